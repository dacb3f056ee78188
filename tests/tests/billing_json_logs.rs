//! With `log.format = "json"` the billing-sync binary writes one JSON object per line from
//! start to stop, with span fields, and never its Stripe key.
//!
//! In: the real ClickHouse (`TOLLGATE_TEST_CLICKHOUSE`, a database of this test's own holding
//! one billable event of a tenant without a Stripe customer) and stripe-mock
//! (`TOLLGATE_TEST_STRIPE`). Out: the binary's stderr, read line by line until the billing
//! pass has logged inside its `window` span, then SIGTERM, then every line parsed.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tollgate_meter_consumer::rows::UsageRow;
use tollgate_runtime::clickhouse::ClickhouseSettings;

fn bin() -> std::path::PathBuf {
    tollgate_tests::service::binary("tollgate-billing-sync")
}
const STRIPE_KEY: &str = "sk_test_jsonlogs9f2c41d7e8a6b35c";
const UNBILLABLE: &str = "usage of tenants without a Stripe customer id recorded as unbillable";

fn var_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn unix_now() -> u32 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    u32::try_from(now.expect("clock after 1970").as_secs()).expect("before 2106")
}

/// One billable event two hours ago, in an hourly window that is closed by now.
fn usage_row(time: u32) -> UsageRow {
    UsageRow {
        event_id: "json-logs-1".to_owned(),
        time,
        time_ms: 0,
        tenant_id: "tenant_jsonlogs".to_owned(),
        consumer: "c_jsonlogs".to_owned(),
        key_id: "key_jsonlogs".to_owned(),
        plan: "starter".to_owned(),
        route: "orders".to_owned(),
        method: "GET".to_owned(),
        status: 200,
        outcome: "ALLOWED",
        billable: 1,
        units_meter: vec!["requests".to_owned()],
        units_value: vec![1],
        request_bytes: 10,
        response_bytes: 100,
        latency_ms: 3,
        upstream_latency_ms: 2,
        gateway_id: "gw".to_owned(),
        request_id: "req-1".to_owned(),
        kafka_partition: 0,
        kafka_offset: 0,
        kafka_topic: "tollgate.usage.v1".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_parse_carry_span_fields_and_no_secret() {
    let clickhouse = ClickhouseSettings::new(tollgate_tests::clickhouse(), tollgate_tests::unique("json_logs"));
    let client = clickhouse
        .connect()
        .await
        .expect("clickhouse is up (scripts/stack up --infra)");
    tollgate_meter_consumer::schema::migrate(&client)
        .await
        .expect("usage tables");
    let event_time = unix_now() - 2 * 3600;
    tollgate_tests::billing::store_as_consumer(&client, vec![usage_row(event_time)]).await;

    let stripe = tollgate_tests::stripe();
    let settings = format!(
        r#"
[clickhouse]
url = "{url}"
database = "{database}"

[stripe]
api_base = "{stripe}/"

[billing]
window_secs = 3600
lateness_secs = 300
poll_interval_secs = 1

[[meters]]
meter = "requests"
event_name = "tollgate_requests"

[admin]
listen = "127.0.0.1:0"

[log]
format = "json"
"#,
        url = clickhouse.url,
        database = clickhouse.database,
        stripe = stripe.trim_end_matches('/'),
    );
    let path = std::env::temp_dir().join(format!("{}.toml", clickhouse.database));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(settings.as_bytes()))
        .expect("settings file");

    let mut child = Command::new(bin())
        .arg("--config")
        .arg(&path)
        .env_clear()
        .env("PATH", var_or("PATH", ""))
        .env("TOLLGATE_STRIPE_API_KEY", STRIPE_KEY)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn billing-sync");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // Until the pass has logged inside its window span (or the deadline, or the process ends).
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lines.iter().any(|l: &String| l.contains(UNBILLABLE)) && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => lines.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let terminated = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(terminated.success(), "billing-sync still running to be stopped");
    let status = child.wait().expect("billing-sync exits");
    reader.join().expect("stderr reader");
    lines.extend(rx.try_iter());
    let _ = std::fs::remove_file(&path);
    client
        .query(&format!("DROP DATABASE {}", clickhouse.database))
        .execute()
        .await
        .expect("drop database");

    let all = lines.join("\n");
    assert!(status.success(), "clean exit after SIGTERM: {status}\n{all}");
    assert!(!all.contains(STRIPE_KEY), "the Stripe key reached the log:\n{all}");
    let events: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object: {e}: {l}")))
        .collect();
    for event in &events {
        let timestamp = event["timestamp"].as_str().unwrap_or_default();
        assert!(
            chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(),
            "RFC 3339 timestamp: {event}"
        );
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&event["level"].as_str().unwrap_or_default()),
            "level: {event}"
        );
        assert!(
            event["target"].as_str().is_some_and(|t| !t.is_empty()),
            "target: {event}"
        );
        assert!(event["fields"]["message"].is_string(), "message: {event}");
    }
    let message = |text: &str| {
        events
            .iter()
            .find(|e| e["fields"]["message"] == text)
            .unwrap_or_else(|| panic!("no `{text}` line in:\n{all}"))
    };
    assert_eq!(message("billing-sync ready")["fields"]["admin"], "127.0.0.1:0");
    let unbillable = message(UNBILLABLE);
    assert_eq!(unbillable["level"], "WARN");
    assert_eq!(unbillable["target"], "tollgate_billing_sync::sync");
    assert_eq!(unbillable["fields"]["revisions"], 1);
    // The window the event falls in, as span fields.
    let window_start = event_time - event_time % 3600;
    assert_eq!(unbillable["span"]["name"], "window");
    assert_eq!(unbillable["span"]["start"], window_start);
    assert_eq!(unbillable["span"]["end"], window_start + 3600);
    assert_eq!(unbillable["spans"][0]["name"], "window");
    assert_eq!(message("shutting down")["fields"]["signal"], "SIGTERM");
}

#[test]
fn a_refused_start_is_one_json_error_line_too() {
    // The settings file is written elsewhere, so the catalogue is named by its full path.
    let catalogue = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/plans.toml");
    let settings = include_str!("../../config/billing-sync.toml")
        .replace("path = \"plans.toml\"", &format!("path = \"{catalogue}\""))
        .replace(
            "gateway_settings = \"gateway.toml\"",
            concat!(
                "gateway_settings = \"",
                env!("CARGO_MANIFEST_DIR"),
                "/../config/gateway.toml\""
            ),
        )
        .replace("127.0.0.1:9102", "127.0.0.1:0")
        .replace("http://127.0.0.1:8123", "http://127.0.0.1:1");
    let exit = tollgate_tests::service::run_with_settings(
        &bin().display().to_string(),
        &settings,
        &[
            ("TOLLGATE_STRIPE_API_KEY", STRIPE_KEY),
            ("TOLLGATE_LOG__FORMAT", "json"),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    let last: serde_json::Value = serde_json::from_str(&exit.last_line).expect("the last line is JSON");
    assert_eq!(last["level"], "ERROR");
    let message = last["fields"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("tollgate-billing-sync: ")
            && message.contains("clickhouse at http://127.0.0.1:1 is unreachable"),
        "{message}"
    );
    assert!(!exit.stderr.contains(STRIPE_KEY), "{}", exit.stderr);
}
