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
//! gateways are in `gateway/http.rs`; topics and the producer in `gateway/kafka.rs`.

#[path = "gateway/http.rs"]
mod http;
#[path = "gateway/kafka.rs"]
mod kafka;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tollgate_gateway::apikey;
use tollgate_gateway::directory::Directory;
use tollgate_gateway::keystore::KeyStore;
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_schemas::{encode, ApiKeyRecord, ConsumerRecord, Outcome, UsageEvent};
use uuid::Uuid;

use crate::http::{get, http_client, start_upstream, BenchGateway, HttpClient, Upstream};
use crate::kafka::{create_topic, delete_topics, kafka_reachable, produce_all, Produced};

/// Keys in the large directory of the lookup benchmark, whatever the scale.
const LARGE_DIRECTORY: usize = 1_000_000;
const SMALL_DIRECTORY: usize = 1_000;
/// Keys per consumer in generated key sets (a tenant with a few keys per environment).
const KEYS_PER_CONSUMER: usize = 10;
/// Tenant A's slow requests held in flight, and its bulkhead cap: A saturates its own cap.
const FLOOD: usize = 500;
const SLOW_DELAY: Duration = Duration::from_secs(2);
/// Concurrent keep-alive clients of the throughput measurement.
const THROUGHPUT_CLIENTS: usize = 16;
/// Partitions of the bench's usage topics, as the stack's `tollgate.usage.v1` has.
const USAGE_PARTITIONS: i32 = 6;
/// Linux page size: `/proc/self/statm` counts pages.
const PAGE_BYTES: u64 = 4096;

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

fn key_lookup(budget: Duration) {
    println!("\n[1] key lookup: apikey::parse + Directory::authenticate");
    let (mut small, mut large) = (Directory::default(), Directory::default());
    load_consumers(&mut small, SMALL_DIRECTORY);
    let small_keys = load_keys(&mut small, SMALL_DIRECTORY, SMALL_DIRECTORY);
    let before = resident_bytes();
    let loading = Instant::now();
    load_consumers(&mut large, LARGE_DIRECTORY);
    let with_consumers = resident_bytes();
    let large_keys = load_keys(&mut large, LARGE_DIRECTORY, 10_000);
    let load_secs = loading.elapsed().as_secs_f64();
    let after = resident_bytes();
    assert_eq!(large.key_count(), LARGE_DIRECTORY);

    let now_ms = chrono::Utc::now().timestamp_millis();
    let lookup = |directory: &Directory, key: &String| {
        let digest = apikey::parse(black_box(key)).expect("a generated key parses");
        black_box(
            directory
                .authenticate(&digest, now_ms)
                .expect("a loaded key authenticates"),
        );
    };
    let small_ns = per_op_ns(budget, &small_keys, |k| lookup(&small, k));
    let large_ns = per_op_ns(budget, &large_keys, |k| lookup(&large, k));
    println!("  {SMALL_DIRECTORY:>9} keys: {small_ns:8.0} ns/lookup (baseline)");
    println!(
        "  {LARGE_DIRECTORY:>9} keys: {large_ns:8.0} ns/lookup   ratio {:.2}x",
        large_ns / small_ns
    );

    // The same without parse (CRC and SHA-256 of the presented key): the index alone.
    let digests = |keys: &[String]| keys.iter().map(|k| apikey::digest(k)).collect::<Vec<_>>();
    let (small_digests, large_digests) = (digests(&small_keys), digests(&large_keys));
    let auth = |directory: &Directory, digest: &[u8; 32]| {
        black_box(
            directory
                .authenticate(black_box(digest), now_ms)
                .expect("a loaded key authenticates"),
        );
    };
    let small_ns = per_op_ns(budget, &small_digests, |d| auth(&small, d));
    let large_ns = per_op_ns(budget, &large_digests, |d| auth(&large, d));
    println!(
        "  authenticate only: {small_ns:.0} ns vs {large_ns:.0} ns   ratio {:.2}x",
        large_ns / small_ns
    );

    let consumers = LARGE_DIRECTORY.div_ceil(KEYS_PER_CONSUMER);
    let per_key = after.saturating_sub(with_consumers) as f64 / LARGE_DIRECTORY as f64;
    let per_consumer = with_consumers.saturating_sub(before) as f64 / consumers as f64;
    println!(
        "  memory: {per_key:.0} bytes/key, {per_consumer:.0} bytes/consumer (RSS {} MiB -> {} MiB for {LARGE_DIRECTORY} keys of {consumers} consumers, loaded in {load_secs:.1} s)",
        before >> 20,
        after >> 20,
    );
}

/// The consumers owning `keys` keys ([`KEYS_PER_CONSUMER`] each), applied as `KeyStore` would.
fn load_consumers(directory: &mut Directory, keys: usize) {
    for i in 0..keys.div_ceil(KEYS_PER_CONSUMER) {
        directory.apply_consumer(&consumer_id(i), Some(&consumer_record(i)));
    }
}

/// Applies `n` new keys; returns the plaintexts of `sample` of them spread evenly over the
/// directory (so lookups touch the whole index).
fn load_keys(directory: &mut Directory, n: usize, sample: usize) -> Vec<String> {
    let mut plaintexts = Vec::with_capacity(sample);
    let every = (n / sample).max(1);
    for i in 0..n {
        let key = apikey::generate("live");
        let record = key_record(i, &key);
        directory.apply_key(&record.id, Some(&record));
        if i % every == 0 && plaintexts.len() < sample {
            plaintexts.push(key.plaintext);
        }
    }
    plaintexts
}

fn consumer_id(i: usize) -> String {
    Uuid::from_u128(i as u128 + 1).hyphenated().to_string()
}

fn consumer_record(i: usize) -> ConsumerRecord {
    ConsumerRecord {
        id: consumer_id(i),
        name: format!("consumer-{i:07}"),
        tenant_id: Some(format!("tenant_{i:07}")),
        plan: Some("pro".to_owned()),
        stripe_customer_id: Some(format!("cus_{i:014}")),
        metadata_json: format!(r#"{{"tenantId":"tenant_{i:07}","plan":"pro","environment":"production"}}"#),
        created_at_ms: 1_764_000_000_000,
        updated_at_ms: 1_764_000_000_000,
        version: 1,
        updated_by: "bench".to_owned(),
    }
}

fn key_record(i: usize, key: &apikey::NewKey) -> ApiKeyRecord {
    let owner = i / KEYS_PER_CONSUMER;
    ApiKeyRecord {
        id: format!("key_{}", Uuid::now_v7().simple()),
        consumer_id: consumer_id(owner),
        consumer_name: format!("consumer-{owner:07}"),
        prefix: key.prefix.clone(),
        secret_sha256: key.digest,
        description: "production".to_owned(),
        labels: BTreeMap::new(),
        created_at_ms: 1_764_000_000_000,
        expires_at_ms: None,
        revoked_at_ms: None,
        rolled_from: None,
        version: 1,
        updated_by: "bench".to_owned(),
    }
}

/// Nanoseconds per call of `op`, cycling over `items` until `budget` is spent.
fn per_op_ns<T>(budget: Duration, items: &[T], mut op: impl FnMut(&T)) -> f64 {
    items.iter().take(1_000).for_each(&mut op);
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < budget {
        items.iter().for_each(&mut op);
        n += items.len();
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm resident field");
    pages * PAGE_BYTES
}

// ---------------------------------------------------------------------------------------------
// 2. Replay of the keys topic

async fn replay(kafka: &KafkaSettings, n: usize, topics: &mut Vec<String>) {
    println!(
        "\n[2] replay of {n} key records (+{} consumer records)",
        n.div_ceil(KEYS_PER_CONSUMER)
    );
    let topic = create_topic(kafka, "keys", 1, &[("cleanup.policy", "compact")], topics).await;
    let records = (0..n.div_ceil(KEYS_PER_CONSUMER))
        .map(|i| (format!("consumer/{}", consumer_id(i)), encode(&consumer_record(i))))
        .chain((0..n).map(|i| {
            let record = key_record(i, &apikey::generate("live"));
            (format!("key/{}", record.id), encode(&record))
        }));
    let produced = tokio::task::block_in_place(|| produce_all(kafka, &topic, records));
    let total = produced.delivered as usize;
    println!("  produced {total} records in {:.1} s", produced.elapsed.as_secs_f64());

    // Baseline: the same records read by a plain consumer, nothing decoded or applied.
    // Read before and after the replay; their mean is the baseline.
    let raw_before = consume_raw(kafka, &topic, total).await;
    let started = Instant::now();
    let store = KeyStore::start(kafka, &topic).await.expect("key store replays");
    let replayed = started.elapsed();
    let raw = (raw_before + consume_raw(kafka, &topic, total).await) / 2;
    let loaded = store.directory().read().expect("directory lock").key_count();
    assert_eq!(loaded, n, "every key record applied");
    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    println!(
        "  plain consumer:  {:9.0} records/s  ({:.2} s, baseline)",
        rate(raw),
        raw.as_secs_f64()
    );
    println!(
        "  KeyStore::start: {:9.0} records/s  ({:.2} s)   time ratio {:.2}x",
        rate(replayed),
        replayed.as_secs_f64(),
        replayed.as_secs_f64() / raw.as_secs_f64()
    );
}

/// Time for a plain consumer, created and assigned inside the timing, to read `total` records.
async fn consume_raw(kafka: &KafkaSettings, topic: &str, total: usize) -> Duration {
    let started = Instant::now();
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", "tollgate-bench-raw")
        .set("enable.auto.commit", "false")
        .create()
        .expect("raw consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .expect("assignment");
    consumer.assign(&assignment).expect("assign");
    for _ in 0..total {
        let message = consumer.recv().await.expect("raw fetch");
        black_box(message.payload());
    }
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// 3. Bulkhead isolation

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
