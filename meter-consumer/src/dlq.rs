//! Dead letters: usage records that cannot be metered, sent to the DLQ topic with why and
//! where they came from, so the partition moves on and nothing disappears silently.
//!
//! In: a record's key and payload, its source partition and offset, and the reason. Out: a
//! message on `topics.dlq` with the original key and payload and headers
//! `tollgate-dlq-reason` (text), `tollgate-dlq-kind` (a bounded reason kind, also the
//! metric's label), `tollgate-source-topic`, `tollgate-source-partition`,
//! `tollgate-source-offset`. A send is retried until the broker acknowledges it: the
//! partition's next batch (holding later offsets) is written only after that.
//!
//! Delivery is at least once: a crash after the dead letter is acknowledged but before a later
//! offset of the partition is stored sends it again on replay (same headers, so duplicates
//! are recognisable by source partition and offset).

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tollgate_runtime::backoff::Backoff;
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_schemas::DecodeError;

use crate::metrics::Metrics;
use crate::sink::{StopSignal, WriteError};

pub const REASON_HEADER: &str = "tollgate-dlq-reason";
pub const KIND_HEADER: &str = "tollgate-dlq-kind";
pub const SOURCE_TOPIC_HEADER: &str = "tollgate-source-topic";
pub const SOURCE_PARTITION_HEADER: &str = "tollgate-source-partition";
pub const SOURCE_OFFSET_HEADER: &str = "tollgate-source-offset";

/// A record that will not be metered, and why.
pub struct DeadLetter<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub kind: &'static str,
    pub reason: String,
}

/// The bounded kind of a decode failure (a metric label and a header).
pub fn decode_kind(err: &DecodeError) -> &'static str {
    match err {
        DecodeError::TooShort { .. } => "too_short",
        DecodeError::BadMagic { .. } => "bad_magic",
        DecodeError::UnknownFingerprint(_) => "unknown_fingerprint",
        DecodeError::WrongRecord { .. } => "wrong_record",
        DecodeError::Body { .. } => "bad_body",
        DecodeError::TrailingBytes { .. } => "trailing_bytes",
    }
}

#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    source_topic: String,
    metrics: Metrics,
    retry_initial: Duration,
    retry_max: Duration,
    log_limit: std::sync::Arc<OncePerSecond>,
}

/// Lets one log line through per wall-clock second.
#[derive(Default)]
pub struct OncePerSecond(std::sync::atomic::AtomicU64);

impl OncePerSecond {
    pub fn allow(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.0.swap(now, std::sync::atomic::Ordering::Relaxed) != now
    }
}

impl DeadLetters {
    pub fn new(
        kafka: &KafkaSettings,
        topic: String,
        source_topic: String,
        metrics: Metrics,
        retry_initial: Duration,
        retry_max: Duration,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let producer = kafka
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()?;
        Ok(Self {
            producer,
            topic,
            source_topic,
            metrics,
            retry_initial,
            retry_max,
            log_limit: Default::default(),
        })
    }

    /// Sends `letter` and waits for the broker's acknowledgement, retrying with capped
    /// backoff; gives up only when `stop` fires.
    pub async fn send(&self, letter: DeadLetter<'_>, stop: &impl StopSignal) -> Result<(), WriteError> {
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: REASON_HEADER,
                value: Some(letter.reason.as_str()),
            })
            .insert(Header {
                key: KIND_HEADER,
                value: Some(letter.kind),
            })
            .insert(Header {
                key: SOURCE_TOPIC_HEADER,
                value: Some(self.source_topic.as_str()),
            })
            .insert(Header {
                key: SOURCE_PARTITION_HEADER,
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: SOURCE_OFFSET_HEADER,
                value: Some(offset.as_str()),
            });
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max).attempts();
        loop {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers.clone());
            if let Some(key) = letter.key {
                record = record.key(key);
            }
            if let Some(payload) = letter.payload {
                record = record.payload(payload);
            }
            match self.producer.send(record, Duration::from_secs(30)).await {
                Ok(_) => break,
                Err((err, _)) => {
                    tracing::warn!(topic = %self.topic, error = %err, "dead letter not acknowledged; retrying");
                    if stop.stopped() {
                        return Err(WriteError::Stopped);
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        self.metrics.dead_letter(letter.kind);
        // Reason text only: the payload may be large or sensitive. At most one line a second;
        // the counter has the full count.
        if self.log_limit.allow() {
            tracing::warn!(
            partition = letter.partition,
            offset = letter.offset,
            kind = letter.kind,
            reason = %letter.reason,
                "usage record dead-lettered"
            );
        }
        Ok(())
    }
}
