//! The billing-sync binary refuses to start with one line naming what is wrong.

use std::time::Duration;

use tollgate_test_support::service::run_with_settings;

const EXAMPLE: &str = include_str!("../../config/billing-sync.toml");
const BIN: &str = env!("CARGO_BIN_EXE_tollgate-billing-sync");

/// The example on a free port, its catalogue and the gateway's settings named by absolute
/// path (the settings file is written to a temporary directory, and relative paths are read
/// from there).
fn example_on_free_port() -> String {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
    EXAMPLE
        .replace("127.0.0.1:9102", "127.0.0.1:0")
        .replace("path = \"plans.toml\"", &format!("path = \"{config}/plans.toml\""))
        .replace(
            "gateway_settings = \"gateway.toml\"",
            &format!("gateway_settings = \"{config}/gateway.toml\""),
        )
}

#[test]
fn a_billing_meter_the_gateway_does_not_count_is_refused() {
    let settings = example_on_free_port().replace("meter = \"tokens\"", "meter = \"tokenz\"");
    let exit = run_with_settings(
        BIN,
        &settings,
        &[("TOLLGATE_STRIPE_API_KEY", "sk_test_123")],
        Duration::from_secs(20),
    );
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.last_line.contains("meters[2].meter") && exit.last_line.contains("a meter the gateway counts"),
        "{}",
        exit.last_line
    );
    assert!(
        exit.last_line.contains("tokens"),
        "the message lists what is counted: {}",
        exit.last_line
    );
}

#[test]
fn missing_meters_are_refused() {
    let settings: String = example_on_free_port()
        .split("[[meters]]")
        .next()
        .expect("text before the meters")
        .to_owned()
        + "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let exit = run_with_settings(BIN, &settings, &[], Duration::from_secs(20));
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.last_line.ends_with(".toml: missing field `meters`"),
        "{}",
        exit.last_line
    );
}

#[test]
fn unreachable_clickhouse_names_the_url() {
    let settings = example_on_free_port().replace("http://127.0.0.1:8123", "http://127.0.0.1:1");
    let exit = run_with_settings(
        BIN,
        &settings,
        &[("TOLLGATE_STRIPE_API_KEY", "sk_test_123")],
        Duration::from_secs(30),
    );
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.last_line
            .contains("clickhouse at http://127.0.0.1:1 is unreachable"),
        "{}",
        exit.last_line
    );
}

#[test]
fn stripe_key_overlay_from_a_bad_variable_is_refused() {
    let exit = run_with_settings(
        BIN,
        &example_on_free_port(),
        &[("TOLLGATE_STRIPE__API_BASE", "stripe.example")],
        Duration::from_secs(20),
    );
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.last_line
            .contains("TOLLGATE_STRIPE__API_BASE: setting `stripe.api_base`"),
        "{}",
        exit.last_line
    );
}

/// The example with an `[alerts]` section (before `[log]`, so it is not read as part of it).
fn with_alerts(alerts: &str) -> String {
    example_on_free_port().replace("\n[log]\n", &format!("\n[alerts]\n{alerts}\n\n[log]\n"))
}

#[test]
fn alerts_without_a_secret_name_where_it_comes_from() {
    let settings = with_alerts("webhook_url = \"http://127.0.0.1:9200/alerts\"");
    let exit = run_with_settings(BIN, &settings, &[], Duration::from_secs(20));
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.last_line
            .contains("no webhook secret: set TOLLGATE_ALERTS_WEBHOOK_SECRET or alerts.webhook_secret_file"),
        "{}",
        exit.last_line
    );
}

#[test]
fn a_malformed_alerts_secret_is_refused_without_echoing_it() {
    let settings = with_alerts("webhook_url = \"http://127.0.0.1:9200/alerts\"");
    let secret = "whsec_bm90LWxvbmctZW5vdWdo";
    let exit = run_with_settings(
        BIN,
        &settings,
        &[("TOLLGATE_ALERTS_WEBHOOK_SECRET", secret)],
        Duration::from_secs(20),
    );
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(
        exit.last_line.contains("the webhook secret is not whsec_"),
        "{}",
        exit.last_line
    );
    assert!(!exit.stderr.contains(&secret[6..]), "{}", exit.stderr);
}

#[test]
fn bad_alert_thresholds_name_the_field() {
    let settings = with_alerts("webhook_url = \"http://127.0.0.1:9200/alerts\"\nquota_thresholds = [100, 80]");
    let exit = run_with_settings(BIN, &settings, &[], Duration::from_secs(20));
    assert_eq!(exit.code, Some(1), "{}", exit.stderr);
    assert!(exit.last_line.contains("alerts.quota_thresholds"), "{}", exit.last_line);
}
