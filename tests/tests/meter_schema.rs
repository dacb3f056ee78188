//! meter-consumer's ClickHouse schema on the real server: migrations apply, are recorded once
//! per version, and are safe to run again and from two instances at once.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use tollgate_meter_consumer::schema::{latest_version, migrate};
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_tests::{clickhouse, unique};

#[tokio::test]
async fn migrations_are_idempotent_and_safe_concurrently() {
    let settings = ClickhouseSettings {
        url: clickhouse(),
        database: unique("meter_schema"),
        user: "default".to_owned(),
    };
    let client = settings.connect().await.expect("clickhouse answers");
    // Two instances starting at once, then a restart.
    let (a, b) = tokio::join!(migrate(&client), migrate(&client));
    a.expect("first instance migrates");
    b.expect("second instance migrates");
    migrate(&client).await.expect("a restart migrates again");

    let versions: Vec<u32> = client
        .query("SELECT DISTINCT version FROM schema_migrations ORDER BY version")
        .fetch_all()
        .await
        .expect("read migrations");
    assert_eq!(versions, (1..=latest_version()).collect::<Vec<_>>());
    for table in [
        "usage_events",
        "usage_meter_minute",
        "usage_meter_hour",
        "usage_meter_day",
        "usage_route_day",
        "consumers",
        "key_audit",
        "usage_daily",
        "usage_by_period",
        "top_routes",
        "invoice_preview",
    ] {
        let n: u64 = client
            .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
            .bind(settings.database.as_str())
            .bind(table)
            .fetch_one()
            .await
            .expect("system.tables");
        assert_eq!(n, 1, "{table} exists");
    }
    // The views parse and run on this server.
    let _: u64 = client
        .query("SELECT count() FROM invoice_preview")
        .fetch_one()
        .await
        .expect("invoice_preview runs");
    client
        .query(&format!("DROP DATABASE {}", settings.database))
        .execute()
        .await
        .expect("drop database");
}
