//! Spend and quota alerts over the real stack: the gateway binary enforcing a cap, the
//! meter-consumer binary counting into ClickHouse, the billing-sync binary raising alerts and
//! delivering them to a webhook receiver in this test; Kafka in between.
//!
//! A tenant with a budget gets its 50, 80 and 100 % spend alerts, each once, as its spend
//! crosses them; a tenant with a daily compute-units quota of 10 gets its 80 and 100 % quota
//! alerts once each. The receiver answers 500 to each alert's first three attempts: every
//! alert still arrives, every attempt under one `webhook-id`, every signature verifying with
//! the shared secret (checked here with the hmac crate, not billing-sync's code). A restarted
//! billing-sync raises nothing again; an alert recorded but not delivered when billing-sync is
//! killed is delivered after the restart under the id it was first tried with.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine as _;
use hmac::{KeyInit as _, Mac as _};
use serde_json::{json, Value};
use tollgate_tests::capped::{CappedStack, REQUEST_COST};
use tollgate_tests::free_port;
use tollgate_tests::http::{send, Reply};
use tollgate_tests::process::{repo, GatewayProcess, ServiceProcess};
use tollgate_tests::webhook_receiver::{Attempt, WebhookReceiver};
use tollgate_tests::{clickhouse, eventually, kafka, stripe, unique};

const ADMIN_TOKEN: &str = "alerts-admin-token-0123456789abcdef";
/// 32 bytes behind `whsec_`, as Standard Webhooks gives secrets.
const SECRET_BYTES: &[u8; 32] = b"alerts-test-secret-32-bytes-long";
const CAP: i64 = 10 * REQUEST_COST;
const DEADLINE: Duration = Duration::from_secs(90);

fn secret() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(SECRET_BYTES)
    )
}

/// billing-sync with alerts to `webhook_url`, checked every second, the quotas read from
/// the gateway's example settings (the ones the stack's gateway runs on).
fn billing(stack: &CappedStack, webhook_url: &str) -> (ServiceProcess, String) {
    let port = free_port();
    let config = stack.dir.join("billing-sync.toml");
    std::fs::write(
        &config,
        format!(
            r#"
gateway_settings = "{gateway_settings}"

[clickhouse]
url = "{clickhouse}"
database = "{database}"

[stripe]
api_base = "{stripe}"
max_requests_per_second = 0

[billing]
poll_interval_secs = 1

[[meters]]
meter = "requests"
event_name = "tollgate_requests"

[[meters]]
meter = "compute_units"
event_name = "tollgate_compute_units"

[admin]
listen = "127.0.0.1:{port}"

[catalogue]
path = "plans.toml"

[provisioning]
keys_topic = "{keys}"

[provisioning.kafka]
brokers = "{kafka}"

[alerts]
webhook_url = "{webhook_url}"
check_interval_secs = 1
initial_backoff_ms = 50
max_backoff_ms = 200
"#,
            clickhouse = clickhouse(),
            database = stack.database,
            stripe = stripe(),
            keys = stack.keys,
            kafka = kafka(),
            gateway_settings = repo().join("config/gateway.toml").display(),
        ),
    )
    .expect("billing-sync settings");
    let env = vec![
        ("TOLLGATE_STRIPE_API_KEY".to_owned(), "sk_test_alerts".to_owned()),
        ("TOLLGATE_ALERTS_WEBHOOK_SECRET".to_owned(), secret()),
    ];
    let process = ServiceProcess::new(
        "tollgate-billing-sync",
        &["--config", &config.display().to_string()],
        env,
        format!("http://127.0.0.1:{port}/healthz"),
        &stack.dir,
    );
    (process, format!("http://127.0.0.1:{port}"))
}

async fn admin(gw: &GatewayProcess, method: &str, path: &str, body: Value) -> Reply {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    send(
        method,
        &format!("{}{path}", gw.admin),
        &headers,
        body.to_string().as_bytes(),
    )
    .await
}

/// One `/v1/` request; the first answers of a budgeted tenant may be `spend-unknown` (503)
/// until the gateway has read ClickHouse for it, and are asked again.
async fn call(gw: &GatewayProcess, key: &str) -> Reply {
    let auth = format!("Bearer {key}");
    eventually("an answer with the month-to-date spend known", DEADLINE, || async {
        let reply = send(
            "GET",
            &format!("{}/v1/orders", gw.public),
            &[("authorization", &auth)],
            b"",
        )
        .await;
        (reply.status != 503).then_some(reply)
    })
    .await
}

async fn calls(gw: &GatewayProcess, key: &str, n: usize) {
    for _ in 0..n {
        let reply = call(gw, key).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

/// The signature checked as a receiver checks it, with nothing of billing-sync's code: HMAC-
/// SHA256 under the decoded secret over `{id}.{timestamp}.{body}`, base64, behind `v1,`; the
/// timestamp within Standard Webhooks' 5-minute tolerance.
fn assert_signed(attempt: &Attempt) {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET_BYTES).expect("key");
    mac.update(format!("{}.{}.{}", attempt.id, attempt.timestamp, attempt.body).as_bytes());
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert!(
        attempt.signature.split(' ').any(|s| s == expected),
        "signature {:?} of {}: expected {expected}",
        attempt.signature,
        attempt.id
    );
    let sent: i64 = attempt.timestamp.parse().expect("webhook-timestamp is Unix seconds");
    assert!((chrono::Utc::now().timestamp() - sent).abs() < 300, "timestamp {sent}");
    assert_eq!(attempt.content_type, "application/json");
}

/// What an alert is about, from its body: (tenant, type, subject, threshold, period).
type About = (String, String, String, u64, String);

fn about(body: &Value) -> About {
    let data = &body["data"];
    let subject = data["limitName"].as_str().unwrap_or("monthly_cap");
    (
        data["tenantId"].as_str().expect("tenantId").to_owned(),
        body["type"].as_str().expect("type").to_owned(),
        subject.to_owned(),
        data["thresholdPercent"].as_u64().expect("thresholdPercent"),
        data["period"].as_str().expect("period").to_owned(),
    )
}

/// The alerts the receiver accepted (answered 200), by what they are about, each with the
/// ids it was delivered under; every attempt so far checked for its signature, and each id's
/// attempts for one body.
fn accepted(receiver: &WebhookReceiver) -> BTreeMap<About, BTreeSet<String>> {
    let attempts = receiver.attempts();
    let mut bodies: BTreeMap<String, String> = BTreeMap::new();
    let mut out: BTreeMap<About, BTreeSet<String>> = BTreeMap::new();
    for attempt in &attempts {
        assert_signed(attempt);
        let body = bodies.entry(attempt.id.clone()).or_insert_with(|| attempt.body.clone());
        assert_eq!(body, &attempt.body, "{}: a re-send carries the same body", attempt.id);
        if attempt.status == 200 {
            let parsed: Value = serde_json::from_str(&attempt.body).expect("JSON body");
            out.entry(about(&parsed)).or_default().insert(attempt.id.clone());
        }
    }
    out
}

async fn wait_accepted(receiver: &WebhookReceiver, what: &str, n: usize) -> BTreeMap<About, BTreeSet<String>> {
    eventually(what, DEADLINE, || async {
        let got = accepted(receiver);
        (got.len() >= n).then_some(got)
    })
    .await
}

fn spend(tenant: &str, threshold: u64, month: &str) -> About {
    (
        tenant.to_owned(),
        "spend.threshold_crossed".to_owned(),
        "monthly_cap".to_owned(),
        threshold,
        month.to_owned(),
    )
}

fn quota(tenant: &str, threshold: u64, day: &str) -> About {
    (
        tenant.to_owned(),
        "quota.threshold_crossed".to_owned(),
        "compute_units_per_day".to_owned(),
        threshold,
        day.to_owned(),
    )
}

async fn metric(base: &str, line: &str) -> f64 {
    let text = send("GET", &format!("{base}/metrics"), &[], b"").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(line).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spend_and_quota_alerts_arrive_once_each_signed_through_failures_and_restarts() {
    let stack = CappedStack::start("alerts").await;
    let receiver = WebhookReceiver::start(3).await;
    let mut gw = stack.gateway("gw", ADMIN_TOKEN, &[]);
    gw.process.start().await;
    let (spender, limited) = (unique("t_spend"), unique("t_quota"));
    let spend_key = gw
        .consumer_with_key(ADMIN_TOKEN, "spender", json!({"tenantId": spender, "plan": "free"}))
        .await;
    let quota_key = gw
        .consumer_with_key(
            ADMIN_TOKEN,
            "limited",
            json!({"tenantId": limited, "plan": "free", "limits": {"compute_units_per_day": 10}}),
        )
        .await;
    let put = admin(
        &gw,
        "PUT",
        "/v1/consumers/spender/budget",
        json!({"monthlyCap": CAP, "alertAt": [50, 80, 100]}),
    )
    .await;
    assert!(put.status == 200 || put.status == 201, "{}", put.text());
    let (mut billing, billing_admin) = billing(&stack, &receiver.url());
    billing.start().await;
    let now = chrono::Utc::now();
    let (month, day) = (now.format("%Y-%m").to_string(), now.format("%Y-%m-%d").to_string());

    // Spend crosses 50 %, then 80 %, then reaches the cap: one alert each, in that order.
    calls(&gw, &spend_key, 5).await;
    let got = wait_accepted(&receiver, "the 50 % spend alert", 1).await;
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), [spend(&spender, 50, &month)]);
    calls(&gw, &spend_key, 3).await;
    wait_accepted(&receiver, "the 80 % spend alert", 2).await;
    calls(&gw, &spend_key, 2).await;
    let refused = call(&gw, &spend_key).await;
    assert_eq!(refused.status, 429, "the cap holds: {}", refused.text());
    wait_accepted(&receiver, "the 100 % spend alert", 3).await;

    // The daily quota of 10 compute units crosses 80 %, then 100 %; the 11th is refused.
    calls(&gw, &quota_key, 8).await;
    wait_accepted(&receiver, "the 80 % quota alert", 4).await;
    calls(&gw, &quota_key, 2).await;
    assert_eq!(call(&gw, &quota_key).await.status, 429, "the quota holds");
    let got = wait_accepted(&receiver, "the 100 % quota alert", 5).await;

    let expected: BTreeSet<About> = [
        spend(&spender, 50, &month),
        spend(&spender, 80, &month),
        spend(&spender, 100, &month),
        quota(&limited, 80, &day),
        quota(&limited, 100, &day),
    ]
    .into_iter()
    .collect();
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for (alert, ids) in &got {
        assert_eq!(ids.len(), 1, "{alert:?}: one webhook-id, whatever the re-sends");
        let id = ids.first().unwrap();
        let tries: Vec<u16> = receiver
            .attempts()
            .iter()
            .filter(|a| &a.id == id)
            .map(|a| a.status)
            .collect();
        assert_eq!(
            tries,
            [500, 500, 500, 200],
            "{alert:?}: three 500s, then delivered, then never again"
        );
    }
    let spend_body: Value = serde_json::from_str(
        &receiver
            .attempts()
            .iter()
            .find(|a| a.id == *got[&spend(&spender, 100, &month)].first().unwrap())
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(spend_body["data"]["spentMinor"], CAP);
    assert_eq!(spend_body["data"]["monthlyCapMinor"], CAP);
    assert_eq!(spend_body["data"]["currency"], "usd");
    assert_eq!(
        metric(&billing_admin, "billing_sync_alerts_emitted_total{kind=\"spend\"}").await,
        3.0
    );
    assert_eq!(
        metric(&billing_admin, "billing_sync_alerts_emitted_total{kind=\"quota\"}").await,
        2.0
    );
    assert_eq!(metric(&billing_admin, "billing_sync_alert_deliveries_total").await, 5.0);
    assert_eq!(
        metric(&billing_admin, "billing_sync_alert_delivery_failures_total").await,
        15.0
    );

    // A new alert while the receiver is down is recorded, tried, and billing-sync killed; the
    // restarted one raises none of the delivered alerts again and delivers the pending one
    // under the id it was first tried with.
    receiver.set_down(true);
    let put = admin(
        &gw,
        "PUT",
        "/v1/consumers/limited/budget",
        json!({"monthlyCap": 2 * CAP, "alertAt": [50]}),
    )
    .await;
    assert!(put.status == 200 || put.status == 201, "{}", put.text());
    let pending_id = eventually("the new alert tried while the receiver is down", DEADLINE, || async {
        receiver.attempts().iter().rev().find_map(|a| {
            let body: Value = serde_json::from_str(&a.body).ok()?;
            (about(&body) == spend(&limited, 50, &month)).then(|| a.id.clone())
        })
    })
    .await;
    billing.kill();
    receiver.set_down(false);
    billing.start().await;
    let got = wait_accepted(&receiver, "the pending alert after the restart", 6).await;
    assert_eq!(
        got[&spend(&limited, 50, &month)],
        BTreeSet::from([pending_id.clone()]),
        "delivered under the id it was recorded with"
    );
    // Two checks of the restarted process with the keys topic read: nothing raised again.
    eventually("two checks after the restart", DEADLINE, || async {
        (metric(&billing_admin, "billing_sync_alert_checks_total").await >= 2.0).then_some(())
    })
    .await;
    let got = accepted(&receiver);
    assert_eq!(got.len(), 6, "{got:#?}");
    assert!(got.values().all(|ids| ids.len() == 1), "{got:#?}");
    assert_eq!(
        metric(&billing_admin, "billing_sync_alerts_emitted_total{kind=\"spend\"}").await,
        0.0
    );

    // ClickHouse has each alert once, delivered; neither it nor billing-sync's log has the secret.
    #[derive(serde::Deserialize, clickhouse::Row)]
    struct Row {
        webhook_id: String,
        status: String,
        attempts: u32,
        payload: String,
        error: String,
    }
    let rows: Vec<Row> = stack
        .client()
        .query("SELECT webhook_id, status, attempts, payload, error FROM billing_alerts FINAL")
        .fetch_all()
        .await
        .expect("read billing_alerts");
    assert_eq!(rows.len(), 6);
    let ids: BTreeSet<&str> = got.values().flatten().map(String::as_str).collect();
    for row in &rows {
        assert!(ids.contains(row.webhook_id.as_str()), "{}", row.webhook_id);
        assert_eq!(row.status, "delivered", "{}", row.webhook_id);
        assert!(
            row.attempts >= 4,
            "{}: {} attempts recorded",
            row.webhook_id,
            row.attempts
        );
        let base64_secret = &secret()[6..];
        assert!(!row.payload.contains(base64_secret) && !row.error.contains(base64_secret));
    }
    let log = billing.output();
    assert!(log.contains("alert raised"), "billing-sync logs the alerts");
    assert!(!log.contains(&secret()[6..]), "the webhook secret is never logged");
    drop(billing);
    drop(gw);
    stack.remove().await;
}
