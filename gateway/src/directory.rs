//! The in-memory directory of consumers and API keys every gateway replica keeps.
//!
//! In: full-state records (and tombstones) from the keys topic, applied in topic order. Out:
//! authentication answers ("this digest is key K of consumer C, valid now"), each tenant's
//! spend cap (for the `cap` chain step) and the views the admin API lists. Pure state: the Kafka side lives in `keystore`.
//!
//! Names are unique: when two records claim one name (two replicas creating the same
//! consumer at once), the one earlier in the topic wins on every replica, since all apply the
//! same order; the later one is ignored and its writer is told 409.
//!
//! A plan and `metadata.limits` are the tenant's terms, not a consumer's: every key of a tenant
//! is limited by one set of limits. The admin API keeps a tenant's consumers agreeing; where
//! records disagree anyway (written before that rule, or mid-way through the admin API
//! rewriting a tenant's consumers), the tenant's most recently updated consumer rules
//! (`Directory::terms_of`), the same on every replica since all apply the same records.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use tollgate_schemas::{ApiKeyRecord, BudgetRecord, ConsumerRecord};

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
            // Records without one are refused before they get here (`check_consumer`).
            tenant_id: record.tenant_id.clone().unwrap_or_default(),
            plan: record.plan.clone(),
            stripe_customer_id: record.stripe_customer_id.clone(),
            metadata,
            created_at_ms: record.created_at_ms,
            updated_at_ms: record.updated_at_ms,
            version: record.version,
        }
    }
}

/// Why a consumer record is refused: by the admin API before it is written, and at replay
/// for records already on the topic (skipped, counted, logged with the record key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidConsumer {
    #[error("name must be 1 to 128 characters of letters, digits, `-`, `_` and `.`, and not `.` or `..`")]
    Name,
    #[error("tenantId is required")]
    MissingTenant,
    #[error("tenantId must be 1 to 64 characters of a-z, A-Z, 0-9, `_`, `-` and `.`, and not `.` or `..`")]
    Tenant,
    #[error("stripeCustomerId must be `cus_` followed by 1 to 64 letters and digits")]
    StripeCustomer,
}

/// Consumer names travel in admin API paths and identity headers.
pub fn check_name(name: &str) -> Result<(), InvalidConsumer> {
    let ok = (1..=128).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then_some(()).ok_or(InvalidConsumer::Name)
}

/// Tenant ids travel in request paths (`/v1/tenants/{tenantId}/`), headers and Kafka keys:
/// only characters no path normaliser, header parser or key format reads specially.
pub fn check_tenant(tenant: Option<&str>) -> Result<(), InvalidConsumer> {
    let tenant = tenant.ok_or(InvalidConsumer::MissingTenant)?;
    let ok = (1..=64).contains(&tenant.len())
        && tenant != "."
        && tenant != ".."
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then_some(()).ok_or(InvalidConsumer::Tenant)
}

/// Stripe customer ids look like `cus_NffrFeUfNV2Hib`.
pub fn check_stripe_customer(id: Option<&str>) -> Result<(), InvalidConsumer> {
    let Some(id) = id else { return Ok(()) };
    let ok = id
        .strip_prefix("cus_")
        .is_some_and(|rest| (1..=64).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_alphanumeric()));
    ok.then_some(()).ok_or(InvalidConsumer::StripeCustomer)
}

/// Every rule a consumer record must keep.
pub fn check_consumer(record: &ConsumerRecord) -> Result<(), InvalidConsumer> {
    check_name(&record.name)?;
    check_tenant(record.tenant_id.as_deref())?;
    check_stripe_customer(record.stripe_customer_id.as_deref())
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
    /// The consumer whose plan and `metadata.limits` are the tenant's terms (often `consumer`).
    pub terms: Arc<Consumer>,
}

/// Hashes a SHA-256 digest by its first eight bytes: they are already uniformly spread, so
/// SipHash over all 32 (a quarter of a lookup's time) buys nothing. Flooding is not a concern:
/// only digests of keys the gateway generated are stored, so a client choosing what it
/// presents cannot crowd one bucket; an unknown digest costs one short probe like any other.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut first = [0u8; 8];
        let n = bytes.len().min(8);
        first[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(first);
    }

    /// The array's length prefix: the same for every digest.
    fn write_usize(&mut self, _: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Default)]
pub struct Directory {
    consumers: HashMap<String, Arc<Consumer>>,
    id_by_name: HashMap<String, String>,
    keys: HashMap<String, ApiKeyRecord>,
    key_by_digest: HashMap<[u8; 32], String, BuildHasherDefault<DigestHasher>>,
    /// Spend caps by tenant id.
    budgets: HashMap<String, Arc<BudgetRecord>>,
    /// Consumer ids by tenant id.
    members: HashMap<String, Vec<String>>,
    /// The consumer whose terms rule, by tenant id.
    terms: HashMap<String, Arc<Consumer>>,
}

impl Directory {
    /// Applies a consumer record, ignoring one that breaks the rules (see `try_apply_consumer`).
    pub fn apply_consumer(&mut self, id: &str, record: Option<&ConsumerRecord>) {
        let _ = self.try_apply_consumer(id, record);
    }

    /// Applies a consumer record; one that breaks the rules (`check_consumer`) is refused and
    /// leaves the directory as it was (the consumer keeps its last valid state, if any).
    pub fn try_apply_consumer(&mut self, id: &str, record: Option<&ConsumerRecord>) -> Result<(), InvalidConsumer> {
        if let Some(record) = record {
            check_consumer(record)?;
        }
        match record {
            Some(record) => {
                if let Some(owner) = self.id_by_name.get(&record.name) {
                    if owner != &record.id {
                        return Ok(());
                    }
                }
                let consumer = Arc::new(Consumer::from_record(record));
                if let Some(old) = self.consumers.get(&record.id).cloned() {
                    if old.name != record.name {
                        self.id_by_name.remove(&old.name);
                    }
                    self.leave_tenant(&old);
                }
                self.id_by_name.insert(record.name.clone(), record.id.clone());
                self.consumers.insert(record.id.clone(), Arc::clone(&consumer));
                self.members
                    .entry(consumer.tenant_id.clone())
                    .or_default()
                    .push(consumer.id.clone());
                self.rule_tenant(&consumer.tenant_id);
            }
            None => {
                if let Some(old) = self.consumers.remove(id) {
                    if self.id_by_name.get(&old.name).is_some_and(|owner| owner == id) {
                        self.id_by_name.remove(&old.name);
                    }
                    self.leave_tenant(&old);
                }
            }
        }
        Ok(())
    }

    fn leave_tenant(&mut self, old: &Consumer) {
        if let Some(ids) = self.members.get_mut(&old.tenant_id) {
            ids.retain(|member| member != &old.id);
            if ids.is_empty() {
                self.members.remove(&old.tenant_id);
            }
        }
        self.rule_tenant(&old.tenant_id);
    }

    /// Picks the tenant's ruling consumer again: the most recently updated, ties broken by the
    /// smaller id, so every replica picks the same one (billing-sync picks a tenant's plan by
    /// the same rule, `tollgate_billing_sync::consumers`).
    fn rule_tenant(&mut self, tenant: &str) {
        let ruling = self
            .members
            .get(tenant)
            .into_iter()
            .flatten()
            .filter_map(|id| self.consumers.get(id))
            .max_by(|a, b| a.updated_at_ms.cmp(&b.updated_at_ms).then_with(|| b.id.cmp(&a.id)))
            .cloned();
        match ruling {
            Some(consumer) => self.terms.insert(tenant.to_owned(), consumer),
            None => self.terms.remove(tenant),
        };
    }

    /// The consumer whose plan and `metadata.limits` are `tenant`'s terms, if it has consumers.
    pub fn terms_of(&self, tenant: &str) -> Option<Arc<Consumer>> {
        self.terms.get(tenant).cloned()
    }

    /// A tenant's consumers, sorted by name.
    pub fn consumers_of(&self, tenant: &str) -> Vec<Arc<Consumer>> {
        let mut all: Vec<_> = self
            .members
            .get(tenant)
            .into_iter()
            .flatten()
            .filter_map(|id| self.consumers.get(id).cloned())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
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
        let terms = self.terms.get(&consumer.tenant_id).unwrap_or(consumer);
        Ok(Identity {
            consumer: Arc::clone(consumer),
            key_id: key.id.clone(),
            terms: Arc::clone(terms),
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

    /// Applies a budget record (a tombstone removes the tenant's cap).
    pub fn apply_budget(&mut self, tenant: &str, record: Option<&BudgetRecord>) {
        match record {
            Some(record) => {
                self.budgets.insert(tenant.to_owned(), Arc::new(record.clone()));
            }
            None => {
                self.budgets.remove(tenant);
            }
        }
    }

    pub fn budget(&self, tenant: &str) -> Option<Arc<BudgetRecord>> {
        self.budgets.get(tenant).cloned()
    }

    /// Every tenant with a cap: whose month-to-date spend the gateway keeps up to date.
    pub fn budgeted_tenants(&self) -> Vec<String> {
        let mut tenants: Vec<_> = self.budgets.keys().cloned().collect();
        tenants.sort();
        tenants
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
    fn digests_sharing_their_hashed_bytes_still_find_their_own_key() {
        let mut d = Directory::default();
        d.apply_consumer("c1", Some(&consumer("c1", "acme")));
        let (mut a, mut b) = (key("k1", "c1", 7), key("k2", "c1", 7));
        a.secret_sha256[31] = 1;
        b.secret_sha256[31] = 2;
        d.apply_key("k1", Some(&a));
        d.apply_key("k2", Some(&b));
        assert_eq!(d.authenticate(&a.secret_sha256, 0).unwrap().key_id, "k1");
        assert_eq!(d.authenticate(&b.secret_sha256, 0).unwrap().key_id, "k2");
        let mut unknown = a.secret_sha256;
        unknown[31] = 3;
        assert_eq!(d.authenticate(&unknown, 0).unwrap_err(), Refusal::Unknown);
    }

    #[test]
    fn first_claim_on_a_name_wins() {
        let mut d = Directory::default();
        d.try_apply_consumer("c1", Some(&consumer("c1", "acme"))).unwrap();
        d.try_apply_consumer("c2", Some(&consumer("c2", "acme"))).unwrap();
        assert_eq!(d.consumer_by_name("acme").unwrap().id, "c1");
        assert!(d.consumer_by_id("c2").is_none());
        // The loser's tombstone leaves the winner alone.
        d.try_apply_consumer("c2", None).unwrap();
        assert_eq!(d.consumer_by_name("acme").unwrap().id, "c1");
    }

    #[test]
    fn records_breaking_the_identity_rules_are_refused_and_change_nothing() {
        let mut d = Directory::default();
        d.try_apply_consumer("c1", Some(&consumer("c1", "acme"))).unwrap();
        let mut no_tenant = consumer("c1", "acme");
        no_tenant.tenant_id = None;
        assert_eq!(
            d.try_apply_consumer("c1", Some(&no_tenant)),
            Err(InvalidConsumer::MissingTenant)
        );
        assert_eq!(
            d.consumer_by_name("acme").unwrap().tenant_id,
            "tenant_acme",
            "last valid state kept"
        );
        for (tenant, ok) in [
            ("t/1", false),
            ("t%1", false),
            ("t;1", false),
            ("..", false),
            ("t_1.a-B", true),
        ] {
            let mut r = consumer("c9", "other");
            r.tenant_id = Some(tenant.into());
            assert_eq!(check_consumer(&r).is_ok(), ok, "{tenant}");
        }
        for (stripe, ok) in [
            ("cus_ABC123", true),
            ("cus_", false),
            ("cus_a\r\nb", false),
            ("acct_1", false),
        ] {
            let mut r = consumer("c9", "other");
            r.stripe_customer_id = Some(stripe.into());
            assert_eq!(check_consumer(&r).is_ok(), ok, "{stripe}");
        }
        for name in [".", ".."] {
            assert_eq!(check_name(name), Err(InvalidConsumer::Name));
        }
    }

    #[test]
    fn keys_authenticate_until_revoked_or_expired() {
        let mut d = Directory::default();
        d.try_apply_consumer("c1", Some(&consumer("c1", "acme"))).unwrap();
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

    /// One step of a replayed keys topic, over three consumers and two tenants.
    #[derive(Debug, Clone)]
    enum Step {
        Write {
            consumer: usize,
            tenant: usize,
            plan: usize,
            updated_at_ms: i64,
        },
        Delete {
            consumer: usize,
        },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..3usize, 0..2usize, 0..3usize, 0..4i64).prop_map(|(consumer, tenant, plan, updated_at_ms)| Step::Write {
                consumer,
                tenant,
                plan,
                updated_at_ms
            }),
            1 => (0..3usize).prop_map(|consumer| Step::Delete { consumer }),
        ]
    }

    proptest::proptest! {
        /// Whatever the records say and in whatever order they come, every key of a tenant is
        /// limited by the same terms: those of the tenant's most recently updated consumer.
        #[test]
        fn every_key_of_a_tenant_gets_one_set_of_terms(steps in proptest::collection::vec(step(), 1..40)) {
            let mut d = Directory::default();
            let mut live: BTreeMap<usize, (usize, usize, i64)> = BTreeMap::new();
            for i in 0..3u8 {
                d.apply_key(&format!("k{i}"), Some(&key(&format!("k{i}"), &format!("c{i}"), i)));
            }
            for step in steps {
                match step {
                    Step::Write { consumer: c, tenant, plan, updated_at_ms } => {
                        let mut r = consumer(&format!("c{c}"), &format!("n{c}"));
                        r.tenant_id = Some(format!("t{tenant}"));
                        r.plan = Some(format!("p{plan}"));
                        r.updated_at_ms = updated_at_ms;
                        d.try_apply_consumer(&r.id.clone(), Some(&r)).unwrap();
                        live.insert(c, (tenant, plan, updated_at_ms));
                    }
                    Step::Delete { consumer: c } => {
                        d.try_apply_consumer(&format!("c{c}"), None).unwrap();
                        live.remove(&c);
                    }
                }
                for (&c, &(tenant, _, _)) in &live {
                    // The model: latest update wins, the smaller id breaks a tie.
                    let (ruler, _) = live
                        .iter()
                        .filter(|(_, (t, _, _))| *t == tenant)
                        .max_by(|(ia, (_, _, ua)), (ib, (_, _, ub))| ua.cmp(ub).then(ib.cmp(ia)))
                        .unwrap();
                    let identity = d.authenticate(&[c as u8; 32], 0).unwrap();
                    proptest::prop_assert_eq!(&identity.terms.id, &format!("c{ruler}"));
                    proptest::prop_assert_eq!(&identity.terms.plan, &Some(format!("p{}", live[ruler].1)));
                    proptest::prop_assert_eq!(&identity.terms.tenant_id, &format!("t{tenant}"));
                }
                for tenant in 0..2 {
                    let expected: Vec<String> = live
                        .iter()
                        .filter(|(_, (t, _, _))| *t == tenant)
                        .map(|(c, _)| format!("n{c}"))
                        .collect();
                    let names: Vec<String> = d.consumers_of(&format!("t{tenant}")).iter().map(|c| c.name.clone()).collect();
                    proptest::prop_assert_eq!(names, expected);
                }
            }
        }
    }

    #[test]
    fn deleted_consumer_keys_no_longer_authenticate() {
        let mut d = Directory::default();
        d.try_apply_consumer("c1", Some(&consumer("c1", "acme"))).unwrap();
        d.apply_key("k1", Some(&key("k1", "c1", 7)));
        d.try_apply_consumer("c1", None).unwrap();
        assert_eq!(d.authenticate(&[7; 32], 10).unwrap_err(), Refusal::Unknown);
        assert!(d.consumer_by_name("acme").is_none());
    }
}
