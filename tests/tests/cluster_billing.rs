//! The cluster stack's two billing-syncs: exactly one holds the lease and bills, the other
//! stands by, healthy; when the active one is killed (-9) the standby takes the lease.
//!
//! The killed instance stays down: the next `scripts/stack up --cluster` (which
//! `scripts/stack test --cluster` runs first) starts it again.

// Needs the cluster stack with Tollgate on it: `scripts/stack test --cluster`.
#![cfg(feature = "cluster-tests")]

use std::path::PathBuf;
use std::time::Duration;

use tollgate_tests::eventually;
use tollgate_tests::http::try_send_with;

const INSTANCES: [(&str, &str); 2] = [
    ("billing-sync-1", "http://127.0.0.1:19201"),
    ("billing-sync-2", "http://127.0.0.1:19202"),
];

/// `billing_sync_active` of the instance at `admin`, if it answers.
async fn active(admin: &str) -> Option<bool> {
    let reply = try_send_with(false, "GET", &format!("{admin}/metrics"), &[], b"")
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    let line = text.lines().find(|l| l.starts_with("billing_sync_active "))?;
    Some(line.trim_end().ends_with(" 1"))
}

/// The pid the stack recorded for `part` (`<state dir>/cluster/run/<part>.pid`).
fn pid_of(part: &str) -> u32 {
    let dir = std::env::var("TOLLGATE_STACK_DIR").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.stack"),
        PathBuf::from,
    );
    let file = dir.join("cluster/run").join(format!("{part}.pid"));
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a pid")
}

#[tokio::test]
async fn one_billing_sync_is_active_and_the_standby_takes_over_when_it_dies() {
    for (part, admin) in INSTANCES {
        assert!(
            active(admin).await.is_some(),
            "{part} does not answer at {admin}: start the cluster stack with `scripts/stack up --cluster`"
        );
    }
    // Once the group has settled: one active, one standing by.
    let holder = eventually(
        "exactly one billing-sync holds the lease",
        Duration::from_secs(60),
        || async {
            let states = [active(INSTANCES[0].1).await?, active(INSTANCES[1].1).await?];
            match states {
                [true, false] => Some(0),
                [false, true] => Some(1),
                _ => None,
            }
        },
    )
    .await;
    let standby = 1 - holder;
    // And so for the next seconds: the lease stays where it is, never on both.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let states = (active(INSTANCES[holder].1).await, active(INSTANCES[standby].1).await);
        assert_eq!(
            states,
            (Some(true), Some(false)),
            "{} keeps the lease",
            INSTANCES[holder].0
        );
    }

    // kill -9 of the active one: no leave, so the group notices within the session timeout.
    let pid = pid_of(INSTANCES[holder].0);
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -9 {pid}");
    let started = std::time::Instant::now();
    eventually("the standby takes the lease", Duration::from_secs(60), || async {
        (active(INSTANCES[standby].1).await == Some(true)).then_some(())
    })
    .await;
    let took = started.elapsed();
    eprintln!("the standby took the lease {took:?} after the kill -9 of the active billing-sync");
    assert!(
        active(INSTANCES[holder].1).await.is_none(),
        "the killed instance is gone"
    );
}
