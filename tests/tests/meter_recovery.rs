//! After a kill -9 the meter-consumer is metering again within seconds of its restart, not
//! after the dead member's session expires; `/readyz` says "not consuming" while a member
//! holds no partition; every table stays exact.
//!
//! Real Kafka and ClickHouse, the test's own topics, group and database; the binary is the
//! one cargo built. The sessions here are 30 s long, so only static group membership (the
//! restarted process rejoining under the dead one's `group.instance.id`) can explain a
//! recovery inside 10 s.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::path::Path;
use std::time::{Duration, Instant};

use tollgate_tests::eventually;
use tollgate_tests::free_port;
use tollgate_tests::http::try_send_with;
use tollgate_tests::meter::{assert_exact, produce, producer, raw_counts, wait_for_rows, Env, Workload};
use tollgate_tests::process::ServiceProcess;

/// The goal: rows flow again within 10 s of a restart.
const RECOVERY: Duration = Duration::from_secs(10);

/// A meter-consumer process of `env` with its ops listener on `port` (so its static
/// membership id, `<hostname>-<port>`, is the same at every start) and 30 s sessions.
fn meter(env: &Env, port: u16, dir: &Path, name: &str) -> ServiceProcess {
    let config = dir.join(format!("{name}.toml"));
    let text = env
        .settings_toml_on(&env.clickhouse, 2_000, 200, &format!("127.0.0.1:{port}"))
        .replace(
            "\"session.timeout.ms\" = \"6000\"",
            "\"session.timeout.ms\" = \"30000\"",
        );
    std::fs::write(&config, text).expect("meter-consumer settings");
    let log_dir = dir.join(name);
    std::fs::create_dir_all(&log_dir).expect("log directory");
    ServiceProcess::new(
        "tollgate-meter-consumer",
        &["--config", &config.display().to_string()],
        Vec::new(),
        format!("http://127.0.0.1:{port}/healthz"),
        &log_dir,
    )
}

/// `/readyz`: its status and body, `None` when the process does not answer.
async fn readiness(port: u16) -> Option<(u16, String)> {
    let reply = try_send_with(false, "GET", &format!("http://127.0.0.1:{port}/readyz"), &[], b"")
        .await
        .ok()?;
    Some((reply.status, reply.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_it_meters_again_within_ten_seconds_and_stays_exact() {
    let env = Env::new("meter_recover", 4).await;
    let dir = std::env::temp_dir().join(tollgate_tests::unique("meter_recover"));
    std::fs::create_dir_all(&dir).expect("test directory");
    let port = free_port();
    let mut process = meter(&env, port, &dir, "meter");

    let workload = Workload::new(11, 60_000);
    let producing = tokio::spawn({
        let (brokers, topic, events) = (env.brokers.clone(), env.usage.clone(), workload.events.clone());
        async move { produce(&producer(&brokers), &topic, &events, Some(2_000)).await }
    });
    let client = env.client();
    process.start().await;
    wait_for_rows(&client, 8_000, Duration::from_secs(120)).await;
    let ready = readiness(port).await.expect("ops listener answers");
    assert_eq!(ready.0, 200, "consuming, so ready: {}", ready.1);

    for round in 1..=2 {
        process.kill();
        let (stored, _) = raw_counts(&client).await;
        process.start().await;
        // From the moment the restarted process answers its health check: its start-up
        // (settings, migrations) is not what the group protocol made wait.
        let restarted = Instant::now();
        // Rows counted once the restarted process holds its partitions again: an insert the
        // killed process had already sent can still land after `stored` was read, so rows
        // alone would not prove that the new process meters.
        eventually(
            "the restarted process consumes again",
            Duration::from_secs(120),
            || async { (readiness(port).await?.0 == 200).then_some(()) },
        )
        .await;
        let (assigned, _) = raw_counts(&client).await;
        eventually("rows flow after the restart", Duration::from_secs(120), || {
            let client = client.clone();
            async move { (raw_counts(&client).await.0 > assigned.max(stored)).then_some(()) }
        })
        .await;
        let recovered = restarted.elapsed();
        println!("round {round}: rows flowed again {recovered:?} after the restarted process was healthy");
        assert!(
            recovered <= RECOVERY,
            "round {round}: rows flowed again only after {recovered:?} (goal {RECOVERY:?}); log: {}",
            process.output()
        );
        wait_for_rows(&client, stored + 8_000, Duration::from_secs(120)).await;
    }

    producing.await.expect("producer");
    assert_exact(&client, &workload.totals, workload.count, Duration::from_secs(120)).await;
    // Billing finds changed windows from the minutes touched: a crash between a batch's
    // rollups and its minutes touched must not lose one.
    let untouched: u64 = client
        .query(
            "SELECT count() FROM (SELECT DISTINCT toStartOfMinute(time) AS m FROM usage_events) \
             WHERE m NOT IN (SELECT minute FROM usage_minutes_touched)",
        )
        .fetch_one()
        .await
        .expect("minutes touched");
    assert_eq!(untouched, 0, "minutes with events missing from usage_minutes_touched");
    process.kill();
    env.drop_database().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_a_partition_reports_not_consuming_until_it_takes_over() {
    // One partition, two members: one consumes, the other must say it does not.
    let env = Env::new("meter_standby", 1).await;
    let dir = std::env::temp_dir().join(tollgate_tests::unique("meter_standby"));
    std::fs::create_dir_all(&dir).expect("test directory");
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = meter(&env, port_a, &dir, "a");
    let mut b = meter(&env, port_b, &dir, "b");
    a.start().await;
    eventually("the first member consumes", Duration::from_secs(60), || async {
        (readiness(port_a).await?.0 == 200).then_some(())
    })
    .await;
    b.start().await;
    let (consuming, standby) = eventually(
        "one member consumes, the other reports not consuming",
        Duration::from_secs(90),
        || async {
            let (ra, rb) = (readiness(port_a).await?, readiness(port_b).await?);
            let idle = |r: &(u16, String)| r.0 == 503 && r.1.contains("not consuming");
            match (ra.0, rb.0) {
                (200, _) if idle(&rb) => Some(("a", "b")),
                (_, 200) if idle(&ra) => Some(("b", "a")),
                _ => None,
            }
        },
    )
    .await;
    let (mut survivor, survivor_port) = if consuming == "a" {
        a.kill();
        (b, port_b)
    } else {
        b.kill();
        (a, port_a)
    };
    // The killed member is not coming back: its session (30 s here) expires, and the
    // standby takes the partition and says so.
    eventually(
        &format!("{standby} takes over after {consuming} died"),
        Duration::from_secs(120),
        || async { (readiness(survivor_port).await?.0 == 200).then_some(()) },
    )
    .await;
    let workload = Workload::with_late_runs(3, 2_000, false);
    produce(&producer(&env.brokers), &env.usage, &workload.events, None).await;
    assert_exact(
        &env.client(),
        &workload.totals,
        workload.count,
        Duration::from_secs(120),
    )
    .await;
    survivor.kill();
    env.drop_database().await;
    let _ = std::fs::remove_dir_all(&dir);
}
