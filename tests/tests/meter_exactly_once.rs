//! meter-consumer over the real Kafka and ClickHouse: every usage event counted exactly once
//! in the raw table and in every rollup, with poison records interleaved, through a
//! ClickHouse outage and through a rebalance between two members of the group.
//!
//! Each test has its own topics, group and database; the consumer runs in-process through the
//! library. (The kill -9 proof runs the binary: `tests/tests/meter_crash_restart.rs`.)

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::time::Duration;

use support::{assert_exact, produce, producer, wait_for_rows, CuttableProxy, Env, Workload};
use tollgate_runtime::shutdown::Shutdown;
use tollgate_test_support::meter as support;

/// Runs a consumer in-process until the returned shutdown fires.
fn start(settings: tollgate_meter_consumer::MeterSettings) -> (Shutdown, tokio::task::JoinHandle<()>) {
    let shutdown = Shutdown::default();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            tollgate_meter_consumer::run(settings, shutdown)
                .await
                .expect("meter-consumer runs");
        }
    });
    (shutdown, task)
}

async fn stop((shutdown, task): (Shutdown, tokio::task::JoinHandle<()>)) {
    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("meter-consumer stops within 60 s")
        .expect("meter-consumer task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_events_counted_once_in_raw_and_every_rollup() {
    let env = Env::new("meter_100k", 4).await;
    let workload = Workload::new(1, 100_000);
    produce(&producer(&env.brokers), &env.usage, &workload.events, None).await;

    let consumer = start(env.settings(&env.clickhouse, 20_000, 500));
    assert_exact(
        &env.client(),
        &workload.totals,
        workload.count,
        Duration::from_secs(120),
    )
    .await;
    stop(consumer).await;
    env.drop_database().await;
}

/// The kinds of poison this test interleaves, with the payload each produces.
fn poison_records(env: &Env) -> Vec<(&'static str, Option<Vec<u8>>)> {
    use tollgate_schemas::{encode, ConsumerRecord};
    let good = Workload::new(99, 2).events;
    let valid = good[0].1.clone();
    let mut unknown_fingerprint = valid.clone();
    unknown_fingerprint[2..10].copy_from_slice(&0x0123_4567_89ab_cdefu64.to_le_bytes());
    let mut trailing = valid.clone();
    trailing.extend_from_slice(b"extra");
    let mut wrong_magic = valid.clone();
    wrong_magic[1] = 0x02;
    let mut ancient = tollgate_schemas::decode::<tollgate_schemas::UsageEvent>(&valid).unwrap();
    ancient.timestamp_ms = -86_400_000;
    let consumer = ConsumerRecord {
        id: "c1".into(),
        name: "acme".into(),
        tenant_id: Some("tenant_1".into()),
        plan: None,
        stripe_customer_id: None,
        metadata_json: "{}".into(),
        created_at_ms: 0,
        updated_at_ms: 0,
        version: 1,
        updated_by: env.group.clone(),
    };
    vec![
        ("too_short", Some(b"garbage".to_vec())),
        ("bad_magic", Some(wrong_magic)),
        ("unknown_fingerprint", Some(unknown_fingerprint)),
        ("bad_body", Some(valid[..valid.len() / 2].to_vec())),
        ("trailing_bytes", Some(trailing)),
        ("wrong_record", Some(encode(&consumer))),
        ("time_out_of_range", Some(encode(&ancient))),
        ("empty", None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_dead_lettered_and_every_good_one_lands() {
    use rdkafka::producer::FutureRecord;
    let env = Env::new("meter_poison", 2).await;
    let workload = Workload::new(2, 4_000);
    let poison = poison_records(&env);
    let producer = producer(&env.brokers);
    // A poison record after every 250 good ones, keyed like its neighbours so it lands in
    // the middle of a partition's stream.
    let mut expected_kinds = Vec::new();
    for (i, chunk) in workload.events.chunks(250).enumerate() {
        produce(&producer, &env.usage, chunk, None).await;
        let (kind, payload) = &poison[i % poison.len()];
        let mut record = FutureRecord::<[u8], [u8]>::to(&env.usage).key(chunk[0].0.as_bytes());
        if let Some(payload) = payload {
            record = record.payload(payload.as_slice());
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("acked");
        expected_kinds.push(*kind);
    }

    let consumer = start(env.settings(&env.clickhouse, 1_000, 200));
    assert_exact(&env.client(), &workload.totals, workload.count, Duration::from_secs(90)).await;
    let letters = support::read_topic(&env.brokers, &env.dlq, expected_kinds.len(), Duration::from_secs(30)).await;
    stop(consumer).await;

    let mut kinds: Vec<String> = letters.iter().map(|(h, _)| h["tollgate-dlq-kind"].clone()).collect();
    kinds.sort();
    expected_kinds.sort();
    assert_eq!(kinds, expected_kinds, "one dead letter per poison record");
    for (headers, _) in &letters {
        assert_eq!(headers["tollgate-source-topic"], env.usage);
        assert!(
            headers["tollgate-source-partition"].parse::<i32>().is_ok(),
            "{headers:?}"
        );
        assert!(headers["tollgate-source-offset"].parse::<i64>().is_ok(), "{headers:?}");
        assert!(!headers["tollgate-dlq-reason"].is_empty(), "{headers:?}");
    }
    let garbage = letters
        .iter()
        .find(|(h, _)| h["tollgate-dlq-kind"] == "too_short")
        .expect("garbage letter");
    assert_eq!(
        garbage.1.as_deref(),
        Some(&b"garbage"[..]),
        "the original payload is kept"
    );
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_unreachable_for_twenty_seconds_mid_stream() {
    let env = Env::new("meter_outage", 2).await;
    let proxy = CuttableProxy::start(&env.clickhouse).await;
    // The consumer migrates through the proxy too.
    let consumer = start(env.settings(&proxy.url, 2_000, 200));
    let workload = Workload::new(3, 30_000);
    let producing = tokio::spawn({
        let (brokers, topic, events) = (env.brokers.clone(), env.usage.clone(), workload.events.clone());
        async move { produce(&producer(&brokers), &topic, &events, Some(2_000)).await }
    });
    let client = env.client();
    wait_for_rows(&client, 3_000, Duration::from_secs(60)).await;
    proxy.cut();
    // The fault window itself: ClickHouse unreachable for the consumer for 20 s.
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.restore();
    producing.await.expect("producer");
    assert_exact(&client, &workload.totals, workload.count, Duration::from_secs(90)).await;
    stop(consumer).await;
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_with_rebalances_mid_stream() {
    let env = Env::new("meter_rebalance", 4).await;
    let workload = Workload::new(4, 40_000);
    let producing = tokio::spawn({
        let (brokers, topic, events) = (env.brokers.clone(), env.usage.clone(), workload.events.clone());
        async move { produce(&producer(&brokers), &topic, &events, Some(4_000)).await }
    });
    let client = env.client();
    let first = start(env.settings(&env.clickhouse, 2_000, 200));
    wait_for_rows(&client, 3_000, Duration::from_secs(60)).await;
    // A second member joins: the partitions are split between the two.
    let second = start(env.settings(&env.clickhouse, 2_000, 200));
    wait_for_rows(&client, 20_000, Duration::from_secs(60)).await;
    // The first leaves: the second takes everything over.
    stop(first).await;
    producing.await.expect("producer");
    assert_exact(&client, &workload.totals, workload.count, Duration::from_secs(90)).await;
    stop(second).await;
    env.drop_database().await;
}
