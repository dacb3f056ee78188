//! Rate limits and quotas: one exact decision over every dimension of a request.
//!
//! In: the consumer's plan limits (with its `metadata.limits` overrides, [`effective_limits`]),
//! the route's cost per meter, the upstream's reported cost (`x-tollgate-cost`) and the end
//! of each response. Out: a [`Decision`] per request (admit or refuse, and every limit's
//! state), from which [`headers`] renders `RateLimit-Policy`, `RateLimit`, the legacy
//! `ratelimit-*` trio and the 429 problem body.
//!
//! One decision covers all dimensions: every charged counter is checked, and all are
//! committed only when all pass, atomically with respect to other decisions on the same
//! counters; a refusal consumes nothing anywhere. The counting rules are in [`counter`]:
//! never more admitted than a limit in any window, under any concurrency.
//!
//! Backends ([`Limiter`]):
//! - [`LocalLimiter`]: counters in this process, one mutex per counter in sharded maps, the
//!   counters of one decision locked in a fixed order. Exact for ONE gateway. On restart it
//!   loses everything: sliding windows start empty, calendar `day`/`month` quotas start from
//!   zero again (a tenant may use a day's quota twice if the gateway restarts that day),
//!   in-flight counts start at zero. Several gateways with local counters each admit the full
//!   limit.
//! - [`RedisLimiter`]: counters in Redis, one Lua script per decision; exact across gateways
//!   (one clock: the Redis server's). Calendar quotas are keyed by period and expire after the
//!   period ends, so they survive gateway restarts. Redis errors or timeouts apply
//!   `on_redis_error` (open by default) and mark the decision `degraded`.

pub mod counter;
pub mod headers;
mod local;
mod redis;
pub mod settings;
pub mod spec;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use self::headers::{legacy_headers, policy_header, ratelimit_header, refusal_problem_json, response_headers};
pub use self::local::LocalLimiter;
pub use self::redis::{LimitsMetrics, RedisLimiter};
pub use self::settings::{
    effective_limits, validate_route_cost, Backend, FailPolicy, LimitSettings, LimitsSettings, PlanSettings,
};
pub use self::spec::{calendar_period, Declared, KeyBy, LimitSpec, Meter, Meters, Window};

/// A boxed future, so that `Arc<dyn Limiter>` works.
pub type LimitFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where rate-limit counters live and how a decision is made.
pub trait Limiter: Send + Sync {
    /// Checks every charge and commits all of them only if all pass (a refusal consumes nothing).
    fn decide<'a>(&'a self, charges: &'a [Charge], now_ms: i64) -> LimitFuture<'a, Decision>;
    /// Adds post-response costs unconditionally (the next decision sees them); `concurrent`
    /// charges are ignored.
    fn add<'a>(&'a self, charges: &'a [Charge], now_ms: i64) -> LimitFuture<'a, ()>;
    /// Ends the `concurrent` charges of an admitted request; other charges are ignored. Call it
    /// once per decision that was `allowed` and not `degraded` (nothing was counted otherwise).
    fn release<'a>(&'a self, charges: &'a [Charge]) -> LimitFuture<'a, ()>;
    /// Gives back what an admitted decision at `at_ms` counted (the gateway refused the request
    /// after admitting it: a refusal is never charged); `concurrent` charges are ignored
    /// (`release` ends those). Same call rule as `release`.
    fn refund<'a>(&'a self, charges: &'a [Charge], at_ms: i64) -> LimitFuture<'a, ()>;
    /// Reads every charge's counter without counting anything (costs are ignored): the state a
    /// request would find now, for status pages. `allowed` says whether a request of cost 1
    /// would pass; a failed backend answers `degraded` with no states.
    fn peek<'a>(&'a self, charges: &'a [Charge], now_ms: i64) -> LimitFuture<'a, Decision>;
}

/// `charges` with every cost set to 0: what a peek assembles its answer from.
pub(crate) fn costless(charges: &[Charge]) -> Vec<Charge> {
    charges.iter().map(|c| Charge { cost: 0, ..c.clone() }).collect()
}

/// One dimension of one request: which limit, whose counter, how many units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub spec: Arc<LimitSpec>,
    /// The subject's counter key, e.g. `tenant:t1`, `key:k_123`, `ip:203.0.113.7`.
    pub key: String,
    /// The tenant the request belongs to (its client address when it has none): on Redis
    /// Cluster every counter of one decision lives in this value's hash slot. Shared by the
    /// charges of one request (one allocation, not one per charge).
    pub scope: Arc<str>,
    pub cost: u64,
}

/// The state of one limit after a decision (after the commit when admitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitState {
    pub name: String,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until some quota is given back (0: nothing is in use); at most `window_secs`.
    pub reset_secs: u64,
    /// Window length in seconds (calendar: this period's length; 0 for `concurrent`).
    pub window_secs: u64,
    pub meter: Meter,
}

/// The answer for one request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub allowed: bool,
    /// One entry per charge, in the order of the charges (empty when degraded).
    pub states: Vec<LimitState>,
    /// Names of the limits that refused the request.
    pub violated: Vec<String>,
    /// When a refused request may pass, in whole seconds (rounded up); 0 when allowed.
    pub retry_after_secs: u64,
    /// The backend failed and `on_redis_error` decided.
    pub degraded: bool,
    /// The time the decision counted at, on the backend's clock (what a refund needs).
    pub at_ms: i64,
}

/// Who is asking: the values the `by` of each limit picks from.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub tenant: &'a str,
    pub key: &'a str,
    pub ip: &'a str,
}

impl Subject<'_> {
    /// The counter key for a limit keyed `by`: `tenant:<id>`, `key:<id>` or `ip:<addr>`.
    pub fn key_for(&self, by: KeyBy) -> String {
        let id = match by {
            KeyBy::Tenant => self.tenant,
            KeyBy::Key => self.key,
            KeyBy::Ip => self.ip,
        };
        format!("{}:{id}", by.as_str())
    }

    /// What [`Charge::scope`] holds: the tenant, or the address of a request without one.
    pub fn scope(&self) -> &str {
        if self.tenant.is_empty() {
            self.ip
        } else {
            self.tenant
        }
    }
}

/// Units a request is charged before it is proxied: the route's cost table (meter name →
/// units), `requests` = 1 unless the route says otherwise, `request_bytes` = the body length
/// when known, and 1 `concurrent`. Unknown meter names are skipped (validated at load).
pub fn upfront_units(
    route_cost: &BTreeMap<String, u64>,
    meters: &Meters,
    request_bytes: Option<u64>,
) -> BTreeMap<Meter, u64> {
    let mut units = BTreeMap::from([(Meter::Requests, 1), (Meter::Concurrent, 1)]);
    if let Some(bytes) = request_bytes {
        units.insert(Meter::RequestBytes, bytes);
    }
    for (name, &n) in route_cost {
        if let Some(meter) = meters.countable(name) {
            units.insert(meter, n);
        }
    }
    units
}

/// One charge per limit, with the units of its meter (0 when the request has none, so that a
/// used-up quota still refuses).
pub fn charges(specs: &[Arc<LimitSpec>], subject: &Subject<'_>, units: &BTreeMap<Meter, u64>) -> Vec<Charge> {
    let scope: Arc<str> = Arc::from(subject.scope());
    specs
        .iter()
        .map(|spec| Charge {
            spec: spec.clone(),
            key: subject.key_for(spec.by),
            scope: scope.clone(),
            cost: units.get(&spec.meter).copied().unwrap_or(0),
        })
        .collect()
}

/// Post-response charges: only limits whose meter has reported units, with those units.
pub fn charges_after(specs: &[Arc<LimitSpec>], subject: &Subject<'_>, units: &BTreeMap<Meter, u64>) -> Vec<Charge> {
    charges(specs, subject, units)
        .into_iter()
        .filter(|c| c.cost > 0 && c.spec.meter != Meter::Concurrent)
        .collect()
}

/// Parses an upstream's `x-tollgate-cost` value: `compute_units=42` or
/// `compute_units=42, response_bytes=1000` (`;` also separates). Repeated meters add up. A
/// meter that is neither built in nor declared makes the whole report unusable: counting the
/// rest would bill a partial report as if it were the upstream's word.
pub fn parse_cost_header(value: &str, meters: &Meters) -> Result<BTreeMap<Meter, u64>, CostReportError> {
    let mut units = BTreeMap::new();
    for part in value.split([',', ';']).map(str::trim).filter(|p| !p.is_empty()) {
        let (name, n) = part
            .split_once('=')
            .ok_or_else(|| CostReportError::Malformed(format!("{part:?}: expected <meter>=<units>")))?;
        let n: u64 = n
            .trim()
            .parse()
            .map_err(|_| CostReportError::Malformed(format!("{part:?}: units must be a whole number")))?;
        let meter = meters
            .countable(name.trim())
            .ok_or_else(|| CostReportError::Undeclared(format!("{:?}: not a countable meter", name.trim())))?;
        let slot: &mut u64 = units.entry(meter).or_default();
        *slot = slot.saturating_add(n);
    }
    Ok(units)
}

/// Why an upstream's cost report was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CostReportError {
    #[error("{0}")]
    Malformed(String),
    /// A meter the settings do not declare (or `concurrent`): a typo or an upstream ahead of
    /// the gateway's settings, never billed.
    #[error("{0}")]
    Undeclared(String),
}

impl CostReportError {
    /// The `reason` label of `gateway_reported_cost_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            CostReportError::Malformed(_) => "malformed",
            CostReportError::Undeclared(_) => "undeclared_meter",
        }
    }
}

/// Builds the configured backend; no IO (Redis connects on first use). Call it inside the
/// Tokio runtime.
pub fn build(settings: &LimitsSettings, metrics: LimitsMetrics) -> Result<Arc<dyn Limiter>, LimitsError> {
    Ok(match settings.backend {
        Backend::Local => Arc::new(LocalLimiter::new()),
        Backend::Redis | Backend::RedisCluster => Arc::new(RedisLimiter::new(settings, metrics)?),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("limits.redis_url: {0}")]
    RedisUrl(String),
}

/// The charges of one decision grouped by counter (charges of the same limit and subject add
/// up), sorted by counter id: the fixed order in which counters are locked.
pub(crate) struct Group {
    pub id: String,
    /// The charges' [`Charge::scope`] (one subject's, so the same for every charge).
    pub scope: Arc<str>,
    pub spec: Arc<LimitSpec>,
    pub cost: u64,
    /// Indexes of the charges in this group.
    pub members: Vec<usize>,
}

pub(crate) fn group(charges: &[Charge]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::with_capacity(charges.len());
    for (i, charge) in charges.iter().enumerate() {
        let id = charge.spec.counter_id(&charge.key);
        match groups.iter_mut().find(|g| g.id == id) {
            Some(g) => {
                g.cost = g.cost.saturating_add(charge.cost);
                g.members.push(i);
            }
            None => groups.push(Group {
                id,
                scope: charge.scope.clone(),
                spec: charge.spec.clone(),
                cost: charge.cost,
                members: vec![i],
            }),
        }
    }
    groups.sort_by(|a, b| a.id.cmp(&b.id));
    groups
}

/// Whole seconds, rounded up.
pub(crate) fn ceil_secs(ms: i64) -> u64 {
    (ms.max(0) as u64).div_ceil(1000)
}

/// Assembles a decision from one check per group: `used` before, whether it passed, reset,
/// retry and window in ms.
pub(crate) fn assemble(charges: &[Charge], groups: &[Group], checks: &[counter::Check]) -> Decision {
    let allowed = checks.iter().all(|c| c.passes);
    let mut states: Vec<Option<LimitState>> = vec![None; charges.len()];
    let mut violated = Vec::new();
    let mut retry_ms = 0i64;
    for (g, check) in groups.iter().zip(checks) {
        let used = if allowed {
            check.used.saturating_add(g.cost)
        } else {
            check.used
        };
        let window_secs = ceil_secs(check.window_ms);
        let reset_ms = if allowed && g.cost > 0 && check.reset_ms == 0 {
            // Nothing was counted before this admission: it is given back one window later.
            check.window_ms
        } else {
            check.reset_ms
        };
        if !check.passes {
            violated.push(g.spec.name.clone());
            retry_ms = retry_ms.max(check.retry_ms);
        }
        for &i in &g.members {
            states[i] = Some(LimitState {
                name: g.spec.name.clone(),
                limit: g.spec.limit,
                remaining: g.spec.limit.saturating_sub(used),
                reset_secs: ceil_secs(reset_ms).min(window_secs),
                window_secs,
                meter: g.spec.meter,
            });
        }
    }
    Decision {
        allowed,
        states: states.into_iter().flatten().collect(),
        violated,
        retry_after_secs: if allowed { 0 } else { ceil_secs(retry_ms).max(1) },
        degraded: false,
        at_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_header_parses_meters() {
        let units = parse_cost_header("compute_units=42", &Meters::default()).unwrap();
        assert_eq!(units[&Meter::ComputeUnits], 42);
        let units = parse_cost_header(
            " compute_units = 2, response_bytes=10; compute_units=1",
            &Meters::default(),
        )
        .unwrap();
        assert_eq!(units[&Meter::ComputeUnits], 3);
        assert_eq!(units[&Meter::ResponseBytes], 10);
        assert!(parse_cost_header("tokens=3", &Meters::default()).is_err());
        assert!(parse_cost_header("compute_units=-3", &Meters::default()).is_err());
        assert!(parse_cost_header("concurrent=1", &Meters::default()).is_err());
    }

    #[test]
    fn declared_meters_are_reported_and_charged_by_name() {
        let meters = Meters::declare([("tokens", "tokens")]);
        let tokens = meters.get("tokens").unwrap();
        let units = parse_cost_header("tokens=1234, compute_units=2, tokens=6", &meters).unwrap();
        assert_eq!(units[&tokens], 1240);
        assert_eq!(units[&Meter::ComputeUnits], 2);
        let err = parse_cost_header("tokens=1, tokenz=2", &meters).unwrap_err();
        assert_eq!(err.reason(), "undeclared_meter");
        assert!(err.to_string().contains("tokenz"), "{err}");
        assert_eq!(
            parse_cost_header("tokens=lots", &meters).unwrap_err().reason(),
            "malformed"
        );
        let route = BTreeMap::from([("tokens".to_owned(), 100)]);
        assert_eq!(upfront_units(&route, &meters, None)[&tokens], 100);
        assert!(!upfront_units(&route, &Meters::default(), None).contains_key(&tokens));
    }

    #[test]
    fn upfront_units_and_charges_follow_the_route_and_subject() {
        let route = BTreeMap::from([("compute_units".to_owned(), 5)]);
        let units = upfront_units(&route, &Meters::default(), Some(300));
        assert_eq!(units[&Meter::Requests], 1);
        assert_eq!(units[&Meter::ComputeUnits], 5);
        assert_eq!(units[&Meter::RequestBytes], 300);
        let spec = |name: &str, meter, by| {
            Arc::new(LimitSpec {
                name: name.into(),
                meter,
                window: Window::Day,
                limit: 9,
                by,
            })
        };
        let specs = [
            spec("a", Meter::Requests, KeyBy::Tenant),
            spec("b", Meter::ResponseBytes, KeyBy::Ip),
        ];
        let subject = Subject {
            tenant: "t1",
            key: "k1",
            ip: "203.0.113.7",
        };
        let c = charges(&specs, &subject, &units);
        assert_eq!((c[0].key.as_str(), c[0].cost), ("tenant:t1", 1));
        assert_eq!((c[1].key.as_str(), c[1].cost), ("ip:203.0.113.7", 0));
        let after = charges_after(
            &specs,
            &subject,
            &parse_cost_header("response_bytes=7", &Meters::default()).unwrap(),
        );
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].cost, 7);
    }
}
