//! The in-memory directory of consumers and API keys every gateway replica keeps.
//!
//! In: full-state records (and tombstones) from the keys topic, applied in topic order. Out:
//! authentication answers ("this digest is key K of consumer C, valid now") and the views
//! the admin API lists. Pure state: the Kafka side lives in `keystore`.
//!
//! Names are unique: when two records claim one name (two replicas creating the same
//! consumer at once), the one earlier in the topic wins on every replica, since all apply the
//! same order; the later one is ignored and its writer is told 409.

use std::collections::HashMap;
use std::sync::Arc;

use tollgate_schemas::{ApiKeyRecord, ConsumerRecord};

/// A consumer as the request chain and the admin API see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Consumer {
    pub id: String,
    pub name: String,
    pub tenant_id: String,
    pub plan: Option<String>,
    pub stripe_customer_id: Option<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub version: i64,
}

impl Consumer {
    pub fn from_record(record: &ConsumerRecord) -> Self {
        let metadata = serde_json::from_str::<serde_json::Value>(&record.metadata_json)
            .ok()
            .and_then(|v| match v {
                serde_json::Value::Object(m) => Some(m),
                _ => None,
            })
            .unwrap_or_default();
        Self {
            id: record.id.clone(),
            name: record.name.clone(),
            // A consumer without a tenant id is its own tenant.
            tenant_id: record.tenant_id.clone().unwrap_or_else(|| record.name.clone()),
            plan: record.plan.clone(),
            stripe_customer_id: record.stripe_customer_id.clone(),
            metadata,
            created_at_ms: record.created_at_ms,
            updated_at_ms: record.updated_at_ms,
            version: record.version,
        }
    }
}

/// Why a presented key does not authenticate. Never shown to the client: every case is the
/// same 401, so a response cannot reveal that a key exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Expired,
    Revoked,
}

/// Who a request is, once its key checked out.
#[derive(Debug, Clone)]
pub struct Identity {
    pub consumer: Arc<Consumer>,
    pub key_id: String,
}

#[derive(Default)]
pub struct Directory {
    consumers: HashMap<String, Arc<Consumer>>,
    id_by_name: HashMap<String, String>,
    keys: HashMap<String, ApiKeyRecord>,
    key_by_digest: HashMap<[u8; 32], String>,
}

impl Directory {
    pub fn apply_consumer(&mut self, id: &str, record: Option<&ConsumerRecord>) {
        match record {
            Some(record) => {
                if let Some(owner) = self.id_by_name.get(&record.name) {
                    if owner != &record.id {
                        return;
                    }
                }
                if let Some(old) = self.consumers.get(&record.id) {
                    if old.name != record.name {
                        self.id_by_name.remove(&old.name);
                    }
                }
                self.id_by_name.insert(record.name.clone(), record.id.clone());
                self.consumers
                    .insert(record.id.clone(), Arc::new(Consumer::from_record(record)));
            }
            None => {
                if let Some(old) = self.consumers.remove(id) {
                    if self.id_by_name.get(&old.name).is_some_and(|owner| owner == id) {
                        self.id_by_name.remove(&old.name);
                    }
                }
            }
        }
    }

    pub fn apply_key(&mut self, id: &str, record: Option<&ApiKeyRecord>) {
        if let Some(old) = self.keys.remove(id) {
            self.key_by_digest.remove(&old.secret_sha256);
        }
        if let Some(record) = record {
            self.key_by_digest.insert(record.secret_sha256, record.id.clone());
            self.keys.insert(record.id.clone(), record.clone());
        }
    }

    /// Looks a key digest up as of `now_ms`.
    pub fn authenticate(&self, digest: &[u8; 32], now_ms: i64) -> Result<Identity, Refusal> {
        let key = self
            .key_by_digest
            .get(digest)
            .and_then(|id| self.keys.get(id))
            .ok_or(Refusal::Unknown)?;
        if key.revoked_at_ms.is_some() {
            return Err(Refusal::Revoked);
        }
        if key.expires_at_ms.is_some_and(|at| at <= now_ms) {
            return Err(Refusal::Expired);
        }
        let consumer = self.consumers.get(&key.consumer_id).ok_or(Refusal::Unknown)?;
        Ok(Identity {
            consumer: Arc::clone(consumer),
            key_id: key.id.clone(),
        })
    }

    pub fn consumer_by_name(&self, name: &str) -> Option<Arc<Consumer>> {
        self.id_by_name.get(name).and_then(|id| self.consumers.get(id)).cloned()
    }

    pub fn consumer_by_id(&self, id: &str) -> Option<Arc<Consumer>> {
        self.consumers.get(id).cloned()
    }

    /// Consumers sorted by name.
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        let mut all: Vec<_> = self.consumers.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// A consumer's keys, oldest first.
    pub fn keys_of(&self, consumer_id: &str) -> Vec<ApiKeyRecord> {
        let mut keys: Vec<_> = self
            .keys
            .values()
            .filter(|k| k.consumer_id == consumer_id)
            .cloned()
            .collect();
        keys.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        keys
    }

    pub fn key(&self, id: &str) -> Option<&ApiKeyRecord> {
        self.keys.get(id)
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn consumer(id: &str, name: &str) -> ConsumerRecord {
        ConsumerRecord {
            id: id.into(),
            name: name.into(),
            tenant_id: Some(format!("tenant_{name}")),
            plan: Some("free".into()),
            stripe_customer_id: None,
            metadata_json: r#"{"tenantId":"t","plan":"free"}"#.into(),
            created_at_ms: 1,
            updated_at_ms: 1,
            version: 1,
            updated_by: "test".into(),
        }
    }

    fn key(id: &str, consumer_id: &str, digest: u8) -> ApiKeyRecord {
        ApiKeyRecord {
            id: id.into(),
            consumer_id: consumer_id.into(),
            consumer_name: "acme".into(),
            prefix: "tg_live_abc".into(),
            secret_sha256: [digest; 32],
            description: String::new(),
            labels: BTreeMap::new(),
            created_at_ms: 1,
            expires_at_ms: None,
            revoked_at_ms: None,
            rolled_from: None,
            version: 1,
            updated_by: "test".into(),
        }
    }

    #[test]
    fn first_claim_on_a_name_wins() {
        let mut d = Directory::default();
        d.apply_consumer("c1", Some(&consumer("c1", "acme")));
        d.apply_consumer("c2", Some(&consumer("c2", "acme")));
        assert_eq!(d.consumer_by_name("acme").unwrap().id, "c1");
        assert!(d.consumer_by_id("c2").is_none());
        // The loser's tombstone leaves the winner alone.
        d.apply_consumer("c2", None);
        assert_eq!(d.consumer_by_name("acme").unwrap().id, "c1");
    }

    #[test]
    fn keys_authenticate_until_revoked_or_expired() {
        let mut d = Directory::default();
        d.apply_consumer("c1", Some(&consumer("c1", "acme")));
        d.apply_key("k1", Some(&key("k1", "c1", 7)));
        let id = d.authenticate(&[7; 32], 10).unwrap();
        assert_eq!((id.consumer.name.as_str(), id.key_id.as_str()), ("acme", "k1"));
        assert_eq!(d.authenticate(&[8; 32], 10).unwrap_err(), Refusal::Unknown);

        let mut expiring = key("k1", "c1", 7);
        expiring.expires_at_ms = Some(100);
        d.apply_key("k1", Some(&expiring));
        assert!(d.authenticate(&[7; 32], 99).is_ok());
        assert_eq!(d.authenticate(&[7; 32], 100).unwrap_err(), Refusal::Expired);

        let mut revoked = key("k1", "c1", 7);
        revoked.revoked_at_ms = Some(5);
        d.apply_key("k1", Some(&revoked));
        assert_eq!(d.authenticate(&[7; 32], 10).unwrap_err(), Refusal::Revoked);

        d.apply_key("k1", None);
        assert_eq!(d.authenticate(&[7; 32], 10).unwrap_err(), Refusal::Unknown);
        assert_eq!(d.key_count(), 0);
    }

    #[test]
    fn deleted_consumer_keys_no_longer_authenticate() {
        let mut d = Directory::default();
        d.apply_consumer("c1", Some(&consumer("c1", "acme")));
        d.apply_key("k1", Some(&key("k1", "c1", 7)));
        d.apply_consumer("c1", None);
        assert_eq!(d.authenticate(&[7; 32], 10).unwrap_err(), Refusal::Unknown);
        assert!(d.consumer_by_name("acme").is_none());
    }
}
