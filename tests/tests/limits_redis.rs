//! The Redis rate limiter on the real Redis: two limiters with their own connections stand
//! for two gateways sharing counters. Exactly the allowance under 64 concurrent clients, a
//! refusal that changes no counter, post-response costs and releases seen by the other
//! gateway, calendar quotas that outlive a limiter, and Redis unreachable (fail open, fail
//! closed, never hanging). Every test uses its own key prefix.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tollgate_gateway::limits::settings::calendar_period;
use tollgate_gateway::limits::{
    legacy_headers, refusal_problem_json, Backend, Charge, Decision, FailPolicy, KeyBy, LimitSpec, Limiter,
    LimitsMetrics, LimitsSettings, Meter, RedisLimiter, Window,
};
use tollgate_tests::{redis, unique};

fn settings(url: &str, prefix: &str) -> LimitsSettings {
    LimitsSettings {
        backend: Backend::Redis,
        redis_url: url.to_owned(),
        // Generous: these tests check counting, not latency, on a busy machine.
        redis_timeout_ms: 5_000,
        on_redis_error: FailPolicy::Closed,
        key_prefix: prefix.to_owned(),
        ..LimitsSettings::default()
    }
}

fn limiter(url: &str, prefix: &str) -> RedisLimiter {
    RedisLimiter::new(&settings(url, prefix), LimitsMetrics::noop()).expect("limiter builds")
}

fn spec(name: &str, meter: Meter, window: Window, limit: u64) -> Arc<LimitSpec> {
    Arc::new(LimitSpec {
        name: name.into(),
        meter,
        window,
        limit,
        by: KeyBy::Tenant,
    })
}

fn charge(spec: &Arc<LimitSpec>, key: &str, cost: u64) -> Charge {
    Charge {
        spec: spec.clone(),
        key: key.into(),
        scope: "t".into(),
        cost,
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis connection")
}

/// Every counter value under `prefix` (key → sum of its hash fields `n` or buckets, or its integer).
async fn counters(url: &str, prefix: &str) -> Vec<(String, i64)> {
    let mut con = connection(url).await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut con)
        .await
        .unwrap();
    keys.sort();
    let mut out = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut con).await.unwrap();
        let value = if kind == "hash" {
            let n: Option<i64> = redis::cmd("HGET")
                .arg(&key)
                .arg("n")
                .query_async(&mut con)
                .await
                .unwrap();
            match n {
                Some(n) => n,
                None => {
                    let buckets: Vec<i64> = redis::cmd("HVALS").arg(&key).query_async(&mut con).await.unwrap();
                    buckets.iter().sum()
                }
            }
        } else {
            redis::cmd("GET").arg(&key).query_async(&mut con).await.unwrap()
        };
        out.push((key, value));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_and_64_clients_admit_exactly_the_allowance() {
    let url = redis();
    let prefix = unique("rl");
    let gateways = [Arc::new(limiter(&url, &prefix)), Arc::new(limiter(&url, &prefix))];
    let rpm = spec(
        "requests_per_minute",
        Meter::Requests,
        Window::Sliding { secs: 60 },
        1_000,
    );
    let cud = spec("compute_units_per_day", Meter::ComputeUnits, Window::Day, 1_000_000);
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let limiter = gateways[i % 2].clone();
            let (rpm, cud, admitted, refused) = (rpm.clone(), cud.clone(), admitted.clone(), refused.clone());
            tokio::spawn(async move {
                for _ in 0..25 {
                    let c = [charge(&rpm, "tenant:busy", 1), charge(&cud, "tenant:busy", 2)];
                    let d = limiter.decide(&c, now_ms()).await;
                    assert!(!d.degraded, "Redis failed during the test");
                    if d.allowed {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    } else {
                        assert_eq!(d.violated, ["requests_per_minute"]);
                        assert!(d.retry_after_secs >= 1);
                        assert_eq!(refusal_problem_json(&d)["status"], 429);
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
    assert_eq!(refused.load(Ordering::Relaxed), 600);
    // The compute quota moved only for the admitted requests.
    let probe = [charge(&rpm, "tenant:busy", 0), charge(&cud, "tenant:busy", 0)];
    let d = gateways[1].decide(&probe, now_ms()).await;
    assert_eq!(d.states[0].remaining, 0);
    assert_eq!(d.states[1].remaining, 1_000_000 - 2_000);
    // Another tenant is unaffected.
    let other = gateways[0].decide(&[charge(&rpm, "tenant:calm", 1)], now_ms()).await;
    assert!(other.allowed);
    assert_eq!(other.states[0].remaining, 999);
}

#[tokio::test]
async fn a_free_key_sees_the_seed_headers() {
    let url = redis();
    let limiter = limiter(&url, &unique("rl"));
    let rpm = spec(
        "requests_per_minute",
        Meter::Requests,
        Window::Sliding { secs: 60 },
        100,
    );
    let cud = spec("compute_units_per_day", Meter::ComputeUnits, Window::Day, 10_000);
    let d = limiter
        .decide(
            &[charge(&rpm, "tenant:free", 1), charge(&cud, "tenant:free", 1)],
            now_ms(),
        )
        .await;
    let headers = legacy_headers(&d);
    assert_eq!(headers[0], ("ratelimit-limit", "100".to_owned()));
    assert_eq!(headers[1], ("ratelimit-remaining", "99".to_owned()));
    let reset: u64 = headers[2].1.parse().unwrap();
    assert!((1..=60).contains(&reset), "reset {reset}");
}

#[tokio::test]
async fn a_refused_decision_changes_no_counter() {
    let url = redis();
    let prefix = unique("rl");
    let limiter = limiter(&url, &prefix);
    let rpm = spec("rpm", Meter::Requests, Window::Sliding { secs: 60 }, 100);
    let cu_day = spec("cu_day", Meter::ComputeUnits, Window::Day, 10);
    let cu_month = spec("cu_month", Meter::ComputeUnits, Window::Month, 1_000);
    let inflight = spec("inflight", Meter::Concurrent, Window::InFlight, 5);
    let request = |cu| {
        [
            charge(&rpm, "tenant:r", 1),
            charge(&cu_day, "tenant:r", cu),
            charge(&cu_month, "tenant:r", cu),
            charge(&inflight, "tenant:r", 1),
        ]
    };
    assert!(limiter.decide(&request(8), now_ms()).await.allowed);
    let before = counters(&url, &prefix).await;
    assert_eq!(before.len(), 4, "{before:?}");

    let refused = limiter.decide(&request(3), now_ms()).await;
    assert!(!refused.allowed);
    assert_eq!(refused.violated, ["cu_day"]);
    assert_eq!(counters(&url, &prefix).await, before);
    let remaining: Vec<u64> = refused.states.iter().map(|s| s.remaining).collect();
    assert_eq!(remaining, [99, 2, 992, 4]);

    let admitted = limiter.decide(&request(2), now_ms()).await;
    assert!(admitted.allowed);
    let remaining: Vec<u64> = admitted.states.iter().map(|s| s.remaining).collect();
    assert_eq!(remaining, [98, 0, 990, 3]);
}

#[tokio::test]
async fn costs_and_releases_reach_the_other_gateway() {
    let url = redis();
    let prefix = unique("rl");
    let (a, b) = (limiter(&url, &prefix), limiter(&url, &prefix));
    let cu = spec("cu", Meter::ComputeUnits, Window::Sliding { secs: 3_600 }, 100);
    let inflight = spec("inflight", Meter::Concurrent, Window::InFlight, 1);
    let request = [charge(&cu, "tenant:c", 0), charge(&inflight, "tenant:c", 1)];
    assert!(a.decide(&request, now_ms()).await.allowed);
    let busy = b.decide(&request, now_ms()).await;
    assert_eq!(busy.violated, ["inflight"]);
    a.add(&[charge(&cu, "tenant:c", 42)], now_ms()).await;
    a.release(&request).await;
    let d = b.decide(&request, now_ms()).await;
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.states[0].remaining, 58);
}

#[tokio::test]
async fn calendar_quotas_outlive_the_limiter() {
    let url = redis();
    let prefix = unique("rl");
    let day = spec("cu_day", Meter::ComputeUnits, Window::Day, 50);
    let month = spec("cu_month", Meter::ComputeUnits, Window::Month, 500);
    let request = |cost| [charge(&day, "tenant:p", cost), charge(&month, "tenant:p", cost)];
    {
        let first = limiter(&url, &prefix);
        assert!(first.decide(&request(7), now_ms()).await.allowed);
    }
    let restarted = limiter(&url, &prefix);
    let now = now_ms();
    let d: Decision = restarted.decide(&request(0), now).await;
    assert_eq!((d.states[0].remaining, d.states[1].remaining), (43, 493));
    let (start, end) = calendar_period(Window::Month, now);
    assert_eq!(
        d.states[1].window_secs as i64,
        (end - start) / 1000,
        "the script's month is the calendar month"
    );
    assert_eq!(d.states[0].window_secs, 86_400);
    assert!(d.states[0].reset_secs <= 86_400 && d.states[0].reset_secs > 0);
    // The counter expires after its period, not before.
    let mut con = connection(&url).await;
    let key = format!("{prefix}:cu_day:compute_units:day:tenant:p");
    let ttl_ms: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut con).await.unwrap();
    assert!(ttl_ms > (d.states[0].reset_secs as i64 - 1) * 1000, "ttl {ttl_ms} ms");
}

#[tokio::test]
async fn redis_unreachable_fails_open_or_closed_without_hanging() {
    let rpm = spec("rpm", Meter::Requests, Window::Sliding { secs: 60 }, 10);
    let request = [charge(&rpm, "tenant:x", 1)];
    for (policy, allowed) in [(FailPolicy::Open, true), (FailPolicy::Closed, false)] {
        let mut s = settings("redis://127.0.0.1:1", "unused");
        s.redis_timeout_ms = 50;
        s.on_redis_error = policy;
        let limiter = RedisLimiter::new(&s, LimitsMetrics::noop()).unwrap();
        for _ in 0..3 {
            let d = tokio::time::timeout(Duration::from_secs(2), limiter.decide(&request, now_ms()))
                .await
                .expect("a decision even with Redis down");
            assert!(d.degraded);
            assert_eq!(d.allowed, allowed, "{policy:?}");
        }
        if !allowed {
            let d = limiter.decide(&request, now_ms()).await;
            assert_eq!(refusal_problem_json(&d)["status"], 503);
            assert_eq!(d.retry_after_secs, 1);
        }
        tokio::time::timeout(Duration::from_secs(2), limiter.add(&request, now_ms()))
            .await
            .expect("add returns");
        tokio::time::timeout(Duration::from_secs(2), limiter.release(&request))
            .await
            .expect("release returns");
    }
}

/// A small deterministic generator (xorshift), so failures replay.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[tokio::test]
async fn the_script_decides_like_the_local_limiter() {
    let url = redis();
    let script = limiter(&url, &unique("rl")).with_caller_clock();
    let local = tollgate_gateway::limits::LocalLimiter::new();
    let specs = [
        spec("per_2s", Meter::Requests, Window::Sliding { secs: 2 }, 7),
        spec("cu_per_min", Meter::ComputeUnits, Window::Sliding { secs: 60 }, 40),
        spec("cu_day", Meter::ComputeUnits, Window::Day, 90),
        spec("cu_month", Meter::ComputeUnits, Window::Month, 150),
    ];
    // Starts two seconds before a month (and day) ends, so both calendar periods roll over.
    let mut now = chrono::DateTime::parse_from_rfc3339("2027-02-28T23:59:58Z")
        .unwrap()
        .timestamp_millis();
    let mut seed = 0x9e37_79b9_7f4a_7c15;
    for i in 0..400 {
        now += (next(&mut seed) % 700) as i64;
        let cost = next(&mut seed) % 6;
        let c: Vec<Charge> = specs
            .iter()
            .map(|s| charge(s, "tenant:same", if s.meter == Meter::Requests { 1 } else { cost }))
            .collect();
        if i % 17 == 0 {
            script.add(&c[1..], now).await;
            local.add_now(&c[1..], now);
        }
        let (remote, here) = (script.decide(&c, now).await, local.decide_now(&c, now));
        assert_eq!(remote, here, "request {i} at {now}");
    }
}

/// A peek on Redis reads what the local limiter's peek reads, counts nothing (the counters and
/// the next decision are as without it), and equals the last decision's `remaining`.
#[tokio::test]
async fn a_peek_reads_like_the_local_limiter_and_counts_nothing() {
    let url = redis();
    let prefix = unique("rl");
    let script = limiter(&url, &prefix).with_caller_clock();
    let local = tollgate_gateway::limits::LocalLimiter::new();
    let specs = [
        spec("per_2s", Meter::Requests, Window::Sliding { secs: 2 }, 5),
        spec("cu_day", Meter::ComputeUnits, Window::Day, 30),
        spec("in_flight", Meter::Concurrent, Window::InFlight, 3),
    ];
    let mut now = chrono::DateTime::parse_from_rfc3339("2027-03-31T23:59:59Z")
        .unwrap()
        .timestamp_millis();
    let mut seed = 0x51_7c_c1_b7_27_22_0a_95;
    for i in 0..120 {
        now += (next(&mut seed) % 400) as i64;
        let cost = next(&mut seed) % 4;
        let c: Vec<Charge> = specs
            .iter()
            .map(|s| charge(s, "tenant:peek", if s.meter == Meter::ComputeUnits { cost } else { 1 }))
            .collect();
        let decided = script.decide(&c, now).await;
        assert_eq!(decided, local.decide_now(&c, now), "decision {i}");
        let before = counters(&url, &prefix).await;
        let (remote, here) = (script.peek(&c, now).await, local.peek_now(&c, now));
        assert_eq!(remote, here, "peek {i} at {now}");
        assert_eq!(counters(&url, &prefix).await, before, "peek {i} changed a counter");
        let remaining = |d: &Decision| d.states.iter().map(|s| s.remaining).collect::<Vec<_>>();
        assert_eq!(
            remaining(&remote),
            remaining(&decided),
            "peek {i} reads the decision's remaining"
        );
        if decided.allowed {
            script.release(&c).await;
            local.release_now(&c);
        }
    }
}

#[tokio::test]
async fn the_script_knows_calendar_months() {
    let url = redis();
    let script = limiter(&url, &unique("rl")).with_caller_clock();
    let month = spec("cu_month", Meter::ComputeUnits, Window::Month, 10);
    let mut seed = 0x2545_f491_4f6c_dd1d;
    // Month starts and ends from 1970 to 2130, and random instants.
    let mut instants = Vec::new();
    for year in (1970..2130).step_by(7) {
        for month_no in 1..=12u32 {
            let start = chrono::NaiveDate::from_ymd_opt(year, month_no, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap();
            let ms = start.and_utc().timestamp_millis();
            instants.extend([ms, ms - 1]);
        }
    }
    instants.extend((0..200).map(|_| (next(&mut seed) % 5_000_000_000_000) as i64));
    for (i, at) in instants.into_iter().enumerate() {
        let d = script.decide(&[charge(&month, &format!("tenant:{i}"), 0)], at).await;
        let (start, end) = calendar_period(Window::Month, at);
        assert_eq!(d.states[0].window_secs as i64, (end - start) / 1000, "at {at}");
        assert_eq!(d.states[0].reset_secs as i64, (end - at + 999) / 1000, "at {at}");
    }
}

/// A TCP proxy to Redis that drops every connection while `up` is false.
async fn flaky_proxy(target: String, up: Arc<std::sync::atomic::AtomicBool>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            if !up.load(Ordering::SeqCst) {
                continue; // dropped: the client sees the connection closed
            }
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn decisions_recover_when_redis_comes_back() {
    let url = redis();
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let proxy = flaky_proxy(
        url.trim_start_matches("redis://").trim_end_matches('/').to_owned(),
        up.clone(),
    )
    .await;
    let mut s = settings(&format!("redis://{proxy}"), &unique("rl"));
    s.redis_timeout_ms = 200;
    let limiter = RedisLimiter::new(&s, LimitsMetrics::noop()).unwrap();
    let rpm = spec("rpm", Meter::Requests, Window::Sliding { secs: 60 }, 10);
    let request = [charge(&rpm, "tenant:back", 1)];
    let down = limiter.decide(&request, now_ms()).await;
    assert!(down.degraded && !down.allowed, "{down:?}");
    up.store(true, Ordering::SeqCst);
    let back = tollgate_tests::eventually("a decision from Redis again", Duration::from_secs(20), || async {
        let d = limiter.decide(&request, now_ms()).await;
        (!d.degraded).then_some(d)
    })
    .await;
    assert!(back.allowed);
    assert_eq!(back.states[0].remaining, 9);
}
