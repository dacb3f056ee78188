//! Rate-limit decision cost: 1, 3 and 6 dimensions, in-process and on Redis, printed as
//! ratios against the 1-dimension in-process decision measured in the same run.
//!
//! Run: `cargo bench -p tollgate-gateway --bench limits`. Redis comes from
//! `TOLLGATE_BENCH_REDIS` (default `redis://127.0.0.1:6379`); when nothing listens there the
//! Redis rows are skipped with a message. Each case runs for a bounded time (well under 30 s
//! in all).

use std::hint::black_box;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_gateway::limits::{
    Backend, Charge, KeyBy, LimitSpec, Limiter, LimitsMetrics, LimitsSettings, LocalLimiter, Meter, RedisLimiter,
    Window,
};

/// Time spent per case (after a short warm-up).
const LOCAL_BUDGET: Duration = Duration::from_millis(1_500);
const REDIS_BUDGET: Duration = Duration::from_millis(2_000);

fn spec(name: &str, meter: Meter, window: Window) -> Arc<LimitSpec> {
    // Allowances far above what a run can use: every decision admits and commits.
    Arc::new(LimitSpec {
        name: name.into(),
        meter,
        window,
        limit: u64::MAX / 4,
        by: KeyBy::Tenant,
    })
}

/// The first `n` of six dimensions a busy plan could have.
fn charges(n: usize, tenant: &str) -> Vec<Charge> {
    let all = [
        spec("requests_per_minute", Meter::Requests, Window::Sliding { secs: 60 }),
        spec("requests_per_second", Meter::Requests, Window::Sliding { secs: 1 }),
        spec("compute_units_per_day", Meter::ComputeUnits, Window::Day),
        spec(
            "compute_units_per_hour",
            Meter::ComputeUnits,
            Window::Sliding { secs: 3_600 },
        ),
        spec("compute_units_per_month", Meter::ComputeUnits, Window::Month),
        spec(
            "request_bytes_per_minute",
            Meter::RequestBytes,
            Window::Sliding { secs: 60 },
        ),
    ];
    all.into_iter()
        .take(n)
        .map(|spec| {
            let cost = if spec.meter == Meter::Requests { 1 } else { 5 };
            Charge {
                spec,
                key: format!("tenant:{tenant}"),
                scope: tenant.into(),
                cost,
            }
        })
        .collect()
}

/// Runs `decide` until the budget is spent; nanoseconds per decision.
async fn measure(limiter: &dyn Limiter, charges: &[Charge], budget: Duration) -> f64 {
    let mut now_ms = chrono::Utc::now().timestamp_millis();
    for _ in 0..200 {
        black_box(limiter.decide(charges, now_ms).await);
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..100 {
            now_ms += 1;
            let decision = limiter.decide(charges, now_ms).await;
            assert!(decision.allowed && !decision.degraded, "benchmark decisions must admit");
            black_box(decision);
        }
        n += 100;
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn redis_up(url: &str) -> bool {
    let host_port = url.trim_start_matches("redis://").trim_end_matches('/');
    let addr = host_port.to_socket_addrs().ok().and_then(|mut a| a.next());
    addr.is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

async fn run() {
    let tenant = format!("bench{}", std::process::id());
    let local = LocalLimiter::new();
    let mut rows: Vec<(String, usize, f64)> = Vec::new();
    for dims in [1, 3, 6] {
        let ns = measure(&local, &charges(dims, &tenant), LOCAL_BUDGET).await;
        rows.push(("local".into(), dims, ns));
    }

    let url = std::env::var("TOLLGATE_BENCH_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("tollgate:bench:{tenant}:{}", chrono::Utc::now().timestamp_millis());
    if redis_up(&url) {
        let settings = LimitsSettings {
            backend: Backend::Redis,
            redis_url: url.clone(),
            redis_timeout_ms: 1_000,
            key_prefix: prefix.clone(),
            ..LimitsSettings::default()
        };
        let redis = RedisLimiter::new(&settings, LimitsMetrics::noop()).expect("Redis limiter");
        for dims in [1, 3, 6] {
            let ns = measure(&redis, &charges(dims, &tenant), REDIS_BUDGET).await;
            rows.push(("redis".into(), dims, ns));
        }
        cleanup(&url, &prefix).await;
    } else {
        println!("Redis is not reachable at {url}: Redis rows skipped (start it with `scripts/stack up --infra`)");
    }

    let baseline = rows[0].2;
    println!(
        "{:<8} {:>10} {:>16} {:>14}",
        "backend", "dimensions", "ns/decision", "vs local 1-dim"
    );
    for (backend, dims, ns) in rows {
        println!("{backend:<8} {dims:>10} {ns:>16.0} {:>13.1}x", ns / baseline);
    }
}

/// Deletes the run's keys (the calendar ones would otherwise stay until the month is over).
async fn cleanup(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else { return };
    let Ok(mut con) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut con)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut con).await;
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run());
}
