//! billing-sync over a real ClickHouse and a real stripe-mock: usage inserted by the test is
//! billed exactly once, through a graceful restart and an abrupt stop mid-run, a crash between
//! a push and its ledger row, 429s (with `Retry-After`), 500s, resets and timeouts between
//! billing-sync and Stripe, and late events (a new revision with just the difference); what
//! cannot be billed (no customer, refused, too old for Stripe) is recorded, and reconcile agrees.
//!
//! stripe-mock validates every request against Stripe's OpenAPI spec but does not deduplicate,
//! so every meter event goes through a proxy (`tollgate_tests::billing`) that records it (identifier,
//! idempotency key, value) and injects the faults.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_billing_sync::ledger::{status, LedgerRow};
use tollgate_billing_sync::push::{PushMetrics, Pusher};
use tollgate_billing_sync::reconcile::{reconcile, Period};
use tollgate_billing_sync::sync::{unix_now, PassReport};
use tollgate_billing_sync::window::Window;
use tollgate_runtime::shutdown::Shutdown;
use tollgate_tests::billing::*;
use tollgate_tests::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_run_pushes_each_identifier_once_within_the_rate_cap() {
    let db = Db::new("billing_restart").await;
    let proxy = Proxy::start(Arc::new(|_, _| Fault::None)).await;
    let windows = closed_windows(&[3, 2]);
    let tenants = tenants("acme", 30);
    let unbillable: HashSet<String> = tenants[..2].iter().cloned().collect();
    let mut expected = Expected::new();
    insert_usage(&db, &tenants, &windows, 6, &mut expected).await;
    insert_customers(&db, &tenants, customer_of(&unbillable)).await;
    let billable_keys = expected.keys().filter(|(t, _, _)| !unbillable.contains(t)).count();

    // Test-mode rate: 25 calls per second.
    let settings = settings(&db, &proxy.url(), "max_requests_per_second = 25");
    let first = Shutdown::default();
    let service = tokio::spawn(tollgate_billing_sync::run(
        settings.clone(),
        KEY.to_owned(),
        first.clone(),
    ));
    eventually("a third of the pushes", Duration::from_secs(30), || {
        let n = proxy.seen().len();
        async move { (n >= billable_keys / 3).then_some(()) }
    })
    .await;
    first.trigger();
    tokio::time::timeout(Duration::from_secs(20), service)
        .await
        .expect("billing-sync stops on shutdown")
        .expect("task")
        .expect("clean exit");
    let at_stop = proxy.seen().len();
    assert!(
        at_stop < billable_keys,
        "stopped mid-run ({at_stop} of {billable_keys})"
    );

    let second = Shutdown::default();
    let service = tokio::spawn(tollgate_billing_sync::run(
        settings.clone(),
        KEY.to_owned(),
        second.clone(),
    ));
    eventually("every revision settled", Duration::from_secs(60), || {
        let db = &db;
        async move {
            let rows = ledger(db).await;
            let done = rows.iter().filter(|r| r.status == status::PUSHED).count() == billable_keys
                && rows.iter().all(|r| r.status != status::PENDING);
            done.then_some(())
        }
    })
    .await;
    second.trigger();
    tokio::time::timeout(Duration::from_secs(20), service)
        .await
        .expect("billing-sync stops on shutdown")
        .expect("task")
        .expect("clean exit");

    let seen = proxy.seen();
    // No identifier pushed twice: the restart re-sent nothing the ledger had settled.
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for s in &seen {
        *counts.entry(&s.identifier).or_default() += 1;
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "identifiers pushed more than once: {twice:?}");
    let by_identifier = assert_consistent_identifiers(&seen);
    let rows = ledger(&db).await;
    assert_ledger_exact(&rows, &by_identifier, &expected, &unbillable);
    assert_eq!(
        rows.iter().filter(|r| r.status == status::UNBILLABLE).count(),
        unbillable.len() * 2 * windows.len()
    );
    // The rate cap: calls leave billing-sync 40 ms apart (25/s). Measured where the proxy
    // receives them, scheduling jitter can bunch a few, so: at most 50 + 5 in any 2 s span
    // (uncapped, this test's pushes would arrive in well under a second).
    let times: Vec<Instant> = seen.iter().map(|s| s.at).collect();
    for (i, t) in times.iter().enumerate() {
        let in_span = times[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(2))
            .count();
        assert!(in_span <= 55, "{in_span} calls within two seconds");
    }
    assert_reconciles(&db, &settings, &windows).await;
    db.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_between_billing_sync_and_stripe_are_retried_without_duplicates() {
    let db = Db::new("billing_faults").await;
    // Every request of the first 64 gets a fault from this cycle; then Stripe recovers.
    let cycle = [
        Fault::TooMany,
        Fault::None,
        Fault::ServerError,
        Fault::Reset,
        Fault::SlowAnswer,
        Fault::LostAnswer,
        Fault::None,
        Fault::TooMany,
    ];
    let proxy = Proxy::start(Arc::new(
        move |n, _| if n < 64 { cycle[n % cycle.len()] } else { Fault::None },
    ))
    .await;
    let windows = closed_windows(&[4]);
    let tenants = tenants("globex", 24);
    let mut expected = Expected::new();
    insert_usage(&db, &tenants, &windows, 5, &mut expected).await;
    let unbillable = HashSet::new();
    insert_customers(&db, &tenants, customer_of(&unbillable)).await;

    let settings = settings(
        &db,
        &proxy.url(),
        "max_requests_per_second = 0\ntimeout_ms = 500\ninitial_backoff_ms = 50\nmax_backoff_ms = 1500",
    );
    let report = settle(&biller(&db, &settings)).await;
    assert_eq!(report.pushed, expected.len());
    assert_eq!(report.failed, 0);

    let seen = proxy.seen();
    for fault in [
        Fault::TooMany,
        Fault::ServerError,
        Fault::Reset,
        Fault::SlowAnswer,
        Fault::LostAnswer,
    ] {
        assert!(seen.iter().any(|s| s.fault == fault), "{fault:?} injected");
    }
    let by_identifier = assert_consistent_identifiers(&seen);
    assert_eq!(
        by_identifier.len(),
        expected.len(),
        "one identifier per tenant, meter and window"
    );
    // Retry-After: 1 was honoured.
    for (i, s) in seen.iter().enumerate() {
        if s.fault == Fault::TooMany {
            if let Some(next) = seen[i + 1..].iter().find(|n| n.identifier == s.identifier) {
                assert!(
                    next.at.duration_since(s.at) >= Duration::from_millis(950),
                    "{} retried early",
                    s.identifier
                );
            }
        }
    }
    let rows = ledger(&db).await;
    assert_ledger_exact(&rows, &by_identifier, &expected, &unbillable);
    assert!(rows.iter().any(|r| r.attempts > 1), "retries are counted");
    assert_reconciles(&db, &settings, &windows).await;
    db.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_refusals_and_old_windows() {
    let db = Db::new("billing_late").await;
    // Stripe refuses one customer; the others are pushed regardless.
    let proxy = Proxy::start(Arc::new(|_, customer| {
        if customer == "cus_initech_002" {
            Fault::Refused
        } else {
            Fault::None
        }
    }))
    .await;
    let windows = closed_windows(&[5]);
    let tenants = tenants("initech", 4);
    let mut expected = Expected::new();
    insert_usage(&db, &tenants, &windows, 3, &mut expected).await;
    let unbillable = HashSet::new();
    insert_customers(&db, &tenants, customer_of(&unbillable)).await;
    let settings = settings(&db, &proxy.url(), "max_requests_per_second = 0");
    let biller = biller(&db, &settings);

    let first = settle(&biller).await;
    assert_eq!((first.pushed, first.failed), (6, 2), "{first:?}");
    let refused = proxy.seen().iter().filter(|s| s.fault == Fault::Refused).count();
    assert_eq!(refused, 2, "a refusal is not retried");
    let rows = ledger(&db).await;
    let failed: Vec<_> = rows.iter().filter(|r| r.status == status::FAILED).collect();
    assert_eq!(failed.len(), 2);
    assert!(
        failed
            .iter()
            .all(|r| r.error.contains("400") && r.error.contains("No such customer")),
        "{failed:?}"
    );
    assert!(failed.iter().all(|r| r.tenant_id == "initech_002" && r.attempts == 1));

    // Late events in the closed window: revision 1 carries only the difference.
    let mut late = Expected::new();
    insert_usage(&db, &tenants[..1], &windows, 2, &mut late).await;
    // And events 40 days old: Stripe no longer accepts them, so they become adjustments.
    let old = vec![Window::containing(unix_now() - 40 * 86_400, 3_600)];
    let mut old_expected = Expected::new();
    insert_usage(&db, &tenants[..1], &old, 1, &mut old_expected).await;
    let before = proxy.seen().len();
    let second = settle(&biller).await;
    assert_eq!(
        (second.pushed, second.adjustments, second.failed),
        (2, 2, 0),
        "{second:?}"
    );
    let rows = ledger(&db).await;
    for meter in ["requests", "compute_units"] {
        let key = (tenants[0].clone(), meter.to_owned(), windows[0].start);
        let revisions: Vec<&LedgerRow> = rows
            .iter()
            .filter(|r| (r.tenant_id.clone(), r.meter.clone(), r.window_start) == key)
            .collect();
        assert_eq!(revisions.len(), 2, "{revisions:?}");
        assert_eq!(revisions[0].value, expected[&key]);
        assert_eq!(revisions[1].revision, 1);
        assert_eq!(revisions[1].value, late[&key], "revision 1 pushes only the delta");
        assert_eq!(revisions[1].window_total, expected[&key] + late[&key]);
        assert!(revisions[1].identifier.ends_with(":r1"), "{}", revisions[1].identifier);
        let adjustment = rows
            .iter()
            .find(|r| r.meter == meter && r.window_start == old[0].start)
            .expect("old window recorded");
        assert_eq!(adjustment.status, status::ADJUSTMENT);
        assert_eq!(
            adjustment.value,
            old_expected[&(tenants[0].clone(), meter.to_owned(), old[0].start)]
        );
    }
    let new_pushes: Vec<Seen> = proxy.seen()[before..].to_vec();
    assert_eq!(new_pushes.len(), 2, "only the two deltas are pushed: {new_pushes:?}");
    assert!(new_pushes.iter().all(|s| s.identifier.ends_with(":r1")));

    // Nothing more to do: a further pass pushes nothing.
    let third = biller.pass(unix_now()).await.expect("pass");
    assert_eq!(third, PassReport::default());

    // Reconcile reports the refused tenant's units as a difference.
    let period: Period = chrono_month(i64::from(windows[0].start)).parse().unwrap();
    let report = reconcile(&db.client, &settings, period, unix_now())
        .await
        .expect("reconcile");
    assert!(report.differs(), "{report}");
    let printed = report.to_string();
    assert!(
        printed.contains("tenant\tmeter\tclickhouse\tpushed\tunbillable\tnot_pushed\tdifference"),
        "{printed}"
    );
    let refused_units = expected[&("initech_002".to_owned(), "requests".to_owned(), windows[0].start)];
    assert!(
        printed.contains(&format!(
            "initech_002\trequests\t{refused_units}\t0\t0\t{refused_units}\t{refused_units}"
        )),
        "{printed}"
    );
    assert!(printed.ends_with("differ"), "{printed}");
    for ((tenant, _), line) in &report.lines {
        if tenant == "initech_002" {
            assert_eq!(line.pushed, 0);
            assert_eq!(line.difference(), line.clickhouse);
        } else {
            assert_eq!(line.difference(), 0, "{tenant}: {line:?}");
        }
    }
    db.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_push_and_ledger_row_resends_the_same_event() {
    let db = Db::new("billing_crash").await;
    let proxy = Proxy::start(Arc::new(|_, _| Fault::None)).await;
    let windows = closed_windows(&[6]);
    let tenants = tenants("umbrella", 1);
    let mut expected = Expected::new();
    insert_usage(&db, &tenants, &windows, 4, &mut expected).await;
    insert_customers(&db, &tenants, |t| Some(format!("cus_{t}"))).await;
    let settings = settings(&db, &proxy.url(), "max_requests_per_second = 0");

    // What the crashed process did: wrote the revision `pending`, pushed it, and died before
    // recording the outcome.
    let window = windows[0];
    let key = (tenants[0].clone(), "requests".to_owned(), window.start);
    let identifier = tollgate_billing_sync::window::identifier(&tenants[0], "requests", window, 0);
    let now = unix_now() as u32;
    let pending = LedgerRow {
        tenant_id: tenants[0].clone(),
        stripe_customer_id: format!("cus_{}", tenants[0]),
        meter: "requests".to_owned(),
        event_name: "tollgate_requests".to_owned(),
        window_start: window.start,
        window_end: window.end,
        revision: 0,
        value: expected[&key],
        window_total: expected[&key],
        identifier: identifier.clone(),
        status: status::PENDING.to_owned(),
        stripe_ref: String::new(),
        error: String::new(),
        attempts: 0,
        created_at: now,
        updated_at: now,
        row_version: tollgate_billing_sync::ledger::next_row_version(),
    };
    tollgate_billing_sync::ledger::write(&db.client, std::slice::from_ref(&pending))
        .await
        .expect("pending row");
    let api = tollgate_billing_sync::stripe::client(&settings.stripe, KEY).expect("client");
    let crashed = Pusher::new(api, &settings.stripe, PushMetrics::noop(), Shutdown::default());
    let outcome = crashed
        .push(&tollgate_billing_sync::push::MeterEvent {
            event_name: pending.event_name.clone(),
            stripe_customer_id: pending.stripe_customer_id.clone(),
            value: pending.value,
            identifier: identifier.clone(),
            timestamp: window.event_timestamp(),
        })
        .await;
    assert!(
        matches!(outcome, tollgate_billing_sync::push::PushOutcome::Pushed { .. }),
        "{outcome:?}"
    );

    // More usage arrived meanwhile: the restarted pass must re-send the recorded event as it
    // was, not a new value under the same identifier.
    let mut late = Expected::new();
    insert_usage(&db, &tenants, &windows, 1, &mut late).await;

    // The restarted process.
    let biller = biller(&db, &settings);
    settle(&biller).await;
    settle(&biller).await;

    let seen = proxy.seen();
    let resent: Vec<&Seen> = seen.iter().filter(|s| s.identifier == identifier).collect();
    assert_eq!(resent.len(), 2, "sent by the crashed process, re-sent once after it");
    let by_identifier = assert_consistent_identifiers(&seen);
    let rows = ledger(&db).await;
    let requests: Vec<&LedgerRow> = rows.iter().filter(|r| r.meter == "requests").collect();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!((requests[0].revision, requests[0].value), (0, expected[&key]));
    assert_eq!(requests[0].identifier, identifier);
    assert_eq!(
        (requests[1].revision, requests[1].value),
        (1, late[&key]),
        "the late unit is revision 1"
    );
    for (k, v) in late {
        *expected.entry(k).or_default() += v;
    }
    assert_ledger_exact(&rows, &by_identifier, &expected, &HashSet::new());
    assert_reconciles(&db, &settings, &windows).await;
    db.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_creates_missing_meters_once_and_keeps_existing_ones() {
    // stripe-mock keeps nothing: its meter list always holds one fixture meter. The proxy
    // renames that meter to `tollgate_requests`, as if an earlier setup had created it.
    let proxy = Proxy::start_with(
        Arc::new(|_, _| Fault::None),
        Arc::new(|path, body| {
            if path != "/v1/billing/meters" {
                return body;
            }
            let mut list: serde_json::Value = serde_json::from_slice(&body).expect("json");
            if list["object"] != "list" {
                return body;
            }
            list["data"][0]["event_name"] = "tollgate_requests".into();
            serde_json::to_vec(&list).expect("json").into()
        }),
    )
    .await;
    let db = Db::new("billing_setup").await;
    let settings = settings(&db, &proxy.url(), "");
    let done = tollgate_billing_sync::setup(&settings, KEY).await.expect("setup");
    use tollgate_billing_sync::products::SetupAction;
    assert_eq!(done.len(), 2, "no catalogue: meters only: {done:?}");
    assert_eq!(
        (done[0].object, done[0].name.as_str(), done[0].action),
        ("meter", "tollgate_requests", SetupAction::Found),
        "{done:?}"
    );
    assert_eq!(
        (done[1].object, done[1].name.as_str(), done[1].action),
        ("meter", "tollgate_compute_units", SetupAction::Created),
        "{done:?}"
    );
    let creates: Vec<Other> = proxy.others().into_iter().filter(|o| o.method == "POST").collect();
    assert_eq!(creates.len(), 1, "{creates:?}");
    let create = &creates[0];
    assert_eq!(create.path, "/v1/billing/meters");
    // Accepted by stripe-mock's validation against Stripe's OpenAPI spec.
    assert_eq!(create.upstream, 200, "{create:?}");
    assert_eq!(create.idempotency_key, "tollgate-meter-setup:tollgate_compute_units");
    assert_eq!(create.form["event_name"], "tollgate_compute_units");
    assert_eq!(create.form["default_aggregation[formula]"], "sum");
    assert_eq!(create.form["customer_mapping[event_payload_key]"], "stripe_customer_id");
    assert_eq!(create.form["value_settings[event_payload_key]"], "value");
    db.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_stop_mid_run_bills_each_revision_once() {
    let db = Db::new("billing_abort").await;
    let proxy = Proxy::start(Arc::new(|_, _| Fault::None)).await;
    let windows = closed_windows(&[7]);
    let tenants = tenants("hooli", 20);
    let mut expected = Expected::new();
    insert_usage(&db, &tenants, &windows, 3, &mut expected).await;
    let unbillable = HashSet::new();
    insert_customers(&db, &tenants, customer_of(&unbillable)).await;
    let settings = settings(&db, &proxy.url(), "max_requests_per_second = 25");

    // A crash: the service task is dropped wherever it is, between a push and its ledger row
    // included, with nothing flushed.
    let service = tokio::spawn(tollgate_billing_sync::run(
        settings.clone(),
        KEY.to_owned(),
        Shutdown::default(),
    ));
    let third = expected.len() / 3;
    eventually("some pushes", Duration::from_secs(30), || {
        let n = proxy.seen().len();
        async move { (n >= third).then_some(()) }
    })
    .await;
    service.abort();
    let _ = service.await;
    assert!(proxy.seen().len() < expected.len(), "stopped mid-run");

    let restarted = Shutdown::default();
    let service = tokio::spawn(tollgate_billing_sync::run(
        settings.clone(),
        KEY.to_owned(),
        restarted.clone(),
    ));
    eventually("every revision settled", Duration::from_secs(60), || {
        let db = &db;
        let want = expected.len();
        async move {
            let rows = ledger(db).await;
            let pushed = rows.iter().filter(|r| r.status == status::PUSHED).count();
            (pushed == want && rows.iter().all(|r| r.status != status::PENDING)).then_some(())
        }
    })
    .await;
    restarted.trigger();
    tokio::time::timeout(Duration::from_secs(20), service)
        .await
        .expect("billing-sync stops on shutdown")
        .expect("task")
        .expect("clean exit");

    // An event in flight at the crash may be sent again, with the same identifier, value and
    // idempotency key (Stripe counts it once); never under a second identifier.
    let by_identifier = assert_consistent_identifiers(&proxy.seen());
    assert_eq!(
        by_identifier.len(),
        expected.len(),
        "one identifier per tenant and meter"
    );
    assert!(by_identifier.keys().all(|id| id.ends_with(":r0")));
    let rows = ledger(&db).await;
    assert_ledger_exact(&rows, &by_identifier, &expected, &unbillable);
    assert_reconciles(&db, &settings, &windows).await;
    db.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_longer_than_the_backoff_cap_defers_the_push() {
    let db = Db::new("billing_defer").await;
    let proxy = Proxy::start(Arc::new(|n, _| if n == 0 { Fault::TooMany } else { Fault::None })).await;
    let windows = closed_windows(&[8]);
    let tenants = tenants("wonka", 1);
    let mut expected = Expected::new();
    insert_usage(&db, &tenants, &windows, 2, &mut expected).await;
    let unbillable = HashSet::new();
    insert_customers(&db, &tenants, customer_of(&unbillable)).await;
    // Retry-After: 1 s, backoff capped at 200 ms: the push waits for a later pass.
    let settings = settings(
        &db,
        &proxy.url(),
        "max_requests_per_second = 0\ninitial_backoff_ms = 50\nmax_backoff_ms = 200",
    );
    let biller = biller(&db, &settings);
    let first = biller.pass(unix_now()).await.expect("pass");
    assert_eq!((first.pushed, first.unresolved), (1, 1), "{first:?}");
    let pending: Vec<LedgerRow> = ledger(&db)
        .await
        .into_iter()
        .filter(|r| r.status == status::PENDING)
        .collect();
    assert_eq!(pending.len(), 1);
    assert!(pending[0].error.contains("Retry-After 1s"), "{:?}", pending[0].error);
    let deferred = proxy.seen()[0].clone();
    eventually("the deferred push settles", Duration::from_secs(10), || {
        let biller = &biller;
        async move { (biller.pass(unix_now()).await.expect("pass").unresolved == 0).then_some(()) }
    })
    .await;
    let seen = proxy.seen();
    let retried = seen[1..]
        .iter()
        .find(|s| s.identifier == deferred.identifier)
        .expect("re-sent");
    assert!(
        retried.at.duration_since(deferred.at) >= Duration::from_millis(950),
        "Retry-After honoured"
    );
    let by_identifier = assert_consistent_identifiers(&seen);
    assert_ledger_exact(&ledger(&db).await, &by_identifier, &expected, &unbillable);
    db.remove().await;
}
