//! The shipper loop: reads the spool in order and ships each batch to the usage topic as one
//! Kafka transaction that also commits the spool position after it
//! ([`super::transactions`]); then saves that position in the spool's own file too.
//!
//! In: spooled records and the writer's notifications. Out: Kafka messages keyed by tenant;
//! the spool position, in Kafka and on disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::FutureProducer;
use tokio::sync::Notify;

use super::metrics::EventMetrics;
use super::record::split_record;
use super::spool::{self, SpoolReader};
use super::transactions;

/// Most spool records shipped in one Kafka transaction.
const SHIP_BATCH_RECORDS: usize = 2000;

/// How the pipeline tells the shipper to finish: `closing` ships what is spooled and ends;
/// `stop` ends at once (what is left stays in the spool).
#[derive(Default)]
pub(crate) struct ShipperControl {
    pub(crate) written: Notify,
    pub(crate) closing: AtomicBool,
    pub(crate) stop: Notify,
    /// Kafka answered the gateway's start-up check: until then the shipper opens no
    /// connection, so a gateway refusing to start for an unreachable broker says so last.
    pub(crate) kafka_checked: Notify,
}

/// What the shipper ships with: the transactional producer, the consumer its spool position
/// is committed through, the usage topic and this spool's epoch.
pub(crate) struct Shipping {
    pub(crate) producer: FutureProducer,
    /// Its settings, for a new producer when this one is stuck in a call.
    pub(crate) producer_config: rdkafka::ClientConfig,
    /// Client settings for the consumer the spool position is read back through.
    pub(crate) kafka: rdkafka::ClientConfig,
    pub(crate) service_id: String,
    pub(crate) topic: String,
    pub(crate) epoch: String,
}

/// Starts shipping: registers the transactional id (aborting what a crashed instance left
/// open), catches the spool up with the position Kafka committed (a crash after a commit but
/// before the position file), then ships batch after batch. Retries until Kafka answers;
/// stops on shutdown, or for good if another producer took over this gateway's id.
pub(crate) async fn ship_loop(
    mut reader: SpoolReader,
    shipping: Shipping,
    metrics: Arc<EventMetrics>,
    control: Arc<ShipperControl>,
    mut from_earlier_run: u64,
    ship_interval: Duration,
) {
    let Shipping {
        mut producer,
        producer_config,
        kafka,
        service_id,
        topic,
        epoch,
    } = shipping;
    tokio::select! {
        _ = control.kafka_checked.notified() => {}
        _ = control.stop.notified() => return,
    }
    let mut positions = match transactions::positions_consumer(&kafka, &service_id) {
        Ok(consumer) => Arc::new(consumer),
        Err(err) => {
            tracing::error!(error = %err, "usage topic: cannot create the position consumer; shipping stopped, events stay in the spool");
            return;
        }
    };
    let retry = Duration::from_millis(500);
    // The transactions' group metadata comes from the first consumer; reads may replace it.
    let group_consumer = Arc::clone(&positions);
    let fresh_positions = || transactions::positions_consumer(&kafka, &service_id).map(Arc::new);
    let init = |producer: FutureProducer| {
        let (positions, topic, epoch, control) = (&group_consumer, &topic, &epoch, &control);
        async move {
            loop {
                let init = transactions::TransactionalShipper::init(producer.clone(), positions, topic, epoch);
                let result = tokio::select! {
                    result = init => result,
                    _ = control.stop.notified() => return None,
                };
                match result {
                    Ok(shipper) => return Some(shipper),
                    Err(transactions::ShipError::Fatal(reason)) => {
                        tracing::error!(%reason, "usage topic: shipping stopped; events stay in the spool");
                        return None;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "usage topic: transactions not ready yet; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(retry) => {}
                            _ = control.stop.notified() => return None,
                        }
                    }
                }
            }
        }
    };
    let Some(mut shipper) = init(producer.clone()).await else {
        return;
    };
    if catch_up(
        &mut positions,
        &fresh_positions,
        &mut reader,
        &topic,
        &epoch,
        &metrics,
        &control,
        &mut from_earlier_run,
    )
    .await
    .is_none()
    {
        return;
    }
    let mut next_ship = Instant::now();
    loop {
        // Writes wake the wait only to see whether SIGTERM's closing came with them.
        while Instant::now() < next_ship && !control.closing.load(Ordering::Acquire) {
            tokio::select! {
                _ = tokio::time::sleep_until(next_ship.into()) => {}
                _ = control.written.notified() => {}
                _ = control.stop.notified() => return,
            }
        }
        let batch = match reader.read_batch(SHIP_BATCH_RECORDS) {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(error = %err, "spool read failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.skipped > 0 {
            metrics.corrupt.increment(batch.skipped);
            tracing::warn!(records = batch.skipped, "spool: damaged records skipped");
        }
        if batch.records.is_empty() {
            if control.closing.load(Ordering::Acquire) {
                return;
            }
            tokio::select! {
                _ = control.written.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = control.stop.notified() => return,
            }
            continue;
        }
        let bytes: u64 = batch.records.iter().map(|r| spool::record_bytes(r.len())).sum();
        let records: Vec<(&[u8], &[u8])> = batch.records.iter().filter_map(|r| split_record(r)).collect();
        let started = Instant::now();
        let shipped = tokio::select! {
            result = shipper.ship(&records, batch.next) => result,
            _ = control.stop.notified() => return,
        };
        match shipped {
            Ok(()) => {
                let count = batch.records.len() as u64;
                // A short batch means the spool is drained: let the next one gather (a full
                // batch goes at once; the wait ends early for SIGTERM's closing).
                if batch.records.len() < SHIP_BATCH_RECORDS {
                    next_ship = started + ship_interval;
                }
                metrics.produced.increment(count);
                let replayed = count.min(from_earlier_run);
                from_earlier_run -= replayed;
                metrics.replayed.increment(replayed);
                metrics.replay_pending.decrement(replayed as f64);
                metrics.delivery_seconds.record(started.elapsed().as_secs_f64());
                // Kafka holds the position too: a failure here only means the next start
                // reads it from there.
                if let Err(err) = reader.commit(batch.next, bytes) {
                    tracing::error!(error = %err, "spool: cannot save the shipped position");
                }
            }
            Err(failure @ (transactions::ShipError::Fatal(_) | transactions::ShipError::Stuck)) => {
                if let transactions::ShipError::Fatal(reason) = &failure {
                    // librdkafka makes "fenced" fatal both when another producer took this
                    // id and when the coordinator aborted our open transaction on its timeout
                    // (an outage longer than it). Only the first is for good, and it shows:
                    // the other producer commits its own spool's epoch.
                    match transactions::committed_epoch(Arc::clone(&positions), &topic).await {
                        Ok(Some(other)) if other != epoch => {
                            tracing::error!(%reason, "usage topic: another gateway with this service id ships to this topic; shipping stopped, events stay in the spool");
                            return;
                        }
                        Ok(_) => tracing::warn!(%reason, "usage topic: the producer failed for good; replacing it"),
                        Err(err) => {
                            tracing::warn!(%reason, error = %err, "usage topic: the producer failed for good and the committed position is unreadable; retrying");
                            tokio::select! {
                                _ = tokio::time::sleep(retry) => {}
                                _ = control.stop.notified() => return,
                            }
                            continue;
                        }
                    }
                } else {
                    tracing::warn!("usage topic: the producer is stuck in a transactional call; replacing it");
                }
                // The batch is shipped again (the reader did not move) by a new producer,
                // whose registration fences the old one and aborts its transaction.
                producer = match producer_config.create() {
                    Ok(new) => new,
                    Err(err) => {
                        tracing::error!(error = %err, "usage topic: cannot make a new producer; shipping stopped, events stay in the spool");
                        return;
                    }
                };
                let Some(new) = init(producer.clone()).await else {
                    return;
                };
                shipper = new;
                // The stuck call may have been a commit that went through: the batch is not
                // shipped again if the position Kafka holds is already past it.
                if catch_up(
                    &mut positions,
                    &fresh_positions,
                    &mut reader,
                    &topic,
                    &epoch,
                    &metrics,
                    &control,
                    &mut from_earlier_run,
                )
                .await
                .is_none()
                {
                    return;
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "usage topic: batch not shipped; retrying it");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = control.stop.notified() => return,
                }
            }
        }
    }
}

/// Moves the reader to the spool position Kafka committed, when that is past it: the events
/// before it are on the topic already (a crash after a commit but before the position file,
/// or a commit whose answer never came). Called after `init_transactions`, which has settled
/// what an earlier producer of this id left open, so the committed position is stable; read
/// before it, a transaction left open with its position would make the broker answer
/// "unstable" until the transaction timed out. Retries until Kafka answers; `None` on stop.
#[allow(clippy::too_many_arguments)]
async fn catch_up(
    positions: &mut Arc<BaseConsumer>,
    fresh: &impl Fn() -> Result<Arc<BaseConsumer>, rdkafka::error::KafkaError>,
    reader: &mut SpoolReader,
    topic: &str,
    epoch: &str,
    metrics: &EventMetrics,
    control: &ShipperControl,
    from_earlier_run: &mut u64,
) -> Option<()> {
    loop {
        let committed = tokio::select! {
            committed = transactions::committed_position(Arc::clone(positions), topic, epoch) => committed,
            _ = control.stop.notified() => return None,
        };
        match committed {
            Ok(committed) => {
                if let Some(target) = committed.filter(|c| *c > reader.position()) {
                    match reader.skip_to(target) {
                        Ok(passed) => {
                            tracing::info!(events = passed, "spool: events Kafka already had skipped");
                            let passed = passed.min(*from_earlier_run);
                            *from_earlier_run -= passed;
                            metrics.replay_pending.decrement(passed as f64);
                        }
                        Err(err) => tracing::error!(error = %err, "spool: cannot move to the position Kafka committed"),
                    }
                }
                return Some(());
            }
            Err(err) => {
                tracing::warn!(error = %err, "usage topic: cannot read the committed spool position yet; retrying");
                // A consumer made while the broker was still loading its groups has been seen
                // to time out on every later read, past any transaction timeout; a new one
                // reads the position at once.
                match fresh() {
                    Ok(new) => *positions = new,
                    Err(err) => tracing::warn!(error = %err, "usage topic: cannot make a new position consumer"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = control.stop.notified() => return None,
                }
            }
        }
    }
}
