//! The SQL the services send to ClickHouse, sent by their own code, and the finance views'
//! numbers, on the real server (Debian's 18.16); with `TOLLGATE_SQL_CAPTURE=<file>`, all of
//! it written to that file for `scripts/chdb-check` to replay on the current ClickHouse.
//!
//! In: meter-consumer's migrations and sink, billing-sync's migrations, one billing pass
//! (against stripe-mock) and reconcile, the README's finance queries, the gateway's
//! spend-cap refresh, billing-sync's alert reads and writes, a fixture of usage events and
//! consumers; everything through
//! [`sql_capture::Recorder`] in front of the server.
//! Out: assertions that 18.16 accepted every statement, that every SQL literal in the
//! services' sources was sent, and that `invoice_preview`, `usage_by_period`, `top_routes`
//! and `usage_hourly` hold the sums computed here from the events, and `invoice_preview`'s
//! amounts and `invoice_totals` what billing-sync's catalogue arithmetic makes of them (with
//! the prices billing-sync wrote to `plan_prices`); and the capture file:
//! the statements in order, the tables' contents, and the view checks with their expected
//! answers, so the current ClickHouse is held to the same numbers.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

mod sql_capture;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate};
use clickhouse::Client;
use sql_capture::{sql_literals, Recorder};
use tollgate_billing_sync::push::{PushMetrics, Pusher};
use tollgate_billing_sync::sync::Biller;
use tollgate_billing_sync::BillingSettings;
use tollgate_meter_consumer::batch::BatchBuilder;
use tollgate_meter_consumer::keys::{ConsumerRow, KeyAuditRow};
use tollgate_meter_consumer::metrics::Metrics;
use tollgate_meter_consumer::rows::{Origin, UsageRow};
use tollgate_meter_consumer::sink::{ClickhouseSink, SinkSettings, Table, TableRows};
use tollgate_runtime::catalogue::Catalogue;
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_runtime::ops::Ops;
use tollgate_runtime::shutdown::Shutdown;
use tollgate_schemas::{Outcome, UsageEvent};
use tollgate_tests::{clickhouse, stripe, unique};

const TOPIC: &str = "tollgate.usage.v1";
/// Prices for the invoice views: tenants a and b are on `starter`, tenant c on a plan the
/// catalogue lacks; the fixture's units cross the included ones and leave fractions to round.
const CATALOGUE: &str = r#"
[plans.starter]
currency = "eur"
monthly_fee_minor = 2900
meters.requests = { unit_price_minor = "0.5", included_units = 3 }
meters.compute_units = { unit_price_minor = "0.125" }

[plans.enterprise]
currency = "usd"
monthly_fee_minor = 49900
"#;
const HOUR: i64 = 3_600;
const DAY: i64 = 86_400;

#[tokio::test]
async fn the_services_sql_runs_on_clickhouse_and_the_finance_views_add_up() {
    let server = clickhouse();
    let recorder = Recorder::start(&server).await;
    let settings = ClickhouseSettings::new(recorder.url(), unique("sqlcheck"));
    let client = settings
        .connect()
        .await
        .expect("clickhouse answers through the recorder");
    tollgate_meter_consumer::schema::migrate(&client)
        .await
        .expect("meter-consumer migrates");
    tollgate_billing_sync::ledger::migrate(&client)
        .await
        .expect("billing-sync migrates");

    let now = tollgate_billing_sync::sync::unix_now();
    let events = fixture(now);
    write_usage(&client, &events).await;
    write_keys(&client).await;
    let catalogue = Catalogue::parse(CATALOGUE, "sqlcheck-plans.toml").expect("catalogue");
    tollgate_billing_sync::prices::publish(&client, &catalogue)
        .await
        .expect("plan prices written");
    bill(&settings, now).await;
    run_readme_queries(&client).await;
    check_spend_refresh(&client, &events, now).await;
    check_alerts(&client, &events, now).await;

    let checks = view_checks(&events, &catalogue);
    for check in &checks {
        assert_eq!(
            tsv(&client, &check.sql).await,
            check.expected,
            "{}: the view's rows on this server",
            check.name
        );
    }

    // Every SQL literal of the services must have reached the server. One the code above
    // cannot reach (a retry or race path) is sent with a sample value for each bind, so the
    // current ClickHouse still sees its text; a `format!` template cannot be, and fails here.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sources: Vec<_> = ["meter-consumer/src", "billing-sync/src", "runtime/src", "gateway/src"]
        .iter()
        .map(|dir| repo.join(dir))
        .collect();
    let literals = sql_literals(&sources.iter().map(|p| p.as_path()).collect::<Vec<_>>());
    assert!(literals.len() >= 20, "the source scan found SQL: {literals:#?}");
    let unsent: Vec<_> = literals.iter().filter(|l| !l.sent_in(&recorder.sent())).collect();
    let templates: Vec<_> = unsent.iter().filter(|l| l.is_template()).collect();
    assert!(
        templates.is_empty(),
        "SQL built with format! that nothing here sends; exercise its code path: {templates:#?}"
    );
    for literal in &unsent {
        eprintln!("sent with sample binds (no test path reaches it): {}", literal.text);
        let sample = literal.text.replace('?', "'sqlcheck'");
        client
            .query(&sample)
            .execute()
            .await
            .unwrap_or_else(|e| panic!("{} from {}: {e}", literal.text, literal.file));
    }

    let sent = recorder.sent();
    let refused: Vec<_> = sent.iter().filter(|s| s.status != 200).collect();
    assert!(refused.is_empty(), "18.16 refused: {refused:#?}");

    if let Ok(path) = std::env::var("TOLLGATE_SQL_CAPTURE") {
        write_capture(&path, &server, &settings.database, &sent, &checks).await;
    }
    direct(&server)
        .query(&format!("DROP DATABASE {}", settings.database))
        .execute()
        .await
        .expect("drop database");
}

/// A client straight to the server, for what is not the services' SQL (export, clean-up).
fn direct(server: &str) -> Client {
    Client::default().with_url(server).with_validation(false)
}

async fn tsv(client: &Client, sql: &str) -> String {
    let bytes = client
        .query(sql)
        .fetch_bytes("TabSeparated")
        .expect("query")
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

// ---------------------------------------------------------------------------------------
// Input.

/// Tenant a: twelve routes with 1..=10, 13 and 15 events (top_routes keeps ten), some rate
/// limited and some upstream errors, and events 40 days back (another month). Tenant b: events
/// over two hours. Tenant c: no Stripe customer. Unauthenticated events: no tenant.
fn fixture(now: i64) -> Vec<UsageEvent> {
    let recent = now - now.rem_euclid(HOUR) - 3 * HOUR;
    let old = recent - 40 * DAY;
    let mut events = Vec::new();
    let mut n = 0i64;
    let mut add = |time: i64, tenant: Option<&str>, route: &str, outcome: Outcome, compute: i64| {
        n += 1;
        let (status, billable) = match outcome {
            Outcome::Allowed => (200, true),
            Outcome::RateLimited => (429, false),
            Outcome::UpstreamError => (502, false),
            _ => (401, false),
        };
        let mut units = BTreeMap::from([("requests".to_owned(), 1)]);
        if compute > 0 {
            units.insert("compute_units".to_owned(), compute);
        }
        events.push(UsageEvent {
            event_id: uuid::Uuid::now_v7(),
            timestamp_ms: time * 1000 + n % 1000,
            tenant_id: tenant.map(str::to_owned),
            consumer: tenant.map(|t| format!("c_{t}")),
            key_id: tenant.map(|_| "key_sqlcheck".to_owned()),
            plan: tenant.map(|_| "starter".to_owned()),
            route: route.to_owned(),
            method: "GET".to_owned(),
            status,
            outcome,
            billable,
            units,
            request_bytes: 100 + n,
            response_bytes: 1_000 + 10 * n,
            latency_ms: 5 + n % 7,
            upstream_latency_ms: billable.then_some(3),
            gateway_id: "gw-sqlcheck".to_owned(),
            request_id: Some(format!("req-{n}")),
        });
    };
    for i in 0..5 {
        add(old + i * 600, Some("tenant_a"), "r01", Outcome::Allowed, 7);
    }
    for r in 1..=12i64 {
        for i in 0..r.min(10) {
            add(
                recent + (r * 7 + i * 37) % (2 * HOUR),
                Some("tenant_a"),
                &format!("r{r:02}"),
                Outcome::Allowed,
                r,
            );
        }
    }
    for i in 0..3 {
        add(recent + 900 + i, Some("tenant_a"), "r11", Outcome::UpstreamError, 0);
    }
    for i in 0..5 {
        add(recent + 1800 + i, Some("tenant_a"), "r12", Outcome::RateLimited, 0);
    }
    for i in 0..20 {
        add(recent + i * 300, Some("tenant_b"), "orders", Outcome::Allowed, 3);
    }
    for i in 0..4 {
        add(recent + 60 * i, Some("tenant_c"), "orders", Outcome::Allowed, 2);
    }
    for i in 0..3 {
        add(recent + 120 * i, None, "", Outcome::Unauthenticated, 0);
    }
    events
}

/// The gateway's spend-cap refresh reads each budgeted tenant's billable units this month,
/// leaving out the events of its own `service.id` since it started: the sums computed here.
async fn check_spend_refresh(client: &Client, events: &[UsageEvent], now: i64) {
    use tollgate_gateway::spend::{refresh, Month};
    let month = Month::of(now * 1000);
    // This gateway started an hour into the recent traffic: its later events are its own.
    let recent = now - now.rem_euclid(HOUR) - 3 * HOUR;
    let own = refresh::Own {
        gateway_id: "gw-sqlcheck".to_owned(),
        started_ms: (recent + HOUR) * 1000,
    };
    let tenants: Vec<String> = ["tenant_a", "tenant_b", "tenant_unknown"].map(str::to_owned).to_vec();
    let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
    for event in events {
        let Some(tenant) = event.tenant_id.as_ref().filter(|t| tenants.contains(t)) else {
            continue;
        };
        let own_event = event.gateway_id == own.gateway_id && event.timestamp_ms >= own.started_ms;
        if event.billable && Month::of(event.timestamp_ms) == month && !own_event {
            for (meter, value) in &event.units {
                *expected.entry((tenant.clone(), meter.clone())).or_default() += value;
            }
        }
    }
    let counted: BTreeMap<(String, String), i64> = refresh::counted(client, &tenants, month, &own)
        .await
        .expect("the spend refresh query runs")
        .into_iter()
        .map(|(tenant, meter, total)| ((tenant, meter), total))
        .collect();
    assert!(!expected.is_empty(), "the fixture has billable units this month");
    assert_eq!(counted, expected, "month-to-date units the spend caps start from");
}

/// The alerts' reads (this month's billable units, today's admitted units: the sums computed
/// here from the events) and their table: a pending alert is pending until its delivered
/// version replaces it, and stays recorded for its period.
async fn check_alerts(client: &Client, events: &[UsageEvent], now: i64) {
    use tollgate_billing_sync::alerts::evaluate::Period;
    use tollgate_billing_sync::alerts::observe::{self, TenantUnits};
    use tollgate_billing_sync::alerts::store::{self, AlertRow, Status};
    let tenants: Vec<String> = ["tenant_a", "tenant_b", "tenant_c"].map(str::to_owned).to_vec();
    let (month, day) = (Period::month_of(now), Period::day_of(now));
    let sums = |period: &Period, counts: fn(&UsageEvent) -> bool| {
        let mut out = TenantUnits::new();
        for event in events.iter().filter(|e| counts(e)) {
            let secs = event.timestamp_ms / 1000;
            if let (Some(tenant), true) = (
                &event.tenant_id,
                (i64::from(period.start)..i64::from(period.end)).contains(&secs),
            ) {
                for (meter, value) in &event.units {
                    *out.entry(tenant.clone()).or_default().entry(meter.clone()).or_default() += value;
                }
            }
        }
        out
    };
    let billable = observe::billable_units(client, &tenants, (month.start, month.end))
        .await
        .expect("the alerts' spend query runs");
    assert!(!billable.is_empty(), "the fixture has billable units this month");
    assert_eq!(billable, sums(&month, |e| e.billable));
    let admitted = observe::admitted_units(client, &tenants, (day.start, day.end))
        .await
        .expect("the alerts' quota query runs");
    assert_eq!(
        admitted,
        sums(&day, |e| matches!(e.outcome, Outcome::Allowed | Outcome::UpstreamError))
    );

    let pending = AlertRow {
        tenant_id: "tenant_a".to_owned(),
        kind: "spend".to_owned(),
        subject: "monthly_cap".to_owned(),
        period: month.name.clone(),
        threshold: 80,
        webhook_id: "alert_sqlcheck".to_owned(),
        observed: 800,
        limit_value: 1000,
        payload: "{}".to_owned(),
        status: "pending".to_owned(),
        attempts: 0,
        error: String::new(),
        created_at: now as u32,
        updated_at: now as u32,
        row_version: 1,
    };
    store::write(client, std::slice::from_ref(&pending))
        .await
        .expect("alert recorded");
    assert_eq!(
        store::pending(client).await.expect("pending alerts"),
        std::slice::from_ref(&pending)
    );
    let delivered = pending.after(Status::Delivered, 4, "", now as u32);
    store::write(client, std::slice::from_ref(&delivered))
        .await
        .expect("alert delivered");
    assert!(store::pending(client).await.expect("pending alerts").is_empty());
    assert_eq!(
        store::recorded(client, &[month.name.clone(), day.name.clone()])
            .await
            .expect("recorded alerts"),
        [delivered]
    );
}

/// The events into ClickHouse as meter-consumer writes them: batches cut at month changes
/// (and once more halfway, so buckets hold rows from two batches), each written raw and
/// rolled up past its table's watermark.
async fn write_usage(client: &Client, events: &[UsageEvent]) {
    let (_, recorder) = Ops::new();
    let sink = ClickhouseSink::new(
        client.clone(),
        TOPIC.to_owned(),
        SinkSettings {
            insert_timeout: Duration::from_secs(20),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            max_rows: 10_000,
        },
        Metrics::new(recorder),
    );
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut builder = BatchBuilder::new(10_000, Duration::from_secs(60));
    let mut batches = Vec::new();
    let topic: std::sync::Arc<str> = TOPIC.into();
    for (offset, event) in events.iter().enumerate() {
        let origin = Origin {
            partition: 0,
            offset: offset as i64,
        };
        let row = UsageRow::from_event(&event.into(), &topic, origin).expect("row");
        batches.extend(builder.push(row));
        if offset == events.len() / 2 {
            batches.extend(builder.take());
        }
    }
    batches.extend(builder.take());
    assert!(batches.len() >= 3, "a month cut and a halfway cut");
    for batch in batches {
        let last = batch.last_offset();
        let marks = sink.watermarks(0).await.expect("watermarks");
        let rollups = TableRows::for_batch(TOPIC, &batch.rows, &marks);
        sink.write(Table::Raw, 0, &batch.rows, last, &stop).await.expect("raw");
        sink.write(Table::MeterMinute, 0, &rollups.minute, last, &stop)
            .await
            .expect("minute");
        sink.write(Table::MeterHour, 0, &rollups.hour, last, &stop)
            .await
            .expect("hour");
        sink.write(Table::MeterDay, 0, &rollups.day, last, &stop)
            .await
            .expect("day");
        sink.write(Table::RouteDay, 0, &rollups.route, last, &stop)
            .await
            .expect("route");
        sink.write(Table::MinutesTouched, 0, &rollups.touched, last, &stop)
            .await
            .expect("minutes touched");
    }
}

/// Consumers as the keys mirror writes them: tenant b also had a consumer, since deleted,
/// with another Stripe customer (the view must not pick it); tenant c has no customer, and a
/// plan the catalogue does not price.
async fn write_keys(client: &Client) {
    let consumer = |id: &str, tenant: &str, customer: &str, version: i64, deleted: u8| ConsumerRow {
        consumer_id: id.to_owned(),
        name: id.to_owned(),
        tenant_id: tenant.to_owned(),
        plan: "starter".to_owned(),
        stripe_customer_id: customer.to_owned(),
        metadata_json: "{}".to_owned(),
        version,
        updated_at: 1_790_000_000 + version as u32,
        deleted,
    };
    let rows = [
        consumer("c_a", "tenant_a", "cus_sqlcheck_a", 1, 0),
        consumer("c_b", "tenant_b", "cus_sqlcheck_b", 1, 0),
        consumer("c_b_old", "tenant_b", "cus_sqlcheck_b_old", 1, 0),
        consumer("c_b_old", "tenant_b", "cus_sqlcheck_b_old", 2, 1),
        ConsumerRow {
            plan: "gold".to_owned(),
            ..consumer("c_c", "tenant_c", "", 1, 0)
        },
    ];
    let mut insert = client.insert::<ConsumerRow>("consumers").await.expect("insert");
    for row in &rows {
        insert.write(row).await.expect("consumer row");
    }
    insert.end().await.expect("consumers stored");
    let mut insert = client.insert::<KeyAuditRow>("key_audit").await.expect("insert");
    insert
        .write(&KeyAuditRow {
            key_id: "key_sqlcheck".to_owned(),
            consumer_id: "c_a".to_owned(),
            consumer_name: "c_a".to_owned(),
            prefix: "tg_test_Abc123".to_owned(),
            action: "created",
            actor: "admin".to_owned(),
            time: 1_790_000_000,
            time_ms: 0,
            expires_at: 0,
            version: 1,
            kafka_partition: 0,
            kafka_offset: 0,
        })
        .await
        .expect("audit row");
    insert.end().await.expect("audit stored");
}

/// One billing pass until nothing is left to retry, then reconcile both months.
async fn bill(clickhouse: &ClickhouseSettings, now: i64) {
    let text = format!(
        r#"
[clickhouse]
url = "{url}"
database = "{database}"

[stripe]
api_base = "{stripe}"

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
"#,
        url = clickhouse.url,
        database = clickhouse.database,
        stripe = stripe(),
    );
    let settings: BillingSettings =
        tollgate_runtime::settings::from_str_with_env(&text, "sqlcheck.toml", Vec::new()).expect("billing settings");
    let client = settings.clickhouse.connect().await.expect("clickhouse");
    let api = tollgate_billing_sync::stripe::client(&settings.stripe, "sk_test_sqlcheck").expect("stripe client");
    let pusher = Pusher::new(api, &settings.stripe, PushMetrics::noop(), Shutdown::default());
    let biller = Biller::new(client.clone(), settings.clone(), pusher);
    let mut pushed = 0;
    for _ in 0..5 {
        let report = biller.pass(now).await.expect("billing pass");
        pushed += report.pushed;
        if report.unresolved == 0 {
            break;
        }
    }
    assert!(pushed > 0, "the pass pushed the recent windows to stripe-mock");
    // A later pass reads only what changed since (the minutes touched): nothing here.
    let idle = biller.pass(now).await.expect("incremental billing pass");
    assert_eq!(
        (idle.pushed, idle.unresolved),
        (0, 0),
        "nothing changed since: {idle:?}"
    );
    for at in [now, now - 40 * DAY] {
        let month = DateTime::from_timestamp(at, 0)
            .expect("time")
            .format("%Y-%m")
            .to_string();
        let period = month.parse().expect("period");
        tollgate_billing_sync::reconcile::reconcile(&client, &settings, period, now)
            .await
            .expect("reconcile");
    }
}

/// The README's finance examples, on this fixture's tenant and consumer.
async fn run_readme_queries(client: &Client) {
    let readme = include_str!("../../README.md");
    let start = readme.find("## Finance queries").expect("README has finance queries");
    let block = &readme[start..];
    let block = &block[block.find("```sql").expect("an sql block") + "```sql".len()..];
    let block = &block[..block.find("```").expect("closed block")];
    let queries: Vec<String> = block
        .split(';')
        .map(|q| {
            q.lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|q| !q.trim().is_empty())
        .collect();
    assert!(queries.len() >= 5, "README finance queries: {queries:?}");
    for query in queries {
        let query = query.replace("tenant_abc123", "tenant_a").replace("c_123", "c_a");
        tsv(client, &query).await;
    }
}

// ---------------------------------------------------------------------------------------
// Expected view contents, from the events alone.

#[derive(Debug, serde::Serialize)]
struct ViewCheck {
    name: &'static str,
    sql: String,
    /// The answer in TabSeparated, as either server prints it.
    expected: String,
}

fn view_checks(events: &[UsageEvent], catalogue: &Catalogue) -> Vec<ViewCheck> {
    let customers = BTreeMap::from([("tenant_a", "cus_sqlcheck_a"), ("tenant_b", "cus_sqlcheck_b")]);
    let plan_of = |tenant: &str| if tenant == "tenant_c" { "gold" } else { "starter" };
    // (tenant, period or hour, meter) -> [events, billable events, units, billable units]
    let mut by_period: BTreeMap<(String, String, String), [i64; 4]> = BTreeMap::new();
    let mut by_hour: BTreeMap<(String, String, String), [i64; 4]> = BTreeMap::new();
    // (tenant, period, route) -> [events, server errors, response bytes]
    let mut routes: BTreeMap<(String, String, String), [i64; 3]> = BTreeMap::new();
    for e in events {
        let tenant = e.tenant_id.clone().unwrap_or_default();
        let time = DateTime::from_timestamp(e.timestamp_ms / 1000, 0).expect("time");
        let period = NaiveDate::from_ymd_opt(time.year(), time.month(), 1)
            .expect("first of month")
            .to_string();
        let hour = time.format("%Y-%m-%d %H:00:00").to_string();
        let billable = i64::from(e.billable);
        for (meter, value) in &e.units {
            for (map, bucket) in [(&mut by_period, &period), (&mut by_hour, &hour)] {
                let sums = map.entry((tenant.clone(), bucket.clone(), meter.clone())).or_default();
                sums[0] += 1;
                sums[1] += billable;
                sums[2] += value;
                sums[3] += billable * value;
            }
        }
        let route = routes
            .entry((tenant.clone(), period.clone(), e.route.clone()))
            .or_default();
        route[0] += 1;
        route[1] += i64::from(e.status >= 500);
        route[2] += e.response_bytes;
    }

    let mut invoice = String::new();
    let mut amounts = String::new();
    // (tenant, period) -> units per meter, for billing-sync's own total.
    let mut months: BTreeMap<(String, String), BTreeMap<String, i64>> = BTreeMap::new();
    let mut period_rows = String::new();
    for ((tenant, period, meter), [events, billable_events, units, billable_units]) in &by_period {
        period_rows +=
            &format!("{tenant}\t{period}\t{meter}\t{events}\t{billable_events}\t{units}\t{billable_units}\n");
        if !tenant.is_empty() {
            let customer = customers.get(tenant.as_str()).copied().unwrap_or_default();
            invoice += &format!("{tenant}\t{period}\t{meter}\t{billable_units}\t{billable_events}\t{customer}\n");
            let plan = plan_of(tenant);
            let prices = catalogue.plans.get(plan);
            let line = prices.and_then(|p| Some((p.currency.as_str(), p.usage_amount(meter, *billable_units)?)));
            let (priced, currency, amount) = match line {
                Some((currency, amount)) => (1, currency, amount.round_minor()),
                None => (0, "", 0),
            };
            amounts += &format!("{tenant}\t{period}\t{meter}\t{plan}\t{priced}\t{currency}\t{amount}\n");
            months
                .entry((tenant.clone(), period.clone()))
                .or_default()
                .insert(meter.clone(), *billable_units);
        }
    }
    let mut totals = String::new();
    for ((tenant, period), units) in &months {
        let plan = plan_of(tenant);
        let (priced, currency, fee, total) = match catalogue.plans.get(plan) {
            Some(p) => (1, p.currency.as_str(), p.monthly_fee_minor, p.amount(units)),
            None => (0, "", 0, 0),
        };
        totals += &format!("{tenant}\t{period}\t{plan}\t{priced}\t{currency}\t{fee}\t{total}\n");
    }
    assert!(
        amounts.contains("\tstarter\t1\teur\t") && amounts.contains("\tgold\t0\t\t0\n"),
        "fixture has priced and unpriced lines: {amounts}"
    );
    let mut hourly = String::new();
    for ((tenant, hour, meter), [events, billable_events, units, billable_units]) in &by_hour {
        hourly += &format!("{tenant}\t{hour}\t{meter}\t{events}\t{billable_events}\t{units}\t{billable_units}\n");
    }
    // Ten routes per tenant and period, most events first (the fixture has no ties).
    // (events, route, server errors, response bytes) per (tenant, period).
    type RouteLine = (i64, String, i64, i64);
    let mut ranked: BTreeMap<(String, String), Vec<RouteLine>> = BTreeMap::new();
    for ((tenant, period, route), [events, errors, bytes]) in routes {
        ranked
            .entry((tenant, period))
            .or_default()
            .push((events, route, errors, bytes));
    }
    let mut top = String::new();
    for ((tenant, period), mut list) in ranked {
        list.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (events, route, errors, bytes) in list.into_iter().take(10) {
            top += &format!("{tenant}\t{period}\t{route}\t{events}\t{errors}\t{bytes}\n");
        }
    }
    assert!(
        top.contains("\tr12\t15\t") && !top.contains("\tr01\t1\t"),
        "fixture exercises LIMIT BY: {top}"
    );

    vec![
        ViewCheck {
            name: "invoice_preview",
            sql: "SELECT tenant_id, period_start, meter, billable_units, billable_events, stripe_customer_id \
                  FROM invoice_preview ORDER BY tenant_id, period_start, meter"
                .to_owned(),
            expected: invoice,
        },
        ViewCheck {
            name: "invoice_preview amounts",
            sql: "SELECT tenant_id, period_start, meter, plan, priced, currency, amount_minor \
                  FROM invoice_preview ORDER BY tenant_id, period_start, meter"
                .to_owned(),
            expected: amounts,
        },
        ViewCheck {
            name: "invoice_totals",
            sql: "SELECT tenant_id, period_start, plan, priced, currency, monthly_fee_minor, total_minor \
                  FROM invoice_totals ORDER BY tenant_id, period_start"
                .to_owned(),
            expected: totals,
        },
        ViewCheck {
            name: "usage_by_period",
            sql: "SELECT tenant_id, period_start, meter, events, billable_events, units, billable_units \
                  FROM usage_by_period ORDER BY tenant_id, period_start, meter"
                .to_owned(),
            expected: period_rows,
        },
        ViewCheck {
            name: "top_routes",
            sql: "SELECT tenant_id, period_start, route, events, server_errors, response_bytes \
                  FROM top_routes ORDER BY tenant_id, period_start, events DESC, route"
                .to_owned(),
            expected: top,
        },
        ViewCheck {
            name: "usage_hourly",
            sql: "SELECT tenant_id, hour, meter, events, billable_events, units, billable_units \
                  FROM usage_hourly ORDER BY tenant_id, hour, meter"
                .to_owned(),
            expected: hourly,
        },
    ]
}

// ---------------------------------------------------------------------------------------
// The capture file.

#[derive(serde::Serialize)]
struct Capture<'a> {
    server_version: String,
    /// The server's time zone: `DateTime` columns without one print in it.
    server_timezone: String,
    database: &'a str,
    statements: &'a [sql_capture::Sent],
    /// Each table's contents after the run.
    tables: BTreeMap<String, Contents>,
    checks: &'a [ViewCheck],
}

#[derive(serde::Serialize)]
struct Contents {
    /// (name, type), in table order.
    columns: Vec<(String, String)>,
    /// TabSeparated, columns in that order, `DateTime` columns as Unix seconds.
    rows: String,
}

async fn write_capture(
    path: &str,
    server: &str,
    database: &str,
    statements: &[sql_capture::Sent],
    checks: &[ViewCheck],
) {
    let direct = direct(server);
    let names: Vec<String> = direct
        .query("SELECT name FROM system.tables WHERE database = ? AND engine != 'View' ORDER BY name")
        .bind(database)
        .fetch_all()
        .await
        .expect("tables");
    let mut tables = BTreeMap::new();
    for name in names {
        let columns: Vec<(String, String)> = tsv(&direct, &format!("DESCRIBE TABLE {database}.{name}"))
            .await
            .lines()
            .map(|line| {
                let mut fields = line.split('\t');
                let name = fields.next().unwrap_or_default().to_owned();
                (name, fields.next().unwrap_or_default().to_owned())
            })
            .collect();
        // `DateTime` as Unix seconds: 18.16 prints the epoch as `0000-00-00 00:00:00`, which
        // current releases do not read back as the epoch.
        let select: Vec<String> = columns
            .iter()
            .map(|(column, ty)| match ty.starts_with("DateTime") {
                true => format!("toUInt32(`{column}`)"),
                false => format!("`{column}`"),
            })
            .collect();
        let rows = tsv(&direct, &format!("SELECT {} FROM {database}.{name}", select.join(", "))).await;
        tables.insert(name, Contents { columns, rows });
    }
    let capture = Capture {
        server_version: tsv(&direct, "SELECT version()").await.trim().to_owned(),
        server_timezone: tsv(&direct, "SELECT timezone()").await.trim().to_owned(),
        database,
        statements,
        tables,
        checks,
    };
    let json = serde_json::to_string_pretty(&capture).expect("capture as JSON");
    std::fs::write(path, json).unwrap_or_else(|e| panic!("write {path}: {e}"));
}
