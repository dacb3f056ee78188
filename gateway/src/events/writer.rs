//! The writer loop: takes recorded events off the sink's queue and appends them to the spool,
//! flushing (and fsyncing, by policy) once per drained batch.
//!
//! In: [`Command`]s from [`super::UsageSink`] and the pipeline's shutdown. Out: framed records
//! on disk and a notification to the shipper after every flush.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};
use tollgate_schemas::UsageEvent;

use super::metrics::EventMetrics;
use super::record::spool_record;
use super::settings::{EventSettings, FsyncPolicy};
use super::spool::SpoolWriter;

pub(crate) enum Command {
    Event(Box<UsageEvent>),
    /// Flush and fsync, then answer.
    Sync(oneshot::Sender<()>),
}

/// After a flush of fewer events than this, the writer waits [`GATHER`] before it takes the
/// next batch: a parked writer is woken by a futex call from the request thread that queued
/// the event, and each wake-up ends in a write of its own, so one wake-up per event cost the
/// gateway more CPU than building the event. Waiting lets a few milliseconds of events share
/// one wake-up and one write. The events are in memory meanwhile, as they are in the queue;
/// a `Sync` (shutdown) is answered at most [`GATHER`] later.
const GATHER_BELOW: u64 = 512;
const GATHER: Duration = Duration::from_millis(2);

pub(crate) fn write_loop(
    mut writer: SpoolWriter,
    mut rx: mpsc::UnboundedReceiver<Command>,
    settings: &EventSettings,
    metrics: &EventMetrics,
    written: &Notify,
) {
    let mut last_sync = Instant::now();
    let interval = Duration::from_millis(settings.fsync_interval_ms);
    let mut record = Vec::with_capacity(512);
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
                    } else if let Err(err) = {
                        spool_record(&event, &mut record);
                        writer.append(&record)
                    } {
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
        let answered = !syncs.is_empty();
        for done in syncs {
            let _ = done.send(());
        }
        if appended < GATHER_BELOW && !answered {
            std::thread::sleep(GATHER);
        }
    }
    let _ = writer.flush(true);
    written.notify_one();
}
