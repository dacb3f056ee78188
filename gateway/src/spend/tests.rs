use proptest::prelude::*;

use super::*;

/// `metered` costs 10 per request and 1 per compute unit, after 2 free requests; `flat` also
/// has a monthly fee of 25.
fn catalogue() -> Catalogue {
    Catalogue::parse(
        r#"
        [plans.metered]
        currency = "usd"
        meters.requests = { unit_price_minor = "10", included_units = 2 }
        meters.compute_units = { unit_price_minor = "1" }

        [plans.flat]
        currency = "usd"
        monthly_fee_minor = 25
        meters.requests = { unit_price_minor = "10" }
        "#,
        "test catalogue",
    )
    .unwrap()
}

const DEC_1: i64 = 1_764_547_200_000; // 2025-12-01T00:00:00Z
const JAN_1: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn units(requests: i64, compute: i64) -> Units {
    Units::from([("requests".to_owned(), requests), ("compute_units".to_owned(), compute)])
}

fn counted(ledger: &SpendLedger, tenant: &str, rows: &[(&str, i64)], at_ms: i64) {
    let rows: Vec<_> = rows
        .iter()
        .map(|(meter, n)| (tenant.to_owned(), (*meter).to_owned(), *n))
        .collect();
    ledger.apply_counted(Month::of(at_ms), &[tenant.to_owned()], &rows);
}

#[test]
fn months_are_utc_calendar_months() {
    let dec = Month::of(DEC_1 + 5);
    assert_eq!((dec.year, dec.month), (2025, 12));
    assert_eq!(dec.start_ms(), DEC_1);
    assert_eq!(dec.end_ms(), JAN_1);
    assert_eq!(Month::of(JAN_1 - 1), dec);
    assert_eq!(Month::of(JAN_1).start_ms(), JAN_1);
}

#[test]
fn unknown_until_clickhouse_has_been_read_then_admits_up_to_the_cap() {
    let ledger = SpendLedger::new(catalogue());
    assert_eq!(
        ledger
            .reserve("t", Some("metered"), 100, units(1, 0), DEC_1)
            .unwrap_err(),
        CapRefusal::Unknown
    );
    assert!(ledger.any_unknown(&["t".to_owned()], DEC_1));
    // ClickHouse counted 5 requests: 3 priced, 30 spent.
    counted(&ledger, "t", &[("requests", 5)], DEC_1);
    assert!(!ledger.any_unknown(&["t".to_owned()], DEC_1));
    let mut held = Vec::new();
    for _ in 0..7 {
        held.push(ledger.reserve("t", Some("metered"), 100, units(1, 0), DEC_1).unwrap());
    }
    assert_eq!(ledger.status("t", Some("metered"), DEC_1).spent_minor, Some(100));
    let refusal = ledger
        .reserve("t", Some("metered"), 100, units(1, 0), DEC_1)
        .unwrap_err();
    assert_eq!(
        refusal,
        CapRefusal::Exceeded {
            cap_minor: 100,
            spent_minor: 100,
            currency: "usd".into(),
            period_end_ms: JAN_1
        }
    );
}

#[test]
fn a_refused_request_costs_nothing_and_a_dropped_reservation_is_given_back() {
    let ledger = SpendLedger::new(catalogue());
    counted(&ledger, "t", &[("requests", 2)], DEC_1);
    let first = ledger.reserve("t", Some("metered"), 15, units(1, 5), DEC_1).unwrap();
    assert_eq!(ledger.status("t", Some("metered"), DEC_1).spent_minor, Some(15));
    assert!(ledger.reserve("t", Some("metered"), 15, units(1, 0), DEC_1).is_err());
    // A later step refused it: nothing billed.
    drop(first);
    assert_eq!(ledger.status("t", Some("metered"), DEC_1).spent_minor, Some(0));
    // Settled with what was billed: the upstream reported 8 compute units, not 5.
    let second = ledger.reserve("t", Some("metered"), 100, units(1, 5), DEC_1).unwrap();
    second.settle(Some(&units(1, 8)));
    assert_eq!(ledger.status("t", Some("metered"), DEC_1).spent_minor, Some(18));
    // Not billable (an upstream 5xx): given back.
    let third = ledger.reserve("t", Some("metered"), 100, units(1, 5), DEC_1).unwrap();
    third.settle(None);
    assert_eq!(ledger.status("t", Some("metered"), DEC_1).spent_minor, Some(18));
}

#[test]
fn the_flat_fee_counts_from_the_first_request() {
    let ledger = SpendLedger::new(catalogue());
    counted(&ledger, "t", &[], DEC_1);
    assert!(matches!(
        ledger.reserve("t", Some("flat"), 24, units(1, 0), DEC_1),
        Err(CapRefusal::Exceeded { spent_minor: 25, .. })
    ));
    let admitted = ledger.reserve("t", Some("flat"), 35, units(1, 0), DEC_1).unwrap();
    assert_eq!(ledger.status("t", Some("flat"), DEC_1).spent_minor, Some(35));
    admitted.settle(Some(&units(1, 0)));
}

#[test]
fn an_unpriced_plan_is_admitted_and_a_new_month_starts_over() {
    let ledger = SpendLedger::new(catalogue());
    counted(&ledger, "t", &[("requests", 1000)], DEC_1);
    let december = ledger.reserve("t", None, 0, units(1, 0), DEC_1).unwrap();
    assert!(ledger.reserve("t", Some("metered"), 100, units(1, 0), DEC_1).is_err());
    // January: no count yet, then ClickHouse's January count.
    assert_eq!(
        ledger
            .reserve("t", Some("metered"), 100, units(1, 0), JAN_1)
            .unwrap_err(),
        CapRefusal::Unknown
    );
    // A December count landing late is dropped.
    counted(&ledger, "t", &[("requests", 1000)], DEC_1);
    assert_eq!(ledger.status("t", Some("metered"), JAN_1).spent_minor, None);
    counted(&ledger, "t", &[], JAN_1);
    assert_eq!(ledger.status("t", Some("metered"), JAN_1).spent_minor, Some(0));
    // A December request settling in January corrects nothing, and one timed in December
    // but checked after January began has no count to go by.
    december.settle(Some(&units(1, 500)));
    assert_eq!(ledger.status("t", Some("metered"), JAN_1).spent_minor, Some(0));
    assert_eq!(
        ledger.reserve("t", None, 0, units(1, 0), JAN_1 - 1).unwrap_err(),
        CapRefusal::Unknown
    );
}

#[test]
fn clickhouse_rows_for_other_tenants_are_ignored_and_missing_tenants_spent_nothing() {
    let ledger = SpendLedger::new(catalogue());
    ledger.reserve("a", None, 0, units(1, 0), DEC_1).unwrap_err();
    let rows = vec![
        ("a".to_owned(), "requests".to_owned(), 4),
        ("a".to_owned(), "compute_units".to_owned(), 7),
        ("z".to_owned(), "requests".to_owned(), 99),
    ];
    ledger.apply_counted(Month::of(DEC_1), &["a".to_owned(), "b".to_owned()], &rows);
    assert_eq!(ledger.status("a", Some("metered"), DEC_1).spent_minor, Some(27));
    assert_eq!(ledger.status("b", Some("metered"), DEC_1).spent_minor, Some(0));
    assert_eq!(ledger.status("z", Some("metered"), DEC_1).spent_minor, None);
}

/// One step of a model run: a request on gateway `gateway`, or gateway `gateway` re-reading
/// ClickHouse (which, in the model, has counted everything the other gateways billed).
#[derive(Debug, Clone)]
enum Step {
    Request {
        gateway: usize,
        requests: i64,
        compute: i64,
        /// Units the upstream reports beyond the upfront ones.
        reported_extra: i64,
        billable: bool,
    },
    Refresh {
        gateway: usize,
    },
}

fn step(gateways: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..gateways, 1..3i64, 0..20i64, prop_oneof![3 => Just(0i64), 1 => 0..10i64], any::<bool>()).prop_map(
            |(gateway, requests, compute, reported_extra, billable)| Step::Request {
                gateway,
                requests,
                compute,
                reported_extra,
                billable,
            }
        ),
        1 => (0..gateways).prop_map(|gateway| Step::Refresh { gateway }),
    ]
}

fn price(units: &Units) -> i64 {
    catalogue().plans["metered"].amount(units)
}

/// What `units` cost at the plan's unit prices with nothing included: the most they can add
/// to any month's spend (the prices here are whole, so no rounding either).
fn linear(units: &Units) -> i64 {
    units.get("requests").copied().unwrap_or(0) * 10 + units.get("compute_units").copied().unwrap_or(0)
}

proptest! {
    /// One gateway: the check and the reservation are one step, so an admitted request never
    /// takes the spend past the cap at its upfront cost; only what its upstream reports beyond
    /// that (`x-tollgate-cost`) can, and then nothing more is admitted.
    #[test]
    fn one_gateway_never_admits_past_the_cap(
        cap in 0..400i64,
        already in 0..30i64,
        steps in proptest::collection::vec(step(1), 1..80),
    ) {
        let ledger = SpendLedger::new(catalogue());
        counted(&ledger, "t", &[("requests", already)], DEC_1);
        let mut billed = units(already, 0);
        for s in steps {
            let Step::Request { requests, compute, reported_extra, billable, .. } = s else { continue };
            let Ok(held) = ledger.reserve("t", Some("metered"), cap, units(requests, compute), DEC_1) else {
                continue;
            };
            let mut upfront = billed.clone();
            add(&mut upfront, &units(requests, compute), 1);
            prop_assert!(price(&upfront) <= cap, "admitted past the cap at the upfront cost");
            if billable {
                let actual = units(requests, compute + reported_extra);
                add(&mut billed, &actual, 1);
                held.settle(Some(&actual));
                prop_assert!(price(&billed) <= cap + linear(&units(0, reported_extra)));
            } else {
                held.settle(None);
            }
        }
        prop_assert_eq!(ledger.status("t", Some("metered"), DEC_1).spent_minor, Some(price(&billed)));
    }

    /// Several gateways that see each other only through ClickHouse: after any admission the
    /// tenant's spend is at most the cap plus what the admitting gateway has not seen of the
    /// others (what they billed since its last refresh): the stated bound, never compounding.
    #[test]
    fn gateways_overshoot_at_most_what_the_admitting_one_has_not_seen(
        cap in 0..400i64,
        steps in proptest::collection::vec(step(3), 1..120),
    ) {
        let ledgers: Vec<_> = (0..3).map(|_| SpendLedger::new(catalogue())).collect();
        for ledger in &ledgers {
            counted(ledger, "t", &[], DEC_1);
        }
        let mut billed = vec![units(0, 0); 3];
        // For each gateway, what the others billed since its last refresh.
        let mut unseen = vec![units(0, 0); 3];
        for s in steps {
            match s {
                Step::Refresh { gateway } => {
                    let mut others = units(0, 0);
                    for (g, b) in billed.iter().enumerate() {
                        if g != gateway {
                            add(&mut others, b, 1);
                        }
                    }
                    let rows: Vec<_> = others.iter().map(|(m, n)| ("t".to_owned(), m.clone(), *n)).collect();
                    ledgers[gateway].apply_counted(Month::of(DEC_1), &["t".to_owned()], &rows);
                    unseen[gateway] = units(0, 0);
                }
                Step::Request { gateway, requests, compute, billable, .. } => {
                    let request = units(requests, compute);
                    let Ok(held) = ledgers[gateway].reserve("t", Some("metered"), cap, request.clone(), DEC_1) else {
                        continue;
                    };
                    if !billable {
                        held.settle(None);
                        continue;
                    }
                    add(&mut billed[gateway], &request, 1);
                    held.settle(Some(&request));
                    let mut total = units(0, 0);
                    for b in &billed {
                        add(&mut total, b, 1);
                    }
                    prop_assert!(
                        price(&total) <= cap + linear(&unseen[gateway]),
                        "spent {} past cap {} + unseen {:?}", price(&total), cap, unseen[gateway]
                    );
                    for (g, u) in unseen.iter_mut().enumerate() {
                        if g != gateway {
                            add(u, &request, 1);
                        }
                    }
                }
            }
        }
    }
}
