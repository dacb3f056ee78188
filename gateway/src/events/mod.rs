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

pub mod metrics;
pub mod spool;
pub mod transactions;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, Notify};
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_runtime::settings::{in_range, Invalid};
use tollgate_schemas::{encode, UsageEvent};

use self::metrics::EventMetrics;
use self::spool::{SpoolReader, SpoolWriter, Watermark};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// Emit usage events (off only for benchmarks and gateways that bill nothing).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Directory of the spool (relative paths from the working directory); one per replica.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: String,
    /// Size at which the spool starts a new segment file.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// Most bytes the spool may hold unshipped; beyond it `when_full` applies.
    #[serde(default = "default_max_spool_bytes")]
    pub max_spool_bytes: u64,
    /// `always` (fsync every write batch), `interval` (every `fsync_interval_ms`), `never`.
    #[serde(default)]
    pub fsync: FsyncPolicy,
    #[serde(default = "default_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
    /// With the spool full: `refuse_billable` (503, nothing served unbilled) or
    /// `serve_unbilled` (serve, count the lost events as dropped).
    #[serde(default)]
    pub when_full: FullPolicy,
    /// Requests whose status is below this, answered by the upstream, are billable; gateway
    /// refusals never are.
    #[serde(default = "default_billable_below_status")]
    pub billable_below_status: u16,
    /// How long SIGTERM waits for Kafka to take the spool before leaving the rest for the next
    /// start.
    #[serde(default = "default_shutdown_flush_ms")]
    pub shutdown_flush_ms: u64,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            spool_dir: default_spool_dir(),
            segment_bytes: default_segment_bytes(),
            max_spool_bytes: default_max_spool_bytes(),
            fsync: FsyncPolicy::default(),
            fsync_interval_ms: default_fsync_interval_ms(),
            when_full: FullPolicy::default(),
            billable_below_status: default_billable_below_status(),
            shutdown_flush_ms: default_shutdown_flush_ms(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_spool_dir() -> String {
    "spool".to_owned()
}
fn default_segment_bytes() -> u64 {
    64 << 20
}
fn default_max_spool_bytes() -> u64 {
    1 << 30
}
fn default_fsync_interval_ms() -> u64 {
    200
}
fn default_billable_below_status() -> u16 {
    500
}
fn default_shutdown_flush_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    Always,
    #[default]
    Interval,
    Never,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    #[default]
    RefuseBillable,
    ServeUnbilled,
}

impl EventSettings {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.spool_dir.trim().is_empty() {
            return Err(Invalid::new("events.spool_dir", &self.spool_dir, "a directory path"));
        }
        in_range("events.segment_bytes", self.segment_bytes, 4096, 1 << 30)?;
        in_range(
            "events.max_spool_bytes",
            self.max_spool_bytes,
            self.segment_bytes,
            1 << 40,
        )?;
        in_range("events.fsync_interval_ms", self.fsync_interval_ms, 1, 60_000)?;
        in_range(
            "events.billable_below_status",
            u64::from(self.billable_below_status),
            100,
            600,
        )?;
        in_range("events.shutdown_flush_ms", self.shutdown_flush_ms, 0, 600_000)?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("spool {dir}: {source}")]
    Spool { dir: String, source: std::io::Error },
    #[error("usage topic {topic}: {reason}")]
    Kafka { topic: String, reason: String },
}

enum Command {
    Event(Box<UsageEvent>),
    /// Flush and fsync, then answer.
    Sync(oneshot::Sender<()>),
}

/// The request chain's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct UsageSink {
    tx: Option<mpsc::UnboundedSender<Command>>,
    watermark: Arc<Watermark>,
    settings: Arc<EventSettings>,
    metrics: Arc<EventMetrics>,
}

impl UsageSink {
    /// A sink that records nothing (events disabled).
    pub fn disabled(settings: EventSettings, metrics: Arc<EventMetrics>) -> Self {
        Self {
            tx: None,
            watermark: Arc::default(),
            settings: Arc::new(settings),
            metrics,
        }
    }

    pub fn record(&self, event: UsageEvent) {
        self.metrics.request(event.outcome);
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

/// How the pipeline tells the shipper to finish: `closing` ships what is spooled and ends;
/// `stop` ends at once (what is left stays in the spool).
#[derive(Default)]
struct ShipperControl {
    written: Notify,
    closing: std::sync::atomic::AtomicBool,
    stop: Notify,
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
    let positions = transactions::positions_consumer(&kafka.client_config(), service_id).map_err(kafka_error)?;
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
            positions,
            topic: topic.to_owned(),
            epoch,
        },
        Arc::clone(&metrics),
        Arc::clone(&control),
        recovery.pending_records,
    ));
    let sink = UsageSink {
        tx: Some(tx.clone()),
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

/// Key and body of one spooled record: `key len (u16 LE) | key | Avro single-object event`.
fn spool_record(event: &UsageEvent) -> Vec<u8> {
    let key = event.tenant_id.as_deref().unwrap_or("-").as_bytes();
    let key = &key[..key.len().min(u16::MAX as usize)];
    let body = encode(event);
    let mut record = Vec::with_capacity(2 + key.len() + body.len());
    record.extend_from_slice(&(key.len() as u16).to_le_bytes());
    record.extend_from_slice(key);
    record.extend_from_slice(&body);
    record
}

fn split_record(record: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u16::from_le_bytes(record.get(..2)?.try_into().ok()?) as usize;
    let key = record.get(2..2 + len)?;
    Some((key, &record[2 + len..]))
}

fn write_loop(
    mut writer: SpoolWriter,
    mut rx: mpsc::UnboundedReceiver<Command>,
    settings: &EventSettings,
    metrics: &EventMetrics,
    written: &Notify,
) {
    let mut last_sync = Instant::now();
    let interval = Duration::from_millis(settings.fsync_interval_ms);
    while let Some(first) = rx.blocking_recv() {
        let mut syncs = Vec::new();
        let mut command = Some(first);
        let mut appended = 0u64;
        // Drain what is queued, so one flush (and fsync) serves many events.
        while let Some(next) = command.take() {
            match next {
                Command::Event(event) => {
                    metrics.queue_depth.decrement(1.0);
                    if writer.watermark().pending_bytes.load(Ordering::Acquire) >= settings.max_spool_bytes {
                        metrics.dropped("spool_full");
                    } else if let Err(err) = writer.append(&spool_record(&event)) {
                        metrics.dropped("spool_error");
                        metrics.log_drop(&err);
                    } else {
                        appended += 1;
                    }
                }
                Command::Sync(done) => syncs.push(done),
            }
            if appended < 4096 {
                command = rx.try_recv().ok();
            }
        }
        let sync = !syncs.is_empty()
            || settings.fsync == FsyncPolicy::Always
            || (settings.fsync == FsyncPolicy::Interval && last_sync.elapsed() >= interval);
        match writer.flush(sync) {
            Ok(()) => metrics.spooled.increment(appended),
            Err(err) => metrics.log_drop(&err),
        }
        if sync {
            last_sync = Instant::now();
        }
        written.notify_one();
        for done in syncs {
            let _ = done.send(());
        }
    }
    let _ = writer.flush(true);
    written.notify_one();
}

/// What the shipper ships with: the transactional producer, the consumer its spool position
/// is committed through, the usage topic and this spool's epoch.
struct Shipping {
    producer: FutureProducer,
    positions: rdkafka::consumer::BaseConsumer,
    topic: String,
    epoch: String,
}

/// Starts shipping: catches the spool up with the position Kafka committed (a crash after a
/// commit but before the position file), registers the transactional id (aborting what a
/// crashed instance left open), then ships batch after batch. Retries until Kafka answers;
/// stops on shutdown, or for good if another producer took over this gateway's id.
async fn ship_loop(
    mut reader: SpoolReader,
    shipping: Shipping,
    metrics: Arc<EventMetrics>,
    control: Arc<ShipperControl>,
    mut from_earlier_run: u64,
) {
    let Shipping {
        producer,
        positions,
        topic,
        epoch,
    } = shipping;
    let positions = Arc::new(positions);
    let retry = Duration::from_millis(500);
    loop {
        match transactions::committed_position(Arc::clone(&positions), &topic, &epoch).await {
            Ok(committed) => {
                if let Some(target) = committed.filter(|c| *c > reader.position()) {
                    match reader.skip_to(target) {
                        Ok(passed) => {
                            tracing::info!(
                                events = passed,
                                "spool: events Kafka already had from the last run skipped"
                            );
                            let passed = passed.min(from_earlier_run);
                            from_earlier_run -= passed;
                            metrics.replay_pending.decrement(passed as f64);
                        }
                        Err(err) => tracing::error!(error = %err, "spool: cannot move to the position Kafka committed"),
                    }
                }
                break;
            }
            Err(err) => {
                tracing::warn!(error = %err, "usage topic: cannot read the committed spool position yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = control.stop.notified() => return,
                }
            }
        }
    }
    let shipper = loop {
        match transactions::TransactionalShipper::init(producer.clone(), &positions, &topic, &epoch).await {
            Ok(shipper) => break shipper,
            Err(transactions::ShipError::Fatal(reason)) => {
                tracing::error!(%reason, "usage topic: shipping stopped; events stay in the spool");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "usage topic: transactions not ready yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = control.stop.notified() => return,
                }
            }
        }
    };
    loop {
        let batch = match reader.read_batch(2000) {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(error = %err, "spool read failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.skipped > 0 {
            metrics.corrupt.increment(batch.skipped);
            tracing::warn!(records = batch.skipped, "spool: damaged records skipped");
        }
        if batch.records.is_empty() {
            if control.closing.load(Ordering::Acquire) {
                return;
            }
            tokio::select! {
                _ = control.written.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = control.stop.notified() => return,
            }
            continue;
        }
        let bytes: u64 = batch.records.iter().map(|r| spool::record_bytes(r.len())).sum();
        let records: Vec<(&[u8], &[u8])> = batch.records.iter().filter_map(|r| split_record(r)).collect();
        let started = Instant::now();
        let shipped = tokio::select! {
            result = shipper.ship(&records, batch.next) => result,
            _ = control.stop.notified() => return,
        };
        match shipped {
            Ok(()) => {
                let count = batch.records.len() as u64;
                metrics.produced.increment(count);
                let replayed = count.min(from_earlier_run);
                from_earlier_run -= replayed;
                metrics.replayed.increment(replayed);
                metrics.replay_pending.decrement(replayed as f64);
                metrics.delivery_seconds.record(started.elapsed().as_secs_f64());
                // Kafka holds the position too: a failure here only means the next start
                // reads it from there.
                if let Err(err) = reader.commit(batch.next, bytes) {
                    tracing::error!(error = %err, "spool: cannot save the shipped position");
                }
            }
            Err(transactions::ShipError::Fatal(reason)) => {
                tracing::error!(%reason, "usage topic: shipping stopped; events stay in the spool");
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "usage topic: batch not shipped; retrying it");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = control.stop.notified() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_record_round_trips_key_and_body() {
        let event = UsageEvent {
            event_id: uuid::Uuid::now_v7(),
            timestamp_ms: 1,
            tenant_id: Some("tenant_1".into()),
            consumer: None,
            key_id: None,
            plan: None,
            route: "v1".into(),
            method: "GET".into(),
            status: 200,
            outcome: tollgate_schemas::Outcome::Allowed,
            billable: true,
            units: Default::default(),
            request_bytes: 0,
            response_bytes: 0,
            latency_ms: 0,
            upstream_latency_ms: None,
            gateway_id: "g".into(),
            request_id: None,
        };
        let record = spool_record(&event);
        let (key, body) = split_record(&record).unwrap();
        assert_eq!(key, b"tenant_1");
        assert_eq!(tollgate_schemas::decode::<UsageEvent>(body).unwrap(), event);
        assert!(split_record(&[5, 0, b'a']).is_none());
    }
}
