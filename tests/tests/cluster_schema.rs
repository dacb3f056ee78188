//! meter-consumer's schema on two ClickHouse 18.16 replicas of one shard (the cluster stack):
//! one migration creates every table on both replicas as `Replicated*MergeTree` and every
//! view on both; the version is recorded once for the cluster, so a service on the other
//! replica applies nothing again; a row written on one replica is read, through the finance
//! views, on the other.

// Needs the cluster stack: `scripts/stack up --cluster`, then `scripts/stack test --cluster`.
#![cfg(feature = "cluster-tests")]

use tollgate_meter_consumer::schema::{latest_version, migrate_on};
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_tests::{cluster_clickhouse, eventually, unique};

#[derive(Debug, serde::Deserialize, clickhouse::Row)]
struct Table {
    name: String,
    engine: String,
}

#[tokio::test]
async fn one_migration_builds_both_replicas_and_rows_written_on_one_are_read_on_the_other() {
    let urls = cluster_clickhouse();
    let database = unique("cluster_schema");
    let replica = |url: &str| ClickhouseSettings {
        cluster: Some("tollgate".to_owned()),
        replicas: 2,
        ..ClickhouseSettings::new(url, database.clone())
    };
    let (first, second) = (replica(&urls[0]), replica(&urls[1]));
    let on_first = first.connect().await.expect("replica 1 answers");
    migrate_on(&on_first, first.on_cluster())
        .await
        .expect("migrates the cluster");

    // The other replica has every table and view, replicated, without a migration of its own.
    let on_second = second.client();
    let tables_on = |client: clickhouse::Client| async move {
        client
            .query("SELECT name, engine FROM system.tables WHERE database = currentDatabase() ORDER BY name")
            .fetch_all::<Table>()
            .await
            .expect("system.tables")
    };
    let (a, b) = (tables_on(on_first.clone()).await, tables_on(on_second.clone()).await);
    let names = |tables: &[Table]| tables.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "the same tables and views on both replicas");
    for t in &b {
        assert!(
            t.engine == "View" || t.engine.starts_with("Replicated"),
            "{} is {} on replica 2",
            t.name,
            t.engine
        );
    }
    for wanted in [
        "usage_events",
        "usage_meter_day",
        "invoice_preview",
        "usage_by_period",
        "schema_migrations",
    ] {
        assert!(
            names(&b).iter().any(|n| n == wanted),
            "{wanted} on replica 2: {:?}",
            names(&b)
        );
    }

    // Recorded once for the cluster: a service on replica 2 finds every version applied.
    migrate_on(&on_second, second.on_cluster())
        .await
        .expect("replica 2 migrates");
    let versions: Vec<u32> = on_second
        .query("SELECT version FROM schema_migrations FINAL ORDER BY version")
        .fetch_all()
        .await
        .expect("versions");
    assert_eq!(versions, (1..=latest_version()).collect::<Vec<_>>());

    // A quorum insert on replica 1 is on replica 2 once acknowledged, through the views.
    on_first
        .query(
            "INSERT INTO usage_meter_day (day, tenant_id, meter, units, billable_units, events, billable_events, \
             kafka_topic, kafka_partition, kafka_offset) \
             VALUES (today(), 't_cluster', 'requests', 7, 7, 7, 7, 'tollgate.usage.v1', 0, 41)",
        )
        .execute()
        .await
        .expect("quorum insert on replica 1");
    let billed: u64 = on_second
        .query("SELECT toUInt64(sum(billable_units)) FROM usage_by_period WHERE tenant_id = 't_cluster'")
        .fetch_one()
        .await
        .expect("usage_by_period on replica 2");
    assert_eq!(billed, 7, "the acknowledged row is read on the other replica");

    // The same block inserted again (a retry whose first try landed) is one row.
    on_second
        .query(
            "INSERT INTO usage_meter_day (day, tenant_id, meter, units, billable_units, events, billable_events, \
             kafka_topic, kafka_partition, kafka_offset) \
             VALUES (today(), 't_cluster', 'requests', 7, 7, 7, 7, 'tollgate.usage.v1', 0, 41)",
        )
        .execute()
        .await
        .expect("the retried insert on replica 2");
    let rows = eventually("both replicas agree", std::time::Duration::from_secs(30), || {
        let (a, b) = (on_first.clone(), on_second.clone());
        async move {
            let count = |c: clickhouse::Client| async move {
                c.query("SELECT count() FROM usage_meter_day WHERE tenant_id = 't_cluster'")
                    .fetch_one::<u64>()
                    .await
                    .ok()
            };
            let (x, y) = (count(a).await?, count(b).await?);
            (x == y).then_some(x)
        }
    })
    .await;
    assert_eq!(rows, 1, "a retried block is deduplicated across replicas");

    let _ = on_first
        .query(&format!("DROP DATABASE IF EXISTS {database} ON CLUSTER tollgate"))
        .execute()
        .await;
}
