//! A meter the operator declares (`[meters.tokens]`), end to end through the binaries: an
//! upstream reports `x-tollgate-cost: tokens=1234`, a plan's daily tokens quota refuses once it
//! is spent, the usage events carry the tokens into ClickHouse's raw table, rollups and
//! finance views, and billing-sync pushes them to their own Stripe meter (`tollgate_tokens`,
//! at stripe-mock behind a recording proxy). A report naming a meter nobody declared is
//! counted in a metric and never reaches a counter, an event or a bill; settings that limit or
//! charge one do not load.

// Needs the running stack (Kafka, ClickHouse, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tollgate_tests::billing::{assert_consistent_identifiers, Fault, Proxy};
use tollgate_tests::free_port;
use tollgate_tests::http::{send, EchoUpstream};
use tollgate_tests::process::{gateway_on, repo, ServiceProcess};
use tollgate_tests::service::{binary, run_with_settings};
use tollgate_tests::{clickhouse, create_topic, eventually, kafka, unique};

const ADMIN_TOKEN: &str = "custom-meters-admin-token-0123456789";
const STRIPE_KEY: &str = "sk_test_123";
const TOKENS_PER_DAY: i64 = 5_000;
const REPORTED: i64 = 1_234;
const GENEROUS: Duration = Duration::from_secs(150);

/// The example gateway settings (which declare `tokens`) with a plan that counts tokens and a
/// route for it, charging no tokens up front: the upstream reports them.
fn gateway_settings(upstream: &str) -> String {
    let example = std::fs::read_to_string(repo().join("config/gateway.toml")).expect("example settings");
    format!(
        "{example}
[plans.ai]
limits = [
  {{ name = \"requests_per_minute\", meter = \"requests\", window = \"1m\", limit = 1000 }},
  {{ name = \"tokens_per_day\", meter = \"tokens\", window = \"day\", limit = {TOKENS_PER_DAY} }},
]

[[routes]]
id = \"ai\"
path = \"/ai/\"
upstream = \"{upstream}\"
timeout_ms = 30000
"
    )
}

/// billing-sync pushing requests and tokens in one-minute windows closed 2 s after their end;
/// customers come from the consumers table meter-consumer fills from the keys topic.
fn billing_settings(database: &str, stripe: &str, admin: &str) -> String {
    format!(
        "[clickhouse]
url = \"{clickhouse}\"
database = \"{database}\"

[stripe]
api_base = \"{stripe}\"
max_requests_per_second = 0

[billing]
window_secs = 60
lateness_secs = 2
poll_interval_secs = 1

[[meters]]
meter = \"requests\"
event_name = \"tollgate_requests\"

[[meters]]
meter = \"tokens\"
event_name = \"tollgate_tokens\"

[admin]
listen = \"{admin}\"
",
        clickhouse = clickhouse()
    )
}

#[derive(Debug, serde::Deserialize, clickhouse::Row)]
struct MeterSum {
    meter: String,
    units: i64,
}

async fn per_meter(client: &clickhouse::Client, sql: &str, tenant: &str) -> BTreeMap<String, i64> {
    let rows: Vec<MeterSum> = client
        .query(sql)
        .bind(tenant)
        .fetch_all()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter().map(|r| (r.meter, r.units)).collect()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_tokens_meter_is_limited_metered_and_billed() {
    let run = unique("tokens");
    let dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&dir).expect("test directory");
    let brokers = kafka();
    let (keys_topic, usage_topic, dlq_topic) = (format!("{run}.keys"), format!("{run}.usage"), format!("{run}.dlq"));
    create_topic(&brokers, &keys_topic, 1, &[("cleanup.policy", "compact")]).await;
    create_topic(&brokers, &usage_topic, 1, &[]).await;
    create_topic(&brokers, &dlq_topic, 1, &[]).await;
    let stripe = Proxy::start(Arc::new(|_, _| Fault::None)).await;
    let upstream = EchoUpstream::start().await;

    let gateway_config = dir.join("gateway.toml");
    std::fs::write(&gateway_config, gateway_settings(&upstream.url())).expect("gateway settings");
    let mut gateway = gateway_on(
        &gateway_config,
        &dir,
        ADMIN_TOKEN,
        &brokers,
        (&keys_topic, &usage_topic),
        &upstream.url(),
        &[],
    );
    let (meter_port, billing_port) = (free_port(), free_port());
    let meter_env = tollgate_tests::meter::Env {
        brokers: brokers.clone(),
        clickhouse: clickhouse(),
        database: run.clone(),
        usage: usage_topic.clone(),
        dlq: dlq_topic.clone(),
        keys: keys_topic.clone(),
        group: format!("{run}.meter"),
    };
    let meter_config = dir.join("meter-consumer.toml");
    std::fs::write(
        &meter_config,
        meter_env.settings_toml_on(&clickhouse(), 1000, 200, &format!("127.0.0.1:{meter_port}")),
    )
    .expect("meter-consumer settings");
    let mut meter = ServiceProcess::new(
        "tollgate-meter-consumer",
        &["--config", &meter_config.display().to_string()],
        Vec::new(),
        format!("http://127.0.0.1:{meter_port}/healthz"),
        &dir,
    );
    let billing_config = dir.join("billing-sync.toml");
    std::fs::write(
        &billing_config,
        billing_settings(&run, &stripe.url(), &format!("127.0.0.1:{billing_port}")),
    )
    .expect("billing-sync settings");
    let mut billing = ServiceProcess::new(
        "tollgate-billing-sync",
        &["--config", &billing_config.display().to_string()],
        vec![("TOLLGATE_STRIPE_API_KEY".to_owned(), STRIPE_KEY.to_owned())],
        format!("http://127.0.0.1:{billing_port}/healthz"),
        &dir,
    );
    meter.start().await;
    billing.start().await;
    gateway.process.start().await;

    let suffix = &unique("t")[2..10];
    let (tenant, customer) = (format!("ai_{suffix}"), format!("cus_ai{suffix}"));
    let metadata = json!({"tenantId": tenant, "plan": "ai", "stripeCustomerId": customer});
    let key = gateway
        .consumer_with_key(ADMIN_TOKEN, &format!("ai-{suffix}"), metadata)
        .await;
    let auth = format!("Bearer {key}");
    let call = |report: &str| {
        let url = format!("{}/ai/v1/complete/report/{report}", gateway.public);
        let auth = auth.clone();
        async move { send("POST", &url, &[("authorization", &auth)], b"{\"prompt\": \"hi\"}").await }
    };

    // Each answer reports 1,234 tokens; the quota counts them after the answer, so requests
    // pass while any of the 5,000 is left and the one after that is refused.
    let mut answered = 0;
    let refusal = loop {
        let reply = call("tokens=1234").await;
        if reply.status == 429 {
            break reply;
        }
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(
            reply.header("x-tollgate-cost").is_none(),
            "the report stays between upstream and gateway"
        );
        answered += 1;
        assert!(answered <= 5, "the tokens quota never refused");
    };
    let spent = answered * REPORTED;
    assert_eq!(answered, 5, "requests pass until {TOKENS_PER_DAY} tokens are spent");
    let problem = refusal.json();
    assert_eq!(problem["violated-policies"], json!(["tokens_per_day"]), "{problem}");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("tokens_per_day (5000 tokens per "), "{detail}");
    let policy = refusal.header("ratelimit-policy").unwrap_or_default().to_owned();
    assert!(
        policy.contains("\"tokens_per_day\";q=5000;tollgate-unit=\"tokens\""),
        "{policy}"
    );

    // A report naming an undeclared meter is ignored and counted; the tenant's own status
    // (the admin view the portal shows) says the quota is spent.
    let metrics_url = format!("{}/metrics", gateway.admin);
    let undeclared = "gateway_reported_cost_rejected_total{reason=\"undeclared_meter\"}";
    let before = metric(&send("GET", &metrics_url, &[], b"").await.text(), undeclared);
    let other_tenant_reply = {
        // A second tenant on the same plan, so the quota does not refuse the typo's request.
        let key = gateway
            .consumer_with_key(
                ADMIN_TOKEN,
                &format!("ai2-{suffix}"),
                json!({"tenantId": format!("ai2_{suffix}"), "plan": "ai"}),
            )
            .await;
        let url = format!("{}/ai/v1/complete/report/tokenz=99", gateway.public);
        send("POST", &url, &[("authorization", &format!("Bearer {key}"))], b"{}").await
    };
    assert_eq!(other_tenant_reply.status, 200, "{}", other_tenant_reply.text());
    let after = metric(&send("GET", &metrics_url, &[], b"").await.text(), undeclared);
    assert_eq!(after - before, 1.0, "{undeclared} counts the ignored report");

    // ClickHouse: the tokens are in the raw events, every rollup and the finance views, as
    // billable units of the tenant; the ignored report left none.
    let client = clickhouse::Client::default()
        .with_url(clickhouse())
        .with_validation(false)
        .with_database(&run);
    let expected = BTreeMap::from([("requests".to_owned(), answered), ("tokens".to_owned(), spent)]);
    let raw_sql = "SELECT meter, toInt64(sum(value)) AS units FROM usage_events \
                   ARRAY JOIN units.meter AS meter, units.value AS value \
                   WHERE tenant_id = ? AND billable = 1 AND meter IN ('requests', 'tokens') GROUP BY meter";
    let raw = eventually("the tenant's billable events in ClickHouse", GENEROUS, || {
        let (client, expected) = (client.clone(), expected.clone());
        let tenant = tenant.clone();
        async move {
            let sums = per_meter(&client, raw_sql, &tenant).await;
            (sums == expected).then_some(sums)
        }
    })
    .await;
    assert_eq!(raw, expected, "usage_events");
    for view in [
        "usage_meter_minute",
        "usage_meter_hour",
        "usage_meter_day",
        "usage_daily",
        "usage_by_period",
        "invoice_preview",
    ] {
        let sql = format!(
            "SELECT meter, toInt64(sum(billable_units)) AS units FROM {view} \
             WHERE tenant_id = ? AND meter IN ('requests', 'tokens') GROUP BY meter"
        );
        let sums = eventually(&format!("{view} holds the tokens"), GENEROUS, || {
            let (client, expected, sql) = (client.clone(), expected.clone(), sql.clone());
            let tenant = tenant.clone();
            async move {
                let sums = per_meter(&client, &sql, &tenant).await;
                (sums == expected).then_some(sums)
            }
        })
        .await;
        assert_eq!(sums, expected, "{view}");
    }
    let typo_sql = "SELECT meter, toInt64(sum(value)) AS units FROM usage_events \
                    ARRAY JOIN units.meter AS meter, units.value AS value WHERE tenant_id = ? GROUP BY meter";
    let typo = eventually("the second tenant's event", GENEROUS, || {
        let client = client.clone();
        let tenant = format!("ai2_{suffix}");
        async move {
            let sums = per_meter(&client, typo_sql, &tenant).await;
            (!sums.is_empty()).then_some(sums)
        }
    })
    .await;
    assert!(
        !typo.contains_key("tokenz") && !typo.contains_key("tokens"),
        "an undeclared meter is never counted: {typo:?}"
    );

    // Stripe: once the window has closed, the tokens were pushed to their own meter, to the
    // tenant's customer, once.
    let pushed = eventually("the tokens pushed to Stripe", GENEROUS, || {
        let (stripe, customer) = (&stripe, &customer);
        async move {
            let mut pushed: BTreeMap<String, i64> = BTreeMap::new();
            for seen in assert_consistent_identifiers(&stripe.seen()).values() {
                if seen.customer == *customer {
                    *pushed.entry(seen.event_name.clone()).or_default() += seen.value;
                }
            }
            (pushed.get("tollgate_tokens") == Some(&spent)).then_some(pushed)
        }
    })
    .await;
    assert_eq!(
        pushed,
        BTreeMap::from([
            ("tollgate_requests".to_owned(), answered),
            ("tollgate_tokens".to_owned(), spent)
        ]),
        "pushes of {customer}"
    );

    gateway.process.kill();
    meter.kill();
    billing.kill();
    let _ = client.query(&format!("DROP DATABASE IF EXISTS {run}")).execute().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Settings that count or charge a meter nobody declared do not load, and say where.
#[test]
fn settings_naming_an_undeclared_meter_do_not_load() {
    let example = std::fs::read_to_string(repo().join("config/gateway.toml")).expect("example settings");
    for (added, field) in [
        (
            "[plans.ai]\nlimits = [{ name = \"t\", meter = \"tokenz\", window = \"day\", limit = 5 }]\n",
            "plans.ai.limits[0].meter",
        ),
        (
            "[[routes]]\nid = \"ai\"\npath = \"/ai/\"\nupstream = \"http://127.0.0.1:1\"\ncost = { tokenz = 1 }\n",
            "routes[3].cost.tokenz",
        ),
        ("[meters.requests]\nunit = \"calls\"\n", "meters.requests"),
    ] {
        let exit = run_with_settings(
            binary("tollgate-gateway").to_str().expect("a UTF-8 path"),
            &format!("{example}\n{added}"),
            &[("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)],
            Duration::from_secs(20),
        );
        assert_ne!(exit.code, Some(0), "{added}");
        assert!(exit.stderr.contains(field), "{field} not named: {}", exit.stderr);
    }
}
