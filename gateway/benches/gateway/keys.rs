//! The key index for the benchmarks: lookups in a small and a large directory, the memory a
//! key and a consumer take, and how fast a gateway replays the keys topic against a plain
//! consumer reading the same records.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tollgate_gateway::apikey;
use tollgate_gateway::directory::Directory;
use tollgate_gateway::keystore::KeyStore;
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_schemas::{encode, ApiKeyRecord, ConsumerRecord, EntityKey};
use uuid::Uuid;

use crate::kafka::{create_topic, produce_all};

/// Keys in the large directory of the lookup benchmark, whatever the scale.
const LARGE_DIRECTORY: usize = 1_000_000;
const SMALL_DIRECTORY: usize = 1_000;
/// Keys per consumer in generated key sets (a tenant with a few keys per environment).
const KEYS_PER_CONSUMER: usize = 10;
/// Linux page size: `/proc/self/statm` counts pages.
const PAGE_BYTES: u64 = 4096;

pub(crate) fn key_lookup(budget: Duration) {
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

pub(crate) async fn replay(kafka: &KafkaSettings, n: usize, topics: &mut Vec<String>) {
    println!(
        "\n[2] replay of {n} key records (+{} consumer records)",
        n.div_ceil(KEYS_PER_CONSUMER)
    );
    let topic = create_topic(kafka, "keys", 1, &[("cleanup.policy", "compact")], topics).await;
    let records = (0..n.div_ceil(KEYS_PER_CONSUMER))
        .map(|i| {
            (
                EntityKey::Consumer(&consumer_id(i)).to_string(),
                encode(&consumer_record(i)),
            )
        })
        .chain((0..n).map(|i| {
            let record = key_record(i, &apikey::generate("live"));
            (EntityKey::ApiKey(&record.id).to_string(), encode(&record))
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
