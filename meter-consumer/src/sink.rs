//! `ClickhouseSink`: exactly-once inserts of batches into each table.
//!
//! In: for one table, rows of contiguous offset ranges, one per Kafka partition, each in
//! offset order (`crate::flush` groups several partitions' batches into one insert). Out: one
//! `INSERT` per group, and per (table, partition) the watermark: the highest Kafka offset
//! stored in that table. A consumer resumes each partition after the lowest watermark of its
//! tables, and writes to each table only the rows past that table's own watermark.
//!
//! # Why this counts every event exactly once
//! - Atomic: a group is one `INSERT` of at most `batch.max_rows` (≤ 1,000,000) rows, below
//!   the server's `max_insert_block_size` (set explicitly on each insert), inside one month,
//!   so it is one block in one partition: one part, renamed into place at once. Either every
//!   row of the group is visible or none is, so an ambiguous failure is settled on the
//!   watermark of any one partition in it (the last row's).
//! - Ordered: ranges of a partition are written in offset order, each after the previous one
//!   succeeded, so "max offset stored" means "everything up to it is stored".
//! - Rollups too: the consumer writes `usage_meter_*` and `usage_route_day` itself, each row
//!   stamped with its batch's partition and last offset, so every rollup table has its own
//!   watermark. Materialized views would be filled after the raw part is written, not
//!   atomically with it: a crash between the two would leave the raw watermark past rows the
//!   rollup never got (docs/ARCHITECTURE.md, "Exactly once into ClickHouse"). Here a crash between the raw
//!   insert and a rollup insert leaves that rollup's watermark behind, and the restarted consumer replays exactly
//!   the missing range into it, and nothing into the raw table.
//! - Ambiguous failures: a timeout or broken connection does not say whether the server
//!   committed. Each attempt carries its own `query_id`; before retrying, the sink waits until
//!   that query is no longer in `system.processes` (killing it if it hangs), then reads the
//!   watermark: if the range landed, the write is done, otherwise it is retried. A retry
//!   therefore never duplicates and never skips.
//! - Data errors (ClickHouse refused the rows themselves) are never retried: the caller
//!   splits the range and dead-letters the rows that fail alone.
//!
//! Retry decisions live in [`classify`]; backoff is capped exponential, so an unreachable
//! ClickHouse costs one attempt per `batch.retry_max_ms`, never a spin.

use std::time::Duration;

use clickhouse::{Client, Row, RowOwned, RowWrite};
use serde::Serialize;
use tollgate_runtime::backoff::{Attempts, Backoff};

use crate::metrics::Metrics;
use crate::rows::{MeterDayRow, MeterHourRow, MeterMinuteRow, MinuteTouchedRow, RouteDayRow, UsageRow};
pub use crate::table::{Table, Watermarks};

/// How one failed ClickHouse call should be treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The server refused the data itself; retrying would fail the same way.
    Data(String),
    /// Anything else (network, timeout, overload, a missing table): it may or may not have
    /// been applied, and may succeed later.
    Retriable(String),
}

/// ClickHouse's retry logic: data errors are final, everything else is retried.
pub fn classify(err: &clickhouse::error::Error) -> Failure {
    // Codes whose cause is the inserted data (ClickHouse `ErrorCodes.cpp`): parse failures,
    // type mismatches, out-of-range values, nested arrays of different sizes.
    const DATA_CODES: &[u32] = &[6, 27, 33, 38, 41, 53, 69, 70, 72, 117, 131, 190, 321];
    match err {
        clickhouse::error::Error::BadResponse(text) => match server_code(text) {
            Some(code) if DATA_CODES.contains(&code) => Failure::Data(first_line(text)),
            _ => Failure::Retriable(first_line(text)),
        },
        other => Failure::Retriable(other.to_string()),
    }
}

/// The `Code: N` a ClickHouse error response starts with.
fn server_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + "Code: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Error text bounded for logs and dead-letter headers.
fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().chars().take(300).collect()
}

/// Why a write stopped without storing its rows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("clickhouse refused the rows: {0}")]
    Rejected(String),
    #[error("stopped before the rows were stored")]
    Stopped,
    /// Stopped while ClickHouse could not say whether these inserts (by `query_id`) were
    /// stored: they may still be running, so nobody may read a watermark and write the same
    /// rows again before [`ClickhouseSink::wait_finished`] says they ended.
    #[error("stopped while clickhouse could not confirm inserts {0:?}")]
    Unsettled(Vec<String>),
}

impl WriteError {
    /// The outcome of several writes done side by side: an unsettled insert first (every one
    /// of them must be waited out), then a refusal, then a stop.
    pub fn merge(results: impl IntoIterator<Item = Result<(), WriteError>>) -> Result<(), WriteError> {
        let mut worst: Option<WriteError> = None;
        for result in results {
            let Err(err) = result else { continue };
            worst = Some(match (worst, err) {
                (Some(WriteError::Unsettled(mut a)), WriteError::Unsettled(b)) => {
                    a.extend(b);
                    WriteError::Unsettled(a)
                }
                (Some(unsettled @ WriteError::Unsettled(_)), _) => unsettled,
                (_, unsettled @ WriteError::Unsettled(_)) => unsettled,
                (Some(rejected @ WriteError::Rejected(_)), _) => rejected,
                (_, err) => err,
            });
        }
        worst.map_or(Ok(()), Err)
    }
}

#[derive(Clone)]
pub struct SinkSettings {
    pub insert_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Rows per insert at most: `max_insert_block_size` is set at least this high.
    pub max_rows: u64,
}

#[derive(Clone)]
pub struct ClickhouseSink {
    client: Client,
    topic: String,
    settings: SinkSettings,
    metrics: Metrics,
}

#[derive(Debug, serde::Deserialize, Row)]
struct Mark {
    table: u8,
    rows: u64,
    max_offset: u64,
}

/// Whether a write should give up (the partition was revoked, or the process is stopping).
pub trait StopSignal {
    fn stopped(&self) -> bool;
}

impl StopSignal for tokio::sync::watch::Receiver<bool> {
    fn stopped(&self) -> bool {
        *self.borrow()
    }
}

impl ClickhouseSink {
    pub fn new(client: Client, topic: String, settings: SinkSettings, metrics: Metrics) -> Self {
        Self {
            client,
            topic,
            settings,
            metrics,
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn retry_backoff(&self) -> Attempts {
        Backoff::new(self.settings.retry_initial, self.settings.retry_max).attempts()
    }

    /// The watermark of every table for `partition`, in one round trip.
    pub async fn watermarks(&self, partition: i32) -> Result<Watermarks, clickhouse::error::Error> {
        let sql = Table::ALL
            .iter()
            .map(|t| {
                format!(
                    "SELECT toUInt8({}) AS table, count() AS rows, max(kafka_offset) AS max_offset \
                     FROM {} WHERE kafka_topic = ? AND kafka_partition = ?",
                    t.position(),
                    t.name()
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ");
        let mut query = self.client.query(&sql);
        for _ in Table::ALL {
            query = query.bind(self.topic.as_str()).bind(partition as u32);
        }
        let marks: Vec<Mark> = self.timed(query.fetch_all()).await?;
        let mut watermarks = Watermarks::empty();
        for mark in marks {
            if let Some(&table) = Table::ALL.get(usize::from(mark.table)) {
                watermarks[table] = (mark.rows > 0).then_some(mark.max_offset as i64);
            }
        }
        Ok(watermarks)
    }

    async fn watermark(&self, table: Table, partition: i32) -> Result<Option<i64>, clickhouse::error::Error> {
        let sql = format!(
            "SELECT toUInt8(0) AS table, count() AS rows, max(kafka_offset) AS max_offset \
             FROM {} WHERE kafka_topic = ? AND kafka_partition = ?",
            table.name()
        );
        let query = self.client.query(&sql).bind(self.topic.as_str()).bind(partition as u32);
        let mark: Mark = self.timed(query.fetch_one()).await?;
        Ok((mark.rows > 0).then_some(mark.max_offset as i64))
    }

    /// Inserts `rows` into `table` exactly once, as one insert; `partition` and `last_offset`
    /// are those of the last row (every row of the insert lands with it or none does).
    /// Retries until the rows are stored, unless ClickHouse refuses the data or `stop` fires
    /// while ClickHouse cannot say whether they were stored.
    pub async fn write<R>(
        &self,
        table: Table,
        partition: i32,
        rows: &[R],
        last_offset: i64,
        stop: &impl StopSignal,
    ) -> Result<(), WriteError>
    where
        R: RowOwned + RowWrite + Serialize,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let mut backoff = self.retry_backoff();
        loop {
            if stop.stopped() {
                return Err(WriteError::Stopped);
            }
            let query_id = uuid::Uuid::now_v7().simple().to_string();
            let err = match self.insert_once(table, rows, &query_id).await {
                Ok(()) => {
                    self.metrics.written(table, rows.len());
                    return Ok(());
                }
                Err(err) => err,
            };
            let reason = match classify(&err) {
                Failure::Data(reason) => return Err(WriteError::Rejected(reason)),
                Failure::Retriable(reason) => reason,
            };
            self.metrics.insert_retry(table);
            tracing::warn!(table = table.name(), partition, last_offset, error = %reason, "insert failed; settling before retry");
            // Did it land anyway? Ask until ClickHouse can answer.
            loop {
                tokio::time::sleep(backoff.next_delay()).await;
                match self.settle(table, partition, &query_id).await {
                    Ok(Some(stored)) if stored >= last_offset => {
                        self.metrics.written(table, rows.len());
                        return Ok(());
                    }
                    Ok(_) => break,
                    Err(err) if stop.stopped() => {
                        tracing::warn!(table = table.name(), partition, error = %err, "stopping while clickhouse cannot confirm an insert");
                        return Err(WriteError::Unsettled(vec![query_id]));
                    }
                    Err(err) => {
                        tracing::warn!(table = table.name(), partition, error = %err, "clickhouse still unavailable");
                    }
                }
            }
        }
    }

    async fn insert_once<R>(&self, table: Table, rows: &[R], query_id: &str) -> Result<(), clickhouse::error::Error>
    where
        R: RowOwned + RowWrite + Serialize,
    {
        // Rollup rows can outnumber the raw rows they sum (one per meter): the block must hold
        // whatever this insert carries, or the server would cut it into several parts.
        let block = (rows.len() as u64)
            .max(self.settings.max_rows)
            .max(1_048_576)
            .to_string();
        let mut insert = self
            .client
            .insert::<R>(table.name())
            .await?
            .with_setting("query_id", query_id)
            .with_setting("max_insert_block_size", block)
            .with_timeouts(Some(self.settings.insert_timeout), Some(self.settings.insert_timeout));
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await
    }

    /// Waits until the insert `query_id` no longer runs on the server (killing it once it has
    /// run longer than the insert timeout), then returns `table`'s watermark.
    async fn settle(
        &self,
        table: Table,
        partition: i32,
        query_id: &str,
    ) -> Result<Option<i64>, clickhouse::error::Error> {
        self.wait_finished(query_id).await?;
        self.watermark(table, partition).await
    }

    /// Waits until the insert `query_id` no longer runs on the server, killing it once it has
    /// run longer than the insert timeout: after this it has either landed or never will.
    pub async fn wait_finished(&self, query_id: &str) -> Result<(), clickhouse::error::Error> {
        let started = tokio::time::Instant::now();
        loop {
            let running: u64 = self
                .timed(
                    self.client
                        .query("SELECT count() FROM system.processes WHERE query_id = ?")
                        .bind(query_id)
                        .fetch_one(),
                )
                .await?;
            if running == 0 {
                break;
            }
            if started.elapsed() > self.settings.insert_timeout {
                self.timed(
                    self.client
                        .query("KILL QUERY WHERE query_id = ? SYNC")
                        .bind(query_id)
                        .execute(),
                )
                .await?;
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    async fn timed<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> Result<T, clickhouse::error::Error> {
        tokio::time::timeout(self.settings.insert_timeout, call)
            .await
            .unwrap_or(Err(clickhouse::error::Error::TimedOut))
    }
}

/// Everything one batch (or a group of them) writes, per table.
#[derive(Default)]
pub struct TableRows {
    pub minute: Vec<MeterMinuteRow>,
    pub hour: Vec<MeterHourRow>,
    pub day: Vec<MeterDayRow>,
    pub route: Vec<RouteDayRow>,
    /// Written after the others succeeded: billing-sync, seeing a minute here, must find its
    /// units in the minute rollup already.
    pub touched: Vec<MinuteTouchedRow>,
}

impl TableRows {
    /// Rollup rows for the tail of `rows` past each rollup table's watermark.
    pub fn for_batch(topic: &str, rows: &[UsageRow], watermarks: &Watermarks) -> Self {
        let tail = |table: Table| {
            let mark = watermarks[table].unwrap_or(-1);
            let start = rows.partition_point(|r| r.offset() <= mark);
            &rows[start..]
        };
        Self {
            minute: crate::batch::meter_minute(topic, tail(Table::MeterMinute)),
            hour: crate::batch::meter_hour(topic, tail(Table::MeterHour)),
            day: crate::batch::meter_day(topic, tail(Table::MeterDay)),
            route: crate::batch::route_day(topic, tail(Table::RouteDay)),
            touched: crate::batch::minutes_touched(topic, tail(Table::MinutesTouched)),
        }
    }

    /// Adds another partition's rows: one insert per table then writes both.
    pub fn extend(&mut self, other: TableRows) {
        self.minute.extend(other.minute);
        self.hour.extend(other.hour);
        self.day.extend(other.day);
        self.route.extend(other.route);
        self.touched.extend(other.touched);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_by_side_writes_report_every_unsettled_insert_before_a_refusal_or_a_stop() {
        use WriteError::{Rejected, Stopped, Unsettled};
        assert_eq!(WriteError::merge([Ok(()), Ok(())]), Ok(()));
        assert_eq!(WriteError::merge([Ok(()), Err(Stopped)]), Err(Stopped));
        assert_eq!(
            WriteError::merge([Err(Stopped), Err(Rejected("x".into()))]),
            Err(Rejected("x".into()))
        );
        assert_eq!(
            WriteError::merge([
                Err(Unsettled(vec!["a".into()])),
                Err(Rejected("x".into())),
                Err(Stopped),
                Err(Unsettled(vec!["b".into()])),
            ]),
            Err(Unsettled(vec!["a".into(), "b".into()]))
        );
    }

    #[test]
    fn data_errors_are_final_and_the_rest_retried() {
        let bad = clickhouse::error::Error::BadResponse(
            "Code: 27, e.displayText() = DB::Exception: Cannot parse input\nmore".to_owned(),
        );
        assert_eq!(
            classify(&bad),
            Failure::Data("Code: 27, e.displayText() = DB::Exception: Cannot parse input".to_owned())
        );
        let overloaded = clickhouse::error::Error::BadResponse("Code: 252, too many parts".to_owned());
        assert!(matches!(classify(&overloaded), Failure::Retriable(_)));
        assert!(matches!(
            classify(&clickhouse::error::Error::TimedOut),
            Failure::Retriable(_)
        ));
        assert_eq!(server_code("Code: 60. DB::Exception: Table x doesn't exist"), Some(60));
        assert_eq!(server_code("no code"), None);
    }
}
