//! The keys-topic mirror: consumers and the API key audit trail, into ClickHouse for finance
//! joins (`consumers`: tenant → Stripe customer) and audits (`key_audit`).
//!
//! In: every partition of the compacted keys topic, from the beginning, on every start
//! (`consumer/<id>` and `key/<id>` records, each the entity's full state; a tombstone
//! deletes; `budget/<tenant>` records are the gateways' and are passed over). Out:
//! `consumers` rows and `key_audit` rows, in small batches.
//!
//! Every instance mirrors the whole topic, outside the consumer group: the writes are
//! idempotent, so replaying is harmless and needs no watermark.
//! - `consumers` is a `ReplacingMergeTree(version)`: the same record written twice is one row
//!   after `FINAL`. A tombstone carries no version, so it becomes a row with `deleted = 1` and
//!   version one above the highest known for the consumer (in this run or in ClickHouse),
//!   keeping the last known name, tenant and plan. A consumer recreated under the same id
//!   must therefore continue its version numbering, as the admin API does.
//! - `key_audit` is a `ReplacingMergeTree` keyed by key id and the record's Kafka partition
//!   and offset: a replayed record replaces itself. Compaction may drop intermediate states
//!   of a key; the audit keeps every state it saw while they were still on the topic.
//!
//! The action of a key record is read from the record itself: `revoked` when it has a
//! revocation time, `created` (or `rolled`, for the new key of a roll) at version 1,
//! `expired` when its expiry is at or before the record's time, `expiry_set` for a future
//! expiry (a roll's grace deadline on the old key, or an explicit expiry), `updated`
//! otherwise, and `deleted` for a tombstone. Never a secret or its hash.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clickhouse::Client;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;
use serde::Serialize;
use tollgate_runtime::backoff::Backoff;
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_runtime::shutdown::Shutdown;
use tollgate_schemas::{ApiKeyRecord, AvroRecord, BudgetRecord, ConsumerRecord, EntityKey};

use crate::dlq::OncePerSecond;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("keys mirror: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("keys mirror: topic `{0}` has no partitions")]
    NoPartitions(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, clickhouse::Row)]
pub struct ConsumerRow {
    pub consumer_id: String,
    pub name: String,
    pub tenant_id: String,
    pub plan: String,
    pub stripe_customer_id: String,
    pub metadata_json: String,
    pub version: i64,
    pub updated_at: u32,
    pub deleted: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, clickhouse::Row)]
pub struct KeyAuditRow {
    pub key_id: String,
    pub consumer_id: String,
    pub consumer_name: String,
    pub prefix: String,
    pub action: &'static str,
    pub actor: String,
    pub time: u32,
    pub time_ms: u16,
    pub expires_at: u32,
    pub version: i64,
    pub kafka_partition: u32,
    pub kafka_offset: u64,
}

impl ConsumerRow {
    fn from_record(record: ConsumerRecord) -> Self {
        Self {
            consumer_id: record.id,
            name: record.name,
            tenant_id: record.tenant_id.unwrap_or_default(),
            plan: record.plan.unwrap_or_default(),
            stripe_customer_id: record.stripe_customer_id.unwrap_or_default(),
            metadata_json: record.metadata_json,
            version: record.version,
            updated_at: seconds(record.updated_at_ms),
            deleted: 0,
        }
    }
}

/// What happened to a key, read from its record (see the module docs).
pub fn key_action(record: &ApiKeyRecord, record_time_ms: i64) -> (&'static str, i64) {
    if let Some(revoked) = record.revoked_at_ms {
        return ("revoked", revoked);
    }
    if record.version <= 1 {
        let action = if record.rolled_from.is_some() {
            "rolled"
        } else {
            "created"
        };
        return (action, record.created_at_ms);
    }
    match record.expires_at_ms {
        Some(expiry) if expiry <= record_time_ms => ("expired", expiry),
        Some(_) => ("expiry_set", record_time_ms),
        None => ("updated", record_time_ms),
    }
}

fn audit_row(record: ApiKeyRecord, record_time_ms: i64, partition: i32, offset: i64) -> KeyAuditRow {
    let (action, time_ms) = key_action(&record, record_time_ms);
    KeyAuditRow {
        key_id: record.id,
        consumer_id: record.consumer_id,
        consumer_name: record.consumer_name,
        prefix: record.prefix,
        action,
        actor: record.updated_by,
        time: seconds(time_ms),
        time_ms: time_ms.rem_euclid(1000) as u16,
        expires_at: record.expires_at_ms.map_or(0, seconds),
        version: record.version,
        kafka_partition: partition as u32,
        kafka_offset: offset as u64,
    }
}

/// Milliseconds to DateTime seconds, clamped to its range.
fn seconds(ms: i64) -> u32 {
    ms.div_euclid(1000).clamp(0, i64::from(u32::MAX)) as u32
}

/// Mirrors the keys topic until shutdown.
pub async fn run(
    kafka: KafkaSettings,
    topic: String,
    group: String,
    client: Client,
    metrics: Metrics,
    backoff: (Duration, Duration),
    shutdown: Shutdown,
) -> Result<(), KeysError> {
    let consumer: Arc<StreamConsumer> = Arc::new(
        kafka
            .client_config()
            .set("group.id", format!("{group}.keys-mirror"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?,
    );
    let assigner = consumer.clone();
    let topic_for_assign = topic.clone();
    let timeout = Duration::from_millis(kafka.connect_timeout_ms);
    tokio::task::spawn_blocking(move || -> Result<(), KeysError> {
        let metadata = assigner.fetch_metadata(Some(&topic_for_assign), timeout)?;
        let mut tpl = TopicPartitionList::new();
        for t in metadata.topics().iter().filter(|t| t.name() == topic_for_assign) {
            for p in t.partitions() {
                tpl.add_partition_offset(&topic_for_assign, p.id(), Offset::Beginning)?;
            }
        }
        if tpl.count() == 0 {
            return Err(KeysError::NoPartitions(topic_for_assign));
        }
        assigner.assign(&tpl)?;
        Ok(())
    })
    .await
    .expect("keys assignment task does not panic")?;

    let mut mirror = Mirror {
        client,
        metrics,
        backoff,
        shutdown: shutdown.clone(),
        consumers: Vec::new(),
        audit: Vec::new(),
        versions: HashMap::new(),
        last_state: HashMap::new(),
        bad_records: OncePerSecond::default(),
    };
    let mut oldest: Option<Instant> = None;
    loop {
        let flush_at = oldest.map(|t| t + Duration::from_millis(500));
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = sleep_until(flush_at), if flush_at.is_some() => {
                mirror.flush().await;
                oldest = None;
            }
            message = consumer.recv() => match message {
                Ok(message) => {
                    mirror.apply(&message).await;
                    oldest.get_or_insert_with(Instant::now);
                    if mirror.consumers.len() + mirror.audit.len() >= 1000 {
                        mirror.flush().await;
                        oldest = None;
                    }
                }
                Err(err) => {
                    if mirror.bad_records.allow() {
                        tracing::warn!(error = %err, "keys topic read error");
                    }
                }
            },
        }
    }
    mirror.flush().await;
    Ok(())
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

struct Mirror {
    client: Client,
    metrics: Metrics,
    backoff: (Duration, Duration),
    shutdown: Shutdown,
    consumers: Vec<ConsumerRow>,
    audit: Vec<KeyAuditRow>,
    /// Highest version seen per consumer id in this run.
    versions: HashMap<String, i64>,
    /// Last state seen per consumer id, copied into its deletion row.
    last_state: HashMap<String, ConsumerRow>,
    bad_records: OncePerSecond,
}

impl Mirror {
    async fn apply(&mut self, message: &BorrowedMessage<'_>) {
        let key = message
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or_default()
            .to_owned();
        let time_ms = message.timestamp().to_millis().unwrap_or(0);
        match message.payload() {
            None => {
                self.tombstone(&key, time_ms, message.partition(), message.offset())
                    .await
            }
            Some(bytes) => {
                let record = match tollgate_schemas::writer_schema_of(bytes) {
                    Ok(schema) => schema.record,
                    Err(err) => return self.skip(&key, &err.to_string()),
                };
                if record == ConsumerRecord::NAME {
                    match tollgate_schemas::decode::<ConsumerRecord>(bytes) {
                        Ok(record) => {
                            let row = ConsumerRow::from_record(record);
                            let seen = self.versions.entry(row.consumer_id.clone()).or_insert(row.version);
                            *seen = (*seen).max(row.version);
                            self.last_state.insert(row.consumer_id.clone(), row.clone());
                            self.consumers.push(row);
                        }
                        Err(err) => self.skip(&key, &err.to_string()),
                    }
                } else if record == ApiKeyRecord::NAME {
                    match tollgate_schemas::decode::<ApiKeyRecord>(bytes) {
                        Ok(record) => {
                            self.audit
                                .push(audit_row(record, time_ms, message.partition(), message.offset()))
                        }
                        Err(err) => self.skip(&key, &err.to_string()),
                    }
                } else if record == BudgetRecord::NAME {
                    // Budgets (`budget/<tenant>`) are the gateways' to enforce; finance has
                    // nothing to join them with.
                } else {
                    self.skip(&key, &format!("unexpected record type {record}"));
                }
            }
        }
        self.metrics.keys_records(1);
    }

    fn skip(&self, key: &str, reason: &str) {
        if self.bad_records.allow() {
            tracing::warn!(key, reason, "keys record skipped");
        }
    }

    async fn tombstone(&mut self, key: &str, time_ms: i64, partition: i32, offset: i64) {
        let entity = match EntityKey::parse(key) {
            Ok(entity) => entity,
            Err(err) => return self.skip(key, &err.to_string()),
        };
        if let EntityKey::Consumer(id) = entity {
            self.flush().await;
            let stored = self.stored_version(id).await;
            let version = stored.max(self.versions.get(id).copied().unwrap_or(0)) + 1;
            self.versions.insert(id.to_owned(), version);
            let mut row = self.last_state.remove(id).unwrap_or_else(|| ConsumerRow {
                consumer_id: id.to_owned(),
                name: String::new(),
                tenant_id: String::new(),
                plan: String::new(),
                stripe_customer_id: String::new(),
                metadata_json: String::new(),
                version: 0,
                updated_at: 0,
                deleted: 1,
            });
            row.version = version;
            row.deleted = 1;
            row.updated_at = seconds(time_ms);
            self.consumers.push(row);
        } else {
            let id = entity.id();
            self.audit.push(KeyAuditRow {
                key_id: id.to_owned(),
                consumer_id: String::new(),
                consumer_name: String::new(),
                prefix: String::new(),
                action: "deleted",
                actor: String::new(),
                time: seconds(time_ms),
                time_ms: time_ms.rem_euclid(1000) as u16,
                expires_at: 0,
                version: 0,
                kafka_partition: partition as u32,
                kafka_offset: offset as u64,
            });
        }
    }

    /// The highest version ClickHouse holds for consumer `id` (0 when none), retried until
    /// ClickHouse answers or shutdown.
    async fn stored_version(&self, id: &str) -> i64 {
        let mut backoff = Backoff::new(self.backoff.0, self.backoff.1).attempts();
        loop {
            let result = self
                .client
                .query("SELECT max(version) FROM consumers WHERE consumer_id = ?")
                .bind(id)
                .fetch_one::<i64>()
                .await;
            match result {
                Ok(version) => return version,
                Err(_) if self.shutdown.is_triggered() => return 0,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read consumer versions; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Writes what is buffered, retrying until ClickHouse takes it (the writes are
    /// idempotent, so a retry after an unclear failure is harmless) or shutdown.
    async fn flush(&mut self) {
        let mut backoff = Backoff::new(self.backoff.0, self.backoff.1).attempts();
        while !(self.consumers.is_empty() && self.audit.is_empty()) {
            let result = async {
                insert_all(&self.client, "consumers", &self.consumers).await?;
                self.consumers.clear();
                insert_all(&self.client, "key_audit", &self.audit).await?;
                self.audit.clear();
                Ok::<(), clickhouse::error::Error>(())
            }
            .await;
            if let Err(err) = result {
                tracing::warn!(error = %err, "keys mirror insert failed; retrying");
                if self.shutdown.is_triggered() {
                    return;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

async fn insert_all<R>(client: &Client, table: &str, rows: &[R]) -> Result<(), clickhouse::error::Error>
where
    R: clickhouse::RowOwned + clickhouse::RowWrite + Serialize,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client.insert::<R>(table).await?;
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn key(version: i64) -> ApiKeyRecord {
        ApiKeyRecord {
            id: "key_1".to_owned(),
            consumer_id: "c1".to_owned(),
            consumer_name: "acme".to_owned(),
            prefix: "tg_test_ab".to_owned(),
            secret_sha256: [7; 32],
            description: String::new(),
            labels: BTreeMap::new(),
            created_at_ms: 1_000,
            expires_at_ms: None,
            revoked_at_ms: None,
            rolled_from: None,
            version,
            updated_by: "admin".to_owned(),
        }
    }

    #[test]
    fn actions_follow_the_record() {
        assert_eq!(key_action(&key(1), 5_000), ("created", 1_000));
        let mut rolled = key(1);
        rolled.rolled_from = Some("key_0".to_owned());
        assert_eq!(key_action(&rolled, 5_000).0, "rolled");
        let mut grace = key(2);
        grace.expires_at_ms = Some(9_000);
        assert_eq!(key_action(&grace, 5_000), ("expiry_set", 5_000));
        assert_eq!(key_action(&grace, 9_500), ("expired", 9_000));
        let mut revoked = key(3);
        revoked.revoked_at_ms = Some(6_000);
        assert_eq!(key_action(&revoked, 7_000), ("revoked", 6_000));
        assert_eq!(key_action(&key(4), 7_000), ("updated", 7_000));
    }

    #[test]
    fn audit_rows_never_hold_the_hash() {
        let row = audit_row(key(1), 5_000, 0, 3);
        let text = format!("{row:?}");
        assert!(!text.contains("[7, 7"), "{text}");
        assert_eq!(
            (row.key_id.as_str(), row.action, row.kafka_offset),
            ("key_1", "created", 3)
        );
    }
}
