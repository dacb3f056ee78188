//! The Kafka side of the usage pipeline: one consumer-group member on its own thread.
//!
//! In: the usage topic, through a `BaseConsumer` polled on a dedicated thread; commands from
//! the partition workers (commit hints). Out: each partition's records to its
//! `PartitionWorker`; pauses and resumes; lag gauges.
//!
//! # Assignment
//! The rebalance callback is ours, not rdkafka's default: on an assignment it reads each
//! partition's watermarks from ClickHouse (waiting, with backoff, while ClickHouse is down)
//! and assigns the partition at the offset after the lowest of them, so the first record
//! the worker sees is the first one some table still lacks. Committed Kafka offsets are never
//! used to resume; they are hints for lag tools. On a revocation the callback stops the
//! partitions' workers and waits until their in-flight insert has finished, so two members
//! never write the same partition at once (except if an insert outlives its timeout, which
//! the sink bounds and kills).
//!
//! # Membership and recovery
//! The member joins with static group membership (`group.instance.id`, KIP-345): a process
//! restarted after a crash rejoins under the same id, and the coordinator hands it the dead
//! member's partitions at once instead of waiting out the old session (the 45 s librdkafka
//! default, during which nothing was metered). A cooperative assignor would not help there:
//! it only spares the members that stay from giving up their partitions, and the killed
//! member's partitions would still wait for its session to expire. A shorter
//! `session.timeout.ms` (10 s) bounds the wait when a member dies and is not restarted.
//! Two running processes with one id fence each other: the fenced one gets a fatal error,
//! stops its workers and exits, so it never writes beside the new owner.
//! `/readyz` answers 503 "not consuming" while this member holds no partition.
//!
//! # Backpressure
//! A worker that cannot keep up (ClickHouse slow or down) leaves its record channel full;
//! the thread then keeps the record in a small per-partition overflow queue and pauses the
//! partition, so nothing more is fetched for it; it resumes the partition when the overflow
//! has drained. Nothing is dropped, nothing spins.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use metrics::Gauge;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message};
use tokio::sync::mpsc::error::TrySendError;
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_runtime::ops::Ops;
use tollgate_runtime::shutdown::Shutdown;

use crate::dlq::OncePerSecond;
use crate::partition::{Command, PartitionWorker, Record, WorkerContext, RECORD_CHANNEL};
use crate::sink::Watermarks;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("usage consumer: {0}")]
    Kafka(#[from] KafkaError),
    #[error("usage consumer: the worker for partition {0} stopped on its own")]
    WorkerDied(i32),
    #[error("usage consumer: fatal kafka error ({code:?}): {reason}; is another instance running with group.instance.id `{instance}`?")]
    Fatal {
        code: rdkafka::types::RDKafkaErrorCode,
        reason: String,
        instance: String,
    },
}

struct Slot {
    worker: PartitionWorker,
    overflow: VecDeque<Record>,
    paused: bool,
    lag: Gauge,
}

pub struct MeterContext {
    topic: String,
    runtime: tokio::runtime::Handle,
    workers_ctx: WorkerContext,
    workers: Mutex<HashMap<i32, Slot>>,
    shutdown: Shutdown,
    join_deadline: Duration,
    poll_errors: OncePerSecond,
    ops: Ops,
    instance: String,
}

impl ClientContext for MeterContext {
    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let workers = self.workers.lock().expect("workers lock");
        for (partition, slot) in workers.iter() {
            if let Some(stats) = topic.partitions.get(partition).filter(|s| s.hi_offset >= 0) {
                let next = slot.worker.next_offset.load(std::sync::atomic::Ordering::Acquire);
                slot.lag.set((stats.hi_offset - next).max(0) as f64);
            }
        }
    }
}

impl ConsumerContext for MeterContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let partitions: Vec<i32> = tpl
            .elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut starts = Vec::new();
                for &partition in &partitions {
                    let Some(watermarks) = self.watermarks_blocking(partition) else {
                        continue;
                    };
                    let offset = match watermarks.resume_offset() {
                        Some(next) => Offset::Offset(next),
                        None => Offset::Beginning,
                    };
                    if let Err(err) = tpl.set_partition_offset(&self.topic, partition, offset) {
                        tracing::error!(partition, error = %err, "cannot set the start offset");
                        continue;
                    }
                    starts.push((partition, watermarks, offset));
                }
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(err) = assigned {
                    tracing::error!(error = %err, "assign failed");
                    return;
                }
                let mut workers = self.workers.lock().expect("workers lock");
                for (partition, watermarks, offset) in starts {
                    tracing::info!(
                        partition,
                        ?offset,
                        ?watermarks,
                        "partition assigned; resuming after the stored watermark"
                    );
                    let worker = PartitionWorker::spawn(&self.runtime, self.workers_ctx.clone(), partition, watermarks);
                    let lag = self.workers_ctx.metrics.lag(partition);
                    workers.insert(
                        partition,
                        Slot {
                            worker,
                            overflow: VecDeque::new(),
                            paused: false,
                            lag,
                        },
                    );
                }
                self.report_assignment(&workers);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(?partitions, lost = consumer.assignment_lost(), "partitions revoked");
                self.stop_workers(Some(&partitions));
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(err) = unassigned {
                    tracing::warn!(error = %err, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                self.stop_workers(None);
                let _ = consumer.unassign();
            }
        }
    }
}

impl MeterContext {
    /// Watermarks of `partition`, retried with backoff until ClickHouse answers; `None` only
    /// when shutting down.
    fn watermarks_blocking(&self, partition: i32) -> Option<Watermarks> {
        let sink = &self.workers_ctx.sink;
        let mut backoff = sink.retry_backoff();
        loop {
            match self.runtime.block_on(sink.watermarks(partition)) {
                Ok(watermarks) => return Some(watermarks),
                Err(err) => {
                    tracing::warn!(partition, error = %err, "cannot read watermarks; retrying");
                    if self.shutdown.is_triggered() {
                        return None;
                    }
                    std::thread::sleep(backoff.next_delay());
                }
            }
        }
    }

    /// Readiness follows the assignment: a member holding no partition meters nothing, and
    /// says so rather than look healthy while the group waits for a session to expire.
    fn report_assignment(&self, workers: &HashMap<i32, Slot>) {
        self.workers_ctx.metrics.assigned_partitions(workers.len());
        if workers.is_empty() {
            self.ops
                .set_not_ready(format!("not consuming: no partition of {} assigned", self.topic));
        } else {
            self.ops.set_ready();
        }
    }

    /// Stops the workers of `partitions` (all when `None`) and waits for them.
    fn stop_workers(&self, partitions: Option<&[i32]>) {
        let stopped: Vec<Slot> = {
            let mut workers = self.workers.lock().expect("workers lock");
            let keys: Vec<i32> = match partitions {
                Some(list) => list.to_vec(),
                None => workers.keys().copied().collect(),
            };
            let stopped = keys.iter().filter_map(|p| workers.remove(p)).collect();
            self.report_assignment(&workers);
            stopped
        };
        for slot in &stopped {
            slot.worker.stop();
        }
        for slot in stopped {
            slot.worker.join_blocking(&self.runtime, self.join_deadline);
        }
    }

    /// Hands a record to its partition's worker, or to the overflow queue (pausing the
    /// partition) when the worker is behind.
    fn route(&self, consumer: &BaseConsumer<Self>, message: &BorrowedMessage<'_>) {
        let partition = message.partition();
        let record = Record {
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
        };
        let mut workers = self.workers.lock().expect("workers lock");
        // Not ours (any more): whoever owns it resumes from ClickHouse.
        let Some(slot) = workers.get_mut(&partition) else {
            return;
        };
        if slot.overflow.is_empty() {
            match slot.worker.records.try_send(record) {
                Ok(()) => return,
                Err(TrySendError::Full(record)) => slot.overflow.push_back(record),
                Err(TrySendError::Closed(_)) => return,
            }
        } else {
            slot.overflow.push_back(record);
        }
        if !slot.paused {
            slot.paused = true;
            if let Err(err) = consumer.pause(&single(&self.topic, partition)) {
                tracing::warn!(partition, error = %err, "pause failed");
            }
        }
    }

    /// Moves overflow records into their workers; resumes partitions whose overflow is empty
    /// and whose worker has room again. Returns whether any partition is still paused, and
    /// the first worker found dead.
    fn drain(&self, consumer: &BaseConsumer<Self>) -> (bool, Option<i32>) {
        let mut workers = self.workers.lock().expect("workers lock");
        let mut remaining = false;
        let mut dead = None;
        for (&partition, slot) in workers.iter_mut() {
            if slot.worker.is_finished() {
                dead = Some(partition);
            }
            while let Some(record) = slot.overflow.pop_front() {
                match slot.worker.records.try_send(record) {
                    Ok(()) => {}
                    Err(TrySendError::Full(record)) => {
                        slot.overflow.push_front(record);
                        break;
                    }
                    Err(TrySendError::Closed(_)) => slot.overflow.clear(),
                }
            }
            // Resume only once the worker has room for a good part of a channel: resuming
            // at the first free slot would pause again at once, and each pause drops what
            // librdkafka had prefetched for the partition.
            let room = slot.worker.records.capacity() >= RECORD_CHANNEL / 2;
            if slot.overflow.is_empty() && slot.paused && room {
                slot.paused = false;
                if let Err(err) = consumer.resume(&single(&self.topic, partition)) {
                    tracing::warn!(partition, error = %err, "resume failed");
                }
            }
            remaining |= slot.paused;
        }
        (remaining, dead)
    }
}

fn single(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

/// The static membership id: the configured one, else `<hostname>-<ops port>` (the bound
/// ops listener makes the port unique on the host; the hostname, across hosts).
pub fn instance_id(configured: Option<&str>, ops_port: u16) -> String {
    if let Some(id) = configured {
        return id.to_owned();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(200)
        .collect();
    let host = if host.is_empty() {
        "meter-consumer".to_owned()
    } else {
        host
    };
    format!("{host}-{ops_port}")
}

/// Where a group member is, and how it reports itself.
pub struct Membership<'a> {
    pub group: &'a str,
    /// `group.instance.id`, from [`instance_id`].
    pub instance: &'a str,
    pub ops: Ops,
}

/// Creates the group member for `topic`.
pub fn consumer(
    kafka: &KafkaSettings,
    membership: Membership<'_>,
    topic: &str,
    workers_ctx: WorkerContext,
    runtime: tokio::runtime::Handle,
    shutdown: Shutdown,
    join_deadline: Duration,
) -> Result<BaseConsumer<MeterContext>, KafkaError> {
    let Membership { group, instance, ops } = membership;
    ops.set_not_ready(format!("not consuming: no partition of {topic} assigned yet"));
    let context = MeterContext {
        topic: topic.to_owned(),
        runtime,
        workers_ctx,
        workers: Mutex::new(HashMap::new()),
        shutdown,
        join_deadline,
        poll_errors: OncePerSecond::default(),
        ops,
        instance: instance.to_owned(),
    };
    let mut config = kafka.client_config();
    // Defaults first; `[kafka.client]` may override them (e.g. session.timeout.ms).
    for (key, value) in [
        ("group.id", group),
        ("group.instance.id", instance),
        // How long a member that died and was not restarted holds its partitions.
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "2000"),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("statistics.interval.ms", "5000"),
        // The broker answers a fetch once 64 KiB are there or 200 ms have passed, not as soon as
        // one record is: at a steady 10,000 events/s that is a few dozen fetches a second
        // instead of one per producer batch, the larger part of the broker's CPU per event
        // (throughput benchmark, steady phase). A batch waits up to `batch.max_wait_ms` anyway.
        ("fetch.min.bytes", "65536"),
        ("fetch.wait.max.ms", "200"),
    ] {
        if !kafka.client.contains_key(key) || key == "group.id" {
            config.set(key, value);
        }
    }
    config.create_with_context(context)
}

/// Polls until shutdown, handing records to the workers and committing their hints; then
/// stops every worker. Runs on its own thread (it blocks).
pub fn run_blocking(
    consumer: BaseConsumer<MeterContext>,
    topic: &str,
    commands: std::sync::mpsc::Receiver<Command>,
) -> Result<(), SourceError> {
    consumer.subscribe(&[topic])?;
    let ctx = consumer.context().clone();
    let result = loop {
        if ctx.shutdown.is_triggered() {
            break Ok(());
        }
        commit_hints(&consumer, topic, &commands);
        let (backlog, dead) = ctx.drain(&consumer);
        if let Some(partition) = dead {
            break Err(SourceError::WorkerDied(partition));
        }
        let timeout = if backlog {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(100)
        };
        match consumer.poll(timeout) {
            Some(Ok(message)) => ctx.route(&consumer, &message),
            // Fenced (another process joined under our instance id) or otherwise dead: the
            // workers must stop before the new owner reads the watermarks.
            Some(Err(_)) if consumer.client().fatal_error().is_some() => {
                let (code, reason) = consumer.client().fatal_error().expect("checked above");
                break Err(SourceError::Fatal {
                    code,
                    reason,
                    instance: ctx.instance.clone(),
                });
            }
            Some(Err(err)) if ctx.poll_errors.allow() => {
                tracing::warn!(error = %err, "usage consumer poll error");
            }
            Some(Err(_)) | None => {}
        }
    };
    ctx.stop_workers(None);
    if result.is_ok() {
        commit_hints(&consumer, topic, &commands);
        consumer.unsubscribe();
    }
    result
}

fn commit_hints(consumer: &BaseConsumer<MeterContext>, topic: &str, commands: &std::sync::mpsc::Receiver<Command>) {
    let mut latest: HashMap<i32, i64> = HashMap::new();
    while let Ok(Command::Commit { partition, next_offset }) = commands.try_recv() {
        let entry = latest.entry(partition).or_insert(next_offset);
        *entry = (*entry).max(next_offset);
    }
    if latest.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, next) in latest {
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(next));
    }
    // A hint only: a failed commit (e.g. after a rebalance) costs nothing but lag accuracy.
    if let Err(err) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::debug!(error = %err, "offset commit hint failed");
    }
}
