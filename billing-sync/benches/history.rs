//! Benchmark: a billing pass does not grow with history. Two databases hold 1M and 10M rows
//! of usage over the 45-day lookback (100 tenants × 2 meters, already billed: the ledger
//! accounts for every closed window), as meter-consumer stores them: raw events, rollups
//! with one row per bucket per batch of 1,000 events, minutes touched stamped two hours ago.
//! Then, in each, the same new work arrives: events in the window that closed last and late
//! events in a window ten days old, stored as the consumer stores them. Timed per database:
//! - the first pass of a process (compares the whole lookback, from the rollups);
//! - the next pass, which finds the new work from the minutes touched (the figure the goal
//!   is about: at most 1.2× from 1M to 10M rows);
//! - an idle pass after it;
//! - the query every pass ran before (billable units per window summed from the raw events
//!   over the lookback), as the baseline.
//!
//! Needs the native stack (`scripts/stack up --infra`). Run with
//! `cargo bench -p tollgate-billing-sync --bench history` (`-- --rows N,M` to resize).
//! Addresses from `TOLLGATE_TEST_CLICKHOUSE` and `TOLLGATE_TEST_STRIPE`, as the tests.

use std::time::{Duration, Instant};

use clickhouse::Client;
use tollgate_billing_sync::push::{PushMetrics, Pusher};
use tollgate_billing_sync::sync::{unix_now, Biller};
use tollgate_billing_sync::usage;
use tollgate_billing_sync::window::Window;
use tollgate_billing_sync::BillingSettings;
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_runtime::shutdown::Shutdown;

mod support;

const KEY: &str = "sk_test_123";
const TENANTS: u64 = 100;
const HOUR: u32 = 3_600;
const DAY: u32 = 86_400;
/// Events per consumer batch in the history: each batch writes its own rollup rows.
const BATCH: u64 = 1_000;

fn var_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

struct Timings {
    rows: u64,
    first: Duration,
    next: Duration,
    idle: Duration,
    raw_scan: Duration,
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<u64> = args
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000_000, 10_000_000]);
    let clickhouse_url = var_or("TOLLGATE_TEST_CLICKHOUSE", "http://127.0.0.1:8123");
    let stripe_url = format!(
        "{}/",
        var_or("TOLLGATE_TEST_STRIPE", "http://127.0.0.1:12111").trim_end_matches('/')
    );
    let mut results = Vec::new();
    for rows in sizes {
        results.push(run(&clickhouse_url, &stripe_url, rows).await);
    }
    for t in &results {
        println!(
            "history {:>10} rows: first pass {:>8.3} s, next pass (new work) {:>6.3} s, idle pass {:>6.3} s; \
             raw per-window scan (every pass before) {:>7.3} s",
            t.rows,
            t.first.as_secs_f64(),
            t.next.as_secs_f64(),
            t.idle.as_secs_f64(),
            t.raw_scan.as_secs_f64()
        );
    }
    if let [small, .., large] = results.as_slice() {
        let ratio = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64().max(1e-9);
        println!(
            "ratio {}M/{}M rows: next pass {:.2}x (goal <= 1.2x), idle pass {:.2}x, first pass {:.2}x, raw scan {:.2}x",
            large.rows / 1_000_000,
            small.rows / 1_000_000,
            ratio(small.next, large.next),
            ratio(small.idle, large.idle),
            ratio(small.first, large.first),
            ratio(small.raw_scan, large.raw_scan),
        );
    }
}

async fn run(clickhouse_url: &str, stripe_url: &str, rows: u64) -> Timings {
    let database = format!("bench_history_{rows}_{}", std::process::id());
    let ch = ClickhouseSettings::new(clickhouse_url.to_owned(), database.clone());
    let client = ch
        .connect()
        .await
        .expect("clickhouse answers (scripts/stack up --infra)");
    tollgate_meter_consumer::schema::migrate(&client)
        .await
        .expect("usage tables");
    tollgate_billing_sync::ledger::migrate(&client).await.expect("ledger");

    let now = unix_now();
    // Windows close 300 s after they end (the default lateness).
    let last_closed = Window::containing(now - 300 - i64::from(HOUR), u64::from(HOUR));
    let history_from = last_closed.start - 44 * DAY;
    let loading = Instant::now();
    history(&client, rows, history_from, last_closed.start).await;
    println!(
        "history {rows} rows over 44 days loaded in {:.1} s",
        loading.elapsed().as_secs_f64()
    );

    let settings = settings(clickhouse_url, &database, stripe_url);
    let api = tollgate_billing_sync::stripe::client(&settings.stripe, KEY).expect("stripe client");
    let pusher = Pusher::new(api, &settings.stripe, PushMetrics::noop(), Shutdown::default());
    let biller = Biller::new(client.clone(), settings.clone(), pusher);

    // The first pass of a process compares the whole lookback; the last closed window has
    // no usage yet, so it finds nothing.
    let started = Instant::now();
    let first = biller.pass(now).await.expect("first pass");
    let first_took = started.elapsed();
    assert_eq!(first.pushed, 0, "history is already billed: {first:?}");

    // New work: every tenant in the window that just closed, and late events for ten of
    // them in a window ten days old.
    let late = Window::containing(i64::from(last_closed.start - 10 * DAY), u64::from(HOUR));
    let mut fresh = Vec::new();
    for t in 0..TENANTS {
        for i in 0..20u32 {
            fresh.push(support::usage_row(
                last_closed.start + i * 61,
                &format!("tenant_{t:03}"),
                fresh.len() as u64,
            ));
        }
    }
    for t in 0..10 {
        fresh.push(support::usage_row(
            late.start + 30,
            &format!("tenant_{t:03}"),
            fresh.len() as u64,
        ));
    }
    support::store(&client, &fresh).await;
    let started = Instant::now();
    let next = biller.pass(now).await.expect("next pass");
    let next_took = started.elapsed();
    assert_eq!(
        next.pushed as u64,
        TENANTS * 2 + 10 * 2,
        "the closed window for every tenant and meter, and the late revisions: {next:?}"
    );

    let started = Instant::now();
    let idle = biller.pass(now).await.expect("idle pass");
    let idle_took = started.elapsed();
    assert_eq!(idle.pushed, 0, "{idle:?}");

    let meters: Vec<String> = settings.meters.iter().map(|m| m.meter.clone()).collect();
    let started = Instant::now();
    let lookback = (history_from, last_closed.end);
    raw_per_window(&client, lookback, &meters).await;
    let raw_took = started.elapsed();

    client
        .query(&format!("DROP DATABASE {database}"))
        .execute()
        .await
        .expect("drop database");
    Timings {
        rows,
        first: first_took,
        next: next_took,
        idle: idle_took,
        raw_scan: raw_took,
    }
}

/// What every pass summed before: billable units per window and meter from the raw events.
async fn raw_per_window(client: &Client, (from, to): (u32, u32), meters: &[String]) {
    let sql = "SELECT toUInt32(intDiv(toUInt32(time), 3600) * 3600) AS ws, units.meter AS m, sum(units.value) AS u \
               FROM usage_events ARRAY JOIN units \
               WHERE billable = 1 AND time >= toDateTime(?) AND time < toDateTime(?) AND has(?, units.meter) \
               GROUP BY ws, m";
    let rows: Vec<usage::WindowUsage> = client
        .query(sql)
        .bind(from)
        .bind(to)
        .bind(meters)
        .fetch_all()
        .await
        .expect("raw scan");
    assert!(!rows.is_empty());
}

/// `rows` events spread evenly over `[from, to)`, their rollups (one row per bucket per
/// batch of `BATCH` events), minutes touched stamped two hours ago, customers, and a ledger
/// that accounts for every window of the history as pushed.
async fn history(client: &Client, rows: u64, from: u32, to: u32) {
    let span = u64::from(to - from);
    let statements = [
        format!(
            "INSERT INTO usage_events (event_id, time, tenant_id, billable, units.meter, units.value, \
                 kafka_topic, kafka_partition, kafka_offset) \
             SELECT toString(number), toDateTime({from} + intDiv(number * {span}, {rows})), \
                    concat('tenant_', substring(toString(1000 + number % {TENANTS}), 2, 3)), 1, \
                    ['requests', 'compute_units'], [toInt64(1), toInt64(number % 5 + 1)], 'history', 0, number \
             FROM system.numbers LIMIT {rows}"
        ),
        rollup("usage_meter_minute", "minute", "toStartOfMinute(time)"),
        rollup("usage_meter_hour", "hour", "toStartOfHour(time)"),
        "INSERT INTO usage_minutes_touched (minute, kafka_topic, kafka_partition, kafka_offset, inserted_at) \
         SELECT toStartOfMinute(time) AS m, 'history', 0, max(kafka_offset), now() - 7200 \
         FROM usage_events GROUP BY m"
            .to_owned(),
        "INSERT INTO consumers (consumer_id, tenant_id, stripe_customer_id, version, deleted) \
         SELECT concat('c_', tenant_id), tenant_id, concat('cus_', tenant_id), 1, 0 \
         FROM usage_events GROUP BY tenant_id"
            .to_owned(),
        "INSERT INTO billing_ledger (tenant_id, stripe_customer_id, meter, event_name, window_start, window_end, \
             revision, value, window_total, identifier, status, stripe_ref, error, attempts, created_at, updated_at, \
             row_version) \
         SELECT tenant_id, concat('cus_', tenant_id), meter, concat('tollgate_', meter), hour, hour + 3600, 0, u, u, \
                concat(tenant_id, '-', meter, '-', toString(toUInt32(hour))), 'pushed', '', '', 1, now(), now(), 1 \
         FROM (SELECT tenant_id, meter, hour, sum(billable_units) AS u FROM usage_meter_hour \
               GROUP BY tenant_id, meter, hour)"
            .to_owned(),
    ];
    for sql in statements {
        client
            .query(&sql)
            .with_setting("max_execution_time", "600")
            .execute()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// A rollup of the history as the consumer writes it: per batch of `BATCH` events, one row
/// per tenant, meter and bucket, stamped with the batch's last offset.
fn rollup(table: &str, column: &str, bucket: &str) -> String {
    format!(
        "INSERT INTO {table} (tenant_id, meter, {column}, events, billable_events, units, billable_units, \
             kafka_topic, kafka_partition, kafka_offset) \
         SELECT tenant_id, meter, {bucket} AS b, count(), sum(billable), sum(value), sum(value * billable), \
                'history', 0, max(kafka_offset) \
         FROM usage_events ARRAY JOIN units.meter AS meter, units.value AS value \
         GROUP BY tenant_id, meter, b, intDiv(kafka_offset, {BATCH})"
    )
}

fn settings(clickhouse_url: &str, database: &str, stripe_url: &str) -> BillingSettings {
    let text = format!(
        r#"
[clickhouse]
url = "{clickhouse_url}"
database = "{database}"
[stripe]
api_base = "{stripe_url}"
max_requests_per_second = 0
max_concurrent_requests = 32
[billing]
window_secs = 3600
lateness_secs = 300
lookback_days = 45
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
    tollgate_runtime::settings::from_str_with_env(&text, "bench.toml", Vec::new()).expect("settings")
}
