//! Finance's invoice amounts in ClickHouse equal billing-sync's: for any catalogue (fees,
//! unit prices to 12 decimal places, included units) and any billable units, the
//! `invoice_preview` line amounts and the `invoice_totals` totals, computed by the real
//! server (Debian's 18.16) from the prices billing-sync writes (`prices::publish`), equal
//! `PlanPrices::usage_amount` and `PlanPrices::amount`, which billing-sync's invoice check
//! (`invoice::compare`) prices a tenant's month with. Tenants whose plan is not in the
//! catalogue, and meters a plan does not price, show `priced = 0` and amount 0.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::BTreeMap;
use std::fmt::Write as _;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tollgate_runtime::catalogue::Catalogue;
use tollgate_tests::billing::Db;
use tollgate_tests::unique;

const METERS: [&str; 3] = ["requests", "compute_units", "request_bytes"];

#[derive(Debug, Clone)]
struct Plan {
    currency: &'static str,
    fee: u64,
    /// Per priced meter: (price text, included units).
    meters: BTreeMap<&'static str, (String, u64)>,
}

/// A price with 0 to 12 decimal places, up to 999 999 minor units per unit.
fn price() -> impl Strategy<Value = String> {
    (0u64..1_000_000, 0usize..=12, any::<u64>()).prop_map(|(int, places, frac)| {
        let int = if int % 3 == 0 { 0 } else { int % 1_000 };
        if places == 0 {
            return int.to_string();
        }
        let frac = frac % 10u64.pow(places as u32);
        format!("{int}.{frac:0places$}")
    })
}

fn plan() -> impl Strategy<Value = Plan> {
    let meter = || (price(), prop_oneof![Just(0u64), 0u64..5_000]);
    (
        prop::sample::select(vec!["usd", "eur", "jpy"]),
        prop_oneof![Just(0u64), 1u64..100_000],
        prop::option::of(meter()),
        prop::option::of(meter()),
    )
        .prop_map(|(currency, fee, requests, compute)| {
            let mut meters = BTreeMap::new();
            meters.extend(requests.map(|m| ("requests", m)));
            meters.extend(compute.map(|m| ("compute_units", m)));
            // Stripe needs one item: a plan without meters has a fee.
            let fee = if meters.is_empty() && fee == 0 { 1 } else { fee };
            Plan { currency, fee, meters }
        })
}

fn catalogue_text(plans: &[Plan]) -> String {
    let mut text = String::new();
    for (i, p) in plans.iter().enumerate() {
        let _ = writeln!(
            text,
            "[plans.p{i}]\ncurrency = \"{}\"\nmonthly_fee_minor = {}",
            p.currency, p.fee
        );
        for (meter, (price, included)) in &p.meters {
            let _ = writeln!(
                text,
                "meters.{meter} = {{ unit_price_minor = \"{price}\", included_units = {included} }}"
            );
        }
    }
    text
}

/// A tenant: its plan (an index past the catalogue's plans names one it lacks) and, per
/// meter, its billable units split over two days.
type TenantUsage = (usize, Vec<(u64, u64)>);

fn tenant(plans: usize) -> impl Strategy<Value = TenantUsage> {
    let units = prop_oneof![Just(0u64), 0u64..20_000, 0u64..10_000_000_000];
    (
        0..plans + 1,
        prop::collection::vec((units.clone(), units), METERS.len()),
    )
}

#[test]
fn invoice_view_amounts_equal_billing_syncs_for_any_prices_and_units() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let db = rt.block_on(Db::new("invoice_amounts"));
    let mut runner = TestRunner::new(Config {
        cases: 16,
        failure_persistence: None,
        ..Config::default()
    });
    let case = prop::collection::vec(plan(), 1..4)
        .prop_flat_map(|plans| (Just(plans.clone()), prop::collection::vec(tenant(plans.len()), 1..6)));
    runner
        .run(&case, |(plans, tenants)| {
            rt.block_on(check(&db, &plans, &tenants));
            Ok(())
        })
        .unwrap();
    rt.block_on(db.remove());
}

async fn check(db: &Db, plans: &[Plan], tenants: &[TenantUsage]) {
    let catalogue = Catalogue::parse(&catalogue_text(plans), "generated").expect("a valid catalogue");
    tollgate_billing_sync::prices::publish(&db.client, &catalogue)
        .await
        .expect("prices written");
    let prefix = unique("t");
    let mut consumers = Vec::new();
    let mut usage = Vec::new();
    // What the views must answer, in TabSeparated.
    let mut lines = String::new();
    let mut totals = String::new();
    for (i, (plan, units)) in tenants.iter().enumerate() {
        let tenant = format!("{prefix}_{i}");
        let plan = format!("p{plan}");
        consumers.push(format!(
            "('c_{tenant}', 'c', '{tenant}', '{plan}', '', '{{}}', 1, now(), 0)"
        ));
        let prices = catalogue.plans.get(&plan);
        let mut month: BTreeMap<String, i64> = BTreeMap::new();
        let mut tenant_lines = Vec::new();
        for (meter, (a, b)) in METERS.iter().zip(units) {
            for (day, n) in [("2026-11-02", a), ("2026-11-20", b)] {
                usage.push(format!("('{tenant}', '{meter}', '{day}', 1, 1, {n}, {n})"));
            }
            let n = (a + b) as i64;
            month.insert((*meter).to_owned(), n);
            let amount = prices.and_then(|p| p.usage_amount(meter, n)).map(|a| a.round_minor());
            let currency = amount.and(prices.map(|p| p.currency.as_str())).unwrap_or_default();
            tenant_lines.push((
                meter.to_owned(),
                u8::from(amount.is_some()),
                currency,
                amount.unwrap_or(0),
            ));
        }
        tenant_lines.sort();
        for (meter, priced, currency, amount) in tenant_lines {
            let _ = writeln!(lines, "{tenant}\t{meter}\t{priced}\t{currency}\t{amount}");
        }
        let (priced, currency, fee, total) = match prices {
            Some(p) => (1, p.currency.as_str(), p.monthly_fee_minor as i64, p.amount(&month)),
            None => (0, "", 0, 0),
        };
        let _ = writeln!(totals, "{tenant}\t{plan}\t{priced}\t{currency}\t{fee}\t{total}");
    }
    let exec = |sql: String| async move { db.client.query(&sql).execute().await.expect("insert") };
    exec(format!(
        "INSERT INTO consumers (consumer_id, name, tenant_id, plan, stripe_customer_id, metadata_json, version, updated_at, deleted) VALUES {}",
        consumers.join(", ")
    ))
    .await;
    exec(format!(
        "INSERT INTO usage_meter_day (tenant_id, meter, day, events, billable_events, units, billable_units) VALUES {}",
        usage.join(", ")
    ))
    .await;
    let pattern = format!("{prefix}_%");
    let seen_lines = tsv(
        db,
        "SELECT tenant_id, meter, priced, currency, amount_minor FROM invoice_preview \
         WHERE tenant_id LIKE ? ORDER BY tenant_id, meter",
        &pattern,
    )
    .await;
    assert_eq!(seen_lines, lines, "invoice_preview lines\n{}", catalogue_text(plans));
    let seen_totals = tsv(
        db,
        "SELECT tenant_id, plan, priced, currency, monthly_fee_minor, total_minor FROM invoice_totals \
         WHERE tenant_id LIKE ? ORDER BY tenant_id",
        &pattern,
    )
    .await;
    assert_eq!(seen_totals, totals, "invoice_totals\n{}", catalogue_text(plans));
}

async fn tsv(db: &Db, sql: &str, pattern: &str) -> String {
    let bytes = db
        .client
        .query(sql)
        .bind(pattern)
        .fetch_bytes("TabSeparated")
        .expect("query")
        .collect()
        .await
        .expect("rows");
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}
