//! Exactly once from the spool to Kafka: each shipped batch is one Kafka transaction that
//! also records how far the spool has been shipped.
//!
//! In: a batch of spool records and the spool position after it. Out: the records on the
//! usage topic and, in the same transaction, the position as a consumer-group offset of the
//! gateway's own (group `tollgate.spool.<service id>`, on partition 0 of the usage topic,
//! with the spool's epoch as the offset's metadata). Readers of the usage topic read
//! committed records only (librdkafka's default `isolation.level`).
//!
//! Why: the spool's own position file is written after Kafka acknowledged a batch, so a crash
//! between the two, or a crash while Kafka had taken part of a batch (an outage that began
//! mid-batch), would send those records again at the next start, at new offsets, and the
//! meter would count them twice. Here the batch and the position commit together or not at
//! all: at start the gateway takes the later of its position file and the committed offset,
//! and `init_transactions` aborts whatever the crashed instance left open, so its records
//! never become visible.
//!
//! The transactional id is `tollgate-gateway-<service id>`: two gateways with one service id
//! fence each other, and the one whose spool did not commit the topic's position last stops
//! shipping, loudly; so the id must be unique per replica, as its spool directory already is.
//! A fence without another gateway (the coordinator aborting a transaction left open through
//! an outage longer than `TRANSACTION_TIMEOUT_MS`) replaces the producer and ships on.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::spool::Position;

/// How long one transactional call to the broker may take before it is retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Our own deadline around a transactional call: librdkafka can block in
/// `send_offsets_to_transaction` past its timeout when the broker went away mid-transaction
/// (its coordinator request timeout is never checked), so a call that has not returned by
/// then is given up and the producer replaced.
const STUCK_AFTER: Duration = Duration::from_secs(20);
/// Longest a transaction may stay open on the broker; a message not acknowledged by then
/// fails and the batch is tried again in a new transaction.
pub const TRANSACTION_TIMEOUT_MS: u64 = 60_000;

/// Why a batch did not ship.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// Kafka refused or did not answer in time; the transaction was (or will be) aborted and
    /// the batch can be tried again.
    #[error("usage topic: {0}")]
    Retry(String),
    /// Another producer with this transactional id took over, or the producer is broken:
    /// shipping stops, the events stay in the spool.
    #[error("usage topic: transactional producer unusable: {0}")]
    Fatal(String),
    /// A call did not return by our own deadline: the producer is stuck in it. A new
    /// producer with the same transactional id fences it and aborts its transaction.
    #[error("usage topic: a transactional call did not return within {}s", STUCK_AFTER.as_secs())]
    Stuck,
}

fn classify(err: KafkaError) -> ShipError {
    if matches!(&err, KafkaError::Transaction(e) if e.is_fatal()) {
        ShipError::Fatal(err.to_string())
    } else {
        ShipError::Retry(err.to_string())
    }
}

/// The consumer group whose offset on the usage topic records this gateway's spool position.
pub fn position_group(service_id: &str) -> String {
    format!("tollgate.spool.{service_id}")
}

/// Producer settings for transactional shipping.
pub fn configure(config: &mut ClientConfig, service_id: &str) {
    config
        .set("transactional.id", format!("tollgate-gateway-{service_id}"))
        .set("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS.to_string())
        // Must not exceed the transaction timeout; a message that times out fails its batch,
        // which is aborted and shipped again (nothing of an aborted transaction is visible).
        .set("message.timeout.ms", (TRANSACTION_TIMEOUT_MS - 5_000).to_string());
}

/// A spool position as an offset: the segment number in the high half, the byte offset
/// (segments are at most 1 GiB) in the low half.
fn encode(position: Position) -> i64 {
    ((position.segment as i64) << 32) | (position.offset as i64 & 0xffff_ffff)
}

fn decode(offset: i64) -> Position {
    Position {
        segment: (offset >> 32) as u64,
        offset: (offset & 0xffff_ffff) as u64,
    }
}

pub struct TransactionalShipper {
    producer: FutureProducer,
    group: Arc<ConsumerGroupMetadata>,
    topic: String,
    epoch: String,
    /// An abort that timed out: librdkafka goes on with it in the background and refuses
    /// every other transactional call ("conflicting abort_transaction call in progress")
    /// until the abort is called again and completes.
    abort_pending: std::sync::atomic::AtomicBool,
}

impl TransactionalShipper {
    /// Registers the transactional id with the broker, aborting any transaction a previous
    /// instance left open. Retries until the broker answers; `Fatal` if it fences us.
    pub async fn init(
        producer: FutureProducer,
        positions: &BaseConsumer,
        topic: &str,
        epoch: &str,
    ) -> Result<Self, ShipError> {
        let group = positions
            .group_metadata()
            .ok_or_else(|| ShipError::Fatal("the positions consumer has no group".to_owned()))?;
        let blocking = producer.clone();
        run_blocking(move || blocking.init_transactions(CALL_TIMEOUT)).await?;
        Ok(Self {
            producer,
            group: Arc::new(group),
            topic: topic.to_owned(),
            epoch: epoch.to_owned(),
            abort_pending: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Ships `records` (key and body each) and the position after them in one transaction.
    pub async fn ship(&self, records: &[(&[u8], &[u8])], next: Position) -> Result<(), ShipError> {
        use std::sync::atomic::Ordering;
        if self.abort_pending.load(Ordering::Acquire) {
            let producer = self.producer.clone();
            run_blocking(move || producer.abort_transaction(CALL_TIMEOUT)).await?;
            self.abort_pending.store(false, Ordering::Release);
        }
        let producer = self.producer.clone();
        run_blocking(move || producer.begin_transaction()).await?;
        match self.produce_and_commit(records, next).await {
            Ok(()) => Ok(()),
            Err(err @ (ShipError::Fatal(_) | ShipError::Stuck)) => Err(err),
            Err(ShipError::Retry(reason)) => {
                let producer = self.producer.clone();
                // Abort so none of the batch becomes visible; if the broker cannot be reached
                // now, the next ship finishes the abort before it begins anew.
                if let Err(err) = run_blocking(move || producer.abort_transaction(CALL_TIMEOUT)).await {
                    tracing::warn!(error = %err, "usage topic: could not abort a failed transaction yet");
                    self.abort_pending.store(true, Ordering::Release);
                }
                Err(ShipError::Retry(reason))
            }
        }
    }

    async fn produce_and_commit(&self, records: &[(&[u8], &[u8])], next: Position) -> Result<(), ShipError> {
        let mut deliveries = Vec::with_capacity(records.len());
        for (key, body) in records {
            loop {
                match self
                    .producer
                    .send_result(FutureRecord::to(&self.topic).key(*key).payload(*body))
                {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err((err, _)) => return Err(classify(err)),
                }
            }
        }
        for delivery in deliveries {
            // Each message fails by `message.timeout.ms` at the latest.
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((err, _))) => return Err(classify(err)),
                Err(_) => return Err(ShipError::Retry("delivery report dropped".to_owned())),
            }
        }
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&self.topic, 0, Offset::Offset(encode(next)))
            .map_err(classify)?;
        offsets
            .find_partition(&self.topic, 0)
            .expect("just added")
            .set_metadata(self.epoch.clone());
        let (producer, group) = (self.producer.clone(), Arc::clone(&self.group));
        run_blocking(move || producer.send_offsets_to_transaction(&offsets, &group, CALL_TIMEOUT)).await?;
        let producer = self.producer.clone();
        run_blocking(move || producer.commit_transaction(CALL_TIMEOUT)).await
    }
}

async fn run_blocking(call: impl FnOnce() -> Result<(), KafkaError> + Send + 'static) -> Result<(), ShipError> {
    // A call past the deadline keeps its blocking thread until librdkafka returns (or the
    // process exits); the shipper goes on with a new producer.
    tokio::time::timeout(STUCK_AFTER, tokio::task::spawn_blocking(call))
        .await
        .map_err(|_| ShipError::Stuck)?
        .map_err(|e| ShipError::Fatal(e.to_string()))?
        .map_err(classify)
}

/// The consumer through which the spool position is committed and read back.
pub fn positions_consumer(kafka: &ClientConfig, service_id: &str) -> Result<BaseConsumer, KafkaError> {
    let mut config = kafka.clone();
    config
        .set("group.id", position_group(service_id))
        .set("enable.auto.commit", "false");
    config.create()
}

/// The spool position the last committed transaction recorded, if it was written for this
/// spool (same epoch): `None` when there is none, or it belongs to an earlier spool.
pub async fn committed_position(
    positions: Arc<BaseConsumer>,
    topic: &str,
    epoch: &str,
) -> Result<Option<Position>, KafkaError> {
    Ok(committed(positions, topic)
        .await?
        .filter(|(_, committed_epoch)| committed_epoch == epoch)
        .map(|(offset, _)| decode(offset)))
}

/// The epoch of the spool whose position was committed last, if any was.
pub async fn committed_epoch(positions: Arc<BaseConsumer>, topic: &str) -> Result<Option<String>, KafkaError> {
    Ok(committed(positions, topic).await?.map(|(_, epoch)| epoch))
}

/// The committed offset and its metadata (a spool epoch).
async fn committed(positions: Arc<BaseConsumer>, topic: &str) -> Result<Option<(i64, String)>, KafkaError> {
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition(topic, 0);
    tokio::task::spawn_blocking(move || {
        let committed = positions.committed_offsets(partitions, CALL_TIMEOUT)?;
        Ok(committed.elements().first().and_then(|element| match element.offset() {
            Offset::Offset(offset) => Some((offset, element.metadata().to_owned())),
            _ => None,
        }))
    })
    .await
    .map_err(|_| KafkaError::Canceled)?
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn a_position_round_trips_through_an_offset(segment in 0u64..(1 << 30), offset in 0u64..(1 << 31)) {
            let position = Position { segment, offset };
            let encoded = encode(position);
            prop_assert!(encoded >= 0, "Kafka offsets are non-negative");
            prop_assert_eq!(decode(encoded), position);
        }

        #[test]
        fn later_positions_are_larger_offsets(a in (0u64..1000, 0u64..(1 << 30)), b in (0u64..1000, 0u64..(1 << 30))) {
            let (pa, pb) = (Position { segment: a.0, offset: a.1 }, Position { segment: b.0, offset: b.1 });
            prop_assert_eq!(pa.cmp(&pb), encode(pa).cmp(&encode(pb)));
        }
    }
}
