//! The meter-consumer binary refuses to start with one line naming what is wrong.

use std::time::Duration;

use tollgate_test_support::service::run_with_settings;

const EXAMPLE: &str = include_str!("../../config/meter-consumer.toml");
const BIN: &str = env!("CARGO_BIN_EXE_tollgate-meter-consumer");

fn example_on_free_port() -> String {
    EXAMPLE.replace("127.0.0.1:9101", "127.0.0.1:0")
}

#[test]
fn bad_batch_size_names_the_field_and_the_allowed_range() {
    let settings = example_on_free_port().replace("max_rows = 50000", "max_rows = 0");
    let exit = run_with_settings(BIN, &settings, &[], Duration::from_secs(20));
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.last_line
            .contains("setting `batch.max_rows`: found \"0\", expected a number from 1"),
        "{}",
        exit.last_line
    );
}

#[test]
fn unreachable_broker_names_the_broker() {
    let settings = example_on_free_port().replace(
        "brokers = \"127.0.0.1:9092\"",
        "brokers = \"127.0.0.1:1\"\nconnect_timeout_ms = 1500",
    );
    let exit = run_with_settings(BIN, &settings, &[], Duration::from_secs(30));
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.last_line.contains("kafka at 127.0.0.1:1 is unreachable"),
        "{}",
        exit.last_line
    );
}

#[test]
fn missing_config_file_is_named() {
    let exit = std::process::Command::new(BIN)
        .args(["--config", "/nonexistent/meter.toml"])
        .output()
        .expect("run");
    assert_eq!(exit.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&exit.stderr);
    assert!(stderr.contains("/nonexistent/meter.toml: cannot read"), "{stderr}");
}
