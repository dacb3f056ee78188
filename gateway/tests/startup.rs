//! The gateway binary refuses to start with one line naming what is wrong, and exits non-zero.

use std::time::Duration;

use tollgate_test_support::service::run_with_settings;

const EXAMPLE: &str = include_str!("../../config/gateway.toml");
const BIN: &str = env!("CARGO_BIN_EXE_tollgate-gateway");
const TOKEN: (&str, &str) = ("TOLLGATE_ADMIN_TOKEN", "test-admin-token-0123456789");

/// Listeners on port 0 so the test never collides with a running stack.
fn example_on_free_ports() -> String {
    EXAMPLE
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:8081", "127.0.0.1:0")
}

#[test]
fn unknown_field_names_the_file_and_field() {
    let settings = example_on_free_ports().replace("[public]", "[public]\nlisten_adress = \"x\"");
    let exit = run_with_settings(BIN, &settings, &[TOKEN], Duration::from_secs(20));
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(exit.last_line.starts_with("tollgate-gateway: "), "{}", exit.last_line);
    assert!(
        exit.last_line.contains("unknown field `listen_adress`"),
        "{}",
        exit.last_line
    );
}

#[test]
fn bad_value_from_environment_names_the_variable() {
    let exit = run_with_settings(
        BIN,
        &example_on_free_ports(),
        &[TOKEN, ("TOLLGATE_KAFKA__BROKERS", "no-port-here")],
        Duration::from_secs(20),
    );
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.last_line
            .contains("TOLLGATE_KAFKA__BROKERS: setting `kafka.brokers`: found \"no-port-here\""),
        "{}",
        exit.last_line
    );
}

#[test]
fn missing_admin_token_is_refused() {
    let exit = run_with_settings(BIN, &example_on_free_ports(), &[], Duration::from_secs(20));
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.last_line.contains("TOLLGATE_ADMIN_TOKEN is not set"),
        "{}",
        exit.last_line
    );
}

#[test]
fn unreachable_broker_names_the_broker() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let settings = example_on_free_ports().replace(
        "brokers = \"127.0.0.1:9092\"",
        "brokers = \"127.0.0.1:1\"\nconnect_timeout_ms = 1500",
    );
    let exit = run_with_settings(BIN, &settings, &[TOKEN], Duration::from_secs(30));
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.last_line.contains("kafka at 127.0.0.1:1 is unreachable"),
        "{}",
        exit.last_line
    );
    assert!(
        !exit.stderr.contains(TOKEN.1),
        "the admin token never appears in output"
    );
}
