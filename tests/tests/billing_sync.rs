//! billing-sync over a real ClickHouse and a real stripe-mock: usage inserted by the test is
//! billed exactly once, through a restart, through faults between billing-sync and Stripe,
//! and for late events; what cannot be billed is recorded, and reconcile agrees.
//!
//! stripe-mock validates every request against Stripe's OpenAPI spec but does not deduplicate,
//! so every meter event goes through a proxy in this file that records it (identifier,
//! idempotency key, value) and, in the fault test, injects 429s, 500s, resets and timeouts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tollgate_billing_sync::ledger::{status, LedgerRow};
use tollgate_billing_sync::push::{PushMetrics, Pusher};
use tollgate_billing_sync::reconcile::{reconcile, Period};
use tollgate_billing_sync::sync::{unix_now, Biller, PassReport};
use tollgate_billing_sync::window::Window;
use tollgate_billing_sync::BillingSettings;
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_runtime::shutdown::Shutdown;
use tollgate_tests::{clickhouse, eventually, stripe, unique};

const KEY: &str = "sk_test_123";
const HOUR: i64 = 3_600;

// ---------------------------------------------------------------------------------------
// The proxy between billing-sync and stripe-mock.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Forwarded, answered as stripe-mock answered.
    None,
    /// 429 with `Retry-After: 1`, not forwarded.
    TooMany,
    /// 500 with a Stripe error body, not forwarded.
    ServerError,
    /// The connection is closed without an answer, not forwarded.
    Reset,
    /// Forwarded, then the answer is held past billing-sync's timeout.
    SlowAnswer,
    /// Forwarded, then the connection is closed: Stripe has the event, billing-sync does not know.
    LostAnswer,
    /// 400 with a Stripe error body, as for an unknown customer.
    Refused,
}

#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    identifier: String,
    idempotency_key: String,
    customer: String,
    value: i64,
    fault: Fault,
    /// stripe-mock's status when the request was forwarded.
    upstream: Option<u16>,
}

type Plan = Arc<dyn Fn(usize, &str) -> Fault + Send + Sync>;

struct Proxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Proxy {
    async fn start(plan: Plan) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let upstream: HttpClient<HttpConnector, Full<Bytes>> = HttpClient::builder(TokioExecutor::new()).build_http();
        let target = stripe().trim_end_matches('/').to_owned();
        let state = (seen.clone(), upstream, target, plan, Arc::new(Mutex::new(0usize)));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, upstream, target, plan, count) = state.clone();
                        async move { handle(req, &seen, &upstream, &target, &plan, &count).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

#[derive(Debug)]
struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the fault proxy")
    }
}
impl std::error::Error for Dropped {}

async fn handle(
    req: Request<Incoming>,
    seen: &Mutex<Vec<Seen>>,
    upstream: &HttpClient<HttpConnector, Full<Bytes>>,
    target: &str,
    plan: &Plan,
    count: &Mutex<usize>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
    let is_meter_event = parts.method == hyper::Method::POST && parts.uri.path() == "/v1/billing/meter_events";
    let form: HashMap<String, String> = form_fields(&body);
    let customer = form.get("payload[stripe_customer_id]").cloned().unwrap_or_default();
    let fault = if is_meter_event {
        let n = {
            let mut c = count.lock().unwrap();
            *c += 1;
            *c - 1
        };
        plan(n, &customer)
    } else {
        Fault::None
    };
    let forward = matches!(fault, Fault::None | Fault::SlowAnswer | Fault::LostAnswer);
    let mut answer = None;
    let mut upstream_status = None;
    if forward {
        let mut out = Request::builder()
            .method(parts.method.clone())
            .uri(format!("{target}{}", parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")));
        for (name, value) in &parts.headers {
            if name != hyper::header::HOST {
                out = out.header(name, value);
            }
        }
        let response = upstream
            .request(out.body(Full::new(body.clone())).expect("request"))
            .await
            .expect("stripe-mock answers the proxy");
        let status = response.status();
        let bytes = response.into_body().collect().await.expect("stripe-mock body").to_bytes();
        upstream_status = Some(status.as_u16());
        answer = Some(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(bytes))
                .expect("response"),
        );
    }
    if is_meter_event {
        seen.lock().unwrap().push(Seen {
            at: Instant::now(),
            identifier: form.get("identifier").cloned().unwrap_or_default(),
            idempotency_key: parts
                .headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            customer,
            value: form.get("payload[value]").and_then(|v| v.parse().ok()).unwrap_or(i64::MIN),
            fault,
            upstream: upstream_status,
        });
    }
    let stripe_error = |status: u16, kind: &str, message: &str| {
        let body = format!(r#"{{"error": {{"type": "{kind}", "message": "{message}"}}}}"#);
        let mut response = Response::builder().status(status).header("content-type", "application/json");
        if status == 429 {
            response = response.header("retry-after", "1");
        }
        Ok(response.body(Full::new(Bytes::from(body))).expect("response"))
    };
    match fault {
        Fault::None => Ok(answer.expect("forwarded")),
        Fault::TooMany => stripe_error(429, "rate_limit_error", "too many requests"),
        Fault::ServerError => stripe_error(500, "api_error", "something went wrong"),
        Fault::Refused => stripe_error(400, "invalid_request_error", "No such customer"),
        Fault::Reset | Fault::LostAnswer => Err(Dropped),
        Fault::SlowAnswer => {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            Ok(answer.expect("forwarded"))
        }
    }
}

fn form_fields(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------
// Usage, settings and the ledger.

struct Db {
    settings: ClickhouseSettings,
    client: clickhouse::Client,
}

impl Db {
    async fn new(prefix: &str) -> Self {
        let settings = ClickhouseSettings {
            url: clickhouse(),
            database: unique(prefix),
            user: "default".to_owned(),
        };
        let client = settings.connect().await.expect("clickhouse answers");
        tollgate_meter_consumer::schema::migrate(&client).await.expect("usage tables");
        tollgate_billing_sync::ledger::migrate(&client).await.expect("ledger table");
        Self { settings, client }
    }

    async fn remove(self) {
        self.client
            .query(&format!("DROP DATABASE {}", self.settings.database))
            .execute()
            .await
            .expect("drop database");
    }
}

#[derive(serde::Serialize, clickhouse::Row)]
struct UsageRow {
    event_id: String,
    time: u32,
    tenant_id: String,
    billable: u8,
    #[serde(rename = "units.meter")]
    meters: Vec<String>,
    #[serde(rename = "units.value")]
    values: Vec<i64>,
}

#[derive(serde::Serialize, clickhouse::Row)]
struct ConsumerRow {
    consumer_id: String,
    tenant_id: String,
    stripe_customer_id: String,
    version: i64,
    deleted: u8,
}

/// Billable units the test inserted, per (tenant, meter, window start).
type Expected = BTreeMap<(String, String, u32), i64>;

/// Inserts `events` per tenant per window: each event bills `requests = 1` and
/// `compute_units = 1 + i % 5`, plus one non-billable event that must not count.
async fn insert_usage(db: &Db, tenants: &[String], windows: &[Window], events: usize, expected: &mut Expected) {
    let mut insert = db.client.insert::<UsageRow>("usage_events").await.expect("insert");
    for tenant in tenants {
        for window in windows {
            for i in 0..=events {
                let billable = i < events;
                let cu = 1 + (i % 5) as i64;
                insert
                    .write(&UsageRow {
                        event_id: unique("ev"),
                        time: window.start + (i as u32 * 7) % 3_000,
                        tenant_id: tenant.clone(),
                        billable: u8::from(billable),
                        meters: vec!["requests".into(), "compute_units".into()],
                        values: vec![1, cu],
                    })
                    .await
                    .expect("write usage");
                if billable {
                    *expected.entry((tenant.clone(), "requests".into(), window.start)).or_default() += 1;
                    *expected.entry((tenant.clone(), "compute_units".into(), window.start)).or_default() += cu;
                }
            }
        }
    }
    insert.end().await.expect("usage committed");
}

async fn insert_customers(db: &Db, tenants: &[String], customer_of: impl Fn(&str) -> Option<String>) {
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

fn settings(db: &Db, stripe_url: &str, extra_stripe: &str) -> BillingSettings {
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

async fn ledger(db: &Db) -> Vec<LedgerRow> {
    db.client
        .query("SELECT ?fields FROM billing_ledger FINAL ORDER BY tenant_id, meter, window_start, revision")
        .fetch_all()
        .await
        .expect("read ledger")
}

fn biller(db: &Db, settings: &BillingSettings) -> Biller {
    let api = tollgate_billing_sync::stripe::client(&settings.stripe, KEY).expect("stripe client");
    let pusher = Pusher::new(api, &settings.stripe, PushMetrics::noop(), Shutdown::default());
    Biller::new(db.client.clone(), settings.clone(), pusher)
}

/// Runs passes until one has nothing left to retry.
async fn settle(biller: &Biller) -> PassReport {
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

fn closed_windows(hours_ago: &[i64]) -> Vec<Window> {
    let now = unix_now();
    hours_ago.iter().map(|h| Window::containing(now - h * HOUR, 3_600)).collect()
}

fn tenants(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}_{i:03}")).collect()
}

/// The month periods covering `windows`, for reconcile.
fn periods(windows: &[Window]) -> Vec<Period> {
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

fn chrono_month(t: i64) -> String {
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

async fn assert_reconciles(db: &Db, settings: &BillingSettings, windows: &[Window]) {
    for period in periods(windows) {
        let report = reconcile(&db.client, settings, period, unix_now()).await.expect("reconcile");
        assert!(!report.differs(), "reconcile differs:\n{report}");
    }
}

/// Per identifier: every request carried the same idempotency key, value and customer, and
/// stripe-mock accepted it at least once.
fn assert_consistent_identifiers(seen: &[Seen]) -> HashMap<String, Seen> {
    let mut first: HashMap<String, Seen> = HashMap::new();
    let mut accepted: HashSet<String> = HashSet::new();
    for s in seen {
        assert!(!s.identifier.is_empty(), "a meter event without identifier");
        assert!(!s.idempotency_key.is_empty(), "{}: no Idempotency-Key", s.identifier);
        if s.upstream.is_some_and(|code| (200..300).contains(&code)) {
            accepted.insert(s.identifier.clone());
        }
        if let Some(upstream) = s.upstream {
            assert!((200..300).contains(&upstream), "stripe-mock refused {}: {upstream}", s.identifier);
        }
        let f = first.entry(s.identifier.clone()).or_insert_with(|| s.clone());
        assert_eq!(f.idempotency_key, s.idempotency_key, "{}: idempotency key changed", s.identifier);
        assert_eq!(f.value, s.value, "{}: value changed between attempts", s.identifier);
        assert_eq!(f.customer, s.customer, "{}: customer changed between attempts", s.identifier);
    }
    for id in first.keys() {
        assert!(accepted.contains(id), "{id}: never reached stripe-mock");
    }
    first
}

/// The pushed ledger rows match the distinct identifiers the proxy saw, one per revision, and
/// pushed plus unbillable units equal the inserted units.
fn assert_ledger_exact(rows: &[LedgerRow], by_identifier: &HashMap<String, Seen>, expected: &Expected, unbillable: &HashSet<String>) {
    let pushed: Vec<&LedgerRow> = rows.iter().filter(|r| r.status == status::PUSHED).collect();
    assert_eq!(pushed.len(), by_identifier.len(), "one pushed revision per identifier seen");
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
        *accounted.entry((row.tenant_id.clone(), row.meter.clone(), row.window_start)).or_default() += row.value;
    }
    assert_eq!(&accounted, expected);
}

fn customer_of(unbillable: &HashSet<String>) -> impl Fn(&str) -> Option<String> + '_ {
    move |tenant| (!unbillable.contains(tenant)).then(|| format!("cus_{tenant}"))
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_run_pushes_each_identifier_once_within_the_rate_cap() {
    let db = Db::new("billing_restart").await;
    let proxy = Proxy::start(Arc::new(|_, _| Fault::None)).await;
    let windows = closed_windows(&[3, 2]);
    let tenants = tenants("acme", 30);
    let unbillable: HashSet<String> = tenants[..2].iter().cloned().collect();
    let mut expected = Expected::new();
    insert_usage(&db, &tenants, &windows, 6, &mut expected).await;
    insert_customers(&db, &tenants, customer_of(&unbillable)).await;
    let billable_keys = expected.keys().filter(|(t, _, _)| !unbillable.contains(t)).count();

    // Test-mode rate: 25 calls per second.
    let settings = settings(&db, &proxy.url(), "max_requests_per_second = 25");
    let first = Shutdown::default();
    let service = tokio::spawn(tollgate_billing_sync::run(settings.clone(), KEY.to_owned(), first.clone()));
    eventually("a third of the pushes", Duration::from_secs(30), || {
        let n = proxy.seen().len();
        async move { (n >= billable_keys / 3).then_some(()) }
    })
    .await;
    first.trigger();
    tokio::time::timeout(Duration::from_secs(20), service)
        .await
        .expect("billing-sync stops on shutdown")
        .expect("task")
        .expect("clean exit");
    let at_stop = proxy.seen().len();
    assert!(at_stop < billable_keys, "stopped mid-run ({at_stop} of {billable_keys})");

    let second = Shutdown::default();
    let service = tokio::spawn(tollgate_billing_sync::run(settings.clone(), KEY.to_owned(), second.clone()));
    eventually("every revision settled", Duration::from_secs(60), || {
        let db = &db;
        async move {
            let rows = ledger(db).await;
            let done = rows.iter().filter(|r| r.status == status::PUSHED).count() == billable_keys
                && rows.iter().all(|r| r.status != status::PENDING);
            done.then_some(())
        }
    })
    .await;
    second.trigger();
    tokio::time::timeout(Duration::from_secs(20), service)
        .await
        .expect("billing-sync stops on shutdown")
        .expect("task")
        .expect("clean exit");

    let seen = proxy.seen();
    // No identifier pushed twice: the restart re-sent nothing the ledger had settled.
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for s in &seen {
        *counts.entry(&s.identifier).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "identifiers pushed more than once: {twice:?}");
    let by_identifier = assert_consistent_identifiers(&seen);
    let rows = ledger(&db).await;
    assert_ledger_exact(&rows, &by_identifier, &expected, &unbillable);
    assert_eq!(
        rows.iter().filter(|r| r.status == status::UNBILLABLE).count(),
        unbillable.len() * 2 * windows.len()
    );
    // The rate cap: never more than 25 calls (+1 at the edges) in any one-second span.
    let times: Vec<Instant> = seen.iter().map(|s| s.at).collect();
    for (i, t) in times.iter().enumerate() {
        let in_second = times[i..].iter().take_while(|u| u.duration_since(*t) < Duration::from_secs(1)).count();
        assert!(in_second <= 26, "{in_second} calls within one second");
    }
    assert_reconciles(&db, &settings, &windows).await;
    db.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_between_billing_sync_and_stripe_are_retried_without_duplicates() {
    let db = Db::new("billing_faults").await;
    // Every request of the first 64 gets a fault from this cycle; then Stripe recovers.
    let cycle = [
        Fault::TooMany,
        Fault::None,
        Fault::ServerError,
        Fault::Reset,
        Fault::SlowAnswer,
        Fault::LostAnswer,
        Fault::None,
        Fault::TooMany,
    ];
    let proxy = Proxy::start(Arc::new(move |n, _| if n < 64 { cycle[n % cycle.len()] } else { Fault::None })).await;
    let windows = closed_windows(&[4]);
    let tenants = tenants("globex", 24);
    let mut expected = Expected::new();
    insert_usage(&db, &tenants, &windows, 5, &mut expected).await;
    let unbillable = HashSet::new();
    insert_customers(&db, &tenants, customer_of(&unbillable)).await;

    let settings = settings(
        &db,
        &proxy.url(),
        "max_requests_per_second = 0\ntimeout_ms = 500\ninitial_backoff_ms = 50\nmax_backoff_ms = 400",
    );
    let report = settle(&biller(&db, &settings)).await;
    assert_eq!(report.pushed, expected.len());
    assert_eq!(report.failed, 0);

    let seen = proxy.seen();
    for fault in [Fault::TooMany, Fault::ServerError, Fault::Reset, Fault::SlowAnswer, Fault::LostAnswer] {
        assert!(seen.iter().any(|s| s.fault == fault), "{fault:?} injected");
    }
    let by_identifier = assert_consistent_identifiers(&seen);
    assert_eq!(by_identifier.len(), expected.len(), "one identifier per tenant, meter and window");
    // Retry-After: 1 was honoured.
    for (i, s) in seen.iter().enumerate() {
        if s.fault == Fault::TooMany {
            if let Some(next) = seen[i + 1..].iter().find(|n| n.identifier == s.identifier) {
                assert!(next.at.duration_since(s.at) >= Duration::from_millis(950), "{} retried early", s.identifier);
            }
        }
    }
    let rows = ledger(&db).await;
    assert_ledger_exact(&rows, &by_identifier, &expected, &unbillable);
    assert!(rows.iter().any(|r| r.attempts > 1), "retries are counted");
    assert_reconciles(&db, &settings, &windows).await;
    db.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_refusals_and_old_windows() {
    let db = Db::new("billing_late").await;
    // Stripe refuses one customer; the others are pushed regardless.
    let proxy = Proxy::start(Arc::new(|_, customer| {
        if customer == "cus_initech_002" {
            Fault::Refused
        } else {
            Fault::None
        }
    }))
    .await;
    let windows = closed_windows(&[5]);
    let tenants = tenants("initech", 4);
    let mut expected = Expected::new();
    insert_usage(&db, &tenants, &windows, 3, &mut expected).await;
    let unbillable = HashSet::new();
    insert_customers(&db, &tenants, customer_of(&unbillable)).await;
    let settings = settings(&db, &proxy.url(), "max_requests_per_second = 0");
    let biller = biller(&db, &settings);

    let first = settle(&biller).await;
    assert_eq!((first.pushed, first.failed), (6, 2), "{first:?}");
    let refused = proxy.seen().iter().filter(|s| s.fault == Fault::Refused).count();
    assert_eq!(refused, 2, "a refusal is not retried");
    let rows = ledger(&db).await;
    let failed: Vec<_> = rows.iter().filter(|r| r.status == status::FAILED).collect();
    assert_eq!(failed.len(), 2);
    assert!(failed.iter().all(|r| r.error.contains("400") && r.error.contains("No such customer")), "{failed:?}");
    assert!(failed.iter().all(|r| r.tenant_id == "initech_002" && r.attempts == 1));

    // Late events in the closed window: revision 1 carries only the difference.
    let mut late = Expected::new();
    insert_usage(&db, &tenants[..1], &windows, 2, &mut late).await;
    // And events 40 days old: Stripe no longer accepts them, so they become adjustments.
    let old = vec![Window::containing(unix_now() - 40 * 86_400, 3_600)];
    let mut old_expected = Expected::new();
    insert_usage(&db, &tenants[..1], &old, 1, &mut old_expected).await;
    let before = proxy.seen().len();
    let second = settle(&biller).await;
    assert_eq!((second.pushed, second.adjustments, second.failed), (2, 2, 0), "{second:?}");
    let rows = ledger(&db).await;
    for meter in ["requests", "compute_units"] {
        let key = (tenants[0].clone(), meter.to_owned(), windows[0].start);
        let revisions: Vec<&LedgerRow> = rows
            .iter()
            .filter(|r| (r.tenant_id.clone(), r.meter.clone(), r.window_start) == key)
            .collect();
        assert_eq!(revisions.len(), 2, "{revisions:?}");
        assert_eq!(revisions[0].value, expected[&key]);
        assert_eq!(revisions[1].revision, 1);
        assert_eq!(revisions[1].value, late[&key], "revision 1 pushes only the delta");
        assert_eq!(revisions[1].window_total, expected[&key] + late[&key]);
        assert!(revisions[1].identifier.ends_with(":r1"), "{}", revisions[1].identifier);
        let adjustment = rows
            .iter()
            .find(|r| r.meter == meter && r.window_start == old[0].start)
            .expect("old window recorded");
        assert_eq!(adjustment.status, status::ADJUSTMENT);
        assert_eq!(adjustment.value, old_expected[&(tenants[0].clone(), meter.to_owned(), old[0].start)]);
    }
    let new_pushes: Vec<Seen> = proxy.seen()[before..].to_vec();
    assert_eq!(new_pushes.len(), 2, "only the two deltas are pushed: {new_pushes:?}");
    assert!(new_pushes.iter().all(|s| s.identifier.ends_with(":r1")));

    // Nothing more to do: a further pass pushes nothing.
    let third = biller.pass(unix_now()).await.expect("pass");
    assert_eq!(third, PassReport::default());

    // Reconcile reports the refused tenant's units as a difference.
    let period: Period = chrono_month(i64::from(windows[0].start)).parse().unwrap();
    let report = reconcile(&db.client, &settings, period, unix_now()).await.expect("reconcile");
    assert!(report.differs(), "{report}");
    for ((tenant, _), line) in &report.lines {
        if tenant == "initech_002" {
            assert_eq!(line.pushed, 0);
            assert_eq!(line.difference(), line.clickhouse);
        } else {
            assert_eq!(line.difference(), 0, "{tenant}: {line:?}");
        }
    }
    db.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_push_and_ledger_row_resends_the_same_event() {
    let db = Db::new("billing_crash").await;
    let proxy = Proxy::start(Arc::new(|_, _| Fault::None)).await;
    let windows = closed_windows(&[6]);
    let tenants = tenants("umbrella", 1);
    let mut expected = Expected::new();
    insert_usage(&db, &tenants, &windows, 4, &mut expected).await;
    insert_customers(&db, &tenants, |t| Some(format!("cus_{t}"))).await;
    let settings = settings(&db, &proxy.url(), "max_requests_per_second = 0");

    // What the crashed process did: wrote the revision `pending`, pushed it, and died before
    // recording the outcome.
    let window = windows[0];
    let key = (tenants[0].clone(), "requests".to_owned(), window.start);
    let identifier = tollgate_billing_sync::window::identifier(&tenants[0], "requests", window, 0);
    let now = unix_now() as u32;
    let pending = LedgerRow {
        tenant_id: tenants[0].clone(),
        stripe_customer_id: format!("cus_{}", tenants[0]),
        meter: "requests".to_owned(),
        event_name: "tollgate_requests".to_owned(),
        window_start: window.start,
        window_end: window.end,
        revision: 0,
        value: expected[&key],
        window_total: expected[&key],
        identifier: identifier.clone(),
        status: status::PENDING.to_owned(),
        stripe_ref: String::new(),
        error: String::new(),
        attempts: 0,
        created_at: now,
        updated_at: now,
        row_version: tollgate_billing_sync::ledger::next_row_version(),
    };
    tollgate_billing_sync::ledger::write(&db.client, std::slice::from_ref(&pending))
        .await
        .expect("pending row");
    let api = tollgate_billing_sync::stripe::client(&settings.stripe, KEY).expect("client");
    let crashed = Pusher::new(api, &settings.stripe, PushMetrics::noop(), Shutdown::default());
    let outcome = crashed
        .push(&tollgate_billing_sync::push::MeterEvent {
            event_name: pending.event_name.clone(),
            stripe_customer_id: pending.stripe_customer_id.clone(),
            value: pending.value,
            identifier: identifier.clone(),
            timestamp: window.event_timestamp(),
        })
        .await;
    assert!(matches!(outcome, tollgate_billing_sync::push::PushOutcome::Pushed { .. }), "{outcome:?}");

    // More usage arrived meanwhile: the restarted pass must re-send the recorded event as it
    // was, not a new value under the same identifier.
    let mut late = Expected::new();
    insert_usage(&db, &tenants, &windows, 1, &mut late).await;

    // The restarted process.
    let biller = biller(&db, &settings);
    settle(&biller).await;
    settle(&biller).await;

    let seen = proxy.seen();
    let resent: Vec<&Seen> = seen.iter().filter(|s| s.identifier == identifier).collect();
    assert_eq!(resent.len(), 2, "sent by the crashed process, re-sent once after it");
    let by_identifier = assert_consistent_identifiers(&seen);
    let rows = ledger(&db).await;
    let requests: Vec<&LedgerRow> = rows.iter().filter(|r| r.meter == "requests").collect();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!((requests[0].revision, requests[0].value), (0, expected[&key]));
    assert_eq!(requests[0].identifier, identifier);
    assert_eq!((requests[1].revision, requests[1].value), (1, late[&key]), "the late unit is revision 1");
    for (k, v) in late {
        *expected.entry(k).or_default() += v;
    }
    assert_ledger_exact(&rows, &by_identifier, &expected, &HashSet::new());
    assert_reconciles(&db, &settings, &windows).await;
    db.remove().await;
}
