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
use super::settings::{EventSettings, FsyncPolicy, FullPolicy};
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

/// Whether an event is dropped rather than spooled, with `pending` bytes unshipped. Under
/// `refuse_billable` a billable event is always spooled: its request was admitted while the
/// spool had room (the admission check and this one race, and the events of requests in
/// flight when the spool filled arrive after it), and it was served, so it is owed a bill.
/// The spool can pass its cap by those in-flight events; what is dropped is never billable.
fn dropped_when_full(event: &UsageEvent, settings: &EventSettings, pending: u64) -> bool {
    pending >= settings.max_spool_bytes && (!event.billable || settings.when_full == FullPolicy::ServeUnbilled)
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
                    if dropped_when_full(
                        &event,
                        settings,
                        writer.watermark().pending_bytes.load(Ordering::Acquire),
                    ) {
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

#[cfg(test)]
mod tests {
    use tollgate_schemas::Outcome;

    use super::*;

    fn event(billable: bool) -> UsageEvent {
        UsageEvent {
            event_id: uuid::Uuid::now_v7(),
            timestamp_ms: 1,
            tenant_id: Some("tenant_1".into()),
            consumer: None,
            key_id: None,
            plan: None,
            route: "v1".into(),
            method: "GET".into(),
            status: if billable { 200 } else { 503 },
            outcome: if billable { Outcome::Allowed } else { Outcome::Rejected },
            billable,
            units: Default::default(),
            request_bytes: 0,
            response_bytes: 0,
            latency_ms: 0,
            upstream_latency_ms: None,
            gateway_id: "g".into(),
            request_id: None,
        }
    }

    #[test]
    fn a_full_spool_drops_only_what_its_policy_lets_go_unbilled() {
        let mut settings = EventSettings {
            max_spool_bytes: 4096,
            ..EventSettings::default()
        };
        for policy in [FullPolicy::RefuseBillable, FullPolicy::ServeUnbilled] {
            settings.when_full = policy;
            for billable in [true, false] {
                assert!(
                    !dropped_when_full(&event(billable), &settings, 4095),
                    "room left: spooled"
                );
            }
            assert!(
                dropped_when_full(&event(false), &settings, 4096),
                "{policy:?}: a full spool drops what bills nothing"
            );
        }
        settings.when_full = FullPolicy::RefuseBillable;
        assert!(
            !dropped_when_full(&event(true), &settings, 1 << 20),
            "an admitted billable request is spooled past the cap"
        );
        settings.when_full = FullPolicy::ServeUnbilled;
        assert!(
            dropped_when_full(&event(true), &settings, 4096),
            "serve_unbilled lets it go, counted"
        );
    }
}
