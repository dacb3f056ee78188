//! Gateway benchmarks (the gateway and usage-event issues), each printed as a ratio against a
//! baseline measured in the same run, since the machine is shared and noisy:
//!
//! 1. key lookup (`apikey::parse` + `Directory::authenticate`) with 1,000 vs 1,000,000 keys
//!    loaded, and resident memory per key loaded;
//! 2. replay of N key records by `KeyStore::start` vs a plain consumer reading the same topic;
//! 3. bulkhead: tenant B's latency while tenant A holds 500 slow requests in flight vs B alone;
//! 4. gateway throughput with usage events on vs off, and with limits on vs off (same
//!    upstream, same load);
//! 5. encoded usage-event size vs JSON, and encode + produce events/s vs producing the same
//!    payloads already encoded.
//!
//! Run: `cargo bench -p tollgate-gateway --bench gateway`. Kafka comes from
//! `TOLLGATE_BENCH_KAFKA` (default `127.0.0.1:9092`); when it does not answer, the Kafka rows
//! are skipped with a message. `TOLLGATE_BENCH_SCALE` (default 1) multiplies record counts and
//! durations (5 replays 1M key records). Every topic and spool directory is the bench's own
//! and is removed at the end. About a minute at scale 1. The upstream, client and in-process
//! gateways are in `gateway/http.rs`; topics and the producer in `gateway/kafka.rs`; the key
//! index measurements in `gateway/keys.rs`.

#[path = "gateway/http.rs"]
mod http;
#[path = "gateway/kafka.rs"]
mod kafka;
#[path = "gateway/keys.rs"]
mod keys;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_schemas::{encode, Outcome, UsageEvent};
use uuid::Uuid;

use crate::http::{get, http_client, start_upstream, BenchGateway, HttpClient, Upstream};
use crate::kafka::{create_topic, delete_topics, kafka_reachable, produce_all, Produced};
use crate::keys::{key_lookup, replay};

/// Tenant A's slow requests held in flight, and its bulkhead cap: A saturates its own cap.
const FLOOD: usize = 500;
const SLOW_DELAY: Duration = Duration::from_secs(2);
/// Concurrent keep-alive clients of the throughput measurement.
const THROUGHPUT_CLIENTS: usize = 16;
/// Partitions of the bench's usage topics, as the stack's `tollgate.usage.v1` has.
const USAGE_PARTITIONS: i32 = 6;

fn main() {
    let scale = std::env::var("TOLLGATE_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0);
    let count = |base: f64| (base * scale).round().max(1.0) as usize;
    let span = |base_ms: f64| Duration::from_millis((base_ms * scale).round() as u64);
    let started = Instant::now();
    println!("gateway benchmarks (TOLLGATE_BENCH_SCALE={scale})");

    key_lookup(span(1_500.0));
    usage_event_size();

    let kafka = KafkaSettings {
        brokers: std::env::var("TOLLGATE_BENCH_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_owned()),
        connect_timeout_ms: 10_000,
        client: BTreeMap::new(),
    };
    if let Err(reason) = kafka_reachable(&kafka) {
        println!(
            "kafka at {} does not answer ({reason}): replay, gateway and producer rows skipped",
            kafka.brokers
        );
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut topics = Vec::new();
    let mut spools = Vec::new();
    runtime.block_on(async {
        replay(&kafka, count(200_000.0), &mut topics).await;
        let upstream = start_upstream().await;
        bulkhead(&kafka, &upstream, span(4_000.0), &mut topics, &mut spools).await;
        let events_off: &[(&str, &str)] = &[("TOLLGATE_EVENTS__ENABLED", "false")];
        compare_throughput(
            &kafka,
            &upstream,
            span(4_000.0),
            &mut topics,
            &mut spools,
            "usage events off vs on",
            [
                ("events off:", events_off),
                ("events on:", &[("TOLLGATE_EVENTS__ENABLED", "true")]),
            ],
        )
        .await;
        compare_throughput(
            &kafka,
            &upstream,
            span(4_000.0),
            &mut topics,
            &mut spools,
            "limits off vs on (local backend, two dimensions, events off)",
            [
                ("limits off:", events_off),
                (
                    "limits on:",
                    &[
                        ("TOLLGATE_EVENTS__ENABLED", "false"),
                        ("TOLLGATE_IDENTITY__DEFAULT_PLAN", "enterprise"),
                        ("TOLLGATE_PLANS__ENTERPRISE__LIMITS", UNREACHABLE_LIMITS),
                    ],
                ),
            ],
        )
        .await;
    });
    producer_rate(&kafka, &runtime, count(200_000.0), &mut topics);

    runtime.block_on(delete_topics(&kafka, &topics));
    for dir in spools {
        let _ = std::fs::remove_dir_all(dir);
    }
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
    // The key store's follower and the gateways' tasks run until the process ends.
    runtime.shutdown_timeout(Duration::from_millis(100));
}

// ---------------------------------------------------------------------------------------------
// 1. Key lookup and memory per key

async fn bulkhead(
    kafka: &KafkaSettings,
    upstream: &Upstream,
    phase: Duration,
    topics: &mut Vec<String>,
    spools: &mut Vec<PathBuf>,
) {
    println!(
        "\n[3] bulkhead: tenant B's latency while tenant A holds {FLOOD} slow ({SLOW_DELAY:?}) requests in flight"
    );
    let cap = FLOOD.to_string();
    let overlays = [
        ("TOLLGATE_EVENTS__ENABLED", "false"),
        ("TOLLGATE_HTTP__TENANT_MAX_IN_FLIGHT", cap.as_str()),
    ];
    let gateway = BenchGateway::start(kafka, upstream, &overlays, topics, spools).await;
    let key_a = gateway.consumer_with_key("bench-tenant-a", "tenant_a").await;
    let key_b = gateway.consumer_with_key("bench-tenant-b", "tenant_b").await;
    let client = http_client();
    let fast = format!("{}/v1/fast", gateway.public);
    for _ in 0..200 {
        get(&client, &fast, &key_b).await.expect("warm-up request");
    }
    let quiet = latencies(&client, &fast, &key_b, phase).await;

    // Tenant A: FLOOD workers, each sending slow requests back to back.
    let stop = Arc::new(AtomicBool::new(false));
    let flood_client = http_client();
    let workers: Vec<_> = (0..FLOOD)
        .map(|_| {
            let (client, url, key, stop) = (
                flood_client.clone(),
                format!("{}/v1/slow", gateway.public),
                key_a.clone(),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if get(&client, &url, &key).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while upstream.slow_in_flight.load(Ordering::Relaxed) < FLOOD {
        assert!(
            Instant::now() < deadline,
            "tenant A never reached {FLOOD} requests in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let probe = get(&client, &fast, &key_a).await.map(|(status, _)| status);
    println!("  tenant A at {FLOOD} in flight; one more A request got {probe:?} (its cap)");
    let flooded = latencies(&client, &fast, &key_b, phase).await;
    stop.store(true, Ordering::Relaxed);
    workers.iter().for_each(tokio::task::JoinHandle::abort);

    for (name, sample) in [("B alone", &quiet), ("B during A's flood", &flooded)] {
        println!(
            "  {name:<20} p50 {:7.2} ms  p99 {:7.2} ms  ({} requests, {} not 200)",
            ms(sample.percentile(50.0)),
            ms(sample.percentile(99.0)),
            sample.times.len(),
            sample.failures
        );
    }
    println!(
        "  ratio flood/alone: p50 {:.2}x  p99 {:.2}x",
        ms(flooded.percentile(50.0)) / ms(quiet.percentile(50.0)),
        ms(flooded.percentile(99.0)) / ms(quiet.percentile(99.0))
    );
    drop((client, flood_client));
    gateway.stop().await;
}

struct Latencies {
    times: Vec<Duration>,
    failures: usize,
}

impl Latencies {
    fn percentile(&self, p: f64) -> Duration {
        let rank = ((p / 100.0) * self.times.len() as f64).ceil() as usize;
        self.times[rank.clamp(1, self.times.len()) - 1]
    }
}

/// One client sending requests one after another for `phase`; each request's latency, sorted.
async fn latencies(client: &HttpClient, url: &str, key: &str, phase: Duration) -> Latencies {
    let mut times = Vec::new();
    let mut failures = 0;
    let started = Instant::now();
    while started.elapsed() < phase {
        let sent = Instant::now();
        match get(client, url, key).await {
            Ok((StatusCode::OK, _)) => times.push(sent.elapsed()),
            _ => failures += 1,
        }
    }
    times.sort_unstable();
    assert!(!times.is_empty(), "no request of tenant B succeeded");
    Latencies { times, failures }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

// ---------------------------------------------------------------------------------------------
// 4. Throughput: usage events on vs off, limits on vs off

/// A plan no benchmark request can exhaust, so the limits cost their decision and nothing else.
const UNREACHABLE_LIMITS: &str = r#"[{ name = "requests_per_minute", meter = "requests", window = "1m", limit = 1000000000 }, { name = "compute_units_per_day", meter = "compute_units", window = "day", limit = 1000000000000 }]"#;

/// One gateway configuration under test: a label and its settings overlays.
type Variant<'a> = (&'a str, &'a [(&'a str, &'a str)]);

async fn compare_throughput(
    kafka: &KafkaSettings,
    upstream: &Upstream,
    round: Duration,
    topics: &mut Vec<String>,
    spools: &mut Vec<PathBuf>,
    title: &str,
    [(base_label, base_env), (measured_label, measured_env)]: [Variant<'_>; 2],
) {
    println!("\n[4] gateway throughput, {THROUGHPUT_CLIENTS} keep-alive clients, {title}");
    let base = BenchGateway::start(kafka, upstream, base_env, topics, spools).await;
    let measured = BenchGateway::start(kafka, upstream, measured_env, topics, spools).await;
    let key_base = base.consumer_with_key("bench-throughput", "tenant_throughput").await;
    let key_measured = measured
        .consumer_with_key("bench-throughput", "tenant_throughput")
        .await;
    // Rounds in the order base, measured, measured, base, so drift on the shared machine
    // weighs on both alike.
    let (mut total_base, mut total_measured) = (Throughput::default(), Throughput::default());
    total_base.add(&throughput(&base.public, &key_base, THROUGHPUT_CLIENTS, round).await);
    total_measured.add(&throughput(&measured.public, &key_measured, THROUGHPUT_CLIENTS, round).await);
    total_measured.add(&throughput(&measured.public, &key_measured, THROUGHPUT_CLIENTS, round).await);
    total_base.add(&throughput(&base.public, &key_base, THROUGHPUT_CLIENTS, round).await);
    println!(
        "  {base_label:<12} {:8.0} requests/s  ({} not 200, baseline)",
        total_base.per_second(),
        total_base.failures
    );
    println!(
        "  {measured_label:<12} {:8.0} requests/s  ({} not 200)",
        total_measured.per_second(),
        total_measured.failures
    );
    println!("  ratio: {:.2}x", total_measured.per_second() / total_base.per_second());
    base.stop().await;
    measured.stop().await;
}

#[derive(Default)]
struct Throughput {
    requests: u64,
    failures: u64,
    elapsed: Duration,
}

impl Throughput {
    fn add(&mut self, other: &Throughput) {
        self.requests += other.requests;
        self.failures += other.failures;
        self.elapsed += other.elapsed;
    }

    fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// Requests that `clients` concurrent keep-alive clients, all presenting `key`, get through the
/// gateway at `public` in `duration`. The one throughput measurement: compare any two gateway
/// configurations (events, limits, ...) by calling it on each.
async fn throughput(public: &str, key: &str, clients: usize, duration: Duration) -> Throughput {
    let url = format!("{public}/v1/throughput");
    let requests = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (url, key, requests, failures) = (
                url.clone(),
                key.to_owned(),
                Arc::clone(&requests),
                Arc::clone(&failures),
            );
            tokio::spawn(async move {
                let client = http_client();
                while Instant::now() < deadline {
                    let counter = match get(&client, &url, &key).await {
                        Ok((StatusCode::OK, _)) => &requests,
                        _ => &failures,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("throughput worker");
    }
    Throughput {
        requests: requests.load(Ordering::Relaxed),
        failures: failures.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Usage events: size and producer rate

fn typical_event(i: usize) -> UsageEvent {
    UsageEvent {
        event_id: Uuid::now_v7(),
        timestamp_ms: 1_764_000_000_000 + i as i64,
        tenant_id: Some(format!("tenant_{:05}", i % 100)),
        consumer: Some(format!("consumer-{:05}", i % 100)),
        key_id: Some(format!("key_{}", Uuid::from_u128(i as u128 % 300).simple())),
        plan: Some("enterprise".to_owned()),
        route: "v1".to_owned(),
        method: "GET".to_owned(),
        status: 200,
        outcome: Outcome::Allowed,
        billable: true,
        units: BTreeMap::from([("compute_units".to_owned(), 1), ("requests".to_owned(), 1)]),
        request_bytes: 312,
        response_bytes: 2_048,
        latency_ms: 14,
        upstream_latency_ms: Some(12),
        gateway_id: "gw-local-1".to_owned(),
        request_id: Some(Uuid::now_v7().to_string()),
    }
}

fn usage_event_size() {
    println!("\n[5a] usage event size");
    let event = typical_event(0);
    let avro = encode(&event).len();
    let json = serde_json::to_vec(&event).expect("event as JSON").len();
    println!(
        "  Avro single-object: {avro} bytes; JSON: {json} bytes (baseline); ratio {:.2}x",
        avro as f64 / json as f64
    );
}

fn producer_rate(kafka: &KafkaSettings, runtime: &tokio::runtime::Runtime, n: usize, topics: &mut Vec<String>) {
    println!(
        "\n[5b] producer: {n} usage events, idempotent, acks=all, lz4, linger 5 ms, {USAGE_PARTITIONS} partitions"
    );
    let events: Vec<UsageEvent> = (0..n).map(typical_event).collect();
    let encoding = Instant::now();
    let encoded: Vec<(&str, Vec<u8>)> = events.iter().map(|e| (tenant(e), encode(e))).collect();
    let encode_ns = encoding.elapsed().as_nanos() as f64 / n as f64;

    let baseline_topic = runtime.block_on(create_topic(kafka, "usage-raw", USAGE_PARTITIONS, &[], topics));
    let measured_topic = runtime.block_on(create_topic(kafka, "usage", USAGE_PARTITIONS, &[], topics));
    // Two halves in the order baseline, measured, measured, baseline: drift on the shared
    // machine (and a topic's first writes) weighs on both sides alike.
    let half = n / 2;
    let (mut baseline, mut measured) = (Produced::default(), Produced::default());
    for (i, range) in [0..half, half..n].into_iter().enumerate() {
        let pre_encoded = || encoded[range.clone()].iter().map(|(k, p)| (*k, p.as_slice()));
        let encoding = || events[range.clone()].iter().map(|e| (tenant(e), encode(e)));
        if i == 0 {
            baseline.add(&produce_all(kafka, &baseline_topic, pre_encoded()));
            measured.add(&produce_all(kafka, &measured_topic, encoding()));
        } else {
            measured.add(&produce_all(kafka, &measured_topic, encoding()));
            baseline.add(&produce_all(kafka, &baseline_topic, pre_encoded()));
        }
    }
    for (name, run) in [("pre-encoded (baseline)", &baseline), ("encode + produce", &measured)] {
        assert_eq!(run.delivered as usize, n, "{name}: every event delivered");
        println!("  {name:<22} {:9.0} events/s", run.per_second());
    }
    println!(
        "  ratio encode+produce / pre-encoded: {:.2}x   (encode alone: {encode_ns:.0} ns/event)",
        measured.per_second() / baseline.per_second()
    );
}

/// The key a usage event is produced under.
fn tenant(event: &UsageEvent) -> &str {
    event.tenant_id.as_deref().unwrap_or_default()
}
