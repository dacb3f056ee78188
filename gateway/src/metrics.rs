//! Gateway-wide request metrics, registered on the gateway's own recorder (no global one).
//!
//! In: one call per finished request (its outcome), and the chain's and listener's refusals by
//! reason. Out: `gateway_requests_total{outcome}` and the counters below on `/metrics`. Labels
//! are bounded sets (an outcome, a reason), never a tenant or a key.

use metrics::{Counter, Key, Label, Metadata, Recorder};
use tollgate_schemas::Outcome;

const METADATA: Metadata<'static> = Metadata::new(module_path!(), metrics::Level::INFO, None);

pub struct GatewayMetrics {
    /// Requests by outcome, counted when their usage event is recorded.
    requests: [(Outcome, Counter); 6],
    recorder_counters: std::sync::Mutex<std::collections::HashMap<(&'static str, &'static str), Counter>>,
    recorder: Option<std::sync::Arc<dyn Recorder + Send + Sync>>,
}

impl GatewayMetrics {
    pub fn new(recorder: std::sync::Arc<dyn Recorder + Send + Sync>) -> Self {
        let requests = Outcome::ALL.map(|outcome| {
            let key = Key::from_parts(
                "gateway_requests_total",
                vec![Label::new("outcome", outcome.as_str().to_ascii_lowercase())],
            );
            (outcome, recorder.register_counter(&key, &METADATA))
        });
        Self {
            requests,
            recorder_counters: Default::default(),
            recorder: Some(recorder),
        }
    }

    /// Metrics that go nowhere (benchmarks, tests that do not read them).
    pub fn noop() -> Self {
        Self {
            requests: Outcome::ALL.map(|o| (o, Counter::noop())),
            recorder_counters: Default::default(),
            recorder: None,
        }
    }

    pub fn request(&self, outcome: Outcome) {
        if let Some((_, counter)) = self.requests.iter().find(|(o, _)| *o == outcome) {
            counter.increment(1);
        }
    }

    /// Counts one occurrence of `name{reason}`; `name` and `reason` come from fixed sets in the
    /// code (the bounded label rule), so the map stays small.
    pub fn count(&self, name: &'static str, reason: &'static str) {
        let Some(recorder) = &self.recorder else { return };
        let mut counters = self.recorder_counters.lock().expect("metrics lock");
        counters
            .entry((name, reason))
            .or_insert_with(|| {
                let key = Key::from_parts(name, vec![Label::new("reason", reason)]);
                recorder.register_counter(&key, &METADATA)
            })
            .increment(1);
    }
}
