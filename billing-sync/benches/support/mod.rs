//! What the billing benchmarks share: usage stored as meter-consumer stores it.

use clickhouse::Client;
use tollgate_meter_consumer::batch;
use tollgate_meter_consumer::rows::UsageRow;

/// A billable event of `tenant` at `time` (`requests = 1`, `compute_units = 3`).
pub fn usage_row(time: u32, tenant: &str, offset: u64) -> UsageRow {
    UsageRow {
        event_id: format!("{tenant}_{offset}"),
        time,
        time_ms: 0,
        tenant_id: tenant.to_owned(),
        consumer: String::new(),
        key_id: String::new(),
        plan: String::new(),
        route: "bench".to_owned(),
        method: "GET".to_owned(),
        status: 200,
        outcome: "ALLOWED",
        billable: 1,
        units_meter: vec!["requests".into(), "compute_units".into()],
        units_value: vec![1, 3],
        request_bytes: 0,
        response_bytes: 0,
        latency_ms: 0,
        upstream_latency_ms: -1,
        gateway_id: "bench".to_owned(),
        request_id: String::new(),
        kafka_partition: 1,
        kafka_offset: offset,
        kafka_topic: "bench".into(),
    }
}

/// Stores `rows` as one consumer batch: raw, every rollup, then the minutes touched.
pub async fn store(client: &Client, rows: &[UsageRow]) {
    async fn insert<R: clickhouse::RowOwned + clickhouse::RowWrite + serde::Serialize>(
        client: &Client,
        table: &str,
        rows: &[R],
    ) {
        let mut insert = client.insert::<R>(table).await.expect("insert");
        for row in rows {
            insert.write(row).await.expect("row");
        }
        insert.end().await.expect("insert committed");
    }
    insert(client, "usage_events", rows).await;
    insert(client, "usage_meter_minute", &batch::meter_minute("bench", rows)).await;
    insert(client, "usage_meter_hour", &batch::meter_hour("bench", rows)).await;
    insert(client, "usage_meter_day", &batch::meter_day("bench", rows)).await;
    insert(client, "usage_route_day", &batch::route_day("bench", rows)).await;
    insert(client, "usage_minutes_touched", &batch::minutes_touched("bench", rows)).await;
}
