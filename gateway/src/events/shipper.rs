//! The shipper loop: reads the spool in order, produces each batch to the usage topic, and
//! moves the spool's position only after Kafka acknowledged the whole batch.
//!
//! In: spooled records and the writer's notifications. Out: Kafka messages keyed by tenant;
//! the saved spool position.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Notify;

use super::metrics::EventMetrics;
use super::record::split_record;
use super::spool::{self, SpoolReader};

/// How the pipeline tells the shipper to finish: `closing` ships what is spooled and ends;
/// `stop` ends at once (what is left stays in the spool).
#[derive(Default)]
pub(crate) struct ShipperControl {
    pub(crate) written: Notify,
    pub(crate) closing: AtomicBool,
    pub(crate) stop: Notify,
}

pub(crate) async fn ship_loop(
    mut reader: SpoolReader,
    producer: FutureProducer,
    topic: String,
    metrics: Arc<EventMetrics>,
    control: Arc<ShipperControl>,
    mut from_earlier_run: u64,
) {
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
        let started = Instant::now();
        let shipped = tokio::select! {
            result = produce_all(&producer, &topic, &batch.records) => result,
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
                if let Err(err) = reader.commit(batch.next, bytes) {
                    tracing::error!(error = %err, "spool: cannot save the shipped position");
                }
            }
            Err(reason) => {
                tracing::error!(%reason, "usage topic: delivery failed; retrying the batch");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn produce_all(producer: &FutureProducer, topic: &str, records: &[Vec<u8>]) -> Result<(), String> {
    let mut deliveries = Vec::with_capacity(records.len());
    for record in records {
        let Some((key, body)) = split_record(record) else {
            continue;
        };
        loop {
            match producer.send_result(FutureRecord::to(topic).key(key).payload(body)) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    _,
                )) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((err, _)) => return Err(err.to_string()),
            }
        }
    }
    for delivery in deliveries {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((err, _))) => return Err(err.to_string()),
            Err(_) => return Err("producer closed".to_owned()),
        }
    }
    Ok(())
}
