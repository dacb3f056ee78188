//! meter-consumer's ClickHouse schema on the real server: migrations apply, are recorded once
//! per version, are safe to run again and from two instances at once, and bring databases
//! made by older versions up to date.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use tollgate_meter_consumer::schema::{latest_version, migrate};
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_tests::{clickhouse, unique};

#[tokio::test]
async fn migrations_are_idempotent_and_safe_concurrently() {
    let settings = ClickhouseSettings::new(clickhouse(), unique("meter_schema"));
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
        "plan_prices",
        "invoice_totals",
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
    let settings = ClickhouseSettings::new(clickhouse(), unique("meter_schema_v3"));
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

/// A database at version 3 (units-only `invoice_preview`, usage already in it) migrates to
/// the priced views: its lines read `priced = 0` until billing-sync writes the prices, then
/// carry the amounts, and `invoice_totals` adds the fee.
#[tokio::test]
async fn a_version_3_database_gains_the_priced_invoice_views_keeping_its_usage() {
    let settings = ClickhouseSettings::new(clickhouse(), unique("meter_schema_v4"));
    let client = settings.connect().await.expect("clickhouse answers");
    let exec = |sql: &'static str| {
        let client = client.clone();
        async move {
            client
                .query(sql)
                .execute()
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }
    };
    for migration in &tollgate_meter_consumer::schema::MIGRATIONS[..3] {
        for statement in migration.statements {
            exec(statement).await;
        }
    }
    // schema_migrations as `migrate` makes it, recording versions 1 to 3.
    exec(
        "CREATE TABLE schema_migrations (version UInt32, name String, applied_at DateTime('UTC'), applied_by String) \
         ENGINE = ReplacingMergeTree ORDER BY version",
    )
    .await;
    exec("INSERT INTO schema_migrations VALUES (1, 'v1', now(), 'test'), (2, 'v2', now(), 'test'), (3, 'v3', now(), 'test')")
        .await;
    exec(
        "INSERT INTO usage_meter_day (tenant_id, meter, day, events, billable_events, units, billable_units) \
         VALUES ('t_old', 'requests', '2026-10-05', 9, 9, 1150, 1150)",
    )
    .await;
    exec(
        "INSERT INTO consumers (consumer_id, name, tenant_id, plan, stripe_customer_id, metadata_json, version, updated_at, deleted) \
         VALUES ('c_old', 'old', 't_old', 'starter', 'cus_old', '{}', 1, now(), 0)",
    )
    .await;

    migrate(&client).await.expect("migrates to the latest version");
    let line = || async {
        let bytes = client
            .query("SELECT billable_units, stripe_customer_id, priced, currency, amount_minor FROM invoice_preview")
            .fetch_bytes("TabSeparated")
            .expect("query")
            .collect()
            .await
            .expect("invoice_preview runs");
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    };
    assert_eq!(line().await, "1150\tcus_old\t0\t\t0\n", "no prices written yet");

    let catalogue = tollgate_runtime::catalogue::Catalogue::parse(
        "[plans.starter]\ncurrency = \"usd\"\nmonthly_fee_minor = 2900\n\
         meters.requests = { unit_price_minor = \"0.01\", included_units = 1000 }\n",
        "plans.toml",
    )
    .expect("catalogue");
    tollgate_billing_sync::prices::publish(&client, &catalogue)
        .await
        .expect("prices written");
    // (1150 - 1000) × 0.01 = 1.5, rounded half up to 2.
    assert_eq!(line().await, "1150\tcus_old\t1\tusd\t2\n");
    let total: String = client
        .query("SELECT toString(total_minor) FROM invoice_totals WHERE tenant_id = 't_old'")
        .fetch_one()
        .await
        .expect("invoice_totals runs");
    assert_eq!(total, "2902");
    client
        .query(&format!("DROP DATABASE {}", settings.database))
        .execute()
        .await
        .expect("drop database");
}
