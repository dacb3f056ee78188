//! meter-consumer: usage events from Kafka into ClickHouse, each counted exactly once.
//!
//! In: the usage topic (consumer group) and the keys topic. Out: ClickHouse tables (raw
//! events, rollups, consumers, key audit; see [`schema`]), dead letters on the DLQ topic,
//! health and metrics on the ops listener.
//!
//! Layout, in the order data flows: [`source`] (Kafka thread, rebalances, backpressure) →
//! [`partition`] (per-partition decode, batches, writes) → [`batch`] (batch bounds, rollups)
//! → [`sink`] (exactly-once inserts and why they are exact; [`table`] names the tables and
//! their watermarks) → ClickHouse; [`dlq`] for records that cannot be metered; [`keys`]
//! mirrors the keys topic.
#![forbid(unsafe_code)]

pub mod batch;
pub mod dlq;
pub mod flush;
pub mod keys;
pub mod metrics;
pub mod partition;
pub mod rows;
pub mod schema;
pub mod settings;
pub mod sink;
pub mod source;
pub mod table;

use std::time::Duration;

use tokio::net::TcpListener;
use tollgate_runtime::ops::Ops;
use tollgate_runtime::shutdown::Shutdown;

pub use settings::MeterSettings;

#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    #[error("ops listener: cannot bind {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Kafka(#[from] tollgate_runtime::kafka::KafkaCheckError),
    #[error(transparent)]
    Clickhouse(#[from] tollgate_runtime::clickhouse::ClickhouseCheckError),
    #[error("clickhouse schema: {0}")]
    Schema(#[from] schema::SchemaError),
    #[error("kafka client: {0}")]
    KafkaClient(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Source(#[from] source::SourceError),
    #[error(transparent)]
    Keys(#[from] keys::KeysError),
}

/// Checks every dependency, migrates the schema, then meters until `shutdown` fires (or a
/// part fails, which stops the others and is returned).
pub async fn run(settings: MeterSettings, shutdown: Shutdown) -> Result<(), MeterError> {
    let listener = TcpListener::bind(&settings.admin.listen)
        .await
        .map_err(|source| MeterError::Bind {
            addr: settings.admin.listen.clone(),
            source,
        })?;
    let topics = &settings.topics;
    tollgate_runtime::kafka::check_topics(
        &settings.kafka,
        &[topics.usage.clone(), topics.dlq.clone(), topics.keys.clone()],
    )
    .await?;
    let client = settings.clickhouse.connect().await?;
    schema::migrate_on(&client, settings.clickhouse.on_cluster()).await?;

    let (ops, recorder) = Ops::new();
    let metrics = metrics::Metrics::new(recorder);
    let upkeep = {
        let handle = metrics.handle();
        let shutdown = shutdown.clone();
        // Histograms buffer samples until upkeep or a scrape drains them.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
                }
            }
        })
    };

    let batch = &settings.batch;
    let retry_initial = Duration::from_millis(batch.retry_initial_ms);
    let retry_max = Duration::from_millis(batch.retry_max_ms);
    let insert_timeout = Duration::from_millis(batch.insert_timeout_ms);
    let dead_letters = dlq::DeadLetters::new(
        &settings.kafka,
        topics.dlq.clone(),
        topics.usage.clone(),
        metrics.clone(),
        retry_initial,
        retry_max,
    )?;
    let sink = sink::ClickhouseSink::new(
        client.clone(),
        topics.usage.clone(),
        sink::SinkSettings {
            insert_timeout,
            retry_initial,
            retry_max,
            max_rows: batch.max_rows,
        },
        metrics.clone(),
    );
    let (commands_tx, commands_rx) = std::sync::mpsc::channel();
    let (batches_tx, batches_rx) = tokio::sync::mpsc::channel(flush::QUEUE);
    // Ends when the last builder and the Kafka thread's context are gone.
    tokio::spawn(flush::run(
        flush::FlushContext {
            sink: sink.clone(),
            dead_letters: dead_letters.clone(),
            metrics: metrics.clone(),
            commands: commands_tx,
            max_rows: batch.max_rows as usize,
        },
        batches_rx,
    ));
    let workers_ctx = partition::WorkerContext {
        sink,
        dead_letters,
        metrics: metrics.clone(),
        batches: batches_tx,
        max_rows: batch.max_rows as usize,
        max_wait: Duration::from_millis(batch.max_wait_ms),
    };
    let ops_port = listener.local_addr().map_or(0, |a| a.port());
    let instance = source::instance_id(topics.instance_id.as_deref(), ops_port);
    let consumer = source::consumer(
        &settings.kafka,
        source::Membership {
            group: &topics.group,
            instance: &instance,
            ops: ops.clone(),
        },
        &topics.usage,
        workers_ctx,
        tokio::runtime::Handle::current(),
        shutdown.clone(),
        // An in-flight insert, its settling, and a margin.
        insert_timeout * 3,
    )?;
    let (source_done_tx, source_done) = tokio::sync::oneshot::channel();
    let usage_topic = topics.usage.clone();
    std::thread::Builder::new()
        .name("usage-consumer".to_owned())
        .spawn(move || {
            let result = source::run_blocking(consumer, &usage_topic, commands_rx);
            let _ = source_done_tx.send(result);
        })
        .expect("spawn the usage consumer thread");
    let mut keys = tokio::spawn(keys::run(
        settings.kafka.clone(),
        topics.keys.clone(),
        topics.group.clone(),
        client,
        metrics,
        (retry_initial, retry_max),
        shutdown.clone(),
    ));

    tracing::info!(admin = %settings.admin.listen, usage = %topics.usage, group = %topics.group, %instance, "meter-consumer started; ready once a partition is assigned");
    let ops_task = tokio::spawn(tollgate_runtime::ops::serve(listener, ops, shutdown.clone()));

    let mut source_done = source_done;
    let result: Result<(), MeterError> = tokio::select! {
        source = &mut source_done => {
            shutdown.trigger();
            let _ = (&mut keys).await;
            source.unwrap_or(Ok(())).map_err(MeterError::from)
        }
        mirrored = &mut keys => {
            shutdown.trigger();
            let _ = source_done.await;
            mirrored.expect("keys mirror does not panic").map_err(MeterError::from)
        }
    };
    let _ = ops_task.await;
    let _ = upkeep.await;
    result
}
