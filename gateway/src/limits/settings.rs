//! Limit settings: plans' named limits, the backend choice and route costs, as written in the
//! gateway settings, checked into [`LimitSpec`]s.
//!
//! In: the `[plans.<plan>]` and `[limits]` tables of the gateway settings, a route's `cost`
//! table and a consumer's `metadata.limits` overrides. Out: validated [`LimitSpec`]s, or an
//! [`Invalid`] naming the field (no IO here; the backends are built in `mod.rs`).

use std::collections::BTreeMap;

use serde::Deserialize;
use tollgate_runtime::settings::Invalid;

pub use super::spec::calendar_period;
pub use super::spec::{KeyBy, LimitSpec, Meter, Meters, Window};

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
    /// What is counted: `requests`, `compute_units`, `request_bytes`, `response_bytes`,
    /// `concurrent`, or a meter declared in `[meters]`.
    pub meter: String,
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
    /// Counters in a Redis Cluster (`redis_url` lists seed nodes, comma-separated): one
    /// decision's counters share a hash slot, the tenant's.
    RedisCluster,
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
    /// Redis URL for the `redis` backend; for `redis_cluster`, one or more seed nodes'
    /// URLs separated by commas (the client learns the rest of the cluster from them).
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
    /// Most units an upstream may report for one meter of one request in `x-tollgate-cost`;
    /// a report above it (or malformed) is counted in `gateway_reported_cost_rejected_total`
    /// and the route's cost applies instead.
    #[serde(default = "default_max_reported_units")]
    pub max_reported_units: u64,
}

/// `url` (or a comma-separated list of URLs) with any password replaced, for error messages.
fn without_password(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => format!("{}://***{}", &one[..scheme], &one[at..]),
            _ => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn default_max_reported_units() -> u64 {
    1_000_000
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
            max_reported_units: default_max_reported_units(),
        }
    }
}

impl LimitsSettings {
    /// The seed nodes of `redis_url` for the `redis_cluster` backend.
    pub fn redis_nodes(&self) -> impl Iterator<Item = &str> {
        self.redis_url.split(',').map(str::trim)
    }

    /// Checks the table without IO; `field` is its dotted path (`limits`).
    pub fn validate(&self, field: &str) -> Result<(), Invalid> {
        let redis_url = |url: &str| url.starts_with("redis://") || url.starts_with("rediss://");
        match self.backend {
            Backend::Local => {}
            Backend::Redis if !redis_url(&self.redis_url) => {
                return Err(Invalid::new(
                    format!("{field}.redis_url"),
                    without_password(&self.redis_url),
                    "a redis:// or rediss:// URL",
                ));
            }
            Backend::Redis => {}
            Backend::RedisCluster => {
                if !self.redis_nodes().all(redis_url) {
                    return Err(Invalid::new(
                        format!("{field}.redis_url"),
                        without_password(&self.redis_url),
                        "redis:// or rediss:// URLs of cluster nodes, separated by commas",
                    ));
                }
                // A brace in the prefix would move the hash tag off the tenant.
                if self.key_prefix.contains(['{', '}']) {
                    return Err(Invalid::new(
                        format!("{field}.key_prefix"),
                        &self.key_prefix,
                        "no { or } on Redis Cluster (the limiter puts the tenant in braces)",
                    ));
                }
            }
        }
        if !(1..=10_000).contains(&self.redis_timeout_ms) {
            return Err(Invalid::new(
                format!("{field}.redis_timeout_ms"),
                self.redis_timeout_ms,
                "1 to 10000 milliseconds",
            ));
        }
        if !(1..=1_000_000_000_000).contains(&self.max_reported_units) {
            return Err(Invalid::new(
                format!("{field}.max_reported_units"),
                self.max_reported_units,
                "1 to 10^12 units",
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

impl LimitSettings {
    /// Checks one limit as written; `field` is its dotted path (`plans.free.limits[0]`).
    pub fn spec(&self, field: &str, meters: &Meters) -> Result<LimitSpec, Invalid> {
        let name = &self.name;
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
        let meter = meters.get(&self.meter).ok_or_else(|| {
            Invalid::new(
                format!("{field}.meter"),
                &self.meter,
                format!("concurrent or a countable meter ({})", meters.countable_names()),
            )
        })?;
        let window = if meter == Meter::Concurrent {
            Window::InFlight
        } else {
            Window::parse(&self.window)
                .map_err(|expected| Invalid::new(format!("{field}.window"), &self.window, expected))?
        };
        Ok(LimitSpec {
            name: name.clone(),
            meter,
            window,
            limit: self.limit,
            by: self.by,
        })
    }
}

impl PlanSettings {
    /// Checks every limit; `field` is the plan's dotted path (`plans.free`).
    pub fn validate(&self, field: &str, meters: &Meters) -> Result<(), Invalid> {
        self.specs(field, meters).map(|_| ())
    }

    /// The plan's limits as checked specs.
    pub fn specs(&self, field: &str, meters: &Meters) -> Result<Vec<LimitSpec>, Invalid> {
        let mut specs: Vec<LimitSpec> = Vec::with_capacity(self.limits.len());
        for (i, limit) in self.limits.iter().enumerate() {
            let at = format!("{field}.limits[{i}]");
            let spec = limit.spec(&at, meters)?;
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
pub fn validate_route_cost(field: &str, cost: &BTreeMap<String, u64>, meters: &Meters) -> Result<(), Invalid> {
    for name in cost.keys() {
        if meters.countable(name).is_none() {
            return Err(Invalid::new(
                format!("{field}.{name}"),
                name,
                format!("a countable meter ({})", meters.countable_names()),
            ));
        }
    }
    Ok(())
}

/// The plan's limits with a consumer's overrides applied.
///
/// `metadata` is the consumer's metadata object; its `limits` member (if any) maps a limit
/// name to a new allowance: `{"limits": {"requests_per_minute": 20000}}`. Unknown names and
/// values that are not whole numbers are errors (a typo in a deal must not pass silently).
pub fn effective_limits(
    plan: &PlanSettings,
    meters: &Meters,
    metadata: &serde_json::Value,
) -> Result<Vec<LimitSpec>, Invalid> {
    let mut specs = plan.specs("plan", meters)?;
    let overrides = match metadata.get("limits") {
        None | Some(serde_json::Value::Null) => return Ok(specs),
        Some(serde_json::Value::Object(map)) => map,
        Some(other) => {
            return Err(Invalid::new(
                "metadata.limits",
                other,
                "an object of limit name to allowance",
            ))
        }
    };
    for (name, value) in overrides {
        let field = format!("metadata.limits.{name}");
        let Some(spec) = specs.iter_mut().find(|s| &s.name == name) else {
            let known: Vec<&str> = plan.limits.iter().map(|l| l.name.as_str()).collect();
            return Err(Invalid::new(
                field,
                name,
                format!("the name of a limit of the plan ({})", known.join(", ")),
            ));
        };
        spec.limit = value
            .as_u64()
            .ok_or_else(|| Invalid::new(field, value, "a whole number ≥ 0"))?;
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(toml_text: &str) -> PlanSettings {
        toml::from_str(toml_text).expect("plan parses")
    }

    #[test]
    fn the_example_configs_seed_plans_parse_and_validate() {
        let settings: crate::GatewaySettings = tollgate_runtime::settings::from_str_with_env(
            include_str!("../../../config/gateway.toml"),
            "config/gateway.toml",
            Vec::new(),
        )
        .expect("the example config loads");
        settings.limits.validate("limits").unwrap();
        let rpm: Vec<(String, u64)> = settings
            .plans
            .iter()
            .map(|(name, plan)| {
                let specs = plan.specs(&format!("plans.{name}"), &settings.meters).unwrap();
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
    fn a_bad_window_names_the_field() {
        let p = plan("[[limits]]\nname = \"rpm\"\nmeter = \"requests\"\nwindow = \"1w\"\nlimit = 5\n");
        let err = p.validate("plans.free", &Meters::default()).unwrap_err();
        assert_eq!(err.field, "plans.free.limits[0].window");
        assert!(err.to_string().contains("1s to 30d"), "{err}");
    }

    #[test]
    fn duplicate_and_bad_names_are_rejected() {
        let p = plan(
            "[[limits]]\nname = \"a\"\nmeter = \"requests\"\nwindow = \"1m\"\nlimit = 5\n\
             [[limits]]\nname = \"a\"\nmeter = \"compute_units\"\nwindow = \"day\"\nlimit = 5\n",
        );
        assert_eq!(
            p.validate("plans.x", &Meters::default()).unwrap_err().field,
            "plans.x.limits[1].name"
        );
        let p = plan("[[limits]]\nname = \"a b\"\nmeter = \"requests\"\nwindow = \"1m\"\nlimit = 5\n");
        assert!(p
            .validate("plans.x", &Meters::default())
            .unwrap_err()
            .to_string()
            .contains("1 to 64 characters"));
    }

    #[test]
    fn unknown_fields_fail_to_parse() {
        let bad = "[[limits]]\nname = \"a\"\nmeter = \"requests\"\nwindow = \"1m\"\nlimit = 5\nlimt = 6\n";
        assert!(toml::from_str::<PlanSettings>(bad)
            .unwrap_err()
            .to_string()
            .contains("limt"));
        assert!(toml::from_str::<LimitsSettings>("backend = \"memcached\"\n").is_err());
    }

    #[test]
    fn a_limit_counts_only_a_built_in_or_declared_meter() {
        let p = plan("[[limits]]\nname = \"tokens_per_day\"\nmeter = \"tokens\"\nwindow = \"day\"\nlimit = 5\n");
        let err = p.validate("plans.x", &Meters::default()).unwrap_err();
        assert_eq!(err.field, "plans.x.limits[0].meter");
        assert!(err.expected.contains("compute_units"), "{err}");
        let meters = Meters::declare([("tokens", "tokens")]);
        let specs = p.specs("plans.x", &meters).unwrap();
        assert_eq!(specs[0].meter, meters.get("tokens").unwrap());
        assert_eq!(specs[0].meter.as_str(), "tokens");
        assert_eq!(specs[0].window, Window::Day);
    }

    #[test]
    fn declarations_are_checked() {
        for (name, unit, field) in [
            ("requests", "requests", "meters.requests"),
            ("Tokens", "tokens", "meters.Tokens"),
            ("9tokens", "tokens", "meters.9tokens"),
            ("to-kens", "tokens", "meters.to-kens"),
            ("tokens", "", "meters.tokens.unit"),
            ("tokens", "a \"quoted\" unit", "meters.tokens.unit"),
            ("tokens", "tab\tunit", "meters.tokens.unit"),
        ] {
            let err = Meters::declare([(name, unit)]).validate("meters").unwrap_err();
            assert_eq!(err.field, field, "{name:?} {unit:?}");
        }
        let meters = Meters::declare([("tokens", "tokens"), ("premium_calls", "premium calls")]);
        meters.validate("meters").unwrap();
        assert_eq!(
            meters.countable_names(),
            "requests, compute_units, request_bytes, response_bytes, premium_calls, tokens"
        );
        assert!(meters.countable("concurrent").is_none());
        assert!(meters.countable("tokenz").is_none());
        // One declaration, one interned copy, however often the settings are read.
        let again = Meters::declare([("tokens", "tokens")]);
        let (Some(Meter::Custom(a)), Some(Meter::Custom(b))) = (meters.get("tokens"), again.get("tokens")) else {
            panic!("tokens is declared");
        };
        assert!(std::ptr::eq(a, b));
    }

    #[test]
    fn concurrent_needs_no_window() {
        let p = plan("[[limits]]\nname = \"inflight\"\nmeter = \"concurrent\"\nlimit = 5\nby = \"key\"\n");
        let specs = p.specs("plans.x", &Meters::default()).unwrap();
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
    fn cluster_settings_list_seed_nodes_and_keep_braces_out_of_the_prefix() {
        let s: LimitsSettings = toml::from_str(
            "backend = \"redis_cluster\"\nredis_url = \"redis://127.0.0.1:7000, redis://127.0.0.1:7001\"\n",
        )
        .unwrap();
        s.validate("limits").unwrap();
        assert_eq!(
            s.redis_nodes().collect::<Vec<_>>(),
            ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        );
        let s: LimitsSettings =
            toml::from_str("backend = \"redis_cluster\"\nredis_url = \"redis://127.0.0.1:7000,127.0.0.1:7001\"\n")
                .unwrap();
        assert_eq!(s.validate("limits").unwrap_err().field, "limits.redis_url");
        let s: LimitsSettings = toml::from_str("backend = \"redis_cluster\"\nkey_prefix = \"rl:{all}\"\n").unwrap();
        assert_eq!(s.validate("limits").unwrap_err().field, "limits.key_prefix");
    }

    #[test]
    fn a_refused_redis_url_never_shows_its_password() {
        let s: LimitsSettings = toml::from_str(
            "backend = \"redis_cluster\"\nredis_url = \"redis://:hunter2@127.0.0.1:7000,http://u:pw2@x\"\n",
        )
        .unwrap();
        let message = s.validate("limits").unwrap_err().to_string();
        assert!(!message.contains("hunter2") && !message.contains("pw2"), "{message}");
        assert!(message.contains("redis://***@127.0.0.1:7000"), "{message}");
    }

    #[test]
    fn route_cost_names_meters() {
        let mut cost = BTreeMap::new();
        cost.insert("compute_units".to_owned(), 5);
        validate_route_cost("routes[0].cost", &cost, &Meters::default()).unwrap();
        let tokens = BTreeMap::from([("tokens".to_owned(), 5)]);
        assert_eq!(
            validate_route_cost("routes[0].cost", &tokens, &Meters::default())
                .unwrap_err()
                .field,
            "routes[0].cost.tokens"
        );
        validate_route_cost("routes[0].cost", &tokens, &Meters::declare([("tokens", "tokens")])).unwrap();
        cost.insert("concurrent".to_owned(), 1);
        assert_eq!(
            validate_route_cost("routes[0].cost", &cost, &Meters::default())
                .unwrap_err()
                .field,
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
            &Meters::default(),
            &serde_json::json!({"plan": "enterprise", "limits": {"requests_per_minute": 20000}}),
        )
        .unwrap();
        assert_eq!(specs[0].limit, 20000);
        assert_eq!(specs[1].limit, 5);
        assert_eq!(
            effective_limits(&p, &Meters::default(), &serde_json::Value::Null).unwrap()[0].limit,
            10000
        );
        let err = effective_limits(&p, &Meters::default(), &serde_json::json!({"limits": {"rpm": 1}})).unwrap_err();
        assert_eq!(err.field, "metadata.limits.rpm");
        assert!(err.expected.contains("requests_per_minute"), "{err}");
        let err = effective_limits(
            &p,
            &Meters::default(),
            &serde_json::json!({"limits": {"requests_per_minute": "lots"}}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("whole number"), "{err}");
        assert!(effective_limits(&p, &Meters::default(), &serde_json::json!({"limits": 3})).is_err());
    }
}
