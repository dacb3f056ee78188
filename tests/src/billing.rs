//! Support for the billing-sync tests: usage and customer fixtures in a test's own
//! ClickHouse database, billing-sync settings for them, and the checks every billing test
//! makes (identifiers, ledger, reconcile). The proxy in front of stripe-mock is
//! [`crate::stripe_proxy`], re-exported here.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::{clickhouse, unique};
use tollgate_billing_sync::ledger::{status, LedgerRow};
use tollgate_billing_sync::push::{PushMetrics, Pusher};
use tollgate_billing_sync::reconcile::{reconcile, Period};
use tollgate_billing_sync::sync::{unix_now, Biller, PassReport};
use tollgate_billing_sync::window::Window;
use tollgate_billing_sync::BillingSettings;
use tollgate_meter_consumer::rows::UsageRow;
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_runtime::shutdown::Shutdown;

pub use crate::stripe_proxy::*;

pub const KEY: &str = "sk_test_123";
pub const HOUR: i64 = 3_600;

// ---------------------------------------------------------------------------------------
// Usage, settings and the ledger.

pub struct Db {
    pub settings: ClickhouseSettings,
    pub client: clickhouse::Client,
}

impl Db {
    pub async fn new(prefix: &str) -> Self {
        let settings = ClickhouseSettings::new(clickhouse(), unique(prefix));
        let client = settings.connect().await.expect("clickhouse answers");
        tollgate_meter_consumer::schema::migrate(&client)
            .await
            .expect("usage tables");
        tollgate_billing_sync::ledger::migrate(&client)
            .await
            .expect("ledger table");
        Self { settings, client }
    }

    pub async fn remove(self) {
        self.client
            .query(&format!("DROP DATABASE {}", self.settings.database))
            .execute()
            .await
            .expect("drop database");
    }
}

#[derive(serde::Serialize, clickhouse::Row)]
pub struct ConsumerRow {
    pub consumer_id: String,
    pub tenant_id: String,
    pub stripe_customer_id: String,
    pub version: i64,
    pub deleted: u8,
}

/// Billable units the test inserted, per (tenant, meter, window start).
pub type Expected = BTreeMap<(String, String, u32), i64>;

/// A billable (or not) usage row as meter-consumer stores it, for the fixtures.
pub fn usage_row(time: u32, tenant: &str, billable: bool, units: &[(&str, i64)]) -> UsageRow {
    UsageRow {
        event_id: unique("ev"),
        time,
        time_ms: 0,
        tenant_id: tenant.to_owned(),
        consumer: format!("c_{tenant}"),
        key_id: String::new(),
        plan: String::new(),
        route: "fixture".to_owned(),
        method: "GET".to_owned(),
        status: 200,
        outcome: "ALLOWED",
        billable: u8::from(billable),
        units_meter: units.iter().map(|(m, _)| (*m).to_owned()).collect(),
        units_value: units.iter().map(|(_, v)| *v).collect(),
        request_bytes: 0,
        response_bytes: 0,
        latency_ms: 0,
        upstream_latency_ms: -1,
        gateway_id: "fixture".to_owned(),
        request_id: String::new(),
        kafka_partition: 0,
        kafka_offset: 0,
        kafka_topic: FIXTURE_TOPIC.into(),
    }
}

const FIXTURE_TOPIC: &str = "billing-fixture";

/// Stores `rows` as meter-consumer does: the raw table, every rollup from the consumer's own
/// rollup functions, then the minutes touched (last, as the consumer writes them), with
/// offsets after every earlier call's.
pub async fn store_as_consumer(client: &clickhouse::Client, mut rows: Vec<UsageRow>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tollgate_meter_consumer::batch;
    static NEXT_OFFSET: AtomicU64 = AtomicU64::new(0);
    if rows.is_empty() {
        return;
    }
    let first = NEXT_OFFSET.fetch_add(rows.len() as u64, Ordering::Relaxed);
    for (i, row) in rows.iter_mut().enumerate() {
        row.kafka_offset = first + i as u64;
    }
    async fn store<R: clickhouse::RowOwned + clickhouse::RowWrite + serde::Serialize>(
        client: &clickhouse::Client,
        table: &str,
        rows: &[R],
    ) {
        let mut insert = client.insert::<R>(table).await.expect("insert");
        for row in rows {
            insert.write(row).await.expect("write row");
        }
        insert.end().await.unwrap_or_else(|e| panic!("{table} committed: {e}"));
    }
    store(client, "usage_events", &rows).await;
    store(client, "usage_meter_minute", &batch::meter_minute(FIXTURE_TOPIC, &rows)).await;
    store(client, "usage_meter_hour", &batch::meter_hour(FIXTURE_TOPIC, &rows)).await;
    store(client, "usage_meter_day", &batch::meter_day(FIXTURE_TOPIC, &rows)).await;
    store(client, "usage_route_day", &batch::route_day(FIXTURE_TOPIC, &rows)).await;
    store(
        client,
        "usage_minutes_touched",
        &batch::minutes_touched(FIXTURE_TOPIC, &rows),
    )
    .await;
}

/// Inserts `events` per tenant per window: each event bills `requests = 1` and
/// `compute_units = 1 + i % 5`, plus one non-billable event that must not count.
pub async fn insert_usage(db: &Db, tenants: &[String], windows: &[Window], events: usize, expected: &mut Expected) {
    let mut rows = Vec::new();
    for tenant in tenants {
        for window in windows {
            for i in 0..=events {
                let billable = i < events;
                let cu = 1 + (i % 5) as i64;
                let time = window.start + (i as u32 * 7) % 3_000;
                rows.push(usage_row(
                    time,
                    tenant,
                    billable,
                    &[("requests", 1), ("compute_units", cu)],
                ));
                if billable {
                    *expected
                        .entry((tenant.clone(), "requests".into(), window.start))
                        .or_default() += 1;
                    *expected
                        .entry((tenant.clone(), "compute_units".into(), window.start))
                        .or_default() += cu;
                }
            }
        }
    }
    store_as_consumer(&db.client, rows).await;
}

pub async fn insert_customers(db: &Db, tenants: &[String], customer_of: impl Fn(&str) -> Option<String>) {
    let mut insert = db.client.insert::<ConsumerRow>("consumers").await.expect("insert");
    for tenant in tenants {
        insert
            .write(&ConsumerRow {
                consumer_id: format!("c_{tenant}"),
                tenant_id: tenant.clone(),
                stripe_customer_id: customer_of(tenant).unwrap_or_default(),
                version: 1,
                deleted: 0,
            })
            .await
            .expect("write consumer");
    }
    insert.end().await.expect("consumers committed");
}

pub fn settings(db: &Db, stripe_url: &str, extra_stripe: &str) -> BillingSettings {
    let text = format!(
        r#"
[clickhouse]
url = "{url}"
database = "{database}"

[stripe]
api_base = "{stripe_url}"
{extra_stripe}

[billing]
window_secs = 3600
lateness_secs = 300
poll_interval_secs = 1

[[meters]]
meter = "requests"
event_name = "tollgate_requests"

[[meters]]
meter = "compute_units"
event_name = "tollgate_compute_units"

[admin]
listen = "127.0.0.1:0"
"#,
        url = db.settings.url,
        database = db.settings.database,
    );
    tollgate_runtime::settings::from_str_with_env(&text, "test.toml", Vec::new()).expect("valid test settings")
}

pub async fn ledger(db: &Db) -> Vec<LedgerRow> {
    db.client
        .query("SELECT ?fields FROM billing_ledger FINAL ORDER BY tenant_id, meter, window_start, revision")
        .fetch_all()
        .await
        .expect("read ledger")
}

pub fn biller(db: &Db, settings: &BillingSettings) -> Biller {
    let api = tollgate_billing_sync::stripe::client(&settings.stripe, KEY).expect("stripe client");
    let pusher = Pusher::new(api, &settings.stripe, PushMetrics::noop(), Shutdown::default());
    Biller::new(db.client.clone(), settings.clone(), pusher)
}

/// Runs passes until one has nothing left to retry.
pub async fn settle(biller: &Biller) -> PassReport {
    let mut total = PassReport::default();
    for _ in 0..10 {
        let report = biller.pass(unix_now()).await.expect("pass");
        total.pushed += report.pushed;
        total.failed += report.failed;
        total.unbillable += report.unbillable;
        total.adjustments += report.adjustments;
        if report.unresolved == 0 {
            return total;
        }
    }
    panic!("pushes still unresolved after 10 passes");
}

pub fn closed_windows(hours_ago: &[i64]) -> Vec<Window> {
    let now = unix_now();
    hours_ago
        .iter()
        .map(|h| Window::containing(now - h * HOUR, 3_600))
        .collect()
}

pub fn tenants(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}_{i:03}")).collect()
}

/// The month periods covering `windows`, for reconcile.
pub fn periods(windows: &[Window]) -> Vec<Period> {
    let mut out: Vec<Period> = Vec::new();
    for w in windows {
        let date = chrono_month(w.start as i64);
        let period: Period = date.parse().expect("period");
        if !out.contains(&period) {
            out.push(period);
        }
    }
    out
}

pub fn chrono_month(t: i64) -> String {
    // Civil date from Unix days (Howard Hinnant's algorithm): year and month only.
    let days = t.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year}-{month:02}")
}

pub async fn assert_reconciles(db: &Db, settings: &BillingSettings, windows: &[Window]) {
    for period in periods(windows) {
        let report = reconcile(&db.client, settings, period, unix_now())
            .await
            .expect("reconcile");
        assert!(!report.differs(), "reconcile differs:\n{report}");
    }
}

/// Per identifier: every request carried the same idempotency key, value and customer, and
/// stripe-mock accepted it at least once.
pub fn assert_consistent_identifiers(seen: &[Seen]) -> HashMap<String, Seen> {
    let mut first: HashMap<String, Seen> = HashMap::new();
    let mut accepted: HashSet<String> = HashSet::new();
    for s in seen {
        assert!(!s.identifier.is_empty(), "a meter event without identifier");
        assert!(!s.idempotency_key.is_empty(), "{}: no Idempotency-Key", s.identifier);
        if s.upstream.is_some_and(|code| (200..300).contains(&code)) {
            accepted.insert(s.identifier.clone());
        }
        if let Some(upstream) = s.upstream {
            assert!(
                (200..300).contains(&upstream),
                "stripe-mock refused {}: {upstream}",
                s.identifier
            );
        }
        let f = first.entry(s.identifier.clone()).or_insert_with(|| s.clone());
        assert_eq!(
            f.idempotency_key, s.idempotency_key,
            "{}: idempotency key changed",
            s.identifier
        );
        assert_eq!(f.value, s.value, "{}: value changed between attempts", s.identifier);
        assert_eq!(
            f.customer, s.customer,
            "{}: customer changed between attempts",
            s.identifier
        );
    }
    for id in first.keys() {
        assert!(accepted.contains(id), "{id}: never reached stripe-mock");
    }
    first
}

/// The pushed ledger rows match the distinct identifiers the proxy saw, one per revision, and
/// pushed plus unbillable units equal the inserted units.
pub fn assert_ledger_exact(
    rows: &[LedgerRow],
    by_identifier: &HashMap<String, Seen>,
    expected: &Expected,
    unbillable: &HashSet<String>,
) {
    let pushed: Vec<&LedgerRow> = rows.iter().filter(|r| r.status == status::PUSHED).collect();
    assert_eq!(
        pushed.len(),
        by_identifier.len(),
        "one pushed revision per identifier seen"
    );
    let mut accounted: Expected = BTreeMap::new();
    for row in rows {
        assert!(
            row.status == status::PUSHED || row.status == status::UNBILLABLE,
            "unexpected ledger row {row:?}"
        );
        if row.status == status::PUSHED {
            let seen = by_identifier
                .get(&row.identifier)
                .unwrap_or_else(|| panic!("ledger identifier {} never sent", row.identifier));
            assert_eq!(seen.value, row.value, "{}", row.identifier);
            assert_eq!(seen.customer, row.stripe_customer_id);
            assert!(row.attempts >= 1);
        } else {
            assert!(unbillable.contains(&row.tenant_id), "{row:?}");
        }
        *accounted
            .entry((row.tenant_id.clone(), row.meter.clone(), row.window_start))
            .or_default() += row.value;
    }
    assert_eq!(&accounted, expected);
}

pub fn customer_of(unbillable: &HashSet<String>) -> impl Fn(&str) -> Option<String> + '_ {
    move |tenant| (!unbillable.contains(tenant)).then(|| format!("cus_{tenant}"))
}

// ---------------------------------------------------------------------------------------
// Provisioning: a catalogue and settings with `[catalogue]` and `[provisioning]`.

/// Two priced plans: `starter` (a fee, requests with included units, compute units) and
/// `professional` (another fee and other unit prices). `requests_price` is starter's.
pub fn catalogue_text(requests_price: &str) -> String {
    format!(
        r#"
[plans.starter]
currency = "usd"
monthly_fee_minor = 2900
meters.requests = {{ unit_price_minor = "{requests_price}", included_units = 10 }}
meters.compute_units = {{ unit_price_minor = "0.25" }}

[plans.professional]
currency = "usd"
monthly_fee_minor = 9900
meters.requests = {{ unit_price_minor = "0.008" }}
meters.compute_units = {{ unit_price_minor = "0.1" }}
"#
    )
}

/// Writes `text` to a catalogue file of the test's own; returns its path.
pub fn write_catalogue(text: &str) -> String {
    let path = std::env::temp_dir().join(format!("{}.toml", unique("tollgate-plans")));
    std::fs::write(&path, text).expect("write catalogue");
    path.display().to_string()
}

/// Settings text for billing-sync with a catalogue and provisioning on `keys_topic`.
pub fn provisioning_settings_text(db: &Db, stripe_url: &str, keys_topic: &str, catalogue: &str) -> String {
    format!(
        r#"
[clickhouse]
url = "{url}"
database = "{database}"

[stripe]
api_base = "{stripe_url}"
max_requests_per_second = 0
initial_backoff_ms = 50
max_backoff_ms = 500

[billing]
window_secs = 3600
lateness_secs = 300
poll_interval_secs = 1

[[meters]]
meter = "requests"
event_name = "tollgate_requests"

[[meters]]
meter = "compute_units"
event_name = "tollgate_compute_units"

[admin]
listen = "127.0.0.1:0"

[catalogue]
path = "{catalogue}"

[provisioning]
keys_topic = "{keys_topic}"
proration_behavior = "none"

[provisioning.kafka]
brokers = "{kafka}"
"#,
        url = db.settings.url,
        database = db.settings.database,
        kafka = crate::kafka(),
    )
}

pub fn provisioning_settings(db: &Db, stripe_url: &str, keys_topic: &str, catalogue: &str) -> BillingSettings {
    let text = provisioning_settings_text(db, stripe_url, keys_topic, catalogue);
    tollgate_runtime::settings::from_str_with_env(&text, "test.toml", Vec::new()).expect("valid test settings")
}

/// Each tenant's `billing_customers` row: (customer, subscription, plan, status, last error).
pub async fn customer_rows(db: &Db) -> HashMap<String, (String, String, String, String, String)> {
    #[derive(serde::Deserialize, clickhouse::Row)]
    struct Row {
        tenant_id: String,
        stripe_customer_id: String,
        subscription_id: String,
        plan: String,
        status: String,
        last_error: String,
    }
    let rows: Vec<Row> = db
        .client
        .query(
            "SELECT tenant_id, stripe_customer_id, subscription_id, plan, status, last_error \
             FROM billing_customers FINAL",
        )
        .fetch_all()
        .await
        .expect("read billing_customers");
    rows.into_iter()
        .map(|r| {
            (
                r.tenant_id,
                (r.stripe_customer_id, r.subscription_id, r.plan, r.status, r.last_error),
            )
        })
        .collect()
}
