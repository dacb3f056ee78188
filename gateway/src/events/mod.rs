//! Usage events: one per request, to Kafka, through a local write-ahead spool.
//!
//! In: [`UsageEvent`]s from the request chain ([`UsageSink::record`]: an enqueue, never a
//! wait on the broker). Out: the events on the usage topic, keyed by tenant, in order,
//! produced idempotently with `acks=all`.
//!
//! Path: request → unbounded queue → writer task (appends to the spool, fsync by policy) →
//! shipper task (reads the spool in order and ships each batch as one Kafka transaction that
//! also records the spool position after it; see [`transactions`]). While Kafka is away a
//! batch fails and is tried again, its earlier attempts aborted and never visible; a restart
//! resumes from the later of the position file and the position Kafka committed, so a batch
//! is on the topic once, whether the gateway crashed before, during or after shipping it.
//!
//! Never a silent drop: every event is produced, still spooled, or counted as dropped (only
//! when the spool is over its cap, and then billable requests are refused with 503 under the
//! default policy, so what is dropped is never billable).

pub mod ids;
pub mod metrics;
mod record;
pub mod settings;
mod shipper;
pub mod spool;
pub mod transactions;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use tokio::sync::{mpsc, oneshot};
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_schemas::UsageEvent;

use self::metrics::EventMetrics;
pub use self::settings::{EventSettings, FsyncPolicy, FullPolicy};
use self::shipper::{ship_loop, ShipperControl, Shipping};
use self::spool::Watermark;
use self::writer::{write_loop, Command};

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("spool {dir}: {source}")]
    Spool { dir: String, source: std::io::Error },
    #[error("usage topic {topic}: {reason}")]
    Kafka { topic: String, reason: String },
}

/// The request chain's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct UsageSink {
    tx: Option<mpsc::UnboundedSender<Command>>,
    /// Events kept in memory instead (in-process tests of the chain).
    memory: Option<RecordedEvents>,
    watermark: Arc<Watermark>,
    settings: Arc<EventSettings>,
    metrics: Arc<EventMetrics>,
}

/// The events an in-memory sink has recorded, in order.
#[derive(Clone, Default)]
pub struct RecordedEvents(Arc<Mutex<Vec<UsageEvent>>>);

impl RecordedEvents {
    /// Every event recorded so far.
    pub fn all(&self) -> Vec<UsageEvent> {
        self.0.lock().expect("recorded events lock").clone()
    }
}

impl UsageSink {
    /// A sink that records nothing (events disabled).
    pub fn disabled(settings: EventSettings, metrics: Arc<EventMetrics>) -> Self {
        Self {
            tx: None,
            memory: None,
            watermark: Arc::default(),
            settings: Arc::new(settings),
            metrics,
        }
    }

    /// A sink that keeps every event in memory, where the returned handle reads them: the
    /// request chain without Kafka or a spool.
    pub fn in_memory(settings: EventSettings, metrics: Arc<EventMetrics>) -> (Self, RecordedEvents) {
        let recorded = RecordedEvents::default();
        let mut sink = Self::disabled(settings, metrics);
        sink.memory = Some(recorded.clone());
        (sink, recorded)
    }

    pub fn record(&self, event: UsageEvent) {
        if let Some(memory) = &self.memory {
            memory.0.lock().expect("recorded events lock").push(event);
            return;
        }
        let Some(tx) = &self.tx else { return };
        self.metrics.queue_depth.increment(1.0);
        if tx.send(Command::Event(Box::new(event))).is_err() {
            // Only after shutdown has closed the writer; counted, never silent.
            self.metrics.queue_depth.decrement(1.0);
            self.metrics.dropped("closed");
        }
    }

    /// Whether a billable request may be served: false when the spool is over its cap and
    /// the policy says to refuse rather than serve unbilled.
    pub fn accepting_billable(&self) -> bool {
        self.tx.is_none()
            || self.settings.when_full == FullPolicy::ServeUnbilled
            || self.watermark.pending_bytes.load(Ordering::Acquire) < self.settings.max_spool_bytes
    }

    pub fn settings(&self) -> &EventSettings {
        &self.settings
    }

    pub fn metrics(&self) -> &EventMetrics {
        &self.metrics
    }
}

/// The background half: the writer and shipper tasks.
pub struct UsagePipeline {
    tx: mpsc::UnboundedSender<Command>,
    shipper: tokio::task::JoinHandle<()>,
    control: Arc<ShipperControl>,
    settings: Arc<EventSettings>,
}

/// Opens the spool, starts the writer and the shipper.
pub fn start(
    settings: EventSettings,
    kafka: &KafkaSettings,
    topic: &str,
    service_id: &str,
    metrics: Arc<EventMetrics>,
) -> Result<(UsageSink, UsagePipeline), EventError> {
    let dir = PathBuf::from(&settings.spool_dir);
    let spool_error = |source| EventError::Spool {
        dir: settings.spool_dir.clone(),
        source,
    };
    let (writer, reader, recovery) = spool::open(&dir, settings.segment_bytes).map_err(spool_error)?;
    let epoch = spool::epoch(&dir).map_err(spool_error)?;
    if recovery.truncated_bytes > 0 {
        tracing::warn!(dir = %settings.spool_dir, bytes = recovery.truncated_bytes, "spool ended in a record cut short (a crash mid-write); cut it off");
    }
    if recovery.pending_records > 0 {
        tracing::info!(dir = %settings.spool_dir, events = recovery.pending_records, "spool holds events from an earlier run; replaying them");
        metrics.replay_pending.increment(recovery.pending_records as f64);
    }
    let kafka_error = |e: rdkafka::error::KafkaError| EventError::Kafka {
        topic: topic.to_owned(),
        reason: e.to_string(),
    };
    let mut config = kafka.client_config();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5");
    transactions::configure(&mut config, service_id);
    let producer: FutureProducer = config.create().map_err(kafka_error)?;
    let producer_config = config;
    let settings = Arc::new(settings);
    let (tx, rx) = mpsc::unbounded_channel();
    let watermark = Arc::clone(writer.watermark());
    let control = Arc::new(ShipperControl::default());
    // The writer lives until every sink is gone; shutdown does not wait for it, since a Sync
    // command has made everything recorded durable by then.
    tokio::task::spawn_blocking({
        let (settings, metrics, control) = (Arc::clone(&settings), Arc::clone(&metrics), Arc::clone(&control));
        move || write_loop(writer, rx, &settings, &metrics, &control.written)
    });
    let shipper_task = tokio::spawn(ship_loop(
        reader,
        Shipping {
            producer,
            producer_config,
            kafka: kafka.client_config(),
            service_id: service_id.to_owned(),
            topic: topic.to_owned(),
            epoch,
        },
        Arc::clone(&metrics),
        Arc::clone(&control),
        recovery.pending_records,
        Duration::from_millis(settings.ship_interval_ms),
    ));
    let sink = UsageSink {
        tx: Some(tx.clone()),
        memory: None,
        watermark,
        settings: Arc::clone(&settings),
        metrics,
    };
    Ok((
        sink,
        UsagePipeline {
            tx,
            shipper: shipper_task,
            control,
            settings,
        },
    ))
}

impl UsagePipeline {
    /// Kafka answered the start-up check: the shipper may connect now.
    pub fn kafka_checked(&self) {
        self.control.kafka_checked.notify_one();
    }

    /// After the listeners have drained: makes every recorded event durable, gives Kafka up to
    /// `shutdown_flush_ms` to take the spool, and leaves the rest for the next start.
    pub async fn shutdown(self) {
        let (done, synced) = oneshot::channel();
        if self.tx.send(Command::Sync(done)).is_ok() {
            let _ = synced.await;
        }
        self.control.closing.store(true, Ordering::Release);
        self.control.written.notify_one();
        let deadline = Duration::from_millis(self.settings.shutdown_flush_ms);
        let mut shipper = self.shipper;
        if tokio::time::timeout(deadline, &mut shipper).await.is_err() {
            self.control.stop.notify_one();
            let _ = shipper.await;
            tracing::warn!("shutdown: Kafka did not take every event in time; the spool keeps them for the next start");
        }
    }
}
