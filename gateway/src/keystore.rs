//! The keys topic as the gateway's database: replay at start, follow, write and wait.
//!
//! In: the compacted keys topic (`consumer/<id>` and `key/<id>` records, full state each,
//! tombstones delete). Out: the shared [`Directory`], kept current by a follower task, and
//! [`KeyStore::write`], which answers only after the broker acknowledged the record
//! (`acks=all`) and this replica applied it, so an admin call's effect is visible on this
//! replica the moment it returns and on every other within one follow cycle.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_schemas::{decode, ApiKeyRecord, BudgetRecord, ConsumerRecord, EntityKey};

use crate::directory::Directory;

/// How long an admin write waits for the broker and the local replica.
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("keys topic {topic}: {reason}")]
    Kafka { topic: String, reason: String },
    #[error("keys topic {topic}: the record was acknowledged but not applied within {WRITE_TIMEOUT:?}")]
    NotApplied { topic: String },
}

/// Positions applied so far, per partition: the next offset to apply.
type Applied = HashMap<i32, i64>;

#[derive(Clone)]
pub struct KeyStore {
    directory: Arc<RwLock<Directory>>,
    producer: FutureProducer,
    topic: String,
    applied: watch::Receiver<Applied>,
}

impl KeyStore {
    /// Replays the topic up to its current end, then follows it in the background.
    pub async fn start(kafka: &KafkaSettings, topic: &str) -> Result<Self, StoreError> {
        let kafka_error = |e: rdkafka::error::KafkaError| StoreError::Kafka {
            topic: topic.to_owned(),
            reason: e.to_string(),
        };
        let producer: FutureProducer = kafka
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .create()
            .map_err(kafka_error)?;
        let consumer: StreamConsumer = kafka
            .client_config()
            // No group: every replica reads the whole topic itself.
            .set("group.id", "tollgate-gateway-keys-unused")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // Revocations reach every replica within one fetch wait.
            .set("fetch.wait.max.ms", "50")
            .create()
            .map_err(kafka_error)?;
        let ends = end_offsets(kafka, topic).await?;
        let mut assignment = TopicPartitionList::new();
        for partition in ends.keys() {
            assignment
                .add_partition_offset(topic, *partition, Offset::Beginning)
                .map_err(kafka_error)?;
        }
        consumer.assign(&assignment).map_err(kafka_error)?;

        let directory = Arc::new(RwLock::new(Directory::default()));
        let (applied_tx, applied) = watch::channel(ends.keys().map(|p| (*p, 0)).collect::<Applied>());
        tokio::spawn(follow(consumer, Arc::clone(&directory), applied_tx));
        let store = Self {
            directory,
            producer,
            topic: topic.to_owned(),
            applied,
        };
        for (partition, end) in ends {
            store.wait_applied(partition, end).await?;
        }
        Ok(store)
    }

    pub fn directory(&self) -> &Arc<RwLock<Directory>> {
        &self.directory
    }

    /// Writes one record (`None`: a tombstone) and waits until this replica applied it.
    pub async fn write(&self, key: &str, payload: Option<Vec<u8>>) -> Result<(), StoreError> {
        let mut record = FutureRecord::<str, Vec<u8>>::to(&self.topic).key(key);
        if let Some(payload) = payload.as_ref() {
            record = record.payload(payload);
        }
        let delivery = self
            .producer
            .send(record, WRITE_TIMEOUT)
            .await
            .map_err(|(e, _)| StoreError::Kafka {
                topic: self.topic.clone(),
                reason: e.to_string(),
            })?;
        self.wait_applied(delivery.partition, delivery.offset + 1).await
    }

    async fn wait_applied(&self, partition: i32, next: i64) -> Result<(), StoreError> {
        let mut applied = self.applied.clone();
        let reached = tokio::time::timeout(WRITE_TIMEOUT, async {
            applied
                .wait_for(|a| a.get(&partition).is_some_and(|at| *at >= next))
                .await
                .is_ok()
        })
        .await;
        match reached {
            Ok(true) => Ok(()),
            _ => Err(StoreError::NotApplied {
                topic: self.topic.clone(),
            }),
        }
    }
}

/// The end (high watermark) of every partition of `topic`: what replay must reach.
async fn end_offsets(kafka: &KafkaSettings, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
    let kafka = kafka.clone();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let fail = |reason: String| StoreError::Kafka {
            topic: topic.clone(),
            reason,
        };
        let timeout = Duration::from_millis(kafka.connect_timeout_ms);
        let client: BaseConsumer = kafka.client_config().create().map_err(|e| fail(e.to_string()))?;
        let metadata = client
            .fetch_metadata(Some(&topic), timeout)
            .map_err(|e| fail(e.to_string()))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(fail("topic does not exist".to_owned()));
        }
        partitions
            .into_iter()
            .map(|p| {
                client
                    .fetch_watermarks(&topic, p, timeout)
                    .map(|(_, high)| (p, high))
                    .map_err(|e| fail(e.to_string()))
            })
            .collect()
    })
    .await
    .expect("watermark task does not panic")
}

/// Applies every record of the topic, in order, to the directory, forever.
async fn follow(consumer: StreamConsumer, directory: Arc<RwLock<Directory>>, applied: watch::Sender<Applied>) {
    loop {
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(error = %err, "keys topic: fetch failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let key = message.key().map(String::from_utf8_lossy).unwrap_or_default();
        apply(&directory, &key, message.payload());
        let (partition, next) = (message.partition(), message.offset() + 1);
        applied.send_modify(|a| {
            a.insert(partition, next);
        });
    }
}

/// Applies one record; a record this version cannot read is skipped and logged, never fatal
/// (a newer gateway may write kinds an older one does not know).
fn apply(directory: &RwLock<Directory>, key: &str, payload: Option<&[u8]>) {
    let mut directory = directory.write().expect("directory lock");
    match EntityKey::parse(key) {
        Ok(EntityKey::Consumer(id)) => match payload.map(decode::<ConsumerRecord>).transpose() {
            Ok(record) => {
                if let Err(invalid) = directory.try_apply_consumer(id, record.as_ref()) {
                    skipped_invalid(key, &invalid);
                }
            }
            Err(err) => tracing::warn!(record = key, error = %err, "keys topic: undecodable consumer record skipped"),
        },
        Ok(EntityKey::ApiKey(id)) => match payload.map(decode::<ApiKeyRecord>).transpose() {
            Ok(record) => directory.apply_key(id, record.as_ref()),
            Err(err) => tracing::warn!(record = key, error = %err, "keys topic: undecodable key record skipped"),
        },
        Ok(EntityKey::Budget(tenant)) => match payload.map(decode::<BudgetRecord>).transpose() {
            Ok(record) => directory.apply_budget(tenant, record.as_ref()),
            Err(err) => tracing::warn!(record = key, error = %err, "keys topic: undecodable budget record skipped"),
        },
        Err(_) => tracing::warn!(record = key, "keys topic: record of unknown kind skipped"),
    }
}

/// A record on the topic that breaks the identity rules (written before they existed, or by
/// another writer): skipped, and logged with its record key at most once per 10 s (the rest
/// are counted in the next line).
fn skipped_invalid(key: &str, invalid: &crate::directory::InvalidConsumer) {
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    static LAST_LOG_MS: AtomicI64 = AtomicI64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = chrono::Utc::now().timestamp_millis();
    let last = LAST_LOG_MS.load(Ordering::Relaxed);
    if now - last >= 10_000
        && LAST_LOG_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        tracing::warn!(record = key, reason = %invalid, suppressed, "keys topic: invalid consumer record skipped");
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
}
