//! One Kafka partition's builder: records in, sealed batches out to the consumer's one
//! writer (`crate::flush`).
//!
//! In: the partition's records, in offset order, from the Kafka thread (`crate::source`),
//! starting at the lowest watermark of its tables. Out: sealed batches to the flusher, poison
//! records to the DLQ.
//!
//! Decoding the next batch overlaps writing the previous ones. The flusher's bounded queue
//! gives backpressure: when ClickHouse is slow or down the flusher stops taking batches, the
//! builder stops reading, the record channel fills and the Kafka thread pauses the partition
//! (no fetching, no spinning).

use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::batch::{Batch, BatchBuilder};
use crate::dlq::{decode_kind, DeadLetter, DeadLetters};
use crate::flush::{Member, Sealed};
use crate::rows::{Origin, UsageRow};
use crate::sink::{Table, Watermarks};

/// A Kafka message, owned, as the Kafka thread hands it over.
#[derive(Debug, Clone)]
pub struct Record {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// What the flusher asks of the Kafka thread.
#[derive(Debug)]
pub enum Command {
    /// Commit `next_offset` for the partition: a hint for tools; resuming uses ClickHouse.
    Commit { partition: i32, next_offset: i64 },
}

/// What every builder shares.
#[derive(Clone)]
pub struct WorkerContext {
    /// For the topic name here, and for watermarks on the Kafka thread.
    pub sink: crate::sink::ClickhouseSink,
    pub dead_letters: DeadLetters,
    pub metrics: crate::metrics::Metrics,
    pub batches: mpsc::Sender<Sealed>,
    pub max_rows: usize,
    pub max_wait: Duration,
}

/// The Kafka thread's handle on a running worker.
pub struct PartitionWorker {
    pub records: mpsc::Sender<Record>,
    /// The next offset not yet stored in every table (for the lag gauge).
    pub next_offset: Arc<AtomicI64>,
    stop: watch::Sender<bool>,
    member: Arc<Member>,
    task: JoinHandle<()>,
}

/// Records buffered between the Kafka thread and a worker.
pub const RECORD_CHANNEL: usize = 16_384;

impl PartitionWorker {
    /// Starts the worker for `partition`, whose tables hold `watermarks`.
    pub fn spawn(runtime: &tokio::runtime::Handle, ctx: WorkerContext, partition: i32, watermarks: Watermarks) -> Self {
        let (records_tx, records_rx) = mpsc::channel(RECORD_CHANNEL);
        let (stop_tx, stop_rx) = watch::channel(false);
        let raw_watermark = watermarks[Table::Raw].unwrap_or(-1);
        let member = Arc::new(Member::new(partition, stop_rx.clone(), watermarks));
        let span = tracing::info_span!("partition", topic = ctx.sink.topic(), partition);
        let builder = Builder {
            topic: ctx.sink.topic().into(),
            ctx,
            partition,
            raw_watermark,
            member: member.clone(),
            stop: stop_rx,
        };
        Self {
            records: records_tx,
            next_offset: member.next_offset.clone(),
            stop: stop_tx,
            member,
            task: runtime.spawn(builder.run(records_rx).instrument(span)),
        }
    }

    /// Tells the worker to stop: the flusher finishes the insert it is in (never starts
    /// another of this partition) and drops what it has not written; the partition's next
    /// owner resumes from ClickHouse.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Whether the builder has ended: after `stop`, or on its own (its partition failed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits (blocking the calling thread, not a runtime one) until the builder has ended and
    /// no insert of the partition is in flight.
    pub fn join_blocking(self, runtime: &tokio::runtime::Handle, deadline: Duration) {
        let (task, member) = (self.task, self.member);
        let joined = runtime.block_on(async move {
            tokio::time::timeout(deadline, async move {
                let _ = task.await;
                member.quiesce().await;
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
    member: Arc<Member>,
    stop: watch::Receiver<bool>,
    /// The topic's name, shared by every row this builder makes.
    topic: Arc<str>,
}

impl Builder {
    async fn run(self, mut records: mpsc::Receiver<Record>) {
        let mut builder = BatchBuilder::new(self.ctx.max_rows, self.ctx.max_wait);
        let mut sources: Vec<Record> = Vec::new();
        let mut next_expected = i64::MIN;
        let mut stop = self.stop.clone();
        loop {
            if self.member.failed() {
                return;
            }
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
                    if !self.hand_over(batch, &mut sources).await {
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
                if !self.hand_over(batch, &mut sources).await {
                    return;
                }
            }
            sources.push(source);
            if builder.is_full() {
                let batch = builder.take().expect("a full batch is open");
                if !self.hand_over(batch, &mut sources).await {
                    return;
                }
            }
        }
    }

    /// Sends a sealed batch (with the sources gathered for it) to the flusher, waiting while
    /// its queue is full; false once the worker is stopped or the flusher gone.
    async fn hand_over(&self, batch: Batch, sources: &mut Vec<Record>) -> bool {
        let sealed = Sealed {
            member: self.member.clone(),
            batch,
            sources: std::mem::take(sources),
        };
        let mut stop = self.stop.clone();
        tokio::select! {
            biased;
            _ = stop.changed() => false,
            sent = self.ctx.batches.send(sealed) => sent.is_ok(),
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
            tollgate_schemas::decode_usage_event(payload).map_err(|e| letter(decode_kind(&e), e.to_string()))?;
        let origin = Origin {
            partition: self.partition,
            offset: record.offset,
        };
        UsageRow::from_event(&event, &self.topic, origin).map_err(|e| letter("time_out_of_range", e.to_string()))
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}
