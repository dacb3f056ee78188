//! A changed `billing.window_secs` never re-bills, over a real ClickHouse and stripe-mock: a
//! ledger of hourly windows, restarted with half-hour windows, keeps its hours (the new length
//! applies from the first boundary after the last closed window), pushes nothing twice and
//! reconciles; late units in an old hour are one more revision of that hour. A ledger of
//! mixed lengths with no record of when the length changed is refused at start, naming both.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tollgate_billing_sync::ledger::{next_row_version, status, LedgerRow};
use tollgate_billing_sync::schedule;
use tollgate_billing_sync::sync::unix_now;
use tollgate_runtime::shutdown::Shutdown;
use tollgate_tests::billing::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_window_length_applies_from_the_next_boundary_and_nothing_is_pushed_twice() {
    let db = Db::new("billing_window_change").await;
    let proxy = Proxy::start(Arc::new(|_, _| Fault::None)).await;
    let windows = closed_windows(&[5, 4, 3]);
    let tenants = tenants("wayne", 3);
    let mut expected = Expected::new();
    insert_usage(&db, &tenants, &windows, 4, &mut expected).await;
    let unbillable = HashSet::new();
    insert_customers(&db, &tenants, customer_of(&unbillable)).await;

    let hourly = settings(&db, &proxy.url(), "max_requests_per_second = 0");
    let first = schedule::establish(&db.client, 3_600, 300, unix_now())
        .await
        .expect("schedule");
    let report = settle(&biller(&db, &hourly).with_schedule(first)).await;
    assert_eq!(report.pushed, expected.len());
    let pushed_before = proxy.seen().len();

    // Restarted with half-hour windows.
    let mut half_hourly = hourly.clone();
    half_hourly.billing.window_secs = 1_800;
    let now = unix_now();
    let second = schedule::establish(&db.client, 1_800, 300, now)
        .await
        .expect("reconcilable");
    let switch = second.segments().last().unwrap();
    let last_hour_end = windows.iter().map(|w| w.end).max().unwrap();
    assert_eq!(switch.window_secs, 1_800);
    assert!(switch.from >= last_hour_end && switch.from % 1_800 == 0, "{second:?}");
    assert!(
        i64::from(switch.from) <= now,
        "from the next boundary after the last closed window"
    );
    let biller = biller(&db, &half_hourly).with_schedule(second);
    let report = settle(&biller).await;
    assert_eq!((report.pushed, report.adjustments), (0, 0), "{report:?}");
    assert_eq!(proxy.seen().len(), pushed_before, "nothing pushed twice");

    // Late units in an old hour: one more revision of that hour, the difference only.
    let mut late = Expected::new();
    insert_usage(&db, &tenants[..1], &windows[..1], 2, &mut late).await;
    let report = settle(&biller).await;
    assert_eq!(report.pushed, 2, "{report:?}");
    let new: Vec<Seen> = proxy.seen()[pushed_before..].to_vec();
    assert!(new.iter().all(|s| s.identifier.ends_with(":r1")), "{new:?}");
    let rows = ledger(&db).await;
    assert!(
        rows.iter().all(|r| r.window_end - r.window_start == 3_600),
        "hours stay hours"
    );
    for (k, v) in late {
        *expected.entry(k).or_default() += v;
    }
    let seen = proxy.seen();
    let by_identifier = assert_consistent_identifiers(&seen);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for s in &seen {
        *counts.entry(s.identifier.as_str()).or_default() += 1;
    }
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    assert_ledger_exact(&rows, &by_identifier, &expected, &unbillable);
    assert_reconciles(&db, &half_hourly, &windows).await;

    // A third start with the same setting records nothing new and keeps the same schedule.
    let again = schedule::establish(&db.client, 1_800, 300, unix_now())
        .await
        .expect("same");
    assert_eq!(again.segments(), biller_schedule_segments(&db).await.as_slice());
    db.remove().await;
}

async fn biller_schedule_segments(db: &Db) -> Vec<schedule::Segment> {
    schedule::load(&db.client, 0).await.expect("load").segments().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_of_mixed_lengths_without_a_record_is_refused_naming_both() {
    let db = Db::new("billing_window_mixed").await;
    let now = unix_now() as u32;
    let hour = now / 3_600 * 3_600 - 10 * 3_600;
    let row = |start: u32, end: u32| LedgerRow {
        tenant_id: "t".into(),
        stripe_customer_id: "cus_t".into(),
        meter: "requests".into(),
        event_name: "tollgate_requests".into(),
        window_start: start,
        window_end: end,
        revision: 0,
        value: 1,
        window_total: 1,
        identifier: format!("tg:t:requests:{start}-{end}:r0"),
        status: status::PUSHED.into(),
        stripe_ref: String::new(),
        error: String::new(),
        attempts: 1,
        created_at: now,
        updated_at: now,
        row_version: next_row_version(),
    };
    tollgate_billing_sync::ledger::write(&db.client, &[row(hour, hour + 3_600), row(hour + 3_600, hour + 5_400)])
        .await
        .expect("ledger rows");
    let settings = settings(&db, &tollgate_tests::stripe(), "");
    let err = tollgate_billing_sync::run(settings, KEY.to_owned(), Shutdown::default())
        .await
        .expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("windows of 1800 s and 3600 s") && text.contains("billing.window_secs = 3600"),
        "{text}"
    );
    db.remove().await;
}
