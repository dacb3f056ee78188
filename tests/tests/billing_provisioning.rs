//! Tenants billed automatically, over a real gateway admin API, Kafka keys topic, meter
//! consumer mirror, ClickHouse and stripe-mock: a consumer created without a Stripe customer
//! gets exactly one customer and one subscription (with idempotency keys), its metadata shows
//! the customer id and its usage is pushed under it; a plan change is one subscription update
//! to the new plan's prices; deleting the consumer is one cancel at period end. And
//! billing-sync killed (SIGKILL) between creating the customer and writing it back, or
//! between creating the subscription and recording it, still makes one of each: after the
//! restart the same call is sent again under the same idempotency key, and no other.
//!
//! stripe-mock does not deduplicate and answers fixtures, so what counts is what was SENT,
//! recorded by the proxy in `tollgate_tests::billing`; that proxy also answers the price and
//! product lookups from what `setup` created through it (`tollgate_tests::stripe_state`).

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::HashSet;
use std::process::{Child, Command};
use std::time::Duration;

use serde_json::json;
use tollgate_runtime::shutdown::Shutdown;
use tollgate_tests::billing::*;
use tollgate_tests::gateway::{create_keys_topic, settings as gateway_settings, TestGateway};
use tollgate_tests::{eventually, unique};

const CHILD_SETTINGS: &str = "TOLLGATE_TEST_BILLING_CHILD_SETTINGS";

struct Stack {
    db: Db,
    proxy: Proxy,
    topic: String,
    catalogue: String,
    gateway: TestGateway,
    mirror: Shutdown,
}

/// A keys topic, a gateway on it, the meter consumer's mirror of it into the test's database,
/// a stateful proxy, and `setup` run through it.
async fn stack(prefix: &str) -> Stack {
    let db = Db::new(prefix).await;
    let proxy = Proxy::start_stateful().await;
    let topic = create_keys_topic().await;
    let catalogue = write_catalogue(&catalogue_text("0.01"));
    let gateway = TestGateway::start(gateway_settings(&topic, "http://127.0.0.1:1"), None).await;
    let mirror = Shutdown::default();
    let (_ops, recorder) = tollgate_runtime::ops::Ops::new();
    let kafka: tollgate_runtime::kafka::KafkaSettings =
        serde_json::from_value(json!({"brokers": tollgate_tests::kafka()})).expect("kafka settings");
    tokio::spawn(tollgate_meter_consumer::keys::run(
        kafka,
        topic.clone(),
        unique("mirror"),
        db.client.clone(),
        tollgate_meter_consumer::metrics::Metrics::new(recorder),
        (Duration::from_millis(100), Duration::from_secs(1)),
        mirror.clone(),
    ));
    let settings = provisioning_settings(&db, &proxy.url(), &topic, &catalogue);
    tollgate_billing_sync::setup(&settings, KEY).await.expect("setup");
    Stack {
        db,
        proxy,
        topic,
        catalogue,
        gateway,
        mirror,
    }
}

impl Stack {
    fn settings(&self) -> tollgate_billing_sync::BillingSettings {
        provisioning_settings(&self.db, &self.proxy.url(), &self.topic, &self.catalogue)
    }

    async fn create_consumer(&self, name: &str, tenant: &str, plan: &str) {
        let created = self
            .gateway
            .admin(
                "POST",
                "/v1/consumers",
                Some(json!({"name": name, "metadata": {"tenantId": tenant, "plan": plan}})),
            )
            .await;
        assert_eq!(created.status, 201, "{}", created.text());
    }

    /// The consumer's `stripeCustomerId`, as the admin API shows it, once it has one.
    async fn customer_of(&self, name: &str) -> String {
        eventually(
            "the customer id in the consumer's metadata",
            Duration::from_secs(60),
            || async {
                let reply = self.gateway.admin("GET", &format!("/v1/consumers/{name}"), None).await;
                reply.json()["metadata"]["stripeCustomerId"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
            },
        )
        .await
    }

    async fn status_of(&self, tenant: &str, status: &str) -> (String, String, String, String, String) {
        eventually(&format!("{tenant} {status}"), Duration::from_secs(60), || async {
            customer_rows(&self.db).await.remove(tenant).filter(|r| r.3 == status)
        })
        .await
    }

    async fn remove(self) {
        self.mirror.trigger();
        self.gateway.stop().await;
        self.db.remove().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_is_billed_changes_plan_and_is_cancelled_with_one_call_each() {
    let stack = stack("billing_provision").await;
    let service = Shutdown::default();
    let task = tokio::spawn(tollgate_billing_sync::run(
        stack.settings(),
        KEY.to_owned(),
        service.clone(),
    ));
    let tenant = unique("tenant");
    stack.create_consumer("acme", &tenant, "starter").await;
    let customer = stack.customer_of("acme").await;

    let creates = stack.proxy.calls("POST", "/v1/customers");
    assert_eq!(creates.len(), 1, "one customer create: {creates:?}");
    assert_eq!(creates[0].idempotency_key, format!("tollgate-customer:{tenant}"));
    assert_eq!(creates[0].form["metadata[tenantId]"], tenant);
    assert_eq!(creates[0].upstream, 200, "stripe-mock accepted it: {:?}", creates[0]);
    assert_eq!(creates[0].response["id"], customer.as_str(), "the id Stripe answered");
    let (_, subscription, plan, _, _) = stack.status_of(&tenant, "active").await;
    let subscribes = stack.proxy.calls("POST", "/v1/subscriptions");
    assert_eq!(subscribes.len(), 1, "one subscription create: {subscribes:?}");
    let subscribe = &subscribes[0];
    assert_eq!(subscribe.upstream, 200, "{subscribe:?}");
    assert_eq!(
        subscribe.idempotency_key,
        format!("tollgate-subscription:{tenant}:{customer}:g0")
    );
    assert_eq!(subscribe.form["customer"], customer);
    assert_eq!(subscribed_prices(subscribe), plan_prices(&stack.proxy, "starter"));
    assert_eq!(
        (subscription.as_str(), plan.as_str()),
        (subscribe.response["id"].as_str().unwrap(), "starter")
    );

    // Usage is pushed under the new customer (the mirror carried the write-back to ClickHouse).
    eventually(
        "the customer id in ClickHouse's consumers",
        Duration::from_secs(60),
        || async {
            let ids: Vec<String> = stack
                .db
                .client
                .query("SELECT stripe_customer_id FROM consumers FINAL WHERE tenant_id = ? AND deleted = 0")
                .bind(&tenant)
                .fetch_all()
                .await
                .expect("consumers");
            (ids == [customer.clone()]).then_some(())
        },
    )
    .await;
    let windows = closed_windows(&[2]);
    insert_usage(
        &stack.db,
        std::slice::from_ref(&tenant),
        &windows,
        3,
        &mut Expected::new(),
    )
    .await;
    eventually("usage pushed under the customer", Duration::from_secs(60), || async {
        let seen = stack.proxy.seen();
        (seen.len() == 2 && seen.iter().all(|s| s.customer == customer)).then_some(())
    })
    .await;

    // A plan change: one update, old items out, the new plan's prices in.
    let patched = stack
        .gateway
        .admin(
            "PATCH",
            "/v1/consumers/acme",
            Some(json!({"metadata": {"plan": "professional"}})),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.text());
    stack.status_of(&tenant, "active").await;
    let path = format!("/v1/subscriptions/{subscription}");
    eventually("the plan change", Duration::from_secs(60), || async {
        (stack.proxy.calls("POST", &path).len() == 1).then_some(())
    })
    .await;
    let update = &stack.proxy.calls("POST", &path)[0];
    assert_eq!(update.upstream, 200, "{update:?}");
    let old_items: HashSet<&str> = subscribe.response["items"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    let deleted: HashSet<&str> = update
        .form
        .iter()
        .filter(|(k, v)| k.ends_with("][deleted]") && *v == "true")
        .map(|(k, _)| update.form[&k.replace("[deleted]", "[id]")].as_str())
        .collect();
    assert_eq!(deleted, old_items);
    let added: Vec<String> = subscribed_prices(update);
    assert_eq!(added, plan_prices(&stack.proxy, "professional"));
    assert_eq!(update.form["proration_behavior"], "none", "the setting");
    eventually("professional recorded", Duration::from_secs(60), || async {
        customer_rows(&stack.db)
            .await
            .remove(&tenant)
            .filter(|r| r.2 == "professional" && r.3 == "active")
    })
    .await;

    // The last consumer deleted: one cancel at period end.
    let deleted = stack.gateway.admin("DELETE", "/v1/consumers/acme", None).await;
    assert_eq!(deleted.status, 204);
    stack.status_of(&tenant, "cancelled").await;
    // Later passes happened (another tenant was provisioned), and sent nothing more for this one.
    let other = unique("tenant");
    stack.create_consumer("globex", &other, "starter").await;
    stack.customer_of("globex").await;
    stack.status_of(&other, "active").await;
    let calls = stack.proxy.calls("POST", &path);
    assert_eq!(calls.len(), 2, "one update, one cancel: {calls:?}");
    assert_eq!(calls[1].form["cancel_at_period_end"], "true");
    assert_eq!(
        calls[1].idempotency_key,
        format!("tollgate-subscription-cancel:{subscription}:r1")
    );
    let customers_for_tenant = stack
        .proxy
        .calls("POST", "/v1/customers")
        .into_iter()
        .filter(|c| c.form["metadata[tenantId]"] == tenant)
        .count();
    assert_eq!(customers_for_tenant, 1);

    service.trigger();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("billing-sync stops")
        .expect("task")
        .expect("clean exit");
    stack.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_supplied_customer_is_kept_and_subscribed() {
    let stack = stack("billing_operator").await;
    let service = Shutdown::default();
    let task = tokio::spawn(tollgate_billing_sync::run(
        stack.settings(),
        KEY.to_owned(),
        service.clone(),
    ));
    let tenant = unique("tenant");
    let created = stack
        .gateway
        .admin(
            "POST",
            "/v1/consumers",
            Some(json!({"name": "initech", "metadata": {"tenantId": tenant, "plan": "starter", "stripeCustomerId": "cus_operator"}})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let (customer, _, _, _, _) = stack.status_of(&tenant, "active").await;
    assert_eq!(customer, "cus_operator");
    assert!(
        stack.proxy.calls("POST", "/v1/customers").is_empty(),
        "no customer created"
    );
    let subscribes = stack.proxy.calls("POST", "/v1/subscriptions");
    assert_eq!(subscribes.len(), 1);
    assert_eq!(subscribes[0].form["customer"], "cus_operator");
    service.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    stack.remove().await;
}

/// Not a test: the billing-sync process the crash tests start and kill (`--ignored --exact`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the SIGKILL tests"]
async fn billing_sync_child_process() {
    let text = std::env::var(CHILD_SETTINGS).expect("started by a crash test");
    let settings = tollgate_runtime::settings::from_str_with_env(&text, "child.toml", Vec::new()).expect("settings");
    tollgate_billing_sync::run(settings, KEY.to_owned(), Shutdown::on_signals())
        .await
        .expect("billing-sync runs");
}

fn start_child(stack: &Stack) -> Child {
    let text = provisioning_settings_text(&stack.db, &stack.proxy.url(), &stack.topic, &stack.catalogue);
    Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--ignored",
            "--exact",
            "billing_sync_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_SETTINGS, text)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn billing-sync")
}

/// Kills billing-sync (SIGKILL) while Stripe's answer to `method path` is held, restarts it,
/// and checks that the tenant ends with one customer and one subscription.
async fn killed_while_waiting_for(method: &str, path: &str, prefix: &str) {
    let stack = stack(prefix).await;
    stack.proxy.hold(method, path);
    let mut child = start_child(&stack);
    let tenant = unique("tenant");
    stack.create_consumer("hooli", &tenant, "starter").await;
    eventually("the call made, its answer held", Duration::from_secs(60), || async {
        (stack.proxy.held() == 1).then_some(())
    })
    .await;
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    stack.proxy.release();
    let mut child = start_child(&stack);
    let customer = stack.customer_of("hooli").await;
    stack.status_of(&tenant, "active").await;
    child.kill().expect("stop");
    child.wait().expect("reaped");

    let creates = stack.proxy.calls("POST", "/v1/customers");
    let subscribes = stack.proxy.calls("POST", "/v1/subscriptions");
    let expected_creates = if path == "/v1/customers" { 2 } else { 1 };
    let expected_subscribes = if path == "/v1/subscriptions" { 2 } else { 1 };
    assert_eq!(creates.len(), expected_creates, "{creates:?}");
    assert_eq!(subscribes.len(), expected_subscribes, "{subscribes:?}");
    // A re-sent call is the same call: same key, same form; Stripe answers it from its cache.
    for calls in [&creates, &subscribes] {
        assert!(
            calls
                .iter()
                .all(|c| c.idempotency_key == calls[0].idempotency_key && c.form == calls[0].form),
            "{calls:?}"
        );
    }
    assert_eq!(creates[0].idempotency_key, format!("tollgate-customer:{tenant}"));
    assert_eq!(subscribes[0].form["customer"], customer);
    assert_eq!(
        subscribes[0].idempotency_key,
        format!("tollgate-subscription:{tenant}:{customer}:g0")
    );
    stack.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_customer_creation_and_write_back_makes_no_second_customer() {
    killed_while_waiting_for("POST", "/v1/customers", "billing_kill_customer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_subscription_creation_and_its_record_makes_no_second_subscription() {
    killed_while_waiting_for("POST", "/v1/subscriptions", "billing_kill_subscription").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_no_invoice_difference_until_a_price_in_stripe_changes() {
    let stack = stack("billing_invoice").await;
    let service = Shutdown::default();
    let task = tokio::spawn(tollgate_billing_sync::run(
        stack.settings(),
        KEY.to_owned(),
        service.clone(),
    ));
    let tenant = unique("tenant");
    stack.create_consumer("umbrella", &tenant, "starter").await;
    let customer = stack.customer_of("umbrella").await;
    stack.status_of(&tenant, "active").await;
    eventually("the customer id in ClickHouse", Duration::from_secs(60), || async {
        let ids: Vec<String> = stack
            .db
            .client
            .query("SELECT stripe_customer_id FROM consumers FINAL WHERE tenant_id = ? AND deleted = 0")
            .bind(&tenant)
            .fetch_all()
            .await
            .expect("consumers");
        (ids == [customer.clone()]).then_some(())
    })
    .await;
    // 40 requests (10 included, 30 at 0.01) and compute units at 0.25, in a closed window.
    let windows = closed_windows(&[2]);
    let mut expected = Expected::new();
    insert_usage(&stack.db, std::slice::from_ref(&tenant), &windows, 40, &mut expected).await;
    eventually("usage pushed", Duration::from_secs(60), || async {
        (stack.proxy.seen().len() == 2).then_some(())
    })
    .await;
    let settings = stack.settings();
    // The ledger side of reconcile: every closed window's units pushed, none differing.
    for period in periods(&windows) {
        let report = eventually("the ledger reconciled", Duration::from_secs(60), || async {
            let report =
                tollgate_billing_sync::reconcile::reconcile(&stack.db.client, &settings, period, unix_now_secs())
                    .await
                    .expect("reconcile");
            (!report.differs()).then_some(report)
        })
        .await;
        let lines: Vec<_> = report.lines.iter().filter(|((t, _), _)| *t == tenant).collect();
        assert_eq!(lines.len(), 2, "both meters: {report}");
        assert!(
            lines.iter().all(|(_, l)| l.clickhouse > 0 && l.pushed == l.clickhouse),
            "{report}"
        );
    }
    let period = chrono_month(unix_now_secs());
    let report = tollgate_billing_sync::reconcile_invoices(&settings, KEY, &period)
        .await
        .expect("reconcile")
        .expect("the current month, with a catalogue");
    assert_eq!(report.lines.len(), 1, "{report}");
    let line = &report.lines[0];
    assert_eq!(
        (line.tenant_id.as_str(), line.plan.as_str()),
        (tenant.as_str(), "starter")
    );
    assert_eq!(line.difference(), 0, "{report}");
    assert!(!report.differs());
    let in_month = |(_, _, start): &&(String, String, u32)| chrono_month(i64::from(*start)) == period;
    let units = |meter: &str| -> i64 {
        expected
            .iter()
            .filter(|(k, _)| k.1 == meter && in_month(k))
            .map(|(_, v)| *v)
            .sum()
    };
    // Fee + (requests - 10 included) × 0.01 + compute units × 0.25, each line rounded.
    let requests = ((units("requests") - 10).max(0) as f64 * 0.01).round() as i64;
    let compute = (units("compute_units") as f64 * 0.25).round() as i64;
    assert_eq!(line.tollgate, 2900 + requests + compute, "{report}");

    // A price changed in Stripe behind Tollgate's back is reported.
    stack.proxy.set_unit_price("tollgate:starter:fee", "0");
    stack
        .proxy
        .set_unit_price("tollgate:starter:meter:compute_units", "0.5");
    let changed = tollgate_billing_sync::reconcile_invoices(&settings, KEY, &period)
        .await
        .expect("reconcile")
        .expect("a report");
    assert!(changed.differs(), "{changed}");
    assert_ne!(changed.lines[0].stripe, line.stripe, "{changed}");
    assert!(
        changed
            .to_string()
            .contains(&format!("{tenant}\tstarter\tusd\t{}\t", line.tollgate)),
        "{changed}"
    );
    service.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    stack.remove().await;
}

fn unix_now_secs() -> i64 {
    tollgate_billing_sync::sync::unix_now()
}
