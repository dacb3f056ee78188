//! The Redis rate limiter on a real Redis Cluster (3 masters, 3 replicas, started by the
//! test): two limiters stand for two gateways. Every decision stays one atomic script in one
//! slot (the tenant's hash tag) whichever master serves it; a killed master's replica takes
//! over and the limiter follows it, refusing (policy closed) while no master serves the slot,
//! and over-admitting at most what the dead master had not yet replicated, measured here.

// Runs with the stack's tests (`scripts/stack test`); needs Debian's redis-server, which the
// stack scripts install.
#![cfg(feature = "stack-tests")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_gateway::limits::{
    Backend, Charge, FailPolicy, KeyBy, LimitSpec, Limiter, LimitsMetrics, LimitsSettings, Meter, RedisLimiter, Window,
};
use tollgate_tests::redis_cluster::RedisCluster;
use tollgate_tests::unique;

fn limiter(cluster: &RedisCluster, prefix: &str, timeout_ms: u64) -> Arc<RedisLimiter> {
    let settings = LimitsSettings {
        backend: Backend::RedisCluster,
        redis_url: cluster.url(),
        redis_timeout_ms: timeout_ms,
        on_redis_error: FailPolicy::Closed,
        key_prefix: prefix.to_owned(),
        ..LimitsSettings::default()
    };
    settings.validate("limits").expect("cluster settings are valid");
    Arc::new(RedisLimiter::new(&settings, LimitsMetrics::noop()).expect("limiter builds"))
}

fn spec(name: &str, meter: Meter, window: Window, limit: u64, by: KeyBy) -> Arc<LimitSpec> {
    Arc::new(LimitSpec {
        name: name.into(),
        meter,
        window,
        limit,
        by,
    })
}

fn charge(spec: &Arc<LimitSpec>, key: &str, tenant: &str, cost: u64) -> Charge {
    Charge {
        spec: spec.clone(),
        key: key.into(),
        scope: tenant.into(),
        cost,
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Every key under `prefix` on the node at `port`, with its value (a hash's `n` or the sum of
/// its buckets).
async fn keys_on(port: u16, prefix: &str) -> BTreeMap<String, i64> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("node connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut con)
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for key in keys {
        let fields: BTreeMap<String, i64> = redis::cmd("HGETALL").arg(&key).query_async(&mut con).await.unwrap();
        let value = match fields.get("n") {
            Some(n) => *n,
            None => fields.iter().filter(|(f, _)| f.as_str() != "p").map(|(_, v)| v).sum(),
        };
        out.insert(key, value);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_admit_exactly_each_tenants_allowance_on_every_master() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start).await.unwrap();
    let prefix = unique("rlc");
    // One tenant per master, so the decisions run on all three.
    let mut tenants: BTreeMap<u16, String> = BTreeMap::new();
    while tenants.len() < 3 {
        let tenant = unique("t");
        tenants.entry(cluster.master_of(&tenant)).or_insert(tenant);
    }
    let tenants: Vec<(u16, String)> = tenants.into_iter().collect();
    let gateways = [limiter(&cluster, &prefix, 5_000), limiter(&cluster, &prefix, 5_000)];
    let rpm = spec("rpm", Meter::Requests, Window::Sliding { secs: 60 }, 300, KeyBy::Tenant);
    let cud = spec("cud", Meter::ComputeUnits, Window::Day, 1_000_000, KeyBy::Key);
    let admitted: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let limiter = gateways[i % 2].clone();
            let (rpm, cud, admitted) = (rpm.clone(), cud.clone(), admitted.clone());
            let tenants: Vec<String> = tenants.iter().map(|(_, t)| t.clone()).collect();
            tokio::spawn(async move {
                for j in 0..30 {
                    let t = (i + j) % 3;
                    let tenant = &tenants[t];
                    let c = [
                        charge(&rpm, &format!("tenant:{tenant}"), tenant, 1),
                        charge(&cud, &format!("key:k_{tenant}"), tenant, 2),
                    ];
                    let d = limiter.decide(&c, now_ms()).await;
                    assert!(!d.degraded, "the cluster failed during the test");
                    if d.allowed {
                        admitted[t].fetch_add(1, Ordering::Relaxed);
                    } else {
                        assert_eq!(d.violated, ["rpm"]);
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    // 64 × 30 attempts, 640 per tenant: exactly the allowance admitted for each.
    for (t, (_, tenant)) in tenants.iter().enumerate() {
        assert_eq!(admitted[t].load(Ordering::Relaxed), 300, "tenant {tenant}");
    }
    // Each tenant's counters, both subjects, sit together on the master of its tag.
    for (port, tenant) in &tenants {
        let keys = keys_on(*port, &prefix).await;
        let mine: BTreeMap<&str, i64> = keys
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{prefix}:{{{tenant}}}:")))
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        let rpm_key = format!("{prefix}:{{{tenant}}}:rpm:requests:60s:tenant:{tenant}");
        let cud_key = format!("{prefix}:{{{tenant}}}:cud:compute_units:day:key:k_{tenant}");
        assert_eq!(mine.get(rpm_key.as_str()), Some(&300), "{keys:?}");
        assert_eq!(mine.get(cud_key.as_str()), Some(&600), "{keys:?}");
        assert_eq!(mine.len(), 2, "{keys:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_master_fails_over_and_the_allowance_holds_within_what_replication_lost() {
    let mut cluster = tokio::task::spawn_blocking(RedisCluster::start).await.unwrap();
    let prefix = unique("rlf");
    let tenant = unique("t");
    let master = cluster.master_of(&tenant);
    let gateways = [limiter(&cluster, &prefix, 500), limiter(&cluster, &prefix, 500)];
    const ALLOWANCE: u64 = 1_000;
    const CLIENTS: usize = 16;
    let rpd = spec("rpd", Meter::Requests, Window::Day, ALLOWANCE, KeyBy::Tenant);
    let (admitted, degraded) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let limiter = gateways[i % 2].clone();
            let (rpd, admitted, degraded, stop) = (rpd.clone(), admitted.clone(), degraded.clone(), stop.clone());
            let tenant = tenant.clone();
            tokio::spawn(async move {
                let c = [charge(&rpd, &format!("tenant:{tenant}"), &tenant, 1)];
                while !stop.load(Ordering::Relaxed) {
                    let d = limiter.decide(&c, now_ms()).await;
                    if d.degraded {
                        // Policy closed: refused while no master answers for the slot.
                        assert!(!d.allowed);
                        degraded.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    } else if d.allowed {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        // Paced, so the allowance lasts past the failover.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    } else {
                        assert_eq!(d.violated, ["rpd"]);
                        return;
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    while admitted.load(Ordering::Relaxed) < 300 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.kill(master);
    let at_kill = admitted.load(Ordering::Relaxed);
    let (cluster, promoted) = tokio::task::spawn_blocking(move || {
        let promoted = cluster.wait_failover(&tenant, master);
        (cluster, promoted)
    })
    .await
    .unwrap();
    let mut cluster = cluster;
    let finish = Instant::now();
    for client in clients {
        tokio::time::timeout(Duration::from_secs(120).saturating_sub(finish.elapsed()), client)
            .await
            .expect("the clients use up the allowance after the failover")
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let admitted = admitted.load(Ordering::Relaxed);
    let counted = keys_on(promoted, &prefix).await.values().sum::<i64>() as u64;
    let lost = admitted - counted;
    println!(
        "failover: {at_kill} admitted before the kill, {admitted} in all against an allowance of {ALLOWANCE}; \
         the promoted replica counts {counted}, so {lost} admissions were lost with the killed master; \
         {} decisions refused while the slot had no master",
        degraded.load(Ordering::Relaxed)
    );
    assert_eq!(
        counted, ALLOWANCE,
        "the promoted master counts up to the allowance, never past it"
    );
    assert!(
        degraded.load(Ordering::Relaxed) > 0,
        "the kill was seen (decisions refused while failing over)"
    );
    // What a failover can lose: increments the dead master acknowledged but had not yet sent to
    // its replica. On loopback that is at most the decisions in flight at the kill.
    assert!(
        lost <= CLIENTS as u64,
        "{lost} admissions over the allowance: more than the {CLIENTS} decisions in flight"
    );
    // The killed node comes back as a replica; decisions go on, still exact.
    cluster.restart(master);
    let _cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_healthy();
        cluster
    })
    .await
    .unwrap();
    let d = gateways[0]
        .decide(
            &[charge(&rpd, &format!("tenant:{}", unique("fresh")), "fresh", 1)],
            now_ms(),
        )
        .await;
    assert!(d.allowed && !d.degraded, "decisions go on after the node rejoins");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_before_its_cluster_decides_once_the_cluster_is_up() {
    // The limiter is built on seeds where nothing listens yet, as a gateway started before
    // Redis is: it refuses (closed) without hanging, then finds the cluster once it exists.
    let mut cluster = RedisCluster::planned();
    let gateway = limiter(&cluster, &unique("rld"), 200);
    let rpm = spec("rpm", Meter::Requests, Window::Sliding { secs: 60 }, 10, KeyBy::Tenant);
    let c = [charge(&rpm, "tenant:t", "t", 1)];
    let d = tokio::time::timeout(Duration::from_secs(5), gateway.decide(&c, now_ms()))
        .await
        .expect("a decision while no node answers");
    assert!(d.degraded && !d.allowed);
    let _cluster = tokio::task::spawn_blocking(move || {
        cluster.launch();
        cluster
    })
    .await
    .unwrap();
    let start = Instant::now();
    loop {
        let d = gateway.decide(&c, now_ms()).await;
        if !d.degraded {
            assert!(d.allowed);
            assert_eq!(d.states[0].remaining, 9);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the limiter never reached the cluster"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
