//! The ClickHouse password goes to ClickHouse and nowhere else. The meter-consumer and
//! billing-sync binaries log in as a user with a password: with the right one they start and
//! use it, with a wrong one they refuse to start, and neither shows up in what they print.
//! (`money_path.rs` runs the whole chain logged in so and searches every log as well.)
//!
//! In: the stack's Kafka, ClickHouse with its `tollgate_secrets` user
//! (`scripts/clickhouse/users.xml`) and stripe-mock. Out: each binary's exit code and stderr.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::time::Duration;

use tollgate_tests::free_port;
use tollgate_tests::meter::Env;
use tollgate_tests::process::ServiceProcess;
use tollgate_tests::service::{binary, run_with_settings};
use tollgate_tests::{clickhouse, stripe, unique, CLICKHOUSE_SECRETS_PASSWORD, CLICKHOUSE_SECRETS_USER};

const WRONG_PASSWORD: &str = "wrong-ch-password-3b8e6f2a";
const STRIPE_KEY: &str = "sk_test_chpassword51e0b7d2";

/// billing-sync's example settings on free ports, with the catalogue by its full path (the
/// settings file is written elsewhere).
fn billing_settings() -> String {
    let catalogue = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/plans.toml");
    include_str!("../../config/billing-sync.toml")
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
}

#[tokio::test]
async fn a_wrong_password_is_refused_and_never_printed() {
    let meter = Env::new("chpw", 1).await;
    let clickhouse = clickhouse();
    let stripe = stripe();
    let login = [
        ("TOLLGATE_CLICKHOUSE__USER", CLICKHOUSE_SECRETS_USER),
        ("TOLLGATE_CLICKHOUSE_PASSWORD", WRONG_PASSWORD),
        ("TOLLGATE_CLICKHOUSE__URL", clickhouse.as_str()),
        ("TOLLGATE_CLICKHOUSE__DATABASE", meter.database.as_str()),
    ];
    let billing_env = [
        ("TOLLGATE_STRIPE_API_KEY", STRIPE_KEY),
        ("TOLLGATE_STRIPE__API_BASE", stripe.as_str()),
    ];
    for (name, settings, extra) in [
        (
            "tollgate-meter-consumer",
            meter.settings_toml(&clickhouse, 100, 200),
            &[][..],
        ),
        ("tollgate-billing-sync", billing_settings(), &billing_env[..]),
    ] {
        let env: Vec<_> = login.iter().chain(extra).copied().collect();
        let exit = run_with_settings(
            &binary(name).display().to_string(),
            &settings,
            &env,
            Duration::from_secs(60),
        );
        assert_eq!(exit.code, Some(1), "{name} refuses to start: {}", exit.stderr);
        assert!(
            exit.last_line.contains(&clickhouse) && exit.last_line.contains(CLICKHOUSE_SECRETS_USER),
            "{name} names the server and the user: {}",
            exit.last_line
        );
        assert!(
            !exit.stderr.contains(WRONG_PASSWORD),
            "{name} printed the password: {}",
            exit.stderr
        );
        assert!(!exit.stderr.contains(STRIPE_KEY), "{name} printed the Stripe key");
    }
}

#[tokio::test]
async fn the_right_password_is_used_and_never_printed() {
    let meter = Env::new("chpw", 1).await;
    let dir = std::env::temp_dir().join(unique("chpw"));
    std::fs::create_dir_all(&dir).expect("test directory");
    let config = dir.join("meter-consumer.toml");
    let port = free_port();
    std::fs::write(
        &config,
        meter.settings_toml_on(&clickhouse(), 100, 200, &format!("127.0.0.1:{port}")),
    )
    .expect("settings");
    let login = [
        ("TOLLGATE_CLICKHOUSE__USER", CLICKHOUSE_SECRETS_USER),
        ("TOLLGATE_CLICKHOUSE_PASSWORD", CLICKHOUSE_SECRETS_PASSWORD),
    ];
    let mut process = ServiceProcess::new(
        "tollgate-meter-consumer",
        &["--config", &config.display().to_string()],
        login.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        format!("http://127.0.0.1:{port}/healthz"),
        &dir,
    );
    process.start().await;
    // Healthy means it created its database and tables, as that user.
    let client =
        tollgate_runtime::clickhouse::ClickhouseSettings::new(clickhouse(), meter.database.clone()).server_client();
    let tables: Vec<String> = client
        .query("SELECT name FROM system.tables WHERE database = ?")
        .bind(&meter.database)
        .fetch_all()
        .await
        .expect("list tables");
    assert!(tables.iter().any(|t| t == "usage_events"), "tables: {tables:?}");
    process.terminate();
    let status = process.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "stops cleanly: {status}");
    let output = process.output();
    assert!(output.contains("ready"), "{output}");
    assert!(
        !output.contains(CLICKHOUSE_SECRETS_PASSWORD),
        "the meter-consumer printed the password: {output}"
    );
    let _ = client
        .query(&format!("DROP DATABASE IF EXISTS {}", meter.database))
        .execute()
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
