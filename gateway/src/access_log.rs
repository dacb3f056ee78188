//! The access log: one line per request (opt-in, sampled), through the service's log output.
//!
//! In: each request's finished usage event (when its response body has been sent, or the
//! client went away) and the `[access_log]` settings. Out: a `tracing` event with target
//! `tollgate::access` at info level, in the service's log format (with `log.format = "json"`,
//! one JSON object per line whose `fields` hold the request's).
//!
//! Built from the usage event, so it carries exactly what the event does: ids, tenant,
//! consumer, key id (never a key), route, method, status, outcome, bytes and latencies.
//! Paths and queries are left out: a client may put anything in them.

use serde::Deserialize;
use tollgate_runtime::settings::Invalid;
use tollgate_schemas::UsageEvent;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSettings {
    /// Off unless set: a busy gateway's access log is a volume operators should choose.
    #[serde(default)]
    pub enabled: bool,
    /// Share of requests logged, 0.0 to 1.0 (decided per request id, so a sampled request's
    /// line is never half there).
    #[serde(default = "default_sample_rate")]
    pub sample_rate: f64,
    /// Requests answered with this status or above are logged whatever the sampling.
    #[serde(default = "default_always_from_status")]
    pub always_from_status: u16,
}

fn default_sample_rate() -> f64 {
    1.0
}

fn default_always_from_status() -> u16 {
    500
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            sample_rate: default_sample_rate(),
            always_from_status: default_always_from_status(),
        }
    }
}

impl AccessLogSettings {
    pub fn validate(&self, field: &str) -> Result<(), Invalid> {
        if !(0.0..=1.0).contains(&self.sample_rate) {
            return Err(Invalid::new(
                format!("{field}.sample_rate"),
                self.sample_rate,
                "a share of requests from 0.0 to 1.0",
            ));
        }
        if !(100..=600).contains(&self.always_from_status) {
            return Err(Invalid::new(
                format!("{field}.always_from_status"),
                self.always_from_status,
                "an HTTP status from 100 to 600 (600: none regardless of sampling)",
            ));
        }
        Ok(())
    }

    /// The logger these settings describe, or `None` when the log is off.
    pub fn logger(&self) -> Option<AccessLog> {
        self.enabled.then(|| AccessLog {
            // Compared with 32 random bits of the event id: rate 1.0 admits all of them.
            threshold: (self.sample_rate * 4_294_967_296.0).round() as u64,
            always_from_status: self.always_from_status,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AccessLog {
    threshold: u64,
    always_from_status: u16,
}

impl AccessLog {
    /// Whether the request of `event` gets a line. UUIDv7's last 62 bits are random.
    pub fn sampled(&self, event: &UsageEvent) -> bool {
        let random = u64::from(event.event_id.as_u128() as u32);
        event.status >= self.always_from_status || random < self.threshold
    }

    pub fn record(&self, event: &UsageEvent) {
        if !self.sampled(event) {
            return;
        }
        tracing::info!(
            target: "tollgate::access",
            request_id = event.request_id.as_deref().unwrap_or_default(),
            tenant = event.tenant_id.as_deref().unwrap_or_default(),
            consumer = event.consumer.as_deref().unwrap_or_default(),
            key_id = event.key_id.as_deref().unwrap_or_default(),
            route = %event.route,
            method = %event.method,
            status = event.status,
            outcome = event.outcome.as_str(),
            billable = event.billable,
            request_bytes = event.request_bytes,
            response_bytes = event.response_bytes,
            latency_ms = event.latency_ms,
            upstream_latency_ms = event.upstream_latency_ms.unwrap_or(-1),
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(status: u16) -> UsageEvent {
        UsageEvent {
            event_id: uuid::Uuid::now_v7(),
            timestamp_ms: 0,
            tenant_id: Some("t1".into()),
            consumer: None,
            key_id: None,
            plan: None,
            route: "v1".into(),
            method: "GET".into(),
            status,
            outcome: tollgate_schemas::Outcome::Allowed,
            billable: true,
            units: Default::default(),
            request_bytes: 0,
            response_bytes: 0,
            latency_ms: 0,
            upstream_latency_ms: None,
            gateway_id: "gw".into(),
            request_id: None,
        }
    }

    fn logger(rate: f64) -> AccessLog {
        AccessLogSettings {
            enabled: true,
            sample_rate: rate,
            ..AccessLogSettings::default()
        }
        .logger()
        .unwrap()
    }

    #[test]
    fn sampling_logs_about_the_share_asked_and_every_error() {
        let n = 20_000;
        let share = |rate: f64, status: u16| (0..n).filter(|_| logger(rate).sampled(&event(status))).count();
        assert_eq!(share(1.0, 200), n);
        assert_eq!(share(0.0, 200), 0);
        assert_eq!(share(0.0, 502), n, "errors are logged whatever the sampling");
        let tenth = share(0.1, 200);
        // Binomial(20000, 0.1): sd ~42; 10 sd either way.
        assert!((1_580..=2_420).contains(&tenth), "{tenth} of {n} at 10 %");
    }

    #[test]
    fn settings_refuse_a_rate_outside_zero_to_one() {
        let bad = AccessLogSettings {
            sample_rate: 1.5,
            ..AccessLogSettings::default()
        };
        assert!(bad
            .validate("access_log")
            .unwrap_err()
            .to_string()
            .contains("access_log.sample_rate"));
        assert!(AccessLogSettings::default().logger().is_none(), "off unless enabled");
    }
}
