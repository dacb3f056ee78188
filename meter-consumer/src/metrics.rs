//! meter-consumer's Prometheus metrics, registered with the recorder from `Ops::new()` (never
//! a global one).
//!
//! In: events from the partition workers, the sink and the Kafka thread. Out: counters,
//! gauges and a histogram on `/metrics`. Labels are bounded: table names, dead-letter reason
//! kinds, Kafka partition numbers; never a tenant or key.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::PrometheusRecorder;

use crate::table::{PerTable, Table};

#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    rows_written: PerTable<Counter>,
    inserts: PerTable<Counter>,
    insert_retries: PerTable<Counter>,
    batches: Counter,
    freshness: Histogram,
    keys_records: Counter,
    assigned: Gauge,
}

impl Metrics {
    pub fn new(recorder: PrometheusRecorder) -> Self {
        let recorder = Arc::new(recorder);
        metrics::with_local_recorder(&*recorder, || {
            metrics::describe_counter!(
                "meter_consumer_rows_written_total",
                "Rows inserted into ClickHouse, by table."
            );
            metrics::describe_counter!(
                "meter_consumer_inserts_total",
                "ClickHouse inserts stored, by table: one per flush, however many partitions it holds."
            );
            metrics::describe_counter!(
                "meter_consumer_batches_total",
                "Partition batches written to every table."
            );
            metrics::describe_counter!(
                "meter_consumer_insert_retries_total",
                "ClickHouse inserts retried after a failure, by table."
            );
            metrics::describe_counter!(
                "meter_consumer_dead_letters_total",
                "Usage records sent to the dead-letter topic, by reason."
            );
            metrics::describe_gauge!(
                "meter_consumer_lag_messages",
                "Messages in the partition not yet written to ClickHouse."
            );
            metrics::describe_histogram!(
                "meter_consumer_freshness_seconds",
                "From an event's timestamp to its batch being visible in every rollup."
            );
            metrics::describe_counter!("meter_consumer_keys_records_total", "Keys-topic records mirrored.");
            metrics::describe_gauge!(
                "meter_consumer_assigned_partitions",
                "Usage-topic partitions this member consumes; 0 means not consuming."
            );
            Self {
                rows_written: PerTable::from_fn(
                    |t| metrics::counter!("meter_consumer_rows_written_total", "table" => t.name()),
                ),
                inserts: PerTable::from_fn(|t| metrics::counter!("meter_consumer_inserts_total", "table" => t.name())),
                insert_retries: PerTable::from_fn(
                    |t| metrics::counter!("meter_consumer_insert_retries_total", "table" => t.name()),
                ),
                batches: metrics::counter!("meter_consumer_batches_total"),
                freshness: metrics::histogram!("meter_consumer_freshness_seconds"),
                keys_records: metrics::counter!("meter_consumer_keys_records_total"),
                assigned: metrics::gauge!("meter_consumer_assigned_partitions"),
                recorder: recorder.clone(),
            }
        })
    }

    /// The handle that renders and maintains the recorder's metrics.
    pub fn handle(&self) -> metrics_exporter_prometheus::PrometheusHandle {
        self.recorder.handle()
    }

    /// One insert of `rows` rows stored in `table`.
    pub fn written(&self, table: Table, rows: usize) {
        self.rows_written[table].increment(rows as u64);
        self.inserts[table].increment(1);
    }

    pub fn insert_retry(&self, table: Table) {
        self.insert_retries[table].increment(1);
    }

    pub fn batch(&self) {
        self.batches.increment(1);
    }

    pub fn dead_letter(&self, reason: &'static str) {
        metrics::with_local_recorder(&*self.recorder, || {
            metrics::counter!("meter_consumer_dead_letters_total", "reason" => reason).increment(1);
        });
    }

    pub fn lag(&self, partition: i32) -> Gauge {
        metrics::with_local_recorder(
            &*self.recorder,
            || metrics::gauge!("meter_consumer_lag_messages", "partition" => partition.to_string()),
        )
    }

    pub fn freshness(&self, age: Duration) {
        self.freshness.record(age.as_secs_f64());
    }

    pub fn assigned_partitions(&self, n: usize) {
        self.assigned.set(n as f64);
    }

    pub fn keys_records(&self, n: usize) {
        self.keys_records.increment(n as u64);
    }
}
