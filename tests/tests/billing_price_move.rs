//! A changed price, end to end, over a real gateway admin API, Kafka keys topic, ClickHouse
//! and stripe-mock: the catalogue's price changes, `setup` creates one new price that takes
//! the lookup key over (a second `setup` creates nothing), billing-sync restarted on the new
//! catalogue writes the new prices for the invoice views and moves the existing
//! subscription to the new prices only once its period has ended, in one update with the
//! configured proration; a tenant subscribed after the change gets the new prices at once.
//!
//! stripe-mock answers fixtures, so the subscription's period end is set by the recording
//! proxy (90 s after the test starts); what counts is what was SENT, as the proxy
//! recorded it.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tollgate_billing_sync::products::SetupAction;
use tollgate_billing_sync::settings::ProrationBehavior;
use tollgate_billing_sync::sync::unix_now;
use tollgate_runtime::shutdown::Shutdown;
use tollgate_tests::billing::*;
use tollgate_tests::gateway::{create_keys_topic, settings as gateway_settings, TestGateway};
use tollgate_tests::{eventually, unique};

fn posts(proxy: &Proxy) -> Vec<Other> {
    proxy.others().into_iter().filter(|o| o.method == "POST").collect()
}

/// Sets every subscription answer's current period end to `period_end` (Unix seconds).
fn period_end_rewrite(period_end: Arc<AtomicU64>) -> Rewrite {
    Arc::new(move |path: &str, body: hyper::body::Bytes| {
        if !path.starts_with("/v1/subscriptions") {
            return body;
        }
        let Ok(mut sub) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return body;
        };
        let end = period_end.load(Ordering::SeqCst);
        sub["current_period_end"] = end.into();
        for item in sub["items"]["data"].as_array_mut().into_iter().flatten() {
            item["current_period_end"] = end.into();
        }
        hyper::body::Bytes::from(serde_json::to_vec(&sub).expect("json"))
    })
}

async fn create_consumer(gateway: &TestGateway, name: &str, tenant: &str) {
    let created = gateway
        .admin(
            "POST",
            "/v1/consumers",
            Some(json!({"name": name, "metadata": {"tenantId": tenant, "plan": "starter"}})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
}

async fn active(db: &Db, tenant: &str) -> (String, String, String, String, String) {
    eventually(&format!("{tenant} active"), Duration::from_secs(60), || async {
        customer_rows(db).await.remove(tenant).filter(|r| r.3 == "active")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_price_is_a_new_price_that_subscriptions_move_to_at_their_next_period() {
    let db = Db::new("billing_price_move").await;
    let period_end = Arc::new(AtomicU64::new(unix_now() as u64 + 90));
    let proxy = Proxy::start_stateful_with(period_end_rewrite(period_end.clone())).await;
    let topic = create_keys_topic().await;
    let gateway = TestGateway::start(gateway_settings(&topic, "http://127.0.0.1:1"), None).await;
    let old_catalogue = write_catalogue(&catalogue_text("0.01"));
    let settings = provisioning_settings(&db, &proxy.url(), &topic, &old_catalogue);
    tollgate_billing_sync::setup(&settings, KEY).await.expect("setup");
    let old_prices = plan_prices(&proxy, "starter");

    // A tenant subscribed at the old prices, its period ending 90 s from the start.
    let first = Shutdown::default();
    let task = tokio::spawn(tollgate_billing_sync::run(settings, KEY.to_owned(), first.clone()));
    let tenant = unique("tenant");
    create_consumer(&gateway, "acme", &tenant).await;
    let (_, subscription, _, _, _) = active(&db, &tenant).await;
    let subscribe = proxy.calls("POST", "/v1/subscriptions");
    assert_eq!(subscribe.len(), 1, "{subscribe:?}");
    assert_eq!(subscribed_prices(&subscribe[0]), old_prices);
    let ends_at = period_end.load(Ordering::SeqCst);
    first.trigger();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("billing-sync stops")
        .expect("task")
        .expect("clean exit");

    // Starter's request price changes: `setup` makes one new price holding the lookup key.
    let new_catalogue = write_catalogue(&catalogue_text("0.02"));
    let mut settings = provisioning_settings(&db, &proxy.url(), &topic, &new_catalogue);
    settings.provisioning.as_mut().expect("provisioning").proration_behavior = ProrationBehavior::CreateProrations;
    let before = posts(&proxy).len();
    let changed = tollgate_billing_sync::setup(&settings, KEY)
        .await
        .expect("setup after the change");
    let moved: Vec<_> = changed.iter().filter(|l| l.action != SetupAction::Found).collect();
    assert_eq!(moved.len(), 1, "{changed:?}");
    assert_eq!(
        (moved[0].name.as_str(), moved[0].action),
        ("tollgate:starter:meter:requests", SetupAction::Changed)
    );
    let created = posts(&proxy)[before..].to_vec();
    assert_eq!(created.len(), 1, "one new price: {created:?}");
    assert_eq!(created[0].path, "/v1/prices");
    assert_eq!(created[0].form["lookup_key"], "tollgate:starter:meter:requests");
    assert_eq!(created[0].form["transfer_lookup_key"], "true");
    assert_eq!(created[0].form["tiers[1][unit_amount_decimal]"], "0.02");
    let new_prices = plan_prices(&proxy, "starter");
    assert_eq!(new_prices[..2], old_prices[..2], "fee and compute units unchanged");
    assert_ne!(new_prices[2], old_prices[2]);
    let again = tollgate_billing_sync::setup(&settings, KEY).await.expect("setup again");
    assert!(again.iter().all(|l| l.action == SetupAction::Found), "{again:?}");
    assert_eq!(posts(&proxy).len(), before + 1, "the second setup created nothing");

    // billing-sync on the new catalogue: the new prices reach the invoice views, a new tenant
    // is subscribed to them, and the existing subscription stays until its period ends.
    period_end.store(unix_now() as u64 + 3_600, Ordering::SeqCst);
    let second = Shutdown::default();
    let task = tokio::spawn(tollgate_billing_sync::run(settings, KEY.to_owned(), second.clone()));
    eventually("the new prices in plan_prices", Duration::from_secs(60), || async {
        let prices: Vec<String> = db
            .client
            .query(
                "SELECT toString(unit_price_minor) FROM plan_prices FINAL \
                 WHERE plan = 'starter' AND meter = 'requests' AND version = (SELECT max(version) FROM plan_prices)",
            )
            .fetch_all()
            .await
            .expect("plan_prices");
        (prices.len() == 1 && prices[0].parse::<f64>().ok() == Some(0.02)).then_some(())
    })
    .await;
    let newcomer = unique("tenant");
    create_consumer(&gateway, "globex", &newcomer).await;
    active(&db, &newcomer).await;
    let subscribes = proxy.calls("POST", "/v1/subscriptions");
    assert_eq!(subscribes.len(), 2, "{subscribes:?}");
    assert_eq!(
        subscribed_prices(&subscribes[1]),
        new_prices,
        "a new subscription: the new prices"
    );
    let path = format!("/v1/subscriptions/{subscription}");
    let now = unix_now() as u64;
    assert!(
        now < ends_at,
        "the test reached this point before the period ended ({now} >= {ends_at})"
    );
    assert!(
        proxy.calls("POST", &path).is_empty(),
        "passes before the period end moved nothing"
    );

    // The period ends: one update, the old items out, the new prices in, with the setting's
    // proration, recorded at or after the period end.
    eventually("the move at the period end", Duration::from_secs(120), || async {
        (!proxy.calls("POST", &path).is_empty()).then_some(())
    })
    .await;
    let updates = proxy.calls("POST", &path);
    assert_eq!(updates.len(), 1, "{updates:?}");
    let update = &updates[0];
    assert_eq!(update.upstream, 200, "stripe-mock accepted it: {update:?}");
    assert_eq!(
        update.idempotency_key,
        format!("tollgate-subscription-update:{subscription}:r0")
    );
    let old_items: HashSet<&str> = subscribe[0].response["items"]["data"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["id"].as_str().expect("item id"))
        .collect();
    let deleted: HashSet<&str> = update
        .form
        .iter()
        .filter(|(k, v)| k.ends_with("][deleted]") && *v == "true")
        .map(|(k, _)| update.form[&k.replace("[deleted]", "[id]")].as_str())
        .collect();
    assert_eq!(deleted, old_items);
    assert_eq!(subscribed_prices(update), new_prices);
    assert_eq!(update.form["proration_behavior"], "create_prorations", "the setting");
    let moved_at: Vec<u32> = db
        .client
        .query("SELECT toUInt32(intent_at) FROM billing_customers FINAL WHERE tenant_id = ?")
        .bind(&tenant)
        .fetch_all()
        .await
        .expect("billing_customers");
    assert!(
        moved_at.len() == 1 && u64::from(moved_at[0]) >= ends_at,
        "moved at {moved_at:?}, period end {ends_at}"
    );

    // Later passes (a third tenant provisioned) send nothing more for either subscription.
    let third = unique("tenant");
    create_consumer(&gateway, "initech", &third).await;
    active(&db, &third).await;
    assert_eq!(proxy.calls("POST", &path).len(), 1, "still one update");
    assert_eq!(
        proxy.calls("POST", "/v1/prices").len(),
        7,
        "six prices at setup, one changed"
    );

    second.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    gateway.stop().await;
    db.remove().await;
}
