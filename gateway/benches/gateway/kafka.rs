//! Kafka for the benchmarks: the bench's own topics (created and deleted), and a producer
//! with the usage pipeline's settings that counts every acknowledgement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use tollgate_runtime::kafka::KafkaSettings;
use uuid::Uuid;

pub(crate) fn kafka_reachable(kafka: &KafkaSettings) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create().map_err(|e| e.to_string())?;
    admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(5))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

pub(crate) async fn create_topic(
    kafka: &KafkaSettings,
    what: &str,
    partitions: i32,
    config: &[(&str, &str)],
    topics: &mut Vec<String>,
) -> String {
    let topic = format!("bench.{what}.{}", Uuid::now_v7().simple());
    tollgate_test_support::create_topic(&kafka.brokers, &topic, partitions, config).await;
    topics.push(topic.clone());
    topic
}

pub(crate) async fn delete_topics(kafka: &KafkaSettings, topics: &[String]) {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create().expect("admin client");
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    if let Err(err) = admin.delete_topics(&names, &AdminOptions::new()).await {
        println!("bench topics left behind ({err}): {names:?}");
    }
}

/// Counts delivery reports: a benchmark that loses messages must not report a rate.
#[derive(Default)]
struct Deliveries {
    delivered: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let counter = if result.is_ok() { &self.delivered } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub(crate) struct Produced {
    pub(crate) delivered: u64,
    pub(crate) elapsed: Duration,
}

impl Produced {
    pub(crate) fn add(&mut self, other: &Produced) {
        self.delivered += other.delivered;
        self.elapsed += other.elapsed;
    }

    pub(crate) fn per_second(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }
}

/// Produces every `(key, payload)` of `records` (pulled, so any work the iterator does is
/// timed) with the usage pipeline's producer settings, and waits for every acknowledgement.
pub(crate) fn produce_all<K: AsRef<str>, P: AsRef<[u8]>>(
    kafka: &KafkaSettings,
    topic: &str,
    records: impl Iterator<Item = (K, P)>,
) -> Produced {
    let producer: BaseProducer<Deliveries> = kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .create_with_context(Deliveries::default())
        .expect("producer");
    // Connected before the clock starts.
    producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let started = Instant::now();
    for (i, (key, payload)) in records.enumerate() {
        let mut record = BaseRecord::<str, [u8]>::to(topic)
            .key(key.as_ref())
            .payload(payload.as_ref());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(5));
                }
                Err((err, _)) => panic!("produce to {topic}: {err}"),
            }
        }
        if i % 1_024 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .expect("every record acknowledged");
    let elapsed = started.elapsed();
    let context = producer.context();
    assert_eq!(
        context.failed.load(Ordering::Relaxed),
        0,
        "deliveries to {topic} failed"
    );
    Produced {
        delivered: context.delivered.load(Ordering::Relaxed),
        elapsed,
    }
}
