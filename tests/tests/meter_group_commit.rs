//! meter-consumer's one writer groups the batches of several partitions into one insert per
//! table, and a group cut off between its inserts is completed exactly once by the next run.
//!
//! Real Kafka and ClickHouse, the test's own topics and database. The flusher runs
//! in-process with three partitions' batches already waiting, so its first flush is one
//! group of all three; `usage_meter_hour` is renamed away so that flush stores the raw rows
//! and the other rollups, then retries the hour rollup until the flusher is dropped (a crash
//! between inserts). The table comes back and a consumer run over the topic must leave every
//! table exact: nothing doubled in the raw table, nothing missing from the hour rollup.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;
use support::{assert_exact, producer, totals, Env, Workload};
use tollgate_meter_consumer::batch::{Batch, BatchBuilder};
use tollgate_meter_consumer::dlq::DeadLetters;
use tollgate_meter_consumer::flush::{self, FlushContext, Member, Sealed};
use tollgate_meter_consumer::metrics::Metrics;
use tollgate_meter_consumer::partition::Record;
use tollgate_meter_consumer::rows::{Origin, UsageRow};
use tollgate_meter_consumer::sink::{ClickhouseSink, SinkSettings};
use tollgate_meter_consumer::MeterSettings;
use tollgate_runtime::ops::Ops;
use tollgate_runtime::shutdown::Shutdown;
use tollgate_test_support::meter as support;

const PARTITIONS: i32 = 3;
const EVENTS: u64 = 3_000;
const MAX_ROWS: u64 = 10_000;

/// Produces the workload and returns each record with the partition and offset Kafka gave it.
async fn produce_placed(env: &Env, workload: &Workload) -> Vec<(i32, Record)> {
    let producer = producer(&env.brokers);
    let mut pending = Vec::with_capacity(workload.events.len());
    for (key, payload) in &workload.events {
        let record = FutureRecord::to(&env.usage)
            .key(key.as_bytes())
            .payload(payload.as_slice());
        let delivery = producer.send_result(record).map_err(|(e, _)| e).expect("enqueued");
        pending.push((delivery, key, payload));
    }
    let mut placed = Vec::with_capacity(pending.len());
    for (delivery, key, payload) in pending {
        let delivered = delivery
            .await
            .expect("delivery reported")
            .map_err(|(e, _)| e)
            .expect("broker acked the event");
        let record = Record {
            offset: delivered.offset,
            key: Some(key.as_bytes().to_vec()),
            payload: Some(payload.clone()),
        };
        placed.push((delivered.partition, record));
    }
    placed
}

/// One sealed batch per partition, rows in offset order, as the builders would hand them over.
fn batches(topic: &str, placed: Vec<(i32, Record)>) -> BTreeMap<i32, (Batch, Vec<Record>)> {
    let mut by_partition: BTreeMap<i32, Vec<Record>> = BTreeMap::new();
    for (partition, record) in placed {
        by_partition.entry(partition).or_default().push(record);
    }
    by_partition
        .into_iter()
        .map(|(partition, mut records)| {
            records.sort_by_key(|r| r.offset);
            let mut builder = BatchBuilder::new(MAX_ROWS as usize, Duration::from_secs(60));
            for record in &records {
                let event = tollgate_schemas::decode_usage_event(record.payload.as_deref().expect("payload"))
                    .expect("event decodes");
                let origin = Origin {
                    partition,
                    offset: record.offset,
                };
                let row = UsageRow::from_event(&event, &topic.into(), origin).expect("row");
                assert!(builder.push(row).is_none(), "one month, one batch");
            }
            (partition, (builder.take().expect("a batch"), records))
        })
        .collect()
}

async fn exec(client: &clickhouse::Client, sql: &str) {
    client
        .query(sql)
        .execute()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn count(client: &clickhouse::Client, sql: &str) -> u64 {
    client
        .query(sql)
        .fetch_one::<u64>()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The value of a counter with exactly these labels in a Prometheus text page.
fn counter(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_three_partitions_is_one_insert_and_survives_a_crash_between_its_inserts() {
    let env = Env::new("meter_group", PARTITIONS).await;
    let workload = Workload::with_late_runs(11, EVENTS, false);
    let placed = produce_placed(&env, &workload).await;
    let settings: MeterSettings = env.settings(&env.clickhouse, MAX_ROWS, 200);
    let client = settings.clickhouse.connect().await.expect("clickhouse answers");
    tollgate_meter_consumer::schema::migrate(&client)
        .await
        .expect("meter-consumer migrates");

    let (_ops, recorder) = Ops::new();
    let metrics = Metrics::new(recorder);
    let sink = ClickhouseSink::new(
        client.clone(),
        env.usage.clone(),
        SinkSettings {
            insert_timeout: Duration::from_secs(10),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(500),
            max_rows: MAX_ROWS,
        },
        metrics.clone(),
    );
    let dead_letters = DeadLetters::new(
        &settings.kafka,
        env.dlq.clone(),
        env.usage.clone(),
        metrics.clone(),
        Duration::from_millis(100),
        Duration::from_millis(500),
    )
    .expect("dead-letter producer");
    let (commands, _commands_rx) = std::sync::mpsc::channel();
    let (batches_tx, batches_rx) = tokio::sync::mpsc::channel(flush::QUEUE);
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let batches = batches(&env.usage, placed);
    assert_eq!(
        batches.len(),
        PARTITIONS as usize,
        "the workload's tenants reach every partition"
    );
    let mut sealed = Vec::new();
    for (partition, (batch, sources)) in batches {
        let watermarks = sink.watermarks(partition).await.expect("watermarks");
        let member = std::sync::Arc::new(Member::new(partition, stop_rx.clone(), watermarks));
        sealed.push(Sealed { member, batch, sources });
    }
    exec(&client, "RENAME TABLE usage_meter_hour TO usage_meter_hour_away").await;
    for sealed in sealed {
        batches_tx.send(sealed).await.expect("queued");
    }
    let flusher = tokio::spawn(flush::run(
        FlushContext {
            sink,
            dead_letters,
            metrics: metrics.clone(),
            commands,
            max_rows: MAX_ROWS as usize,
        },
        batches_rx,
    ));

    // The group's raw insert and the rollups that exist land; the hour rollup is retried.
    let started = Instant::now();
    let expected_day = workload.totals.clone();
    loop {
        let raw = count(&client, "SELECT count() FROM usage_events").await;
        if raw == EVENTS && totals(&client, "usage_meter_day").await == expected_day {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the group's raw rows and day rollup were not stored within 60 s ({raw} raw rows)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let page = metrics.handle().render();
    assert_eq!(
        counter(&page, "meter_consumer_inserts_total{table=\"usage_events\"}"),
        1,
        "three partitions' batches went in as one raw insert:\n{page}"
    );
    assert_eq!(
        count(&client, "SELECT uniqExact(kafka_partition) FROM usage_events").await,
        PARTITIONS as u64
    );
    assert!(counter(&page, "meter_consumer_insert_retries_total{table=\"usage_meter_hour\"}") >= 1);

    // The crash: the flusher is dropped in the middle of its hour rollup retries.
    flusher.abort();
    let _ = flusher.await;
    drop(batches_tx);
    exec(&client, "RENAME TABLE usage_meter_hour_away TO usage_meter_hour").await;
    assert_eq!(count(&client, "SELECT count() FROM usage_meter_hour").await, 0);

    let shutdown = Shutdown::default();
    let consumer = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tollgate_meter_consumer::run(settings, shutdown)
                .await
                .expect("meter-consumer runs");
        }
    });
    assert_exact(&client, &workload.totals, workload.count, Duration::from_secs(120)).await;
    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(60), consumer)
        .await
        .expect("meter-consumer stops within 60 s")
        .expect("meter-consumer task");
    env.drop_database().await;
}
