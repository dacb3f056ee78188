//! Limit settings: plans' named limits, the backend choice, route costs, and the checked
//! [`LimitSpec`] the limiters work from.
//!
//! In: the `[plans.<plan>]` and `[limits]` tables of the gateway settings, a route's `cost`
//! table and a consumer's `metadata.limits` overrides. Out: validated [`LimitSpec`]s (no IO
//! here; the backends are built in `mod.rs`).

use std::collections::BTreeMap;

use chrono::{Datelike, TimeZone, Utc};
use serde::Deserialize;
use tollgate_runtime::settings::Invalid;

/// Shortest and longest sliding window, in seconds (`1s` … `30d`).
const MIN_WINDOW_SECS: u64 = 1;
const MAX_WINDOW_SECS: u64 = 30 * 86_400;
const DAY_MS: i64 = 86_400_000;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Meter {
    Requests,
    ComputeUnits,
    RequestBytes,
    ResponseBytes,
    /// Requests in flight at once; the window does not apply.
    Concurrent,
}

impl Meter {
    pub const ALL: [Meter; 5] = [
        Meter::Requests,
        Meter::ComputeUnits,
        Meter::RequestBytes,
        Meter::ResponseBytes,
        Meter::Concurrent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Requests => "requests",
            Meter::ComputeUnits => "compute_units",
            Meter::RequestBytes => "request_bytes",
            Meter::ResponseBytes => "response_bytes",
            Meter::Concurrent => "concurrent",
        }
    }

    pub fn parse(name: &str) -> Option<Meter> {
        Meter::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

/// Whose counter a limit uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyBy {
    /// One counter per tenant (consumer), shared by all its keys.
    #[default]
    Tenant,
    /// One counter per API key.
    Key,
    /// One counter per client IP address (for unauthenticated routes).
    Ip,
}

impl KeyBy {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyBy::Tenant => "tenant",
            KeyBy::Key => "key",
            KeyBy::Ip => "ip",
        }
    }
}

/// One plan: the named limits every consumer on it gets.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSettings {
    /// The plan's limits, each checked on every request; names are unique within the plan.
    #[serde(default)]
    pub limits: Vec<LimitSettings>,
}

/// One named limit of a plan, as written in the settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Policy name shown in the `RateLimit` headers and in refusals, e.g. `requests_per_minute`.
    pub name: String,
    /// What is counted: `requests`, `compute_units`, `request_bytes`, `response_bytes` or `concurrent`.
    pub meter: Meter,
    /// Sliding window `<n><s|m|h|d>` from `1s` to `30d`, or the UTC calendar `day` / `month`;
    /// not used (may be left out) for `concurrent`.
    #[serde(default)]
    pub window: String,
    /// Allowance per window (for `concurrent`: requests in flight at once).
    pub limit: u64,
    /// Counter per `tenant` (default), per API `key`, or per client `ip`.
    #[serde(default)]
    pub by: KeyBy,
}

/// The limiter backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Counters in this process: exact for one gateway, lost on restart.
    #[default]
    Local,
    /// Counters in Redis, shared by every gateway using the same `key_prefix`.
    Redis,
}

/// What a decision is when Redis fails or is slower than `redis_timeout_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailPolicy {
    /// Admit the request (unlimited while Redis is down).
    #[default]
    Open,
    /// Refuse the request (503, nothing is admitted while Redis is down).
    Closed,
}

/// The `[limits]` table: where counters live.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    /// `local` (in-process, the default) or `redis` (shared by several gateways).
    #[serde(default)]
    pub backend: Backend,
    /// Redis URL for the `redis` backend.
    #[serde(default = "default_redis_url")]
    pub redis_url: String,
    /// Longest wait for one Redis decision before `on_redis_error` applies, in milliseconds.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// `open` (admit, the default) or `closed` (refuse) when Redis fails or times out.
    #[serde(default)]
    pub on_redis_error: FailPolicy,
    /// Prefix of every Redis key the limiter writes.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".to_owned()
}

fn default_redis_timeout_ms() -> u64 {
    50
}

fn default_key_prefix() -> String {
    "tollgate:rl".to_owned()
}

impl Default for LimitsSettings {
    fn default() -> Self {
        Self {
            backend: Backend::default(),
            redis_url: default_redis_url(),
            redis_timeout_ms: default_redis_timeout_ms(),
            on_redis_error: FailPolicy::default(),
            key_prefix: default_key_prefix(),
        }
    }
}

impl LimitsSettings {
    /// Checks the table without IO; `field` is its dotted path (`limits`).
    pub fn validate(&self, field: &str) -> Result<(), Invalid> {
        if self.backend == Backend::Redis
            && !(self.redis_url.starts_with("redis://") || self.redis_url.starts_with("rediss://"))
        {
            return Err(Invalid::new(
                format!("{field}.redis_url"),
                &self.redis_url,
                "a redis:// or rediss:// URL",
            ));
        }
        if !(1..=10_000).contains(&self.redis_timeout_ms) {
            return Err(Invalid::new(
                format!("{field}.redis_timeout_ms"),
                self.redis_timeout_ms,
                "1 to 10000 milliseconds",
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.chars().any(|c| c.is_whitespace()) {
            return Err(Invalid::new(
                format!("{field}.key_prefix"),
                &self.key_prefix,
                "a non-empty prefix without spaces",
            ));
        }
        Ok(())
    }
}

/// How long a limit's counting lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// Any interval of this many seconds (sliding).
    Sliding { secs: u64 },
    /// The UTC calendar day.
    Day,
    /// The UTC calendar month.
    Month,
    /// No window: in-flight count (`concurrent`).
    InFlight,
}

impl Window {
    /// Parses `<n><s|m|h|d>` (1 s … 30 d), `day` or `month`; the message says what is allowed.
    pub fn parse(text: &str) -> Result<Window, &'static str> {
        const EXPECTED: &str = "a window from 1s to 30d as <n><s|m|h|d>, or `day` or `month`";
        match text {
            "day" => return Ok(Window::Day),
            "month" => return Ok(Window::Month),
            _ => {}
        }
        let split = text
            .len()
            .checked_sub(1)
            .filter(|&i| text.is_char_boundary(i))
            .ok_or(EXPECTED)?;
        let (digits, unit) = text.split_at(split);
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => return Err(EXPECTED),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(EXPECTED);
        }
        let n: u64 = digits.parse().map_err(|_| EXPECTED)?;
        let secs = n.checked_mul(unit_secs).ok_or(EXPECTED)?;
        if !(MIN_WINDOW_SECS..=MAX_WINDOW_SECS).contains(&secs) {
            return Err(EXPECTED);
        }
        Ok(Window::Sliding { secs })
    }

    /// Stable text for counter keys: `60s`, `day`, `month`, `inflight`.
    pub fn code(&self) -> String {
        match self {
            Window::Sliding { secs } => format!("{secs}s"),
            Window::Day => "day".to_owned(),
            Window::Month => "month".to_owned(),
            Window::InFlight => "inflight".to_owned(),
        }
    }
}

/// UTC calendar period `[start, end)` in epoch milliseconds holding `now_ms` (day or month).
pub fn calendar_period(window: Window, now_ms: i64) -> (i64, i64) {
    let day = now_ms.div_euclid(DAY_MS);
    match window {
        Window::Month => {
            let date = Utc
                .timestamp_millis_opt(day * DAY_MS)
                .single()
                .unwrap_or_default()
                .date_naive();
            let start = date.with_day(1).unwrap_or(date);
            let next = if start.month() == 12 {
                start.with_year(start.year() + 1).and_then(|d| d.with_month(1))
            } else {
                start.with_month(start.month() + 1)
            }
            .unwrap_or(start);
            let ms = |d: chrono::NaiveDate| d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc().timestamp_millis();
            (ms(start), ms(next))
        }
        _ => (day * DAY_MS, (day + 1) * DAY_MS),
    }
}

/// One checked limit, shared by the decisions that charge it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    /// Policy name (unique within the plan).
    pub name: String,
    pub meter: Meter,
    pub window: Window,
    /// Allowance per window, or in flight for `concurrent`.
    pub limit: u64,
    pub by: KeyBy,
}

impl LimitSpec {
    /// Checks one limit as written; `field` is its dotted path (`plans.free.limits[0]`).
    pub fn from_settings(field: &str, settings: &LimitSettings) -> Result<LimitSpec, Invalid> {
        let name = &settings.name;
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(Invalid::new(
                format!("{field}.name"),
                name,
                "1 to 64 characters from A-Z a-z 0-9 _ - .",
            ));
        }
        let window = if settings.meter == Meter::Concurrent {
            Window::InFlight
        } else {
            Window::parse(&settings.window)
                .map_err(|expected| Invalid::new(format!("{field}.window"), &settings.window, expected))?
        };
        Ok(LimitSpec {
            name: name.clone(),
            meter: settings.meter,
            window,
            limit: settings.limit,
            by: settings.by,
        })
    }

    /// The counter's identity below the backend's prefix: name, meter, window and subject key.
    /// Changing a limit's allowance keeps its counter; changing its window or meter does not.
    pub fn counter_id(&self, key: &str) -> String {
        format!("{}:{}:{}:{}", self.name, self.meter.as_str(), self.window.code(), key)
    }
}

impl PlanSettings {
    /// Checks every limit; `field` is the plan's dotted path (`plans.free`).
    pub fn validate(&self, field: &str) -> Result<(), Invalid> {
        self.specs(field).map(|_| ())
    }

    /// The plan's limits as checked specs.
    pub fn specs(&self, field: &str) -> Result<Vec<LimitSpec>, Invalid> {
        let mut specs: Vec<LimitSpec> = Vec::with_capacity(self.limits.len());
        for (i, limit) in self.limits.iter().enumerate() {
            let at = format!("{field}.limits[{i}]");
            let spec = LimitSpec::from_settings(&at, limit)?;
            if specs.iter().any(|s| s.name == spec.name) {
                return Err(Invalid::new(
                    format!("{at}.name"),
                    &spec.name,
                    "a name not used by another limit of the plan",
                ));
            }
            specs.push(spec);
        }
        Ok(specs)
    }
}

/// Checks a route's `cost` table (meter → units per request); `field` is its dotted path.
pub fn validate_route_cost(field: &str, cost: &BTreeMap<String, u64>) -> Result<(), Invalid> {
    for name in cost.keys() {
        match Meter::parse(name) {
            Some(Meter::Concurrent) | None => {
                return Err(Invalid::new(
                    format!("{field}.{name}"),
                    name,
                    "one of requests, compute_units, request_bytes, response_bytes",
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The plan's limits with a consumer's overrides applied.
///
/// `metadata` is the consumer's metadata object; its `limits` member (if any) maps a limit
/// name to a new allowance: `{"limits": {"requests_per_minute": 20000}}`. Unknown names and
/// values that are not whole numbers are errors (a typo in a deal must not pass silently).
pub fn effective_limits(plan: &PlanSettings, metadata: &serde_json::Value) -> Result<Vec<LimitSpec>, String> {
    let mut specs = plan.specs("plan").map_err(|e| e.to_string())?;
    let overrides = match metadata.get("limits") {
        None | Some(serde_json::Value::Null) => return Ok(specs),
        Some(serde_json::Value::Object(map)) => map,
        Some(other) => {
            return Err(format!(
                "metadata.limits: found {other}, expected an object of limit name to allowance"
            ))
        }
    };
    for (name, value) in overrides {
        let Some(spec) = specs.iter_mut().find(|s| &s.name == name) else {
            return Err(format!("metadata.limits.{name}: the plan has no limit of that name"));
        };
        spec.limit = value
            .as_u64()
            .ok_or_else(|| format!("metadata.limits.{name}: found {value}, expected a whole number ≥ 0"))?;
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(toml_text: &str) -> PlanSettings {
        toml::from_str(toml_text).expect("plan parses")
    }

    /// The four seed plans as the example config ships them (copy of the reply to the lead).
    const SEED_PLANS: &str = r#"
[limits]
backend = "local"
on_redis_error = "open"

[[plans.free.limits]]
name = "requests_per_minute"
meter = "requests"
window = "1m"
limit = 100

[[plans.free.limits]]
name = "compute_units_per_day"
meter = "compute_units"
window = "day"
limit = 10000

[[plans.starter.limits]]
name = "requests_per_minute"
meter = "requests"
window = "1m"
limit = 500

[[plans.starter.limits]]
name = "compute_units_per_day"
meter = "compute_units"
window = "day"
limit = 100000

[[plans.professional.limits]]
name = "requests_per_minute"
meter = "requests"
window = "1m"
limit = 2000

[[plans.professional.limits]]
name = "compute_units_per_day"
meter = "compute_units"
window = "day"
limit = 1000000

[[plans.enterprise.limits]]
name = "requests_per_minute"
meter = "requests"
window = "1m"
limit = 10000

[[plans.enterprise.limits]]
name = "compute_units_per_day"
meter = "compute_units"
window = "day"
limit = 10000000
"#;

    #[test]
    fn the_seed_plans_parse_and_validate() {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Seed {
            limits: LimitsSettings,
            plans: BTreeMap<String, PlanSettings>,
        }
        let seed: Seed = toml::from_str(SEED_PLANS).unwrap();
        seed.limits.validate("limits").unwrap();
        let rpm: Vec<(String, u64)> = seed
            .plans
            .iter()
            .map(|(name, plan)| {
                let specs = plan.specs(&format!("plans.{name}")).unwrap();
                assert_eq!(specs[0].window, Window::Sliding { secs: 60 });
                assert_eq!(specs[1].window, Window::Day);
                (name.clone(), specs[0].limit)
            })
            .collect();
        assert_eq!(
            rpm,
            [
                ("enterprise".into(), 10_000),
                ("free".into(), 100),
                ("professional".into(), 2_000),
                ("starter".into(), 500)
            ]
        );
    }

    #[test]
    fn windows_parse_and_reject() {
        assert_eq!(Window::parse("1s"), Ok(Window::Sliding { secs: 1 }));
        assert_eq!(Window::parse("60s"), Ok(Window::Sliding { secs: 60 }));
        assert_eq!(Window::parse("1m"), Ok(Window::Sliding { secs: 60 }));
        assert_eq!(Window::parse("30d"), Ok(Window::Sliding { secs: 30 * 86_400 }));
        assert_eq!(Window::parse("day"), Ok(Window::Day));
        assert_eq!(Window::parse("month"), Ok(Window::Month));
        for bad in [
            "",
            "0s",
            "31d",
            "1w",
            "m",
            "-1s",
            "1.5m",
            "1 m",
            "99999999999999999999d",
            "é",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn calendar_periods_are_utc_days_and_months() {
        let ms = |y, m, d, h| Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap().timestamp_millis();
        assert_eq!(
            calendar_period(Window::Day, ms(2026, 11, 27, 23)),
            (ms(2026, 11, 27, 0), ms(2026, 11, 28, 0))
        );
        assert_eq!(
            calendar_period(Window::Month, ms(2026, 12, 31, 23)),
            (ms(2026, 12, 1, 0), ms(2027, 1, 1, 0))
        );
        assert_eq!(
            calendar_period(Window::Month, ms(2028, 2, 29, 5)),
            (ms(2028, 2, 1, 0), ms(2028, 3, 1, 0))
        );
        assert_eq!(
            calendar_period(Window::Month, ms(2026, 3, 1, 0)),
            (ms(2026, 3, 1, 0), ms(2026, 4, 1, 0))
        );
    }

    #[test]
    fn a_bad_window_names_the_field() {
        let p = plan("[[limits]]\nname = \"rpm\"\nmeter = \"requests\"\nwindow = \"1w\"\nlimit = 5\n");
        let err = p.validate("plans.free").unwrap_err();
        assert_eq!(err.field, "plans.free.limits[0].window");
        assert!(err.to_string().contains("1s to 30d"), "{err}");
    }

    #[test]
    fn duplicate_and_bad_names_are_rejected() {
        let p = plan(
            "[[limits]]\nname = \"a\"\nmeter = \"requests\"\nwindow = \"1m\"\nlimit = 5\n\
             [[limits]]\nname = \"a\"\nmeter = \"compute_units\"\nwindow = \"day\"\nlimit = 5\n",
        );
        assert_eq!(p.validate("plans.x").unwrap_err().field, "plans.x.limits[1].name");
        let p = plan("[[limits]]\nname = \"a b\"\nmeter = \"requests\"\nwindow = \"1m\"\nlimit = 5\n");
        assert!(p
            .validate("plans.x")
            .unwrap_err()
            .to_string()
            .contains("1 to 64 characters"));
    }

    #[test]
    fn unknown_fields_and_meters_fail_to_parse() {
        let bad = "[[limits]]\nname = \"a\"\nmeter = \"requests\"\nwindow = \"1m\"\nlimit = 5\nlimt = 6\n";
        assert!(toml::from_str::<PlanSettings>(bad)
            .unwrap_err()
            .to_string()
            .contains("limt"));
        let bad = "[[limits]]\nname = \"a\"\nmeter = \"tokens\"\nwindow = \"1m\"\nlimit = 5\n";
        assert!(toml::from_str::<PlanSettings>(bad).is_err());
        assert!(toml::from_str::<LimitsSettings>("backend = \"memcached\"\n").is_err());
    }

    #[test]
    fn concurrent_needs_no_window() {
        let p = plan("[[limits]]\nname = \"inflight\"\nmeter = \"concurrent\"\nlimit = 5\nby = \"key\"\n");
        let specs = p.specs("plans.x").unwrap();
        assert_eq!(specs[0].window, Window::InFlight);
        assert_eq!(specs[0].by, KeyBy::Key);
    }

    #[test]
    fn limits_settings_defaults_and_rejections() {
        let s: LimitsSettings = toml::from_str("").unwrap();
        assert_eq!(s, LimitsSettings::default());
        assert_eq!(s.redis_timeout_ms, 50);
        assert_eq!(s.key_prefix, "tollgate:rl");
        s.validate("limits").unwrap();
        let s: LimitsSettings = toml::from_str("backend = \"redis\"\nredis_url = \"http://x\"\n").unwrap();
        assert_eq!(s.validate("limits").unwrap_err().field, "limits.redis_url");
        let s: LimitsSettings = toml::from_str("redis_timeout_ms = 0\n").unwrap();
        assert!(s.validate("limits").unwrap_err().to_string().contains("1 to 10000"));
        let s: LimitsSettings = toml::from_str("key_prefix = \"\"\n").unwrap();
        assert_eq!(s.validate("limits").unwrap_err().field, "limits.key_prefix");
    }

    #[test]
    fn route_cost_names_meters() {
        let mut cost = BTreeMap::new();
        cost.insert("compute_units".to_owned(), 5);
        validate_route_cost("routes[0].cost", &cost).unwrap();
        cost.insert("concurrent".to_owned(), 1);
        assert_eq!(
            validate_route_cost("routes[0].cost", &cost).unwrap_err().field,
            "routes[0].cost.concurrent"
        );
    }

    #[test]
    fn overrides_replace_single_limits_by_name() {
        let p = plan(
            "[[limits]]\nname = \"requests_per_minute\"\nmeter = \"requests\"\nwindow = \"1m\"\nlimit = 10000\n\
             [[limits]]\nname = \"compute_units_per_day\"\nmeter = \"compute_units\"\nwindow = \"day\"\nlimit = 5\n",
        );
        let specs = effective_limits(
            &p,
            &serde_json::json!({"plan": "enterprise", "limits": {"requests_per_minute": 20000}}),
        )
        .unwrap();
        assert_eq!(specs[0].limit, 20000);
        assert_eq!(specs[1].limit, 5);
        assert_eq!(effective_limits(&p, &serde_json::Value::Null).unwrap()[0].limit, 10000);
        let err = effective_limits(&p, &serde_json::json!({"limits": {"rpm": 1}})).unwrap_err();
        assert!(err.contains("metadata.limits.rpm"), "{err}");
        let err = effective_limits(&p, &serde_json::json!({"limits": {"requests_per_minute": "lots"}})).unwrap_err();
        assert!(err.contains("whole number"), "{err}");
        assert!(effective_limits(&p, &serde_json::json!({"limits": 3})).is_err());
    }
}
