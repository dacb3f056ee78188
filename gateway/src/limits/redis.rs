//! The Redis backend: counters shared by every gateway, one Lua script (`decide.lua`) per
//! decision covering all dimensions atomically.
//!
//! In: charges from the request chain. Out: decisions; counters under `key_prefix` in Redis.
//! Each call waits at most `redis_timeout_ms` (connection included); on an error or timeout
//! the decision is `on_redis_error` (admit by default) with `degraded = true`, counted in
//! `gateway_limits_redis_errors_total{op}` and logged at most once per 10 s. Time is the Redis
//! server's clock (`TIME`), the same for every gateway, unless [`RedisLimiter::with_caller_clock`].
//!
//! In-flight (`concurrent`) counters expire 10 minutes after their last admission, so a
//! gateway that dies with requests in flight cannot block a tenant for longer than that.
//!
//! On Redis Cluster (`backend = "redis_cluster"`) a script may only touch keys of one hash
//! slot, so every key is `<prefix>:{<scope>}:<counter>`: the braces put all counters of a
//! tenant (or, on routes without one, of an address) in one slot, and a decision stays one
//! atomic script on one master. The cluster client follows MOVED and ASK redirections and
//! reloads the slot map after a failover. The exactness argument is the single node's, per
//! slot; what a failover may lose is in docs/ARCHITECTURE.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::Counter;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::RedisFuture;

use super::counter::{bucket_ms, Check};
use super::settings::{Backend, FailPolicy, LimitsSettings};
use super::spec::Window;
use super::{assemble, group, Charge, Decision, Group, LimitFuture, Limiter, LimitsError};

/// Shortest gap between two "Redis failed" log lines.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The limiter's metrics, registered with the recorder passed in (never a global one).
#[derive(Clone)]
pub struct LimitsMetrics {
    decide_errors: Counter,
    add_errors: Counter,
    release_errors: Counter,
    refund_errors: Counter,
    peek_errors: Counter,
}

impl LimitsMetrics {
    pub fn new(recorder: &dyn metrics::Recorder) -> Self {
        metrics::with_local_recorder(recorder, || {
            metrics::describe_counter!(
                "gateway_limits_redis_errors_total",
                "Rate-limit operations that failed or timed out on Redis, by operation (decide: on_redis_error applied)."
            );
            Self {
                decide_errors: metrics::counter!("gateway_limits_redis_errors_total", "op" => "decide"),
                add_errors: metrics::counter!("gateway_limits_redis_errors_total", "op" => "add"),
                release_errors: metrics::counter!("gateway_limits_redis_errors_total", "op" => "release"),
                refund_errors: metrics::counter!("gateway_limits_redis_errors_total", "op" => "refund"),
                peek_errors: metrics::counter!("gateway_limits_redis_errors_total", "op" => "peek"),
            }
        })
    }

    /// Metrics that go nowhere (tests, benchmarks).
    pub fn noop() -> Self {
        Self {
            decide_errors: Counter::noop(),
            add_errors: Counter::noop(),
            release_errors: Counter::noop(),
            refund_errors: Counter::noop(),
            peek_errors: Counter::noop(),
        }
    }
}

/// One Redis server, or a cluster whose client routes each script to the master of its slot.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Either connection runs a script the same way; the cluster one also follows MOVED and ASK.
impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

pub struct RedisLimiter {
    connection: Connection,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    policy: FailPolicy,
    caller_clock: bool,
    metrics: LimitsMetrics,
    started: Instant,
    /// Milliseconds after `started` of the last warning (0: none yet).
    last_warn_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RedisLimiter {
    /// No IO: the connection is made on first use (and remade after failures). Call it inside
    /// the Tokio runtime (the connection manager spawns its task there).
    pub fn new(settings: &LimitsSettings, metrics: LimitsMetrics) -> Result<Self, LimitsError> {
        let timeout = Duration::from_millis(settings.redis_timeout_ms);
        let url_error = |e: redis::RedisError| LimitsError::RedisUrl(e.to_string());
        let connection = if settings.backend == Backend::RedisCluster {
            let client = ClusterClient::builder(settings.redis_nodes())
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(500)
                .build()
                .map_err(url_error)?;
            let config = ClusterConfig::new()
                .set_connection_timeout(timeout)
                .set_response_timeout(timeout);
            Connection::Cluster(client.get_pending_async_connection_with_config(config))
        } else {
            let client = redis::Client::open(settings.redis_url.as_str()).map_err(url_error)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(10))
                .set_max_delay(Duration::from_millis(500));
            Connection::Single(ConnectionManager::new_lazy_with_config(client, config).map_err(url_error)?)
        };
        Ok(Self {
            connection,
            script: redis::Script::new(include_str!("decide.lua")),
            prefix: settings.key_prefix.clone(),
            timeout,
            policy: settings.on_redis_error,
            caller_clock: false,
            metrics,
            started: Instant::now(),
            last_warn_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        })
    }

    /// Uses the `now_ms` callers pass instead of the Redis server's clock (tests, benchmarks).
    pub fn with_caller_clock(mut self) -> Self {
        self.caller_clock = true;
        self
    }

    /// Runs the script for `groups`; the reply's integers, or why not.
    async fn run(&self, mode: &str, groups: &[Group], now_ms: i64) -> Result<Vec<i64>, String> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(mode);
        // A refund names the decision's own time, whichever clock decided.
        if self.caller_clock || mode == "refund" {
            invocation.arg(now_ms);
        } else {
            invocation.arg("");
        }
        for g in groups {
            let (kind, window_ms, bucket) = match g.spec.window {
                Window::Sliding { secs } => ("s", secs.saturating_mul(1000) as i64, bucket_ms(secs)),
                Window::Day => ("d", 0, 0),
                Window::Month => ("m", 0, 0),
                Window::InFlight => ("c", 0, 0),
            };
            match self.connection {
                Connection::Single(_) => invocation.key(format!("{}:{}", self.prefix, g.id)),
                Connection::Cluster(_) => invocation.key(cluster_key(&self.prefix, &g.scope, &g.id)),
            };
            invocation
                .arg(kind)
                .arg(window_ms)
                .arg(bucket)
                .arg(g.spec.limit)
                .arg(g.cost);
        }
        let mut connection = self.connection.clone();
        let reply = tokio::time::timeout(self.timeout, invocation.invoke_async::<Vec<i64>>(&mut connection)).await;
        match reply {
            Ok(Ok(reply)) if reply.len() >= 2 => Ok(reply),
            Ok(Ok(reply)) => Err(format!("unexpected script reply of {} values", reply.len())),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }

    /// Logs a failure unless one was logged in the last [`WARN_EVERY`]; says how many were not.
    fn warn(&self, op: &'static str, error: &str) {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last_warn_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64;
        if due
            && self
                .last_warn_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            tracing::warn!(op, error, suppressed, policy = ?self.policy, "rate limits: Redis failed");
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn decide_inner(&self, charges: &[Charge], now_ms: i64) -> Decision {
        let groups = group(charges);
        if groups.is_empty() {
            return Decision {
                allowed: true,
                ..Decision::default()
            };
        }
        match self
            .run("decide", &groups, now_ms)
            .await
            .and_then(|reply| Ok((reply[1], checks(&reply, groups.len())?)))
        {
            Ok((at_ms, checks)) => Decision {
                at_ms,
                ..assemble(charges, &groups, &checks)
            },
            Err(error) => {
                self.metrics.decide_errors.increment(1);
                self.warn("decide", &error);
                let allowed = self.policy == FailPolicy::Open;
                Decision {
                    allowed,
                    states: Vec::new(),
                    violated: Vec::new(),
                    retry_after_secs: if allowed { 0 } else { 1 },
                    degraded: true,
                    at_ms: now_ms,
                }
            }
        }
    }

    /// A decision over costless charges that commits nothing; a failure is `degraded` with no
    /// states (never `on_redis_error`: nothing is admitted by a peek).
    async fn peek_inner(&self, charges: &[Charge], now_ms: i64) -> Decision {
        let charges = super::costless(charges);
        let groups = group(&charges);
        if groups.is_empty() {
            return Decision {
                allowed: true,
                ..Decision::default()
            };
        }
        match self
            .run("peek", &groups, now_ms)
            .await
            .and_then(|reply| Ok((reply[1], checks(&reply, groups.len())?)))
        {
            Ok((at_ms, checks)) => Decision {
                at_ms,
                ..assemble(&charges, &groups, &checks)
            },
            Err(error) => {
                self.metrics.peek_errors.increment(1);
                self.warn("peek", &error);
                Decision {
                    degraded: true,
                    at_ms: now_ms,
                    ..Decision::default()
                }
            }
        }
    }

    async fn apply(&self, mode: &'static str, charges: &[Charge], now_ms: i64, errors: &Counter) {
        let groups = group(charges);
        if groups.is_empty() {
            return;
        }
        if let Err(error) = self.run(mode, &groups, now_ms).await {
            errors.increment(1);
            self.warn(mode, &error);
        }
    }
}

/// A counter's key on Redis Cluster: the scope in braces is the hash tag, so one decision's
/// keys share a slot. An empty scope would make Redis hash the whole key (keys of one decision
/// in different slots), so it becomes `_`.
fn cluster_key(prefix: &str, scope: &str, id: &str) -> String {
    let scope = if scope.is_empty() { "_" } else { scope };
    format!("{prefix}:{{{scope}}}:{id}")
}

/// The per-key checks of a script reply (after `allowed, now`: five values per key).
fn checks(reply: &[i64], keys: usize) -> Result<Vec<Check>, String> {
    let values = &reply[2..];
    if values.len() != keys * 5 {
        return Err(format!("script replied {} values for {keys} keys", values.len()));
    }
    Ok(values
        .chunks_exact(5)
        .map(|v| Check {
            used: v[0].max(0) as u64,
            passes: v[1] == 1,
            reset_ms: v[2],
            retry_ms: v[3],
            window_ms: v[4],
        })
        .collect())
}

impl Limiter for RedisLimiter {
    fn decide<'a>(&'a self, charges: &'a [Charge], now_ms: i64) -> LimitFuture<'a, Decision> {
        Box::pin(self.decide_inner(charges, now_ms))
    }

    fn add<'a>(&'a self, charges: &'a [Charge], now_ms: i64) -> LimitFuture<'a, ()> {
        Box::pin(self.apply("add", charges, now_ms, &self.metrics.add_errors))
    }

    fn release<'a>(&'a self, charges: &'a [Charge]) -> LimitFuture<'a, ()> {
        Box::pin(self.apply("release", charges, 0, &self.metrics.release_errors))
    }

    fn refund<'a>(&'a self, charges: &'a [Charge], at_ms: i64) -> LimitFuture<'a, ()> {
        Box::pin(self.apply("refund", charges, at_ms, &self.metrics.refund_errors))
    }

    fn peek<'a>(&'a self, charges: &'a [Charge], now_ms: i64) -> LimitFuture<'a, Decision> {
        Box::pin(self.peek_inner(charges, now_ms))
    }
}
