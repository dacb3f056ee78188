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

/// `invoice_preview` as migration 2 first created it: its joined subqueries have no alias,
/// which 18.16 accepts and current ClickHouse refuses.
const UNALIASED_INVOICE_PREVIEW: &str = "CREATE VIEW invoice_preview AS
     SELECT tenant_id, period_start, meter, billable_units, billable_events, stripe_customer_id
     FROM (
         SELECT tenant_id, toStartOfMonth(day) AS period_start, meter,
                sum(billable_units) AS billable_units, sum(billable_events) AS billable_events
         FROM usage_meter_day WHERE tenant_id != '' GROUP BY tenant_id, period_start, meter
     ) ANY LEFT JOIN (
         SELECT tenant_id, anyIf(stripe_customer_id, stripe_customer_id != '') AS stripe_customer_id
         FROM consumers FINAL WHERE deleted = 0 GROUP BY tenant_id
     ) USING tenant_id";

#[tokio::test]
async fn a_server_holding_the_unaliased_invoice_preview_gets_the_aliased_one() {
    let settings = ClickhouseSettings {
        url: clickhouse(),
        database: unique("meter_schema_v3"),
        user: "default".to_owned(),
    };
    let client = settings.connect().await.expect("clickhouse answers");
    // The tables and views of versions 1 and 2, with the view as first released.
    for migration in &tollgate_meter_consumer::schema::MIGRATIONS[..2] {
        for statement in migration.statements {
            client
                .query(statement)
                .execute()
                .await
                .expect("version 1 and 2 statement");
        }
    }
    for statement in ["DROP TABLE invoice_preview", UNALIASED_INVOICE_PREVIEW] {
        client.query(statement).execute().await.expect("the old view");
    }

    migrate(&client).await.expect("migrates");
    let create: String = client
        .query("SELECT create_table_query FROM system.tables WHERE database = ? AND name = 'invoice_preview'")
        .bind(settings.database.as_str())
        .fetch_one()
        .await
        .expect("the view's definition");
    // The server prints the definition its own way: compare words.
    let create = create.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        create.contains(") AS billed ANY LEFT JOIN (") && create.contains(") AS customers USING"),
        "{create}"
    );
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
