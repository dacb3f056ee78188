//! Benchmark: one billing window for 10,000 tenants × 2 meters pushed to stripe-mock with the
//! rate cap off, against a baseline measured in the same run: raw meter-event POSTs to
//! stripe-mock at the same concurrency, with no ClickHouse, ledger or retry logic.
//!
//! Needs the native stack (`scripts/stack up --infra`). Run with
//! `cargo bench -p tollgate-billing-sync --bench push_window` (`-- --tenants N` to resize).
//! Addresses from `TOLLGATE_TEST_CLICKHOUSE` and `TOLLGATE_TEST_STRIPE`, as the tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use tollgate_billing_sync::push::{PushMetrics, Pusher};
use tollgate_billing_sync::sync::{unix_now, Biller};
use tollgate_billing_sync::window::Window;
use tollgate_billing_sync::BillingSettings;
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_runtime::shutdown::Shutdown;

mod support;

const CONCURRENCY: usize = 32;
const KEY: &str = "sk_test_123";

#[derive(serde::Serialize, clickhouse::Row)]
struct ConsumerRow {
    consumer_id: String,
    tenant_id: String,
    stripe_customer_id: String,
    version: i64,
    deleted: u8,
}

fn var_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tenants: usize = args
        .iter()
        .position(|a| a == "--tenants")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let clickhouse_url = var_or("TOLLGATE_TEST_CLICKHOUSE", "http://127.0.0.1:8123");
    let stripe_url = format!(
        "{}/",
        var_or("TOLLGATE_TEST_STRIPE", "http://127.0.0.1:12111").trim_end_matches('/')
    );
    let pushes = tenants * 2;

    // Baseline: the same number of meter-event POSTs, straight to stripe-mock.
    let baseline = raw_posts(&stripe_url, pushes).await;
    println!(
        "baseline  raw POST /v1/billing/meter_events: {pushes} in {:.2} s = {:.0}/s (concurrency {CONCURRENCY})",
        baseline.as_secs_f64(),
        pushes as f64 / baseline.as_secs_f64()
    );

    let database = format!(
        "bench_push_window_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis()
    );
    let ch = ClickhouseSettings::new(clickhouse_url.clone(), database.clone());
    let client = ch
        .connect()
        .await
        .expect("clickhouse answers (scripts/stack up --infra)");
    tollgate_meter_consumer::schema::migrate(&client)
        .await
        .expect("usage tables");
    tollgate_billing_sync::ledger::migrate(&client).await.expect("ledger");
    let window = Window::containing(unix_now() - 2 * 3_600, 3_600);
    let mut usage = Vec::new();
    let mut consumers = client.insert::<ConsumerRow>("consumers").await.expect("insert");
    for t in 0..tenants {
        let tenant = format!("tenant_{t:05}");
        for i in 0..2u32 {
            usage.push(support::usage_row(window.start + 60 * i, &tenant, usage.len() as u64));
        }
        consumers
            .write(&ConsumerRow {
                consumer_id: format!("c_{tenant}"),
                tenant_id: tenant.clone(),
                stripe_customer_id: format!("cus_{tenant}"),
                version: 1,
                deleted: 0,
            })
            .await
            .expect("consumer row");
    }
    support::store(&client, &usage).await;
    consumers.end().await.expect("consumers committed");

    let text = format!(
        r#"
[clickhouse]
url = "{clickhouse_url}"
database = "{database}"
[stripe]
api_base = "{stripe_url}"
max_requests_per_second = 0
max_concurrent_requests = {CONCURRENCY}
[[meters]]
meter = "requests"
event_name = "tollgate_requests"
[[meters]]
meter = "compute_units"
event_name = "tollgate_compute_units"
[admin]
listen = "127.0.0.1:0"
"#
    );
    let settings: BillingSettings =
        tollgate_runtime::settings::from_str_with_env(&text, "bench.toml", Vec::new()).expect("settings");
    let api = tollgate_billing_sync::stripe::client(&settings.stripe, KEY).expect("stripe client");
    let pusher = Pusher::new(api, &settings.stripe, PushMetrics::noop(), Shutdown::default());
    let biller = Biller::new(client.clone(), settings, pusher);

    let start = Instant::now();
    let report = biller.pass(unix_now()).await.expect("pass");
    let took = start.elapsed();
    assert_eq!(report.pushed, pushes, "{report:?}");
    let rate = pushes as f64 / took.as_secs_f64();
    println!(
        "billing-sync one window, {tenants} tenants x 2 meters: {pushes} pushes in {:.2} s = {rate:.0}/s \
         ({:.2}x the baseline; includes ClickHouse reads and ledger writes)",
        took.as_secs_f64(),
        rate / (pushes as f64 / baseline.as_secs_f64()),
    );
    let again = Instant::now();
    let idle = biller.pass(unix_now()).await.expect("pass");
    println!(
        "next pass with nothing to push: {:.3} s ({} windows visited)",
        again.elapsed().as_secs_f64(),
        idle.windows
    );
    client
        .query(&format!("DROP DATABASE {database}"))
        .execute()
        .await
        .expect("drop database");
}

/// `n` meter-event POSTs to stripe-mock, `CONCURRENCY` at a time; returns the wall time.
async fn raw_posts(base: &str, n: usize) -> Duration {
    let http: HttpClient<_, Full<Bytes>> = HttpClient::builder(TokioExecutor::new()).build_http();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let http = http.clone();
        let next = next.clone();
        let uri = format!("{base}v1/billing/meter_events");
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let body = format!(
                    "event_name=tollgate_requests&payload[stripe_customer_id]=cus_{i}&payload[value]=1&identifier=bench-{i}&timestamp={}",
                    unix_now() - 3_600
                );
                let request = hyper::Request::post(&uri)
                    .header("authorization", format!("Bearer {KEY}"))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .header("idempotency-key", format!("bench-{i}"))
                    .body(Full::new(Bytes::from(body)))
                    .expect("request");
                let response = http.request(request).await.expect("stripe-mock answers");
                assert!(response.status().is_success(), "{}", response.status());
                let _ = response.into_body().collect().await;
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    start.elapsed()
}
