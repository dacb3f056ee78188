//! billing-sync's settings (`config/billing-sync.toml`), parsed and validated without IO.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_runtime::kafka::KafkaSettings;
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
    /// The gateway's settings file: every `[[meters]]` entry must be a meter it counts, and
    /// the quota alerts watch its plans' limits (only `[meters]` and `[plans.*]` are read).
    /// Without it neither is known here. Relative: from this file's directory.
    #[serde(default)]
    pub gateway_settings: Option<PathBuf>,
    /// Meters pushed to Stripe, one meter event name each.
    pub meters: Vec<MeterSettings>,
    pub admin: AdminSettings,
    /// The plan catalogue with prices; without it billing-sync only pushes meter events.
    #[serde(default)]
    pub catalogue: Option<CatalogueSettings>,
    /// Stripe customers and subscriptions kept in step with the consumers on the keys topic;
    /// needs `[catalogue]`.
    #[serde(default)]
    pub provisioning: Option<ProvisioningSettings>,
    /// Spend and quota alerts delivered to a webhook; needs `[catalogue]` (prices) and
    /// `[provisioning]` (its keys-topic follower brings the budgets and plans).
    #[serde(default)]
    pub alerts: Option<crate::alerts::settings::AlertsSettings>,
    /// Several instances, one active (`crate::lease`); without it this instance is the only one.
    #[serde(default)]
    pub lease: Option<LeaseSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSettings {
    pub kafka: KafkaSettings,
    /// A topic of one partition that nothing writes to: the group hands it to one member.
    #[serde(default = "default_lease_topic")]
    pub topic: String,
    /// The consumer group every instance of the deployment joins.
    #[serde(default = "default_lease_group")]
    pub group: String,
}

fn default_lease_topic() -> String {
    "tollgate.billing.lease".to_owned()
}

fn default_lease_group() -> String {
    "tollgate-billing-sync".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueSettings {
    /// The catalogue file (`config/plans.toml`); a relative path is read from the directory of
    /// this settings file.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningSettings {
    pub kafka: KafkaSettings,
    /// The compacted keys topic the admin API writes consumers to.
    #[serde(default = "default_keys_topic")]
    pub keys_topic: String,
    /// Consumer metadata field holding the Stripe customer id (the gateway's
    /// `identity.stripe_customer_field`).
    #[serde(default = "default_stripe_customer_field")]
    pub stripe_customer_field: String,
    /// What Stripe does with the price difference when a tenant changes plan mid-period.
    #[serde(default)]
    pub proration_behavior: ProrationBehavior,
    /// How subscription invoices are paid: `send_invoice` needs no payment method on file.
    #[serde(default)]
    pub collection_method: CollectionMethod,
    /// Days a sent invoice is due in (`send_invoice` only).
    #[serde(default = "default_days_until_due")]
    pub days_until_due: u32,
    /// How long a step Stripe refused stays `failed` before it is tried again.
    #[serde(default = "default_retry_failed_secs")]
    pub retry_failed_secs: u64,
}

/// Stripe's `proration_behavior` (<https://docs.stripe.com/billing/subscriptions/prorations>).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProrationBehavior {
    #[default]
    CreateProrations,
    None,
    AlwaysInvoice,
}

impl ProrationBehavior {
    pub fn as_str(self) -> &'static str {
        match self {
            ProrationBehavior::CreateProrations => "create_prorations",
            ProrationBehavior::None => "none",
            ProrationBehavior::AlwaysInvoice => "always_invoice",
        }
    }
}

/// Stripe's `collection_method` for subscriptions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectionMethod {
    #[default]
    SendInvoice,
    ChargeAutomatically,
}

impl CollectionMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CollectionMethod::SendInvoice => "send_invoice",
            CollectionMethod::ChargeAutomatically => "charge_automatically",
        }
    }
}

fn default_keys_topic() -> String {
    tollgate_runtime::topics::KEYS.to_owned()
}
fn default_stripe_customer_field() -> String {
    "stripeCustomerId".to_owned()
}
fn default_days_until_due() -> u32 {
    30
}
fn default_retry_failed_secs() -> u64 {
    3_600
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeSettings {
    /// Stripe API base URL; a stripe-mock address in tests.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// Global cap on Stripe calls per second, retries included (test mode allows 25, live
    /// mode 1000); 0 turns the cap off (benchmarks against stripe-mock only).
    #[serde(default = "default_max_requests_per_second")]
    pub max_requests_per_second: u32,
    /// Timeout of one Stripe call.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Stripe calls in flight at once (never more than one per customer and meter).
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: u32,
    /// Attempts of one push within a pass; a push still failing with a retriable error stays
    /// pending and is retried, same identifier, on the next pass.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with jitter, up to `max_backoff_ms`.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Longest delay between two attempts. A push whose `Retry-After` asks for more is left
    /// pending for a later pass (at least `billing.poll_interval_secs` later).
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
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
fn default_max_concurrent_requests() -> u32 {
    16
}
fn default_max_attempts() -> u32 {
    8
}
fn default_initial_backoff_ms() -> u64 {
    250
}
fn default_max_backoff_ms() -> u64 {
    30_000
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
    /// How often closed windows are looked for.
    #[serde(default = "default_poll_interval_secs")]
    pub poll_interval_secs: u64,
    /// How far back windows are re-checked for late events. Late units in windows Stripe no
    /// longer accepts (older than 35 days) are recorded as adjustments, not pushed.
    #[serde(default = "default_lookback_days")]
    pub lookback_days: u64,
}

impl Default for WindowSettings {
    fn default() -> Self {
        Self {
            window_secs: default_window_secs(),
            lateness_secs: default_lateness_secs(),
            poll_interval_secs: default_poll_interval_secs(),
            lookback_days: default_lookback_days(),
        }
    }
}

fn default_window_secs() -> u64 {
    3_600
}
fn default_lateness_secs() -> u64 {
    300
}
fn default_poll_interval_secs() -> u64 {
    30
}
fn default_lookback_days() -> u64 {
    45
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterSettings {
    /// Tollgate meter name, as in usage events: a built-in one (`requests`, `compute_units`,
    /// …) or one the gateway's settings declare (`[meters.tokens]`).
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
        if let Some(lease) = &self.lease {
            lease.kafka.validate("lease.kafka")?;
            for (field, value) in [("lease.topic", &lease.topic), ("lease.group", &lease.group)] {
                if value.trim().is_empty() || value.contains(char::is_whitespace) {
                    return Err(Invalid::new(field, value, "a Kafka name without spaces"));
                }
            }
        }
        http_url("stripe.api_base", &self.stripe.api_base)?;
        in_range(
            "stripe.max_requests_per_second",
            u64::from(self.stripe.max_requests_per_second),
            0,
            1_000,
        )?;
        in_range("stripe.timeout_ms", self.stripe.timeout_ms, 100, 120_000)?;
        in_range(
            "stripe.max_concurrent_requests",
            u64::from(self.stripe.max_concurrent_requests),
            1,
            1_024,
        )?;
        in_range("stripe.max_attempts", u64::from(self.stripe.max_attempts), 1, 100)?;
        in_range("stripe.initial_backoff_ms", self.stripe.initial_backoff_ms, 1, 60_000)?;
        in_range(
            "stripe.max_backoff_ms",
            self.stripe.max_backoff_ms,
            self.stripe.initial_backoff_ms,
            600_000,
        )?;
        in_range("billing.window_secs", self.billing.window_secs, 60, 86_400)?;
        if 86_400 % self.billing.window_secs != 0 {
            return Err(Invalid::new(
                "billing.window_secs",
                self.billing.window_secs,
                "a divisor of 86400, so windows align with days",
            ));
        }
        in_range("billing.lateness_secs", self.billing.lateness_secs, 0, 7 * 86_400)?;
        in_range("billing.poll_interval_secs", self.billing.poll_interval_secs, 1, 3_600)?;
        in_range("billing.lookback_days", self.billing.lookback_days, 1, 400)?;
        if self.meters.is_empty() {
            return Err(Invalid::new("meters", "[]", "at least one [[meters]] entry"));
        }
        let mut seen = HashSet::new();
        for (i, m) in self.meters.iter().enumerate() {
            // `concurrent` is a limit, never a usage event's unit: nothing would ever be pushed.
            if !tollgate_runtime::meters::valid_name(&m.meter) || m.meter == "concurrent" || !seen.insert(&m.meter) {
                return Err(Invalid::new(
                    format!("meters[{i}].meter"),
                    &m.meter,
                    format!(
                        "a unique meter the gateway counts (requests, compute_units, request_bytes, response_bytes                          or one its [meters] declare): {}",
                        tollgate_runtime::meters::NAME_RULE
                    ),
                ));
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
        if let Some(p) = &self.provisioning {
            if self.catalogue.is_none() {
                return Err(Invalid::new(
                    "provisioning",
                    "a [provisioning] section",
                    "a [catalogue] too: subscriptions need the plans' prices",
                ));
            }
            p.kafka.validate("provisioning.kafka")?;
            tollgate_runtime::topics::validate("provisioning.keys_topic", &p.keys_topic)?;
            if p.stripe_customer_field.is_empty() {
                return Err(Invalid::new(
                    "provisioning.stripe_customer_field",
                    "",
                    "a metadata field name",
                ));
            }
            in_range("provisioning.days_until_due", u64::from(p.days_until_due), 1, 365)?;
            in_range("provisioning.retry_failed_secs", p.retry_failed_secs, 60, 30 * 86_400)?;
        }
        if let Some(a) = &self.alerts {
            if self.catalogue.is_none() || self.provisioning.is_none() {
                return Err(Invalid::new(
                    "alerts",
                    "an [alerts] section",
                    "a [catalogue] (spend is priced with it) and a [provisioning] (its keys topic brings the budgets and plans) too",
                ));
            }
            a.validate("alerts")?;
        }
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

    /// The example with one setting changed; fails if the example no longer has the line, so
    /// a test never checks the unchanged example by mistake.
    fn edited(edits: &[(&str, &str)]) -> String {
        edits.iter().fold(EXAMPLE.to_owned(), |text, (from, to)| {
            assert!(text.contains(from), "config/billing-sync.toml has no `{from}`");
            text.replace(from, to)
        })
    }

    #[test]
    fn alerts_need_the_catalogue_and_the_keys_follower() {
        let alerts = "\n[alerts]\nwebhook_url = \"http://127.0.0.1:9200/alerts\"\n";
        let text = EXAMPLE.replace("\n[log]\n", &format!("{alerts}\n[log]\n"));
        load(&text).expect("the example with alerts");
        let without_provisioning = text.split("[provisioning]").next().unwrap().to_owned() + alerts;
        let err = load(&without_provisioning).unwrap_err();
        assert!(err.contains("alerts") && err.contains("[provisioning]"), "{err}");
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
        let err = load(&edited(&[("window_secs = 3600", "window_secs = 7000")])).unwrap_err();
        assert!(
            err.contains("setting `billing.window_secs`: found \"7000\", expected a divisor"),
            "{err}"
        );
    }

    #[test]
    fn rejects_duplicate_meter_and_long_event_name() {
        let dup = format!("{EXAMPLE}\n[[meters]]\nmeter = \"requests\"\nevent_name = \"x\"\n");
        assert!(load(&dup).unwrap_err().contains("meter`: found \"requests\""));
        let long = format!(
            "{EXAMPLE}\n[[meters]]\nmeter = \"bytes\"\nevent_name = \"{}\"\n",
            "e".repeat(101)
        );
        assert!(load(&long).unwrap_err().contains("1 to 100 characters"));
        for bad in ["Tokens", "ai-tokens", "concurrent", ""] {
            let text = format!("{EXAMPLE}\n[[meters]]\nmeter = \"{bad}\"\nevent_name = \"x\"\n");
            assert!(
                load(&text).unwrap_err().contains("a unique meter the gateway counts"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rejects_backoff_cap_below_first_delay() {
        let text = edited(&[
            ("initial_backoff_ms = 250", "initial_backoff_ms = 500"),
            ("max_backoff_ms = 30000", "max_backoff_ms = 100"),
        ]);
        let err = load(&text).unwrap_err();
        assert!(
            err.contains("setting `stripe.max_backoff_ms`: found \"100\", expected a number from 500"),
            "{err}"
        );
    }

    #[test]
    fn zero_rate_turns_the_cap_off_but_zero_attempts_is_refused() {
        let uncapped = load(&edited(&[(
            "max_requests_per_second = 25",
            "max_requests_per_second = 0",
        )]))
        .unwrap();
        assert_eq!(uncapped.stripe.max_requests_per_second, 0);
        let text = edited(&[("max_attempts = 8", "max_attempts = 0")]);
        assert!(load(&text).unwrap_err().contains("setting `stripe.max_attempts`"));
    }

    #[test]
    fn provisioning_needs_a_catalogue_and_known_enums() {
        let (head, rest) = EXAMPLE.split_once("[catalogue]").unwrap();
        let without = format!("{head}[provisioning]{}", rest.split_once("[provisioning]").unwrap().1);
        assert!(
            load(&without).unwrap_err().contains("expected a [catalogue] too"),
            "{}",
            load(&without).unwrap_err()
        );
        let err = load(&edited(&[(
            "proration_behavior = \"create_prorations\"",
            "proration_behavior = \"sometimes\"",
        )]))
        .unwrap_err();
        assert!(err.contains("provisioning.proration_behavior"), "{err}");
    }

    #[test]
    fn rejects_rate_above_live_mode_limit() {
        let err = load(&edited(&[(
            "max_requests_per_second = 25",
            "max_requests_per_second = 5000",
        )]))
        .unwrap_err();
        assert!(err.contains("setting `stripe.max_requests_per_second`"), "{err}");
    }
}
