//! One Kafka partition's worker: records in, batches written exactly once, offsets committed
//! as a hint.
//!
//! In: the partition's records, in offset order, from the Kafka thread (`crate::source`),
//! starting at the lowest watermark of its tables. Out: batches into ClickHouse through
//! `ClickhouseSink`, poison records to the DLQ, a commit hint back to the Kafka thread after
//! each batch is stored.
//!
//! Two tasks, so decoding the next batch overlaps writing the previous one: the builder
//! decodes and batches, the writer writes batches one at a time, in order. A hand-off channel
//! of one batch between them gives backpressure: when ClickHouse is slow or down the writer
//! stops taking batches, the builder stops reading, the record channel fills and the Kafka
//! thread pauses the partition (no fetching, no spinning).

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tollgate_schemas::UsageEvent;
use tracing::Instrument;

use crate::batch::{Batch, BatchBuilder};
use crate::dlq::{decode_kind, DeadLetter, DeadLetters};
use crate::metrics::Metrics;
use crate::rows::{Origin, UsageRow};
use crate::sink::{ClickhouseSink, Table, TableRows, Watermarks, WriteError};

/// A Kafka message, owned, as the Kafka thread hands it over.
#[derive(Debug, Clone)]
pub struct Record {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// What a worker asks of the Kafka thread.
#[derive(Debug)]
pub enum Command {
    /// Commit `next_offset` for the partition: a hint for tools; resuming uses ClickHouse.
    Commit { partition: i32, next_offset: i64 },
}

/// What every worker shares.
#[derive(Clone)]
pub struct WorkerContext {
    pub sink: ClickhouseSink,
    pub dead_letters: DeadLetters,
    pub metrics: Metrics,
    pub commands: std::sync::mpsc::Sender<Command>,
    pub max_rows: usize,
    pub max_wait: Duration,
}

/// The Kafka thread's handle on a running worker.
pub struct PartitionWorker {
    pub records: mpsc::Sender<Record>,
    /// The next offset not yet stored in every table (for the lag gauge).
    pub next_offset: Arc<AtomicI64>,
    stop: watch::Sender<bool>,
    tasks: [JoinHandle<()>; 2],
}

/// Records buffered between the Kafka thread and a worker.
pub const RECORD_CHANNEL: usize = 16_384;

impl PartitionWorker {
    /// Starts the worker for `partition`, whose tables hold `watermarks`.
    pub fn spawn(runtime: &tokio::runtime::Handle, ctx: WorkerContext, partition: i32, watermarks: Watermarks) -> Self {
        let (records_tx, records_rx) = mpsc::channel(RECORD_CHANNEL);
        let (batches_tx, batches_rx) = mpsc::channel(1);
        let (stop_tx, stop_rx) = watch::channel(false);
        let resume = watermarks.resume_offset().unwrap_or(0);
        let next_offset = Arc::new(AtomicI64::new(resume));
        let span = tracing::info_span!("partition", topic = ctx.sink.topic(), partition);
        let builder = Builder {
            ctx: ctx.clone(),
            partition,
            raw_watermark: watermarks[Table::Raw].unwrap_or(-1),
            stop: stop_rx.clone(),
        };
        let writer = Writer {
            ctx,
            partition,
            watermarks,
            next_offset: next_offset.clone(),
            stop: stop_rx,
        };
        let tasks = [
            runtime.spawn(builder.run(records_rx, batches_tx).instrument(span.clone())),
            runtime.spawn(writer.run(batches_rx).instrument(span)),
        ];
        Self {
            records: records_tx,
            next_offset,
            stop: stop_tx,
            tasks,
        }
    }

    /// Tells the worker to stop: it finishes the insert it is in (never starts another) and
    /// drops what it has not written; the partition's next owner resumes from ClickHouse.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    pub fn is_finished(&self) -> bool {
        self.tasks.iter().all(JoinHandle::is_finished)
    }

    /// Waits (blocking the calling thread, not a runtime one) until both tasks have ended.
    pub fn join_blocking(self, runtime: &tokio::runtime::Handle, deadline: Duration) {
        let tasks = self.tasks;
        let joined = runtime.block_on(async move {
            tokio::time::timeout(deadline, async move {
                for task in tasks {
                    let _ = task.await;
                }
            })
            .await
        });
        if joined.is_err() {
            tracing::warn!("partition worker did not stop within {deadline:?}");
        }
    }
}

struct Builder {
    ctx: WorkerContext,
    partition: i32,
    /// Records at or below this offset were already handled by the raw table (stored or
    /// dead-lettered): decoded again only for rollups behind it, never dead-lettered twice.
    raw_watermark: i64,
    stop: watch::Receiver<bool>,
}

/// A sealed batch with the original bytes of its rows (kept to dead-letter a row ClickHouse
/// refuses).
struct SealedBatch {
    batch: Batch,
    sources: Vec<Record>,
}

impl Builder {
    async fn run(self, mut records: mpsc::Receiver<Record>, batches: mpsc::Sender<SealedBatch>) {
        let mut builder = BatchBuilder::new(self.ctx.max_rows, self.ctx.max_wait);
        let mut sources: Vec<Record> = Vec::new();
        let mut next_expected = i64::MIN;
        let mut stop = self.stop.clone();
        loop {
            let deadline = builder.deadline();
            let record = tokio::select! {
                biased;
                _ = stop.changed() => return,
                _ = sleep_until(deadline), if deadline.is_some() => None,
                record = records.recv() => match record {
                    Some(record) => Some(record),
                    None => return,
                },
            };
            let Some(mut record) = record else {
                if let Some(batch) = builder.take() {
                    let sealed = SealedBatch {
                        batch,
                        sources: std::mem::take(&mut sources),
                    };
                    if batches.send(sealed).await.is_err() {
                        return;
                    }
                }
                continue;
            };
            // A re-delivered record (a fetch from before a seek) is already in the batch.
            if record.offset < next_expected {
                continue;
            }
            next_expected = record.offset + 1;
            let row = match self.decode(&record) {
                Ok(row) => row,
                Err(letter) => {
                    if record.offset > self.raw_watermark
                        && self.ctx.dead_letters.send(letter, &self.stop).await.is_err()
                    {
                        return;
                    }
                    continue;
                }
            };
            let sealed = builder.push(row);
            // The payload is kept only until the batch is written, in case ClickHouse refuses
            // a row and it must be dead-lettered with its original bytes.
            let source = Record {
                offset: record.offset,
                key: record.key.take(),
                payload: record.payload.take(),
            };
            if let Some(batch) = sealed {
                let sealed = SealedBatch {
                    batch,
                    sources: std::mem::take(&mut sources),
                };
                if batches.send(sealed).await.is_err() {
                    return;
                }
            }
            sources.push(source);
            if builder.is_full() {
                let batch = builder.take().expect("a full batch is open");
                let sealed = SealedBatch {
                    batch,
                    sources: std::mem::take(&mut sources),
                };
                if batches.send(sealed).await.is_err() {
                    return;
                }
            }
        }
    }

    fn decode<'a>(&self, record: &'a Record) -> Result<UsageRow, DeadLetter<'a>> {
        let letter = |kind: &'static str, reason: String| DeadLetter {
            partition: self.partition,
            offset: record.offset,
            key: record.key.as_deref(),
            payload: record.payload.as_deref(),
            kind,
            reason,
        };
        let Some(payload) = record.payload.as_deref() else {
            return Err(letter("empty", "record has no payload".to_owned()));
        };
        let event =
            tollgate_schemas::decode::<UsageEvent>(payload).map_err(|e| letter(decode_kind(&e), e.to_string()))?;
        let origin = Origin {
            partition: self.partition,
            offset: record.offset,
        };
        UsageRow::from_event(event, self.ctx.sink.topic(), origin)
            .map_err(|e| letter("time_out_of_range", e.to_string()))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}

struct Writer {
    ctx: WorkerContext,
    partition: i32,
    watermarks: Watermarks,
    next_offset: Arc<AtomicI64>,
    stop: watch::Receiver<bool>,
}

impl Writer {
    async fn run(mut self, mut batches: mpsc::Receiver<SealedBatch>) {
        while let Some(sealed) = batches.recv().await {
            if *self.stop.borrow() {
                return;
            }
            match self.write(sealed).await {
                Ok(()) => {}
                Err(WriteError::Stopped) => return,
                Err(WriteError::Rejected(reason)) => {
                    // Only rollups get here (raw rows are split and dead-lettered): rows that
                    // the raw table took but a rollup refused. Stop rather than skip them;
                    // the partition is retried from its watermarks after the next rebalance
                    // or restart.
                    tracing::error!(partition = self.partition, error = %reason, "rollup insert refused; partition stopped");
                    return;
                }
            }
        }
    }

    async fn write(&mut self, sealed: SealedBatch) -> Result<(), WriteError> {
        let SealedBatch { batch, sources } = sealed;
        let last_offset = batch.last_offset();
        let raw_mark = self.watermarks[Table::Raw].unwrap_or(-1);
        let raw_start = batch.rows.partition_point(|r| r.offset() <= raw_mark);
        let refused = self.write_raw(&batch.rows[raw_start..], &sources[raw_start..]).await?;
        self.watermarks[Table::Raw] = Some(raw_mark.max(last_offset));

        let rows: Cow<'_, [UsageRow]> = if refused.is_empty() {
            Cow::Borrowed(&batch.rows)
        } else {
            Cow::Owned(
                batch
                    .rows
                    .iter()
                    .filter(|r| !refused.contains(&r.offset()))
                    .cloned()
                    .collect(),
            )
        };
        let rollups = TableRows::for_batch(self.ctx.sink.topic(), &rows, &self.watermarks);
        let sink = &self.ctx.sink;
        let p = self.partition;
        let stamp = |offsets: Option<u64>| offsets.map_or(-1, |o| o as i64);
        let (minute, hour, day, route) = tokio::join!(
            sink.write(
                Table::MeterMinute,
                p,
                &rollups.minute,
                stamp(rollups.minute.first().map(|r| r.kafka_offset)),
                &self.stop
            ),
            sink.write(
                Table::MeterHour,
                p,
                &rollups.hour,
                stamp(rollups.hour.first().map(|r| r.kafka_offset)),
                &self.stop
            ),
            sink.write(
                Table::MeterDay,
                p,
                &rollups.day,
                stamp(rollups.day.first().map(|r| r.kafka_offset)),
                &self.stop
            ),
            sink.write(
                Table::RouteDay,
                p,
                &rollups.route,
                stamp(rollups.route.first().map(|r| r.kafka_offset)),
                &self.stop
            ),
        );
        minute?;
        hour?;
        day?;
        route?;
        let touched_last = stamp(rollups.touched.first().map(|r| r.kafka_offset));
        sink.write(Table::MinutesTouched, p, &rollups.touched, touched_last, &self.stop)
            .await?;
        let minute_mark = self.watermarks[Table::MeterMinute].unwrap_or(-1);
        for mark in self.watermarks.values_mut() {
            *mark = Some(mark.unwrap_or(-1).max(last_offset));
        }

        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        for row in rows.iter().filter(|r| r.offset() > minute_mark) {
            self.ctx
                .metrics
                .freshness(Duration::from_millis((now_ms - row.time_millis()).max(0) as u64));
        }
        self.ctx.metrics.batch();
        self.next_offset.store(last_offset + 1, Ordering::Release);
        let _ = self.ctx.commands.send(Command::Commit {
            partition: self.partition,
            next_offset: last_offset + 1,
        });
        Ok(())
    }

    /// Writes `rows` to the raw table in one insert; if ClickHouse refuses the data, splits
    /// the range in halves (each still contiguous, written in order) until the refused rows
    /// are alone, and dead-letters those. Returns the offsets dead-lettered.
    async fn write_raw(&self, rows: &[UsageRow], sources: &[Record]) -> Result<HashSet<i64>, WriteError> {
        let mut refused = HashSet::new();
        let mut pending = VecDeque::new();
        pending.push_back(0..rows.len());
        while let Some(range) = pending.pop_front() {
            if range.is_empty() {
                continue;
            }
            let slice = &rows[range.clone()];
            let last = slice.last().map_or(-1, UsageRow::offset);
            match self
                .ctx
                .sink
                .write(Table::Raw, self.partition, slice, last, &self.stop)
                .await
            {
                Ok(()) => {}
                Err(WriteError::Rejected(reason)) if range.len() == 1 => {
                    let source = &sources[range.start];
                    let letter = DeadLetter {
                        partition: self.partition,
                        offset: source.offset,
                        key: source.key.as_deref(),
                        payload: source.payload.as_deref(),
                        kind: "clickhouse_rejected",
                        reason,
                    };
                    self.ctx.dead_letters.send(letter, &self.stop).await?;
                    refused.insert(source.offset);
                }
                Err(WriteError::Rejected(_)) => {
                    let mid = range.start + range.len() / 2;
                    pending.push_front(mid..range.end);
                    pending.push_front(range.start..mid);
                }
                Err(stopped) => return Err(stopped),
            }
        }
        Ok(refused)
    }
}
