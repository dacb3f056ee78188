//! kill -9 the meter-consumer binary three times while usage events stream in, restart it
//! each time: the raw table and every rollup still count every event exactly once.
//!
//! Real Kafka and ClickHouse, the test's own topics and database; the binary is the one
//! cargo built for this package.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tollgate_tests::meter as support;

use support::{assert_exact, produce, producer, wait_for_rows, Env, Workload};

/// The running binary; killed (SIGKILL) when dropped, also when the test fails.
struct Running(Child);

impl Running {
    fn kill(mut self) {
        self.0.kill().expect("SIGKILL");
        self.0.wait().expect("reap");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(config: &std::path::Path, log: &std::path::Path) -> Running {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let child = Command::new(tollgate_tests::service::binary("tollgate-meter-consumer"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start tollgate-meter-consumer");
    Running(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_three_times_mid_stream_and_restarted_totals_stay_exact() {
    let env = Env::new("meter_kill", 4).await;
    let dir = std::env::temp_dir();
    let config = dir.join(format!("{}.toml", env.database));
    let log = dir.join(format!("{}.log", env.database));
    std::fs::write(&config, env.settings_toml(&env.clickhouse, 2_000, 200)).expect("write settings");

    let workload = Workload::new(5, 60_000);
    let producing = tokio::spawn({
        let (brokers, topic, events) = (env.brokers.clone(), env.usage.clone(), workload.events.clone());
        async move { produce(&producer(&brokers), &topic, &events, Some(3_000)).await }
    });
    let client = env.client();
    for round in 1..=3u64 {
        let child = spawn(&config, &log);
        // Kill as soon as this run has stored its share: mid-batch, mid-stream.
        wait_for_rows(&client, round * 12_000, Duration::from_secs(120)).await;
        child.kill();
    }
    let last = spawn(&config, &log);
    producing.await.expect("producer");
    assert_exact(&client, &workload.totals, workload.count, Duration::from_secs(120)).await;
    last.kill();
    env.drop_database().await;
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&log);
}
