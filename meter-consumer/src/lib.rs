//! meter-consumer: usage events from Kafka into ClickHouse.
//!
//! In: the usage topic (consumer group) and the keys topic. Out: ClickHouse tables, dead
//! letters on the DLQ topic, health and metrics on the ops listener.
#![forbid(unsafe_code)]

pub mod schema;
pub mod settings;

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
}

/// Checks every dependency, then serves until `shutdown` fires.
pub async fn run(settings: MeterSettings, shutdown: Shutdown) -> Result<(), MeterError> {
    let listener = TcpListener::bind(&settings.admin.listen)
        .await
        .map_err(|source| MeterError::Bind {
            addr: settings.admin.listen.clone(),
            source,
        })?;
    tollgate_runtime::kafka::check_topics(
        &settings.kafka,
        &[
            settings.topics.usage.clone(),
            settings.topics.dlq.clone(),
            settings.topics.keys.clone(),
        ],
    )
    .await?;
    settings.clickhouse.connect().await?;
    let (ops, _recorder) = Ops::new();
    ops.set_ready();
    tracing::info!(admin = %settings.admin.listen, "meter-consumer ready");
    tollgate_runtime::ops::serve(listener, ops, shutdown).await;
    Ok(())
}
