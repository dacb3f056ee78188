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

pub(crate) fn write_loop(
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
