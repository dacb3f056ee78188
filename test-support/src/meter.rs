//! Support for meter-consumer's end-to-end tests over the real Kafka and ClickHouse: unique
//! topics and databases, a deterministic usage workload with its expected totals, the totals
//! ClickHouse holds, and a TCP proxy that can cut ClickHouse off.
//!
//! Used by `meter-consumer/tests/`, its benchmark and `tests/tests/meter_*.rs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tollgate_schemas::{encode, Outcome, UsageEvent};

/// One test's own topics, group and database.
#[derive(Clone)]
pub struct Env {
    pub brokers: String,
    pub clickhouse: String,
    pub database: String,
    pub usage: String,
    pub dlq: String,
    pub keys: String,
    pub group: String,
}

impl Env {
    pub async fn new(prefix: &str, partitions: i32) -> Self {
        let brokers = crate::kafka();
        let clickhouse = crate::clickhouse();
        let id = crate::unique(prefix);
        let env = Self {
            brokers,
            clickhouse,
            database: id.clone(),
            usage: format!("{id}.usage"),
            dlq: format!("{id}.dlq"),
            keys: format!("{id}.keys"),
            group: format!("{id}.group"),
        };
        for (topic, partitions) in [(&env.usage, partitions), (&env.dlq, 1), (&env.keys, 1)] {
            crate::create_topic(&env.brokers, topic, partitions, &[]).await;
        }
        env
    }

    /// Settings text for a consumer of this environment, talking to ClickHouse at
    /// `clickhouse_url` (the real one, or a proxy in front of it).
    pub fn settings_toml(&self, clickhouse_url: &str, max_rows: u64, max_wait_ms: u64) -> String {
        self.settings_toml_on(clickhouse_url, max_rows, max_wait_ms, "127.0.0.1:0")
    }

    /// The same, with the ops listener (health, metrics) on `admin_listen`.
    pub fn settings_toml_on(
        &self,
        clickhouse_url: &str,
        max_rows: u64,
        max_wait_ms: u64,
        admin_listen: &str,
    ) -> String {
        format!(
            r#"
[kafka]
brokers = "{brokers}"
[kafka.client]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000"

[topics]
group = "{group}"
usage = "{usage}"
dlq = "{dlq}"
keys = "{keys}"

[clickhouse]
url = "{clickhouse_url}"
database = "{database}"

[batch]
max_rows = {max_rows}
max_wait_ms = {max_wait_ms}
retry_initial_ms = 100
retry_max_ms = 1000
insert_timeout_ms = 10000

[admin]
listen = "{admin_listen}"
"#,
            brokers = self.brokers,
            group = self.group,
            usage = self.usage,
            dlq = self.dlq,
            keys = self.keys,
            database = self.database,
        )
    }

    /// The same settings, parsed and validated (`tollgate_meter_consumer::MeterSettings`).
    pub fn settings<T>(&self, clickhouse_url: &str, max_rows: u64, max_wait_ms: u64) -> T
    where
        T: serde::de::DeserializeOwned + tollgate_runtime::settings::Validate,
    {
        tollgate_runtime::settings::from_str_with_env(
            &self.settings_toml(clickhouse_url, max_rows, max_wait_ms),
            "test settings",
            Vec::new(),
        )
        .expect("test settings are valid")
    }

    pub fn client(&self) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(&self.clickhouse)
            .with_validation(false)
            .with_database(&self.database)
    }

    pub async fn drop_database(&self) {
        clickhouse::Client::default()
            .with_url(&self.clickhouse)
            .with_validation(false)
            .query(&format!("DROP DATABASE IF EXISTS {}", self.database))
            .execute()
            .await
            .expect("drop test database");
    }
}

pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .create()
        .expect("producer")
}

/// Expected totals per (tenant, meter): (units, billable units, events carrying the meter).
pub type Totals = BTreeMap<(String, String), (i64, i64, u64)>;

/// A deterministic workload: `count` events over seven tenants and unauthenticated traffic,
/// three meters, several routes and outcomes; one run of a thousand events in twenty dated
/// in an earlier month (so batches are cut at month boundaries).
pub struct Workload {
    pub events: Vec<(String, Vec<u8>)>,
    pub totals: Totals,
    pub count: u64,
}

pub const METERS: [&str; 3] = ["requests", "compute_units", "response_bytes"];

impl Workload {
    pub fn new(seed: u64, count: u64) -> Self {
        Self::with_late_runs(seed, count, true)
    }

    /// Like `new`; without `late_runs` every event is from the last ten minutes (steady
    /// traffic, as the benchmark wants).
    pub fn with_late_runs(seed: u64, count: u64, late_runs: bool) -> Self {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let mut events = Vec::with_capacity(count as usize);
        let mut totals = Totals::new();
        for i in 0..count {
            let n = i.wrapping_mul(2_654_435_761).wrapping_add(seed);
            let tenant = match n % 8 {
                7 => None,
                t => Some(format!("tenant_{t}")),
            };
            let billable = tenant.is_some() && n % 5 != 0;
            let mut units = BTreeMap::new();
            units.insert("requests".to_owned(), 1);
            if n % 3 != 0 {
                units.insert("compute_units".to_owned(), (n % 17) as i64 + 1);
            }
            if n % 4 == 0 {
                units.insert("response_bytes".to_owned(), (n % 1_000) as i64 * 10);
            }
            let timestamp_ms = if late_runs && (i / 1_000) % 20 == 7 {
                now_ms - 40 * 86_400_000
            } else {
                now_ms - (n % 600_000) as i64
            };
            let event = UsageEvent {
                event_id: uuid::Uuid::now_v7(),
                timestamp_ms,
                tenant_id: tenant.clone(),
                consumer: tenant.as_ref().map(|t| format!("{t}-app")),
                key_id: tenant.as_ref().map(|_| format!("key_{}", n % 3)),
                plan: tenant.as_ref().map(|_| "pro".to_owned()),
                route: format!("route_{}", n % 5),
                method: "GET".to_owned(),
                status: if n % 11 == 0 { 429 } else { 200 },
                outcome: if tenant.is_none() {
                    Outcome::Unauthenticated
                } else if n % 11 == 0 {
                    Outcome::RateLimited
                } else {
                    Outcome::Allowed
                },
                billable,
                units: units.clone(),
                request_bytes: 100,
                response_bytes: 1_000,
                latency_ms: 3,
                upstream_latency_ms: Some(2),
                gateway_id: "gw-test".to_owned(),
                request_id: Some(format!("req-{i}")),
            };
            let tenant_id = tenant.unwrap_or_default();
            for (meter, value) in units {
                let t = totals.entry((tenant_id.clone(), meter)).or_default();
                t.0 += value;
                t.1 += if billable { value } else { 0 };
                t.2 += 1;
            }
            events.push((tenant_id, encode(&event)));
        }
        Self { events, totals, count }
    }
}

/// Produces `records` (key, payload) with `acks=all`, at most `rate` per second if given.
pub async fn produce(producer: &FutureProducer, topic: &str, records: &[(String, Vec<u8>)], rate: Option<u64>) {
    let started = Instant::now();
    for (i, chunk) in records.chunks(2_000).enumerate() {
        // Enqueued at once (`send_result`), then every delivery awaited: a chunk is far below
        // the producer's queue limit.
        let mut pending = Vec::with_capacity(chunk.len());
        for (key, payload) in chunk {
            let record = FutureRecord::to(topic).key(key.as_bytes()).payload(payload.as_slice());
            pending.push(producer.send_result(record).map_err(|(e, _)| e).expect("enqueued"));
        }
        for delivery in pending {
            delivery
                .await
                .expect("delivery reported")
                .map_err(|(e, _)| e)
                .expect("broker acked the event");
        }
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(((i + 1) * 2_000) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[derive(Debug, serde::Deserialize, clickhouse::Row)]
struct TotalRow {
    tenant_id: String,
    meter: String,
    units: i64,
    billable_units: i64,
    events: u64,
}

/// Totals per (tenant, meter) as `table` holds them.
pub async fn totals(client: &clickhouse::Client, table: &str) -> Totals {
    let sql = if table == "usage_events" {
        "SELECT tenant_id, meter, sum(value) AS units, sum(value * billable) AS billable_units, count() AS events \
         FROM usage_events ARRAY JOIN units.meter AS meter, units.value AS value GROUP BY tenant_id, meter"
            .to_owned()
    } else {
        format!(
            "SELECT tenant_id, meter, sum(units) AS units, sum(billable_units) AS billable_units, sum(events) AS events \
             FROM {table} GROUP BY tenant_id, meter"
        )
    };
    let rows: Vec<TotalRow> = client.query(&sql).fetch_all().await.unwrap_or_default();
    rows.into_iter()
        .map(|r| ((r.tenant_id, r.meter), (r.units, r.billable_units, r.events)))
        .collect()
}

pub const TOTAL_TABLES: [&str; 5] = [
    "usage_events",
    "usage_meter_minute",
    "usage_meter_hour",
    "usage_meter_day",
    "usage_daily",
];

/// Rows in the raw table, and rows whose event id appears more than once.
pub async fn raw_counts(client: &clickhouse::Client) -> (u64, u64) {
    #[derive(serde::Deserialize, clickhouse::Row)]
    struct Counts {
        rows: u64,
        distinct: u64,
    }
    let counts: Option<Counts> = client
        .query("SELECT count() AS rows, uniqExact(event_id) AS distinct FROM usage_events")
        .fetch_one()
        .await
        .ok();
    counts.map_or((0, 0), |c| (c.rows, c.rows - c.distinct))
}

/// Waits until every table's totals equal `expected` (or `deadline` passes), then asserts
/// they do, that the raw table holds `count` rows with no event twice, and that the
/// tenant × route rollup counts every event once.
pub async fn assert_exact(client: &clickhouse::Client, expected: &Totals, count: u64, deadline: Duration) {
    let started = Instant::now();
    loop {
        let (rows, _) = raw_counts(client).await;
        let mut all = rows == count;
        if all {
            for table in TOTAL_TABLES {
                if &totals(client, table).await != expected {
                    all = false;
                    break;
                }
            }
        }
        if all || started.elapsed() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (rows, duplicated) = raw_counts(client).await;
    assert_eq!(duplicated, 0, "event ids stored twice");
    assert_eq!(rows, count, "raw rows");
    for table in TOTAL_TABLES {
        let found = totals(client, table).await;
        assert_eq!(&found, expected, "totals per tenant and meter in {table}");
    }
    let routed: u64 = client
        .query("SELECT sum(events) FROM usage_route_day")
        .fetch_one()
        .await
        .expect("route rollup");
    assert_eq!(routed, count, "events in usage_route_day");
}

/// Polls until the raw table holds at least `rows` rows.
pub async fn wait_for_rows(client: &clickhouse::Client, rows: u64, deadline: Duration) {
    let started = Instant::now();
    while raw_counts(client).await.0 < rows {
        assert!(
            started.elapsed() < deadline,
            "{rows} rows not stored within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP proxy in front of ClickHouse that a test can cut (every connection dropped, new
/// ones refused) and restore, without touching the shared server.
pub struct CuttableProxy {
    pub url: String,
    up: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl CuttableProxy {
    pub async fn start(target_url: &str) -> Self {
        let target = target_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let up = Arc::new(AtomicBool::new(true));
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let up_accept = up.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !up_accept.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut cut_rx = cut_rx.clone();
                cut_rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Self { url, up, cut }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// A record read back from a topic: its headers and payload.
pub type TopicRecord = (HashMap<String, String>, Option<Vec<u8>>);

/// Every record on `topic` (a fresh group reading from the start) until `count` arrived or
/// `deadline` passed: (headers, payload).
pub async fn read_topic(brokers: &str, topic: &str, count: usize, deadline: Duration) -> Vec<TopicRecord> {
    read_topic_until(brokers, topic, deadline, |records| records.len() >= count).await
}

/// Every record on `topic` (a fresh group reading from the start, committed records only)
/// until `done` holds for what was read or `deadline` passed. For a test that knows what
/// must arrive: a fixed wait would be too short on a loaded machine and too long elsewhere.
pub async fn read_topic_until(
    brokers: &str,
    topic: &str,
    deadline: Duration,
    mut done: impl FnMut(&[TopicRecord]) -> bool,
) -> Vec<TopicRecord> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    use rdkafka::Message;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::unique("meter-test-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let started = Instant::now();
    let mut out = Vec::new();
    while !done(&out) && started.elapsed() < deadline {
        let Ok(Ok(message)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await else {
            continue;
        };
        let mut headers = HashMap::new();
        if let Some(h) = message.headers() {
            for header in h.iter() {
                let value = header
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                headers.insert(header.key.to_owned(), value);
            }
        }
        out.push((headers, message.payload().map(<[u8]>::to_vec)));
    }
    out
}
