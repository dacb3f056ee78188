//! The usage pipeline's metrics, registered on the gateway's own recorder (no global one).
//! Names follow `gateway_<what>_<unit>[_total]`; labels are bounded (a drop reason), never a
//! tenant or key.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};

pub struct EventMetrics {
    pub spooled: Counter,
    pub produced: Counter,
    pub replayed: Counter,
    pub corrupt: Counter,
    pub refused: Counter,
    dropped_full: Counter,
    dropped_error: Counter,
    dropped_closed: Counter,
    pub queue_depth: Gauge,
    pub replay_pending: Gauge,
    pub delivery_seconds: Histogram,
    last_drop_log: Mutex<Option<Instant>>,
}

const METADATA: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

impl EventMetrics {
    pub fn new(recorder: &dyn Recorder) -> Self {
        let counter = |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let dropped = |reason: &'static str| {
            recorder.register_counter(
                &Key::from_parts("gateway_events_dropped_total", vec![Label::new("reason", reason)]),
                &METADATA,
            )
        };
        Self {
            spooled: counter("gateway_events_spooled_total"),
            produced: counter("gateway_events_produced_total"),
            replayed: counter("gateway_events_replayed_total"),
            corrupt: counter("gateway_events_spool_corrupt_total"),
            refused: counter("gateway_events_refused_requests_total"),
            dropped_full: dropped("spool_full"),
            dropped_error: dropped("spool_error"),
            dropped_closed: dropped("closed"),
            queue_depth: recorder.register_gauge(&Key::from_static_name("gateway_events_queue_depth"), &METADATA),
            replay_pending: recorder.register_gauge(&Key::from_static_name("gateway_events_replay_pending"), &METADATA),
            delivery_seconds: recorder
                .register_histogram(&Key::from_static_name("gateway_events_delivery_seconds"), &METADATA),
            last_drop_log: Mutex::new(None),
        }
    }

    pub fn dropped(&self, reason: &str) {
        match reason {
            "spool_full" => self.dropped_full.increment(1),
            "closed" => self.dropped_closed.increment(1),
            _ => self.dropped_error.increment(1),
        }
        self.log_drop(&reason);
    }

    /// One warning per 10 s at most: a drop is never silent, nor a log flood.
    pub fn log_drop(&self, what: &dyn std::fmt::Display) {
        let mut last = self.last_drop_log.lock().expect("drop log lock");
        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(reason = %what, "usage event dropped (see gateway_events_dropped_total)");
        }
    }
}
