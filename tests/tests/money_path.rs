//! The whole money path, with crashes: tenants call the gateway binary; usage goes through a
//! Kafka broker of the test's own to the meter-consumer binary, into ClickHouse, and from there
//! through the billing-sync binary to a recording proxy in front of stripe-mock.
//!
//! While traffic of several tenants flows (allowed, refused by a limit, refused for a tenant
//! mismatch or a bad key, upstream 4xx and 5xx), Kafka is killed and the gateway is killed
//! (-9) with unshipped events in its spool; the meter-consumer and billing-sync are killed (-9)
//! and restarted; ClickHouse is cut off. Afterwards every billable answer is in ClickHouse once
//! (raw table, rollups, finance views), pushed to Stripe once, `reconcile` is clean, and nothing
//! was billed for a refusal or a 5xx.
//!
//! Requests in flight at the instant of a gateway kill are not counted as answered or not: the
//! traffic pauses for that kill, so every answer the client saw was given before it.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};
use tollgate_tests::billing::{assert_consistent_identifiers, Fault, Proxy};
use tollgate_tests::free_port;
use tollgate_tests::http::{try_send_with, EchoUpstream};
use tollgate_tests::meter::CuttableProxy;
use tollgate_tests::private_kafka::PrivateKafka;
use tollgate_tests::process::{repo, ServiceProcess};
use tollgate_tests::service::binary;
use tollgate_tests::{
    clickhouse, create_topic, eventually, unique, CLICKHOUSE_SECRETS_PASSWORD, CLICKHOUSE_SECRETS_USER,
};

const ADMIN_TOKEN: &str = "money-path-admin-token-0123456789";
const STRIPE_KEY: &str = "sk_test_123";
/// The route cost of `/v1/tenants/{tenantId}/` in config/gateway.toml.
const TENANT_ROUTE_COMPUTE_UNITS: i64 = 5;
const GENEROUS: Duration = Duration::from_secs(180);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// Upstream 200: billable.
    Ok,
    /// Upstream 404: the upstream answered below 500, so billable.
    UpstreamClientError,
    /// Upstream 503: not billable.
    UpstreamServerError,
    /// The path names another tenant: 403, not billable.
    OtherTenant,
    /// A key that is not a key: 401, no tenant.
    BadKey,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::Ok,
        Kind::UpstreamClientError,
        Kind::UpstreamServerError,
        Kind::OtherTenant,
        Kind::BadKey,
    ];
}

#[derive(Debug, Clone)]
struct Answer {
    tenant: String,
    kind: Kind,
    status: u16,
    request_id: String,
}

#[derive(Clone)]
struct Tenant {
    id: String,
    key: String,
    customer: String,
}

/// Sends requests round-robin over tenants and kinds while `running`, paused while `paused`;
/// records every answer the client received.
async fn traffic(
    public: String,
    tenants: Vec<Tenant>,
    running: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
    worker: usize,
) {
    let mut i = worker;
    while running.load(Ordering::SeqCst) {
        if paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let tenant = &tenants[i % tenants.len()];
        let other = &tenants[(i + 1) % tenants.len()];
        let kind = Kind::ALL[(i / tenants.len()) % Kind::ALL.len()];
        i += 7;
        let (path, key) = match kind {
            Kind::Ok => (format!("/v1/tenants/{}/items", tenant.id), tenant.key.clone()),
            Kind::UpstreamClientError => (format!("/v1/tenants/{}/status/404", tenant.id), tenant.key.clone()),
            Kind::UpstreamServerError => (format!("/v1/tenants/{}/status/503", tenant.id), tenant.key.clone()),
            Kind::OtherTenant => (format!("/v1/tenants/{}/items", other.id), tenant.key.clone()),
            Kind::BadKey => (format!("/v1/tenants/{}/items", tenant.id), "tg_live_notakey".to_owned()),
        };
        let auth = format!("Bearer {key}");
        let url = format!("{public}{path}");
        match try_send_with(false, "GET", &url, &[("authorization", &auth)], b"").await {
            Ok(reply) => {
                let request_id = reply
                    .headers
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                answers.lock().unwrap().push(Answer {
                    tenant: tenant.id.clone(),
                    kind,
                    status: reply.status,
                    request_id,
                });
            }
            // The gateway is down (killed, restarting): no answer, nothing to bill.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        // A steady few hundred requests a second: enough to exercise every part, bounded.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Debug, serde::Deserialize, clickhouse::Row)]
struct EventRow {
    request_id: String,
    billable: u8,
    status: u16,
}

#[derive(Debug, serde::Deserialize, clickhouse::Row)]
struct Sum {
    tenant_id: String,
    meter: String,
    units: i64,
}

async fn sums(client: &clickhouse::Client, sql: &str) -> BTreeMap<(String, String), i64> {
    let rows: Vec<Sum> = client
        .query(sql)
        .fetch_all()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter().map(|r| ((r.tenant_id, r.meter), r.units)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_billable_answer_is_counted_and_billed_once_through_crashes() {
    let run = unique("money");
    let dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&dir).expect("test directory");

    // Servers: a Kafka of the test's own (so it can be killed), the stack's ClickHouse behind
    // a proxy that can cut it off, stripe-mock behind a recording proxy.
    let mut kafka = PrivateKafka::start();
    let (keys_topic, usage_topic, dlq_topic) = (format!("{run}.keys"), format!("{run}.usage"), format!("{run}.dlq"));
    create_topic(&kafka.brokers, &keys_topic, 1, &[("cleanup.policy", "compact")]).await;
    create_topic(&kafka.brokers, &usage_topic, 3, &[]).await;
    create_topic(&kafka.brokers, &dlq_topic, 1, &[]).await;
    let ch = CuttableProxy::start(&clickhouse()).await;
    let database = run.clone();
    let stripe = Proxy::start(Arc::new(|_, _| Fault::None)).await;
    let upstream = EchoUpstream::start().await;

    let mut gateway = tollgate_tests::process::gateway(
        &dir,
        ADMIN_TOKEN,
        &kafka.brokers,
        (&keys_topic, &usage_topic),
        &upstream.url(),
        &[],
    );
    let (meter_port, billing_port) = (free_port(), free_port());
    let env = |pairs: &[(&str, String)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect::<Vec<_>>()
    };
    let meter_env = tollgate_tests::meter::Env {
        brokers: kafka.brokers.clone(),
        clickhouse: clickhouse(),
        database: database.clone(),
        usage: usage_topic.clone(),
        dlq: dlq_topic.clone(),
        keys: keys_topic.clone(),
        group: format!("{run}.meter"),
    };
    let meter_config = dir.join("meter-consumer.toml");
    std::fs::write(
        &meter_config,
        meter_env.settings_toml_on(&ch.url, 5000, 200, &format!("127.0.0.1:{meter_port}")),
    )
    .expect("meter-consumer settings");
    let meter_config = meter_config.display().to_string();
    // Both services reach ClickHouse as a user with a password, so the check at the end
    // can look for it in their output.
    let clickhouse_login = [
        ("TOLLGATE_CLICKHOUSE__USER", CLICKHOUSE_SECRETS_USER.to_owned()),
        ("TOLLGATE_CLICKHOUSE_PASSWORD", CLICKHOUSE_SECRETS_PASSWORD.to_owned()),
    ];
    let mut meter = ServiceProcess::new(
        "tollgate-meter-consumer",
        &["--config", &meter_config],
        env(&clickhouse_login),
        format!("http://127.0.0.1:{meter_port}/healthz"),
        &dir,
    );
    // One-minute windows (the shortest billing-sync allows), closed 2 s after they end.
    let billing_config = repo().join("config/billing-sync.toml").display().to_string();
    let billing_env = env(&[
        clickhouse_login[0].clone(),
        clickhouse_login[1].clone(),
        ("TOLLGATE_STRIPE_API_KEY", STRIPE_KEY.to_owned()),
        ("TOLLGATE_CLICKHOUSE__URL", ch.url.clone()),
        ("TOLLGATE_CLICKHOUSE__DATABASE", database.clone()),
        ("TOLLGATE_STRIPE__API_BASE", stripe.url()),
        ("TOLLGATE_BILLING__WINDOW_SECS", "60".to_owned()),
        ("TOLLGATE_BILLING__LATENESS_SECS", "2".to_owned()),
        ("TOLLGATE_BILLING__POLL_INTERVAL_SECS", "1".to_owned()),
        ("TOLLGATE_ADMIN__LISTEN", format!("127.0.0.1:{billing_port}")),
        // Provisioning follows this test's consumers, on this test's Kafka.
        ("TOLLGATE_PROVISIONING__KEYS_TOPIC", keys_topic.clone()),
        ("TOLLGATE_PROVISIONING__KAFKA__BROKERS", kafka.brokers.clone()),
    ]);
    let mut billing = ServiceProcess::new(
        "tollgate-billing-sync",
        &["--config", &billing_config],
        billing_env.clone(),
        format!("http://127.0.0.1:{billing_port}/healthz"),
        &dir,
    );

    meter.start().await;
    billing.start().await;
    gateway.process.start().await;

    // Three tenants, each with a key; the third on the free plan (100 requests a minute), so
    // some of its requests are refused by the limit.
    let mut tenants = Vec::new();
    for (i, plan) in ["enterprise", "enterprise", "free"].iter().enumerate() {
        let suffix = &unique("t")[2..10];
        let id = format!("t{i}_{suffix}");
        let customer = format!("cus_{i}{suffix}");
        let name = format!("c{i}-{suffix}");
        let metadata = json!({"tenantId": id, "plan": plan, "stripeCustomerId": customer});
        let key = gateway.consumer_with_key(ADMIN_TOKEN, &name, metadata).await;
        tenants.push(Tenant { id, key, customer });
    }

    let running = Arc::new(AtomicBool::new(true));
    let paused = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            tokio::spawn(traffic(
                gateway.public.clone(),
                tenants.clone(),
                running.clone(),
                paused.clone(),
                answers.clone(),
                w,
            ))
        })
        .collect();
    // Lets traffic flow for `time`, and checks it did: answers kept coming.
    let flow = |time: Duration| {
        let answers = answers.clone();
        async move {
            let before = answers.lock().unwrap().len();
            tokio::time::sleep(time).await;
            let after = answers.lock().unwrap().len();
            assert!(
                after > before + 50,
                "traffic flows: {before} answers, then {after} after {time:?}"
            );
        }
    };
    let second = Duration::from_secs(1);
    // How many answers there were as each fault began, to place a missing answer in its phase.
    let mut phases: Vec<(&str, usize)> = Vec::new();
    let mut mark = |phase| phases.push((phase, answers.lock().unwrap().len()));

    // 1. Traffic, then Kafka goes away: the gateway keeps answering and spools the events.
    flow(3 * second).await;
    mark("kafka killed");
    kafka.kill();
    flow(3 * second).await;
    // 2. kill -9 of the gateway with those events unshipped (traffic paused so no answer is
    //    in flight at the kill), then Kafka and the gateway come back: the spool drains.
    paused.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    mark("gateway killed");
    gateway.process.kill();
    kafka.restart();
    gateway.process.start().await;
    paused.store(false, Ordering::SeqCst);
    flow(3 * second).await;
    // 3. kill -9 of the meter-consumer mid-stream, restarted.
    mark("meter-consumer killed");
    meter.kill();
    flow(2 * second).await;
    meter.start().await;
    flow(2 * second).await;
    // 4. ClickHouse cut off from the meter-consumer and billing-sync for a while.
    mark("clickhouse cut");
    ch.cut();
    flow(5 * second).await;
    ch.restore();
    flow(2 * second).await;
    // 5. kill -9 of billing-sync, restarted.
    mark("billing-sync killed");
    billing.kill();
    flow(2 * second).await;
    billing.start().await;
    flow(2 * second).await;
    running.store(false, Ordering::SeqCst);
    for worker in workers {
        worker.await.expect("traffic worker");
    }
    let answers = answers.lock().unwrap().clone();

    // What the tenants must be billed: answers the upstream gave below 500.
    let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut billable_ids = HashSet::new();
    let mut statuses: HashMap<Kind, HashSet<u16>> = HashMap::new();
    for a in &answers {
        statuses.entry(a.kind).or_default().insert(a.status);
        assert!(!a.request_id.is_empty(), "every answer carries x-request-id: {a:?}");
        if matches!(a.status, 200 | 404) && matches!(a.kind, Kind::Ok | Kind::UpstreamClientError) {
            billable_ids.insert(a.request_id.clone());
            *expected.entry((a.tenant.clone(), "requests".to_owned())).or_default() += 1;
            *expected
                .entry((a.tenant.clone(), "compute_units".to_owned()))
                .or_default() += TENANT_ROUTE_COMPUTE_UNITS;
        }
    }
    assert_eq!(statuses[&Kind::OtherTenant], HashSet::from([403]), "{statuses:?}");
    assert_eq!(statuses[&Kind::BadKey], HashSet::from([401]), "{statuses:?}");
    assert!(statuses[&Kind::UpstreamServerError].contains(&503), "{statuses:?}");
    assert!(
        statuses[&Kind::Ok].contains(&429),
        "the free tenant met its limit: {statuses:?}"
    );
    assert!(
        billable_ids.len() > 500,
        "enough billable traffic: {}",
        billable_ids.len()
    );

    // ClickHouse: every answer's event, each once; billable exactly for the billable answers.
    let client = clickhouse::Client::default()
        .with_url(clickhouse())
        .with_validation(false)
        .with_database(&database);
    // Waited for by hand rather than with `eventually`: a failure says which answers are
    // missing (by their place in the run, so the phase shows) and what the services logged.
    let started = std::time::Instant::now();
    let rows: Vec<EventRow> = loop {
        let rows: Vec<EventRow> = client
            .query("SELECT request_id, billable, status FROM usage_events")
            .fetch_all()
            .await
            .unwrap_or_default();
        let seen: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
        let missing: Vec<usize> = (0..answers.len())
            .filter(|&i| !seen.contains(answers[i].request_id.as_str()))
            .collect();
        if missing.is_empty() {
            break rows;
        }
        if started.elapsed() > GENEROUS {
            panic!(
                "every answered request has its event: {} of {} answers missing after {GENEROUS:?} \
                 (answers #{}..=#{}, {} rows in usage_events; answers when each fault began: {phases:?})\n\
                 gateway:\n{}\nmeter-consumer:\n{}\nbilling-sync:\n{}",
                missing.len(),
                answers.len(),
                missing[0],
                missing[missing.len() - 1],
                rows.len(),
                gateway.process.log_tail(),
                meter.log_tail(),
                billing.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut per_request: HashMap<&str, Vec<&EventRow>> = HashMap::new();
    for row in &rows {
        per_request.entry(row.request_id.as_str()).or_default().push(row);
    }
    for a in &answers {
        let events = &per_request[a.request_id.as_str()];
        assert_eq!(
            events.len(),
            1,
            "request {} has {} events: {events:?}",
            a.request_id,
            events.len()
        );
        let event = events[0];
        assert_eq!(event.status, a.status, "{a:?}");
        assert_eq!(
            event.billable == 1,
            billable_ids.contains(&a.request_id),
            "billable flag of {a:?}: {event:?}"
        );
    }
    let billed_rows: Vec<&EventRow> = rows.iter().filter(|r| r.billable == 1).collect();
    assert_eq!(
        billed_rows.len(),
        billable_ids.len(),
        "no billable event that no client saw answered"
    );

    // Rollups and finance views hold the same billable sums.
    let raw = sums(
        &client,
        "SELECT tenant_id, meter, toInt64(sum(value)) AS units FROM usage_events ARRAY JOIN units.meter AS meter, units.value AS value \
         WHERE billable = 1 AND meter IN ('requests', 'compute_units') GROUP BY tenant_id, meter",
    )
    .await;
    assert_eq!(raw, expected, "raw usage_events");
    // The consumer writes a batch's rollups after its raw rows: the last batch's may still be
    // on their way when the raw rows are all there. What is checked is that they arrive, exact.
    for table in ["usage_meter_minute", "usage_meter_hour", "usage_meter_day"] {
        let sql = format!(
            "SELECT tenant_id, meter, toInt64(sum(billable_units)) AS units FROM {table} \
             WHERE meter IN ('requests', 'compute_units') GROUP BY tenant_id, meter HAVING units != 0"
        );
        let mut last = BTreeMap::new();
        let arrived = tokio::time::timeout(GENEROUS, async {
            loop {
                last = sums(&client, &sql).await;
                if last == expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        assert!(arrived.is_ok(), "{table}: {last:?}, expected {expected:?}");
    }
    let by_period = sums(
        &client,
        "SELECT tenant_id, meter, toInt64(sum(billable_units)) AS units FROM usage_by_period \
         WHERE meter IN ('requests', 'compute_units') GROUP BY tenant_id, meter HAVING units != 0",
    )
    .await;
    assert_eq!(by_period, expected, "usage_by_period");

    // Stripe: once every window has closed, each tenant's billable units were pushed once, to
    // its customer, under identifiers that never carried two values.
    let customer_of: HashMap<String, String> = tenants.iter().map(|t| (t.customer.clone(), t.id.clone())).collect();
    let pushed = eventually("every billable unit pushed to Stripe", GENEROUS, || {
        let (stripe, customer_of, expected) = (&stripe, &customer_of, &expected);
        async move {
            let by_identifier = assert_consistent_identifiers(&stripe.seen());
            let mut pushed: BTreeMap<(String, String), i64> = BTreeMap::new();
            for seen in by_identifier.values() {
                let tenant = customer_of.get(&seen.customer).expect("a customer of this test");
                let meter = seen
                    .identifier
                    .split(':')
                    .nth(2)
                    .expect("tg:<tenant>:<meter>:...")
                    .to_owned();
                *pushed.entry((tenant.clone(), meter)).or_default() += seen.value;
            }
            (pushed == *expected).then_some(pushed)
        }
    })
    .await;
    assert_eq!(pushed, expected);

    // A billing-sync killed -9 and restarted re-sends nothing new: the ledger already says
    // every window is pushed.
    let pushes_before = stripe.seen().len();
    billing.kill();
    billing.start().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let new_identifiers: HashSet<String> = stripe.seen()[pushes_before..]
        .iter()
        .map(|s| s.identifier.clone())
        .collect();
    let known: HashSet<String> = stripe.seen()[..pushes_before]
        .iter()
        .map(|s| s.identifier.clone())
        .collect();
    assert!(
        new_identifiers.is_subset(&known),
        "a restart pushed new meter events: {new_identifiers:?}"
    );

    // reconcile agrees for the period (or periods, across a month boundary) of the traffic.
    let months: HashSet<String> = [chrono::Utc::now(), chrono::Utc::now() - chrono::Duration::minutes(10)]
        .iter()
        .map(|t| t.format("%Y-%m").to_string())
        .collect();
    for month in months {
        let output = Command::new(binary("tollgate-billing-sync"))
            .args(["--config", &billing_config, "reconcile", "--period", &month])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(billing_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(repo())
            .output()
            .expect("run reconcile");
        assert!(
            output.status.success(),
            "reconcile {month}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // No secret in any service's output.
    for service in [&gateway.process, &meter, &billing] {
        let output = service.output();
        assert!(!output.contains(STRIPE_KEY), "{} logged the Stripe key", service.name);
        assert!(!output.contains(ADMIN_TOKEN), "{} logged the admin token", service.name);
        assert!(
            !output.contains(CLICKHOUSE_SECRETS_PASSWORD),
            "{} logged the ClickHouse password",
            service.name
        );
        for tenant in &tenants {
            assert!(!output.contains(&tenant.key), "{} logged an API key", service.name);
            let digest: String = Sha256::digest(tenant.key.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert!(!output.contains(&digest), "{} logged an API key's digest", service.name);
        }
    }

    gateway.process.kill();
    meter.kill();
    billing.kill();
    kafka.kill();
    let _ = client
        .query(&format!("DROP DATABASE IF EXISTS {database}"))
        .execute()
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
