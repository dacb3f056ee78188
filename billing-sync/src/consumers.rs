//! The consumers on the keys topic, as provisioning sees them, and the write-back of a
//! tenant's Stripe customer id into its consumers' records.
//!
//! In: every partition of the compacted keys topic from the beginning (`consumer/<id>`
//! and `budget/<tenant id>` records, full state each; a tombstone deletes; key records are
//! ignored). Out: [`Consumers`], maps kept current by a follower task (budgets are what
//! alerts compare spend with), which says when it has caught up
//! with the topic's end as of start (before that, a missing consumer may just not be read
//! yet, so nothing is cancelled); and [`Consumers::write_back`], which writes a consumer's
//! next version with the customer id, as the admin API writes a metadata change.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tollgate_runtime::shutdown::Shutdown;
use tollgate_schemas::{decode, encode, BudgetRecord, ConsumerRecord, EntityKey};

use crate::settings::ProvisioningSettings;

/// Who write-backs are attributed to in the records.
pub const ACTOR: &str = "billing-sync";
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ConsumersError {
    #[error("keys topic {topic}: {reason}")]
    Kafka { topic: String, reason: String },
}

/// Live consumers by id, as last read from the topic.
#[derive(Clone)]
pub struct Consumers {
    map: Arc<RwLock<HashMap<String, ConsumerRecord>>>,
    budgets: Budgets,
    caught_up: watch::Receiver<bool>,
    producer: FutureProducer,
    topic: String,
    customer_field: String,
}

/// A tenant's live consumers, what provisioning needs of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub tenant_id: String,
    /// The plan of the most recently updated consumer (`None`: no plan named).
    pub plan: Option<String>,
    /// A Stripe customer id an operator (or an earlier write-back) put on a consumer: of the
    /// most recently updated consumer that has one.
    pub stripe_customer_id: Option<String>,
    pub consumers: Vec<ConsumerRecord>,
}

impl Consumers {
    /// Starts following the topic; [`Consumers::wait_caught_up`] says when the records that
    /// were on it at start have all been read.
    pub async fn start(settings: &ProvisioningSettings, shutdown: Shutdown) -> Result<Self, ConsumersError> {
        let topic = settings.keys_topic.clone();
        let kafka_err = |e: rdkafka::error::KafkaError| ConsumersError::Kafka {
            topic: topic.clone(),
            reason: e.to_string(),
        };
        let producer: FutureProducer = settings
            .kafka
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .create()
            .map_err(kafka_err)?;
        let consumer: StreamConsumer = settings
            .kafka
            .client_config()
            // No group: the whole topic, every time.
            .set("group.id", "tollgate-billing-sync-keys-unused")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .map_err(kafka_err)?;
        let timeout = Duration::from_millis(settings.kafka.connect_timeout_ms);
        let (consumer, ends) = {
            let topic = topic.clone();
            tokio::task::spawn_blocking(move || -> Result<_, rdkafka::error::KafkaError> {
                let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
                let mut ends = BTreeMap::new();
                let mut assignment = TopicPartitionList::new();
                for t in metadata.topics().iter().filter(|t| t.name() == topic) {
                    for p in t.partitions() {
                        let (_, high) = consumer.fetch_watermarks(&topic, p.id(), timeout)?;
                        ends.insert(p.id(), high);
                        assignment.add_partition_offset(&topic, p.id(), Offset::Beginning)?;
                    }
                }
                consumer.assign(&assignment)?;
                Ok((consumer, ends))
            })
            .await
            .expect("keys assignment task does not panic")
            .map_err(kafka_err)?
        };
        if ends.is_empty() {
            return Err(ConsumersError::Kafka {
                topic,
                reason: "the topic has no partitions (does it exist?)".to_owned(),
            });
        }
        let map = Arc::new(RwLock::new(HashMap::new()));
        let budgets = Budgets::default();
        let (caught_up_tx, caught_up) = watch::channel(false);
        tokio::spawn(follow(
            consumer,
            (map.clone(), budgets.clone()),
            ends,
            caught_up_tx,
            shutdown,
        ));
        Ok(Self {
            map,
            budgets,
            caught_up,
            producer,
            topic,
            customer_field: settings.stripe_customer_field.clone(),
        })
    }

    pub fn is_caught_up(&self) -> bool {
        *self.caught_up.borrow()
    }

    /// Budgets by tenant id, as last read from the topic.
    pub fn budgets(&self) -> BTreeMap<String, BudgetRecord> {
        let budgets = self.budgets.read().expect("budgets lock");
        budgets.iter().map(|(t, b)| (t.clone(), b.clone())).collect()
    }

    /// Live consumers that have a tenant, grouped by tenant.
    pub fn tenants(&self) -> BTreeMap<String, Tenant> {
        let map = self.map.read().expect("consumers lock");
        let mut by_tenant: BTreeMap<String, Vec<ConsumerRecord>> = BTreeMap::new();
        for record in map.values() {
            if let Some(tenant) = record.tenant_id.as_ref().filter(|t| !t.is_empty()) {
                by_tenant.entry(tenant.clone()).or_default().push(record.clone());
            }
        }
        by_tenant
            .into_iter()
            .map(|(tenant_id, mut consumers)| {
                // Latest first; the id breaks ties so the choice never depends on map order.
                consumers.sort_by(|a, b| b.updated_at_ms.cmp(&a.updated_at_ms).then(a.id.cmp(&b.id)));
                let plan = consumers.first().and_then(|c| c.plan.clone());
                let stripe_customer_id = consumers
                    .iter()
                    .find_map(|c| c.stripe_customer_id.clone().filter(|s| !s.is_empty()));
                let tenant = Tenant {
                    tenant_id: tenant_id.clone(),
                    plan,
                    stripe_customer_id,
                    consumers,
                };
                (tenant_id, tenant)
            })
            .collect()
    }

    /// Writes `consumer`'s next version with `customer` as its Stripe customer id (record
    /// field and metadata), waits for the broker's ack, and applies it locally so the next
    /// look does not write it again.
    pub async fn write_back(&self, consumer: &ConsumerRecord, customer: &str) -> Result<(), ConsumersError> {
        let mut record = consumer.clone();
        let mut metadata: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&record.metadata_json).unwrap_or_default();
        metadata.insert(
            self.customer_field.clone(),
            serde_json::Value::String(customer.to_owned()),
        );
        record.metadata_json = serde_json::Value::Object(metadata).to_string();
        record.stripe_customer_id = Some(customer.to_owned());
        record.version += 1;
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        record.updated_by = ACTOR.to_owned();
        let key = EntityKey::Consumer(&record.id).to_string();
        let payload = encode(&record);
        self.producer
            .send(
                FutureRecord::<str, Vec<u8>>::to(&self.topic)
                    .key(&key)
                    .payload(&payload),
                WRITE_TIMEOUT,
            )
            .await
            .map_err(|(e, _)| ConsumersError::Kafka {
                topic: self.topic.clone(),
                reason: e.to_string(),
            })?;
        apply(&self.map, record);
        Ok(())
    }
}

/// Keeps the newest version of each consumer: the follower may still be reading records
/// older than one this process wrote and applied itself.
fn apply(map: &RwLock<HashMap<String, ConsumerRecord>>, record: ConsumerRecord) {
    let mut map = map.write().expect("consumers lock");
    match map.get(&record.id) {
        Some(current) if current.version > record.version => {}
        _ => {
            map.insert(record.id.clone(), record);
        }
    }
}

type Budgets = Arc<RwLock<HashMap<String, BudgetRecord>>>;

async fn follow(
    consumer: StreamConsumer,
    (map, budgets): (Arc<RwLock<HashMap<String, ConsumerRecord>>>, Budgets),
    ends: BTreeMap<i32, i64>,
    caught_up: watch::Sender<bool>,
    shutdown: Shutdown,
) {
    // Next offset read per partition; caught up once each reaches its end as of start.
    let mut positions: BTreeMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
    let done =
        |positions: &BTreeMap<i32, i64>| ends.iter().all(|(p, end)| positions.get(p).is_some_and(|at| at >= end));
    if done(&positions) {
        let _ = caught_up.send(true);
    }
    loop {
        let message = tokio::select! {
            _ = shutdown.wait() => return,
            m = consumer.recv() => m,
        };
        let message = match message {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!(error = %err, "keys topic read error");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        positions.insert(message.partition(), message.offset() + 1);
        let key = message
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or_default();
        match (EntityKey::parse(key), message.payload()) {
            (Ok(EntityKey::Consumer(id)), None) => {
                map.write().expect("consumers lock").remove(id);
            }
            (Ok(EntityKey::Consumer(_)), Some(bytes)) => match decode::<ConsumerRecord>(bytes) {
                Ok(record) => apply(&map, record),
                Err(err) => tracing::warn!(key, error = %err, "consumer record skipped"),
            },
            (Ok(EntityKey::Budget(tenant)), None) => {
                budgets.write().expect("budgets lock").remove(tenant);
            }
            (Ok(EntityKey::Budget(tenant)), Some(bytes)) => match decode::<BudgetRecord>(bytes) {
                Ok(record) => {
                    budgets.write().expect("budgets lock").insert(tenant.to_owned(), record);
                }
                Err(err) => tracing::warn!(key, error = %err, "budget record skipped"),
            },
            _ => {}
        }
        if !*caught_up.borrow() && done(&positions) {
            let _ = caught_up.send(true);
        }
    }
}
