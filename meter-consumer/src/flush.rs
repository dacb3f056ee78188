//! The consumer's one writer: sealed batches of every assigned partition in, one insert per
//! table per flush out.
//!
//! In: [`Sealed`] batches from the partition builders (`crate::partition`), over one bounded
//! channel. Out: inserts through `ClickhouseSink` (raw rows, then the four rollups side by
//! side, then the minutes touched), poison rows to the DLQ, and per partition the lag
//! position and a commit hint once its rows are in every table.
//!
//! # Why one writer
//! Every insert costs ClickHouse a new part to write and later merge, whatever its size, so
//! six tables × one insert per partition batch made the inserts, not the rows, the cost.
//! The flusher takes whatever batches are waiting when an insert ends (group commit) and
//! writes them as one insert per table: while ClickHouse is busy, more partitions gather.
//!
//! # Why it is still exactly once
//! - One insert of a group stays atomic: its batches are all in one UTC month (one
//!   ClickHouse partition), and the group holds at most `batch.max_rows` rows, below the
//!   `max_insert_block_size` each insert sets, so it is one part.
//! - Watermarks stay per (table, Kafka partition): every row carries its partition and
//!   offset, so one insert raises the watermark of each partition in it, together or not at
//!   all. A partition's rows are in offset order inside the insert, and its batches are
//!   written in order, so "max offset stored" still means "everything up to it is stored".
//! - An ambiguous failure is settled on any one partition of the insert: the part landed
//!   for all of them or for none.
//! - A partition's [`Member`] lock is held for the whole of a write that includes it, and a
//!   stopped member is never written again: a revocation stops the member, then takes the
//!   lock, so when it returns no insert of the partition is in flight and none will start.
//!   If a write gives up because a member stopped, the flusher first waits until every insert
//!   ClickHouse could not confirm has ended (holding the locks, so a revocation returns only
//!   then), and reads the other members' watermarks again from ClickHouse before their rows
//!   are written, so nothing is skipped or doubled; a member that stops meanwhile is dropped,
//!   never a running one.

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch, Mutex, OwnedMutexGuard};

use crate::batch::Batch;
use crate::dlq::{DeadLetter, DeadLetters};
use crate::metrics::Metrics;
use crate::partition::{Command, Record};
use crate::rows::UsageRow;
use crate::sink::{ClickhouseSink, StopSignal, Table, TableRows, Watermarks, WriteError};

/// Batches waiting for the flusher at most, in its channel and its queue each: the
/// backpressure bound (a builder waits to hand over its next batch).
pub const QUEUE: usize = 8;

/// One assigned partition as the flusher sees it.
pub struct Member {
    pub partition: i32,
    stop: watch::Receiver<bool>,
    /// Set when ClickHouse refused rollup rows of this partition: its builder then ends, and
    /// the partition is retried from its watermarks by the next owner or after a restart.
    failed: AtomicBool,
    /// The next offset not yet stored in every table (for the lag gauge).
    pub next_offset: Arc<AtomicI64>,
    /// Held by the flusher while it writes this partition's rows.
    state: Arc<Mutex<Watermarks>>,
}

impl Member {
    pub fn new(partition: i32, stop: watch::Receiver<bool>, watermarks: Watermarks) -> Self {
        Self {
            partition,
            stop,
            failed: AtomicBool::new(false),
            next_offset: Arc::new(AtomicI64::new(watermarks.resume_offset().unwrap_or(0))),
            state: Arc::new(Mutex::new(watermarks)),
        }
    }

    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Waits until no write of this partition is in flight. Called after the member's stop
    /// has been set, it also means none will start.
    pub async fn quiesce(&self) {
        drop(self.state.lock().await);
    }
}

/// A batch of one partition, with the original bytes of its rows (kept to dead-letter a row
/// ClickHouse refuses).
pub struct Sealed {
    pub member: Arc<Member>,
    pub batch: Batch,
    pub sources: Vec<Record>,
}

/// What the flusher shares with nobody but needs from the service.
pub struct FlushContext {
    pub sink: ClickhouseSink,
    pub dead_letters: DeadLetters,
    pub metrics: Metrics,
    pub commands: std::sync::mpsc::Sender<Command>,
    /// Rows per insert at most.
    pub max_rows: usize,
}

/// Runs until every sender of `batches` is gone.
pub async fn run(ctx: FlushContext, mut batches: mpsc::Receiver<Sealed>) {
    let mut pending: VecDeque<Sealed> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match batches.recv().await {
                Some(sealed) => pending.push_back(sealed),
                None => return,
            }
        }
        while pending.len() < QUEUE {
            match batches.try_recv() {
                Ok(sealed) => pending.push_back(sealed),
                Err(_) => break,
            }
        }
        pending.retain(|s| !s.member.stopped() && !s.member.failed());
        let group = take_group(&mut pending, ctx.max_rows, |s| {
            (s.batch.month, s.member.partition, s.batch.rows.len())
        });
        if !group.is_empty() {
            ctx.flush(group).await;
        }
    }
}

/// Takes from the front of `pending` the batches one insert can hold: all in the month of
/// the first, at most `max_rows` rows (the first batch always), and never a batch of a
/// partition whose earlier batch stays behind (a partition's batches are written in order).
/// `key` gives a batch's month, partition and row count.
fn take_group<T>(pending: &mut VecDeque<T>, max_rows: usize, key: impl Fn(&T) -> (u32, i32, usize)) -> Vec<T> {
    let Some(first) = pending.front() else {
        return Vec::new();
    };
    let month = key(first).0;
    let mut group = Vec::new();
    let mut rows = 0;
    let mut held_back = HashSet::new();
    let mut rest = VecDeque::with_capacity(pending.len());
    for item in pending.drain(..) {
        let (item_month, partition, len) = key(&item);
        let fits = group.is_empty() || rows + len <= max_rows;
        if item_month == month && fits && !held_back.contains(&partition) {
            rows += len;
            group.push(item);
        } else {
            held_back.insert(partition);
            rest.push_back(item);
        }
    }
    *pending = rest;
    group
}

/// One partition's rows in a group: `rows[range]` of the group, ascending by offset.
struct Part {
    member: Arc<Member>,
    range: std::ops::Range<usize>,
    watermarks: OwnedMutexGuard<Watermarks>,
}

impl Part {
    fn last_offset(&self, rows: &[UsageRow]) -> i64 {
        rows[self.range.clone()].last().map_or(-1, UsageRow::offset)
    }
}

/// The rows of one flush, partition by partition.
struct Group {
    rows: Vec<UsageRow>,
    sources: Vec<Record>,
    parts: Vec<Part>,
    /// (partition, offset) of the rows ClickHouse refused and that were dead-lettered: kept
    /// across a retry of the group, so none is dead-lettered twice or counted in a rollup.
    refused: HashSet<(u32, i64)>,
}

/// A write gives up when any member in it has stopped: that member must not be written, and
/// the others are resumed from ClickHouse's watermarks.
struct AnyStopped<'a>(&'a [Part]);

impl StopSignal for AnyStopped<'_> {
    fn stopped(&self) -> bool {
        self.0.iter().any(|p| p.member.stopped())
    }
}

impl FlushContext {
    async fn flush(&self, batches: Vec<Sealed>) {
        let Some(mut group) = self.lock(batches).await else {
            return;
        };
        loop {
            match self.write(&mut group).await {
                Ok(()) => return,
                Err(stopped @ (WriteError::Stopped | WriteError::Unsettled(_))) => {
                    // Inserts that may still land must end before any watermark is read.
                    if let WriteError::Unsettled(queries) = stopped {
                        if !self.wait_finished(&group, &queries).await {
                            return;
                        }
                    }
                    // What landed of the others is unknown: read their watermarks again,
                    // dropping every member that stops meanwhile (never a running one).
                    loop {
                        group.parts.retain(|p| !p.member.stopped());
                        if group.parts.is_empty() {
                            return;
                        }
                        if let Some(reloaded) = self.reload(&group.parts).await {
                            for (part, watermarks) in group.parts.iter_mut().zip(reloaded) {
                                *part.watermarks = watermarks;
                            }
                            break;
                        }
                    }
                }
                Err(WriteError::Rejected(reason)) => {
                    // Only rollups get here (raw rows are split and dead-lettered): rows the
                    // raw table took but a rollup refused. Stop these partitions rather than
                    // skip the rows; each is retried from its watermarks.
                    for part in &group.parts {
                        part.member.failed.store(true, Ordering::Release);
                        tracing::error!(partition = part.member.partition, error = %reason, "rollup insert refused; partition stopped");
                    }
                    return;
                }
            }
        }
    }

    /// Joins each partition's batches into one contiguous part, and takes each member's lock;
    /// drops members stopped by the time their lock is held.
    async fn lock(&self, batches: Vec<Sealed>) -> Option<Group> {
        let total: usize = batches.iter().map(|s| s.batch.rows.len()).sum();
        let mut rows = Vec::with_capacity(total);
        let mut sources = Vec::with_capacity(total);
        let mut parts: Vec<Part> = Vec::new();
        let mut merged: Vec<(Arc<Member>, Vec<Sealed>)> = Vec::new();
        for sealed in batches {
            match merged.iter_mut().find(|(m, _)| Arc::ptr_eq(m, &sealed.member)) {
                Some((_, list)) => list.push(sealed),
                None => merged.push((sealed.member.clone(), vec![sealed])),
            }
        }
        for (member, list) in merged {
            let watermarks = member.state.clone().lock_owned().await;
            if member.stopped() || member.failed() {
                continue;
            }
            let start = rows.len();
            for sealed in list {
                rows.extend(sealed.batch.rows);
                sources.extend(sealed.sources);
            }
            parts.push(Part {
                member,
                range: start..rows.len(),
                watermarks,
            });
        }
        (!parts.is_empty()).then_some(Group {
            rows,
            sources,
            parts,
            refused: HashSet::new(),
        })
    }

    /// The parts' watermarks from ClickHouse, retried until it answers; `None` as soon as any
    /// of their members has stopped (the caller drops it, releasing its lock, and asks again).
    async fn reload(&self, parts: &[Part]) -> Option<Vec<Watermarks>> {
        let mut reloaded = Vec::with_capacity(parts.len());
        let mut backoff = self.sink.retry_backoff();
        for part in parts {
            loop {
                if parts.iter().any(|p| p.member.stopped()) {
                    return None;
                }
                match self.sink.watermarks(part.member.partition).await {
                    Ok(watermarks) => {
                        reloaded.push(watermarks);
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(partition = part.member.partition, error = %err, "cannot read watermarks; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        }
        Some(reloaded)
    }

    /// Waits until none of `queries` runs on the server; false if every member of the group
    /// stopped first (then nothing of the group is written again here).
    async fn wait_finished(&self, group: &Group, queries: &[String]) -> bool {
        let mut backoff = self.sink.retry_backoff();
        for query_id in queries {
            loop {
                if group.parts.iter().all(|p| p.member.stopped()) {
                    return false;
                }
                match self.sink.wait_finished(query_id).await {
                    Ok(()) => break,
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot tell whether an insert still runs; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        }
        true
    }

    async fn write(&self, group: &mut Group) -> Result<(), WriteError> {
        self.write_raw(group).await?;
        for part in &mut group.parts {
            let last = part.last_offset(&group.rows);
            let mark = &mut part.watermarks[Table::Raw];
            *mark = Some(mark.unwrap_or(-1).max(last));
        }

        let topic = self.sink.topic();
        let mut rollups = TableRows::default();
        let mut minute_marks = Vec::with_capacity(group.parts.len());
        for part in &group.parts {
            let slice = &group.rows[part.range.clone()];
            let rows: Cow<'_, [UsageRow]> = if group.refused.is_empty() {
                Cow::Borrowed(slice)
            } else {
                Cow::Owned(
                    slice
                        .iter()
                        .filter(|r| !group.refused.contains(&(r.kafka_partition, r.offset())))
                        .cloned()
                        .collect(),
                )
            };
            rollups.extend(TableRows::for_batch(topic, &rows, &part.watermarks));
            minute_marks.push(part.watermarks[Table::MeterMinute].unwrap_or(-1));
        }
        let stop = AnyStopped(&group.parts);
        let (minute, hour, day, route) = tokio::join!(
            self.write_rollup(
                Table::MeterMinute,
                &rollups.minute,
                |r| (r.kafka_partition, r.kafka_offset),
                &stop
            ),
            self.write_rollup(
                Table::MeterHour,
                &rollups.hour,
                |r| (r.kafka_partition, r.kafka_offset),
                &stop
            ),
            self.write_rollup(
                Table::MeterDay,
                &rollups.day,
                |r| (r.kafka_partition, r.kafka_offset),
                &stop
            ),
            self.write_rollup(
                Table::RouteDay,
                &rollups.route,
                |r| (r.kafka_partition, r.kafka_offset),
                &stop
            ),
        );
        WriteError::merge([minute, hour, day, route])?;
        self.write_rollup(
            Table::MinutesTouched,
            &rollups.touched,
            |r| (r.kafka_partition, r.kafka_offset),
            &stop,
        )
        .await?;

        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        for (part, minute_mark) in group.parts.iter_mut().zip(minute_marks) {
            let last = part.last_offset(&group.rows);
            for mark in part.watermarks.values_mut() {
                *mark = Some(mark.unwrap_or(-1).max(last));
            }
            for row in group.rows[part.range.clone()]
                .iter()
                .filter(|r| r.offset() > minute_mark)
            {
                self.metrics
                    .freshness(Duration::from_millis((now_ms - row.time_millis()).max(0) as u64));
            }
            self.metrics.batch();
            part.member.next_offset.store(last + 1, Ordering::Release);
            let _ = self.commands.send(Command::Commit {
                partition: part.member.partition,
                next_offset: last + 1,
            });
        }
        Ok(())
    }

    /// Writes one rollup table's rows of the group in one insert, settled on the partition
    /// and offset stamped on its last row (every row of a partition carries the same).
    async fn write_rollup<R>(
        &self,
        table: Table,
        rows: &[R],
        stamp: impl Fn(&R) -> (u32, u64),
        stop: &AnyStopped<'_>,
    ) -> Result<(), WriteError>
    where
        R: clickhouse::RowOwned + clickhouse::RowWrite + serde::Serialize,
    {
        let Some((partition, offset)) = rows.last().map(stamp) else {
            return Ok(());
        };
        self.sink
            .write(table, partition as i32, rows, offset as i64, stop)
            .await
    }

    /// Writes the group's rows past each partition's raw watermark in one insert; if
    /// ClickHouse refuses the data, splits the range in halves (each partition's rows still
    /// contiguous and in order) until the refused rows are alone, and dead-letters those,
    /// adding them to the group's refused rows.
    async fn write_raw(&self, group: &mut Group) -> Result<(), WriteError> {
        let mut indices = Vec::with_capacity(group.rows.len());
        for part in &group.parts {
            let mark = part.watermarks[Table::Raw].unwrap_or(-1);
            let slice = &group.rows[part.range.clone()];
            let start = part.range.start + slice.partition_point(|r| r.offset() <= mark);
            indices.extend((start..part.range.end).filter(|&i| {
                !group
                    .refused
                    .contains(&(group.rows[i].kafka_partition, group.rows[i].offset()))
            }));
        }
        // Past every watermark (the usual case) the rows to write are the group's rows as
        // they are; only after a restart or a reload do some need leaving out.
        let rows: Cow<'_, [UsageRow]> = if indices.len() == group.rows.len() {
            Cow::Borrowed(&group.rows)
        } else {
            Cow::Owned(indices.iter().map(|&i| group.rows[i].clone()).collect())
        };
        let stop = AnyStopped(&group.parts);
        let mut refused = Vec::new();
        let mut pending = VecDeque::new();
        pending.push_back(0..rows.len());
        while let Some(range) = pending.pop_front() {
            let Some(last) = rows[range.clone()].last() else {
                continue;
            };
            let written = self
                .sink
                .write(
                    Table::Raw,
                    last.kafka_partition as i32,
                    &rows[range.clone()],
                    last.offset(),
                    &stop,
                )
                .await;
            match written {
                Ok(()) => {}
                Err(WriteError::Rejected(reason)) if range.len() == 1 => {
                    let row = &rows[range.start];
                    let source = &group.sources[indices[range.start]];
                    let letter = DeadLetter {
                        partition: row.kafka_partition as i32,
                        offset: source.offset,
                        key: source.key.as_deref(),
                        payload: source.payload.as_deref(),
                        kind: "clickhouse_rejected",
                        reason,
                    };
                    if let Err(stopped) = self.dead_letters.send(letter, &stop).await {
                        group.refused.extend(refused);
                        return Err(stopped);
                    }
                    refused.push((row.kafka_partition, source.offset));
                }
                Err(WriteError::Rejected(_)) => {
                    let mid = range.start + range.len() / 2;
                    pending.push_front(mid..range.end);
                    pending.push_front(range.start..mid);
                }
                Err(stopped) => {
                    group.refused.extend(refused);
                    return Err(stopped);
                }
            }
        }
        group.refused.extend(refused);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// (month, partition, rows, sequence number).
    type Item = (u32, i32, usize, usize);

    fn group_of(pending: &mut VecDeque<Item>, max_rows: usize) -> Vec<Item> {
        take_group(pending, max_rows, |&(month, partition, rows, _)| {
            (month, partition, rows)
        })
    }

    #[test]
    fn a_group_is_one_month_within_the_row_cap() {
        let mut pending: VecDeque<Item> = [
            (1, 0, 10, 0),
            (1, 1, 10, 1),
            (2, 2, 10, 2),
            (1, 3, 10, 3),
            (1, 4, 25, 4),
        ]
        .into_iter()
        .collect();
        let group = group_of(&mut pending, 30);
        assert_eq!(group.iter().map(|i| i.3).collect::<Vec<_>>(), [0, 1, 3]);
        assert_eq!(pending.iter().map(|i| i.3).collect::<Vec<_>>(), [2, 4]);
        // An oversized first batch still goes, alone.
        let mut big: VecDeque<Item> = [(1, 0, 100, 0), (1, 1, 1, 1)].into_iter().collect();
        assert_eq!(group_of(&mut big, 30).len(), 1);
    }

    proptest! {
        /// Whatever waits, groups are taken until nothing is left: every batch exactly once,
        /// each group one month within the cap (or a single batch), and each partition's
        /// batches in their order.
        #[test]
        fn groups_keep_every_batch_once_and_each_partition_in_order(
            batches in proptest::collection::vec((0u32..3, 0i32..4, 1usize..40), 0..40),
            max_rows in 1usize..100,
        ) {
            let mut pending: VecDeque<Item> = batches
                .iter()
                .enumerate()
                .map(|(seq, &(month, partition, rows))| (month, partition, rows, seq))
                .collect();
            let mut written = Vec::new();
            while !pending.is_empty() {
                let group = group_of(&mut pending, max_rows);
                prop_assert!(!group.is_empty());
                prop_assert!(group.iter().all(|i| i.0 == group[0].0));
                let rows: usize = group.iter().map(|i| i.2).sum();
                prop_assert!(group.len() == 1 || rows <= max_rows);
                written.extend(group);
            }
            prop_assert_eq!(written.len(), batches.len());
            for partition in 0..4 {
                let order: Vec<usize> = written.iter().filter(|i| i.1 == partition).map(|i| i.3).collect();
                let mut sorted = order.clone();
                sorted.sort_unstable();
                prop_assert_eq!(order, sorted);
            }
        }
    }
}
