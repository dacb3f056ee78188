//! `billing-sync setup` with a catalogue, through the recording proxy in front of a real
//! stripe-mock: the first run creates the meters, a product per plan and its prices (each
//! accepted by stripe-mock's validation against Stripe's API spec); a second run creates
//! nothing; a changed price is one new price that takes the old one's lookup key.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use tollgate_billing_sync::products::SetupAction;
use tollgate_tests::billing::*;

fn posts(proxy: &Proxy) -> Vec<Other> {
    proxy.others().into_iter().filter(|o| o.method == "POST").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_twice_creates_nothing_and_a_changed_price_is_a_new_price() {
    let db = Db::new("billing_setup_catalogue").await;
    let proxy = Proxy::start_stateful().await;
    let catalogue = write_catalogue(&catalogue_text("0.01"));
    let settings = provisioning_settings(&db, &proxy.url(), "unused.keys", &catalogue);

    let first = tollgate_billing_sync::setup(&settings, KEY).await.expect("setup");
    let summary: Vec<(&str, &str, SetupAction)> = first.iter().map(|l| (l.object, l.name.as_str(), l.action)).collect();
    assert_eq!(
        summary,
        [
            ("meter", "tollgate_requests", SetupAction::Created),
            ("meter", "tollgate_compute_units", SetupAction::Created),
            ("product", "professional", SetupAction::Created),
            ("product", "starter", SetupAction::Created),
            ("price", "tollgate:professional:fee", SetupAction::Created),
            (
                "price",
                "tollgate:professional:meter:compute_units",
                SetupAction::Created
            ),
            ("price", "tollgate:professional:meter:requests", SetupAction::Created),
            ("price", "tollgate:starter:fee", SetupAction::Created),
            ("price", "tollgate:starter:meter:compute_units", SetupAction::Created),
            ("price", "tollgate:starter:meter:requests", SetupAction::Created),
        ]
    );
    let created = posts(&proxy);
    assert_eq!(created.len(), 10);
    assert!(
        created
            .iter()
            .all(|c| c.upstream == 200 && !c.idempotency_key.is_empty()),
        "{created:?}"
    );
    let meter_id = created
        .iter()
        .find(|c| c.path == "/v1/billing/meters" && c.form["event_name"] == "tollgate_requests")
        .map(|c| c.response["id"].as_str().unwrap().to_owned())
        .unwrap();
    let requests = proxy.price("tollgate:starter:meter:requests").unwrap();
    let form = &requests["form"];
    assert_eq!(form["product"], "tollgate_plan_starter");
    assert_eq!(form["recurring[usage_type]"], "metered");
    assert_eq!(form["recurring[meter]"], meter_id.as_str(), "attached to its meter");
    assert_eq!(form["tiers_mode"], "graduated");
    assert_eq!(form["tiers[0][up_to]"], "10", "included units free");
    assert_eq!(form["tiers[1][unit_amount_decimal]"], "0.01");
    let fee = proxy.price("tollgate:starter:fee").unwrap();
    assert_eq!(fee["form"]["unit_amount"], "2900");
    assert_eq!(fee["form"]["recurring[usage_type]"], "licensed");

    let second = tollgate_billing_sync::setup(&settings, KEY).await.expect("setup again");
    assert!(second.iter().all(|l| l.action == SetupAction::Found), "{second:?}");
    assert_eq!(posts(&proxy).len(), 10, "the second run created nothing");

    // Starter's request price changes: one new price, taking the lookup key over.
    let changed = write_catalogue(&catalogue_text("0.02"));
    let settings = provisioning_settings(&db, &proxy.url(), "unused.keys", &changed);
    let third = tollgate_billing_sync::setup(&settings, KEY)
        .await
        .expect("setup after a change");
    let not_found: Vec<_> = third.iter().filter(|l| l.action != SetupAction::Found).collect();
    assert_eq!(not_found.len(), 1, "{third:?}");
    assert_eq!(
        (not_found[0].name.as_str(), not_found[0].action),
        ("tollgate:starter:meter:requests", SetupAction::Changed)
    );
    let new_posts = posts(&proxy)[10..].to_vec();
    assert_eq!(new_posts.len(), 1, "{new_posts:?}");
    assert_eq!(new_posts[0].path, "/v1/prices");
    assert_eq!(new_posts[0].form["transfer_lookup_key"], "true");
    assert_eq!(new_posts[0].form["tiers[1][unit_amount_decimal]"], "0.02");
    assert_ne!(
        new_posts[0].idempotency_key, created[9].idempotency_key,
        "a new price, a new key"
    );
    let fourth = tollgate_billing_sync::setup(&settings, KEY).await.expect("setup");
    assert!(fourth.iter().all(|l| l.action == SetupAction::Found), "{fourth:?}");
    assert_eq!(posts(&proxy).len(), 11);
    db.remove().await;
}
