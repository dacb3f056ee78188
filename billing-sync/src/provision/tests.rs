//! [`decide`] walked through a tenant's life: created, subscribed, written back, plan
//! changed, prices changed, deleted, and every intent resumed after a crash.

use std::collections::BTreeMap;

use tollgate_schemas::ConsumerRecord;

use super::*;

const RETRY: u64 = 3_600;

fn consumer(id: &str, plan: Option<&str>, customer: Option<&str>, updated: i64) -> ConsumerRecord {
    ConsumerRecord {
        id: id.to_owned(),
        name: id.to_owned(),
        tenant_id: Some("t1".to_owned()),
        plan: plan.map(str::to_owned),
        stripe_customer_id: customer.map(str::to_owned),
        metadata_json: "{}".to_owned(),
        created_at_ms: 0,
        updated_at_ms: updated,
        version: 1,
        updated_by: "admin-api".to_owned(),
    }
}

fn tenant(consumers: Vec<ConsumerRecord>) -> Tenant {
    let mut consumers = consumers;
    consumers.sort_by_key(|c| std::cmp::Reverse(c.updated_at_ms));
    Tenant {
        tenant_id: "t1".to_owned(),
        plan: consumers[0].plan.clone(),
        stripe_customer_id: consumers.iter().find_map(|c| c.stripe_customer_id.clone()),
        consumers,
    }
}

fn prices() -> PlanPriceIds {
    PlanPriceIds {
        plans: BTreeMap::from([
            ("starter".to_owned(), vec!["price_s1".to_owned()]),
            ("professional".to_owned(), vec!["price_p1".to_owned()]),
        ]),
        not_set_up: BTreeMap::from([("enterprise".to_owned(), "price x not found; run `setup`".to_owned())]),
    }
}

fn record(status: CustomerStatus) -> CustomerRecord {
    CustomerRecord {
        stripe_customer_id: "cus_1".to_owned(),
        subscription_id: "sub_1".to_owned(),
        plan: "starter".to_owned(),
        price_ids: vec!["price_s1".to_owned()],
        status,
        updated_at: 1_000,
        ..CustomerRecord::new("t1")
    }
}

#[test]
fn a_new_tenant_gets_a_customer_or_keeps_the_operators() {
    let t = tenant(vec![consumer("c1", Some("starter"), None, 1)]);
    assert_eq!(decide(Some(&t), None, &prices(), 10, RETRY), Step::CreateCustomer);
    let given = tenant(vec![consumer("c1", Some("starter"), Some("cus_op"), 1)]);
    assert_eq!(
        decide(Some(&given), None, &prices(), 10, RETRY),
        Step::Adopt {
            customer: "cus_op".to_owned()
        }
    );
    assert_eq!(decide(None, None, &prices(), 10, RETRY), Step::Nothing);
}

#[test]
fn a_customer_is_subscribed_then_written_back() {
    let t = tenant(vec![
        consumer("c1", Some("starter"), None, 1),
        consumer("c2", Some("starter"), None, 2),
    ]);
    let mut rec = record(CustomerStatus::Customer);
    rec.subscription_id.clear();
    assert_eq!(
        decide(Some(&t), Some(&rec), &prices(), 10, RETRY),
        Step::Subscribe {
            plan: "starter".to_owned(),
            price_ids: vec!["price_s1".to_owned()]
        }
    );
    let active = record(CustomerStatus::Active);
    assert_eq!(
        decide(Some(&t), Some(&active), &prices(), 10, RETRY),
        Step::WriteBack {
            consumer_ids: vec!["c2".to_owned(), "c1".to_owned()]
        }
    );
    let written = tenant(vec![consumer("c1", Some("starter"), Some("cus_1"), 3)]);
    assert_eq!(
        decide(Some(&written), Some(&active), &prices(), 10, RETRY),
        Step::Nothing
    );
}

#[test]
fn intents_are_resumed_whatever_the_consumers_say_now() {
    let t = tenant(vec![consumer("c1", Some("professional"), None, 1)]);
    for status in [
        CustomerStatus::Subscribing,
        CustomerStatus::Updating,
        CustomerStatus::Cancelling,
    ] {
        assert_eq!(
            decide(Some(&t), Some(&record(status)), &prices(), 10, RETRY),
            Step::Resume
        );
        assert_eq!(decide(None, Some(&record(status)), &prices(), 10, RETRY), Step::Resume);
    }
    let creating = CustomerRecord::new("t1");
    assert_eq!(
        decide(Some(&t), Some(&creating), &prices(), 10, RETRY),
        Step::CreateCustomer
    );
    assert_eq!(decide(None, Some(&creating), &prices(), 10, RETRY), Step::Nothing);
}

#[test]
fn a_plan_change_moves_the_subscription_at_once_and_new_prices_at_period_end() {
    let moved = tenant(vec![consumer("c1", Some("professional"), Some("cus_1"), 5)]);
    assert_eq!(
        decide(
            Some(&moved),
            Some(&record(CustomerStatus::Active)),
            &prices(),
            10,
            RETRY
        ),
        Step::Update {
            plan: "professional".to_owned(),
            price_ids: vec!["price_p1".to_owned()]
        }
    );
    let same = tenant(vec![consumer("c1", Some("starter"), Some("cus_1"), 5)]);
    let mut repriced = prices();
    repriced.plans.insert("starter".to_owned(), vec!["price_s2".to_owned()]);
    let mut active = record(CustomerStatus::Active);
    active.period_end = 100;
    assert_eq!(decide(Some(&same), Some(&active), &repriced, 99, RETRY), Step::Nothing);
    assert_eq!(
        decide(Some(&same), Some(&active), &repriced, 100, RETRY),
        Step::Update {
            plan: "starter".to_owned(),
            price_ids: vec!["price_s2".to_owned()]
        }
    );
}

#[test]
fn the_last_consumer_gone_cancels_once() {
    assert_eq!(
        decide(None, Some(&record(CustomerStatus::Active)), &prices(), 10, RETRY),
        Step::Cancel
    );
    assert_eq!(
        decide(None, Some(&record(CustomerStatus::Cancelled)), &prices(), 10, RETRY),
        Step::Nothing
    );
    // Back again: a new subscription.
    let back = tenant(vec![consumer("c9", Some("starter"), Some("cus_1"), 9)]);
    assert!(matches!(
        decide(
            Some(&back),
            Some(&record(CustomerStatus::Cancelled)),
            &prices(),
            10,
            RETRY
        ),
        Step::Subscribe { .. }
    ));
}

#[test]
fn plans_without_prices_and_plans_not_set_up() {
    let mut rec = record(CustomerStatus::Customer);
    rec.subscription_id.clear();
    let unpriced = tenant(vec![consumer("c1", Some("platinum"), Some("cus_1"), 1)]);
    assert_eq!(decide(Some(&unpriced), Some(&rec), &prices(), 10, RETRY), Step::NoPlan);
    let waiting = tenant(vec![consumer("c1", Some("enterprise"), Some("cus_1"), 1)]);
    assert_eq!(
        decide(Some(&waiting), Some(&rec), &prices(), 10, RETRY),
        Step::Wait {
            reason: "price x not found; run `setup`".to_owned()
        }
    );
    rec.last_error = "price x not found; run `setup`".to_owned();
    assert_eq!(decide(Some(&waiting), Some(&rec), &prices(), 10, RETRY), Step::Nothing);
}

#[test]
fn a_refused_step_waits_before_it_is_tried_again() {
    let t = tenant(vec![consumer("c1", Some("starter"), None, 1)]);
    let failed = record(CustomerStatus::Failed);
    assert_eq!(
        decide(Some(&t), Some(&failed), &prices(), 1_000 + 3_599, RETRY),
        Step::Nothing
    );
    assert_eq!(
        decide(Some(&t), Some(&failed), &prices(), 1_000 + 3_600, RETRY),
        Step::Retry
    );
    assert_eq!(
        decide(None, Some(&failed), &prices(), 1_000 + 3_600, RETRY),
        Step::Nothing
    );
}
