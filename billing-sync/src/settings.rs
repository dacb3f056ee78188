//! billing-sync's settings (`config/billing-sync.toml`), parsed and validated without IO.

use std::collections::HashSet;

use serde::Deserialize;
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_runtime::settings::{http_url, in_range, socket_addr, Invalid, Validate};

/// Where the Stripe secret key comes from: never the settings file.
pub const STRIPE_KEY_ENV: &str = "TOLLGATE_STRIPE_API_KEY";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingSettings {
    pub clickhouse: ClickhouseSettings,
    pub stripe: StripeSettings,
    #[serde(default)]
    pub billing: WindowSettings,
    /// Meters pushed to Stripe, one meter event name each.
    pub meters: Vec<MeterSettings>,
    pub admin: AdminSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeSettings {
    /// Stripe API base URL; a stripe-mock address in tests.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// Global cap on Stripe calls per second (test mode allows 25, live mode 1000).
    #[serde(default = "default_max_requests_per_second")]
    pub max_requests_per_second: u32,
    /// Timeout of one Stripe call.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_api_base() -> String {
    "https://api.stripe.com/".to_owned()
}
fn default_max_requests_per_second() -> u32 {
    25
}
fn default_timeout_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSettings {
    /// Length of a billing window; windows are aligned to the epoch (hours to the hour).
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// How long after a window ends it stays open for late events before it is pushed.
    #[serde(default = "default_lateness_secs")]
    pub lateness_secs: u64,
}

impl Default for WindowSettings {
    fn default() -> Self {
        Self {
            window_secs: default_window_secs(),
            lateness_secs: default_lateness_secs(),
        }
    }
}

fn default_window_secs() -> u64 {
    3_600
}
fn default_lateness_secs() -> u64 {
    300
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterSettings {
    /// Tollgate meter name, as in usage events (`requests`, `compute_units`, …).
    pub meter: String,
    /// Stripe meter `event_name` the units are reported under.
    pub event_name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Health, readiness and metrics listener, `ip:port`.
    pub listen: String,
}

impl Validate for BillingSettings {
    fn validate(&self) -> Result<(), Invalid> {
        self.clickhouse.validate("clickhouse")?;
        http_url("stripe.api_base", &self.stripe.api_base)?;
        in_range(
            "stripe.max_requests_per_second",
            u64::from(self.stripe.max_requests_per_second),
            1,
            1_000,
        )?;
        in_range("stripe.timeout_ms", self.stripe.timeout_ms, 100, 120_000)?;
        in_range("billing.window_secs", self.billing.window_secs, 60, 86_400)?;
        if 86_400 % self.billing.window_secs != 0 {
            return Err(Invalid::new(
                "billing.window_secs",
                self.billing.window_secs,
                "a divisor of 86400, so windows align with days",
            ));
        }
        in_range("billing.lateness_secs", self.billing.lateness_secs, 0, 7 * 86_400)?;
        if self.meters.is_empty() {
            return Err(Invalid::new("meters", "[]", "at least one [[meters]] entry"));
        }
        let mut seen = HashSet::new();
        for (i, m) in self.meters.iter().enumerate() {
            if m.meter.is_empty() || !seen.insert(&m.meter) {
                return Err(Invalid::new(format!("meters[{i}].meter"), &m.meter, "a unique, non-empty meter name"));
            }
            // Stripe limits event_name to 100 characters.
            if m.event_name.is_empty() || m.event_name.len() > 100 {
                return Err(Invalid::new(
                    format!("meters[{i}].event_name"),
                    &m.event_name,
                    "a Stripe meter event name of 1 to 100 characters",
                ));
            }
        }
        socket_addr("admin.listen", &self.admin.listen)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tollgate_runtime::settings::from_str_with_env;

    use super::*;

    const EXAMPLE: &str = include_str!("../../config/billing-sync.toml");

    fn load(text: &str) -> Result<BillingSettings, String> {
        from_str_with_env(text, "billing-sync.toml", Vec::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn example_config_is_valid() {
        let s = load(EXAMPLE).unwrap();
        assert_eq!(s.stripe.api_base, "http://127.0.0.1:12111/");
        assert_eq!(s.billing.window_secs, 3_600);
        assert!(s.meters.iter().any(|m| m.meter == "compute_units"));
    }

    #[test]
    fn rejects_window_that_does_not_divide_a_day() {
        let err = load(&EXAMPLE.replace("window_secs = 3600", "window_secs = 7000")).unwrap_err();
        assert!(err.contains("setting `billing.window_secs`: found \"7000\", expected a divisor"), "{err}");
    }

    #[test]
    fn rejects_duplicate_meter_and_long_event_name() {
        let dup = format!("{EXAMPLE}\n[[meters]]\nmeter = \"requests\"\nevent_name = \"x\"\n");
        assert!(load(&dup).unwrap_err().contains("meter`: found \"requests\""));
        let long = format!("{EXAMPLE}\n[[meters]]\nmeter = \"bytes\"\nevent_name = \"{}\"\n", "e".repeat(101));
        assert!(load(&long).unwrap_err().contains("1 to 100 characters"));
    }

    #[test]
    fn rejects_rate_above_live_mode_limit() {
        let err = load(&EXAMPLE.replace("max_requests_per_second = 25", "max_requests_per_second = 5000")).unwrap_err();
        assert!(err.contains("setting `stripe.max_requests_per_second`"), "{err}");
    }
}
