//! The foundation over the real stack: a usage event through Kafka and back, ClickHouse rows
//! through the `clickhouse` crate, a meter event accepted by stripe-mock, and each service
//! refusing to start with one line naming what is missing.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use tollgate_schemas::{decode, encode, encode_value, Outcome, UsageEvent};
use tollgate_tests::{clickhouse, kafka, stripe, unique};

fn sample_event(tenant: &str) -> UsageEvent {
    UsageEvent {
        event_id: uuid::Uuid::now_v7(),
        timestamp_ms: 1_795_000_000_123,
        tenant_id: Some(tenant.to_owned()),
        consumer: Some("acme-corp".to_owned()),
        key_id: Some("key_01".to_owned()),
        plan: Some("enterprise".to_owned()),
        route: "v1".to_owned(),
        method: "GET".to_owned(),
        status: 200,
        outcome: Outcome::Allowed,
        billable: true,
        units: BTreeMap::from([("requests".to_owned(), 1), ("compute_units".to_owned(), 5)]),
        request_bytes: 12,
        response_bytes: 345,
        latency_ms: 7,
        upstream_latency_ms: Some(5),
        gateway_id: "gw-test".to_owned(),
        request_id: Some("req-1".to_owned()),
    }
}

async fn create_topic(brokers: &str, topic: &str) {
    tollgate_tests::create_topic(brokers, topic, 3, &[]).await;
}

/// Produces `payloads` keyed by tenant with the settings the gateway uses, then reads them
/// back from the start of the topic.
async fn produce_and_consume(brokers: &str, topic: &str, payloads: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .create()
        .expect("producer");
    for (key, payload) in payloads {
        producer
            .send(
                FutureRecord::to(topic).key(key).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("broker acked the event");
    }
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("foundation"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut received = Vec::new();
    while received.len() < payloads.len() {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("events arrive within 30 s")
            .expect("consume");
        let key = String::from_utf8(message.key().expect("keyed").to_vec()).expect("utf-8 key");
        received.push((key, message.payload().expect("payload").to_vec()));
    }
    received
}

#[tokio::test]
async fn usage_event_round_trips_through_kafka_and_v1_resolves_to_current() {
    let brokers = kafka();
    let topic = unique("foundation.usage");
    create_topic(&brokers, &topic).await;

    let current = sample_event("tenant_abc123");
    let mut v1 = sample_event("tenant_v1");
    v1.request_id = None;
    let v1_bytes = encode_value::<UsageEvent>(v1_value(&v1), 1).expect("v1 encodes");
    assert_ne!(
        v1_bytes[2..10],
        encode(&v1)[2..10],
        "v1 and current fingerprints differ"
    );

    let received = produce_and_consume(
        &brokers,
        &topic,
        &[
            ("tenant_abc123".to_owned(), encode(&current)),
            ("tenant_v1".to_owned(), v1_bytes),
        ],
    )
    .await;
    let mut decoded: HashMap<String, UsageEvent> = received
        .into_iter()
        .map(|(key, payload)| (key, decode::<UsageEvent>(&payload).expect("decodes")))
        .collect();
    assert_eq!(decoded.remove("tenant_abc123"), Some(current));
    // The v1 writer had no request_id: the current reader fills in its default.
    assert_eq!(decoded.remove("tenant_v1"), Some(v1));
}

/// The event as the v1 schema's writer sees it (no `request_id`).
fn v1_value(event: &UsageEvent) -> apache_avro::types::Value {
    use apache_avro::types::Value;
    let opt_str = |v: &Option<String>| match v {
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    Value::Record(vec![
        ("event_id".into(), Value::String(event.event_id.to_string())),
        ("timestamp_ms".into(), Value::TimestampMillis(event.timestamp_ms)),
        ("tenant_id".into(), opt_str(&event.tenant_id)),
        ("consumer".into(), opt_str(&event.consumer)),
        ("key_id".into(), opt_str(&event.key_id)),
        ("plan".into(), opt_str(&event.plan)),
        ("route".into(), Value::String(event.route.clone())),
        ("method".into(), Value::String(event.method.clone())),
        ("status".into(), Value::Int(i32::from(event.status))),
        ("outcome".into(), Value::Enum(0, "ALLOWED".into())),
        ("billable".into(), Value::Boolean(event.billable)),
        (
            "units".into(),
            Value::Map(event.units.iter().map(|(k, v)| (k.clone(), Value::Long(*v))).collect()),
        ),
        ("request_bytes".into(), Value::Long(event.request_bytes)),
        ("response_bytes".into(), Value::Long(event.response_bytes)),
        ("latency_ms".into(), Value::Long(event.latency_ms)),
        (
            "upstream_latency_ms".into(),
            match event.upstream_latency_ms {
                Some(ms) => Value::Union(1, Box::new(Value::Long(ms))),
                None => Value::Union(0, Box::new(Value::Null)),
            },
        ),
        ("gateway_id".into(), Value::String(event.gateway_id.clone())),
    ])
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, ::clickhouse::Row)]
struct UsageRow {
    tenant_id: String,
    meter: String,
    units: u64,
    time: u32,
    time_ms: u16,
}

#[tokio::test]
async fn clickhouse_table_created_rows_inserted_and_read_back() {
    let settings = tollgate_runtime::clickhouse::ClickhouseSettings::new(clickhouse(), unique("foundation"));
    let client = settings
        .connect()
        .await
        .expect("clickhouse answers and the database is created");
    // DateTime plus a millisecond column: 18.16 has no DateTime64.
    client
        .query(
            "CREATE TABLE usage (tenant_id String, meter String, units UInt64, time DateTime, time_ms UInt16) \
             ENGINE = MergeTree ORDER BY (tenant_id, meter, time)",
        )
        .execute()
        .await
        .expect("create table");
    let rows: Vec<UsageRow> = (0..100u32)
        .map(|i| UsageRow {
            tenant_id: format!("tenant_{}", i % 3),
            meter: if i % 2 == 0 { "requests" } else { "compute_units" }.to_owned(),
            units: u64::from(i) + 1,
            time: 1_795_000_000 + i,
            time_ms: (i * 7 % 1000) as u16,
        })
        .collect();
    let mut insert = client.insert::<UsageRow>("usage").await.expect("insert starts");
    for row in &rows {
        insert.write(row).await.expect("row written");
    }
    insert.end().await.expect("insert committed");

    let mut read: Vec<UsageRow> = client
        .query("SELECT ?fields FROM usage ORDER BY time")
        .fetch_all()
        .await
        .expect("select");
    read.sort_by_key(|r| r.time);
    assert_eq!(read, rows);
    let total: u64 = client
        .query("SELECT sum(units) FROM usage WHERE tenant_id = ?")
        .bind("tenant_1")
        .fetch_one()
        .await
        .expect("sum");
    let expected: u64 = rows.iter().filter(|r| r.tenant_id == "tenant_1").map(|r| r.units).sum();
    assert_eq!(total, expected);
    client
        .query(&format!("DROP DATABASE {}", settings.database))
        .execute()
        .await
        .expect("drop database");
}

#[tokio::test]
async fn stripe_mock_accepts_a_meter_event_and_rejects_a_malformed_one() {
    let client = stripe::ClientBuilder::new("sk_test_123")
        .url(stripe())
        .build()
        .expect("client");
    let payload = HashMap::from([
        ("stripe_customer_id".to_owned(), "cus_foundation".to_owned()),
        ("value".to_owned(), "42".to_owned()),
    ]);
    let event = stripe_billing::billing_meter_event::CreateBillingMeterEvent::new("tollgate_compute_units", payload)
        .identifier("tenant_abc123:compute_units:1795000000:0")
        .timestamp(1_795_000_000)
        .send(&client)
        .await
        .expect("stripe-mock accepts the meter event");
    assert!(!event.event_name.is_empty());

    // stripe-mock validates against Stripe's OpenAPI spec: a parameter Stripe does not know
    // is refused, which is what makes the acceptance above mean something.
    let refused = reqwest_like_post(
        &stripe(),
        "v1/billing/meter_events",
        "event_name=x&payload[value]=1&no_such_parameter=1",
    )
    .await;
    assert_eq!(refused, 400, "stripe-mock must refuse an unknown parameter");
}

/// A bare form POST over a TCP socket, for a request the typed client cannot express.
async fn reqwest_like_post(base: &str, path: &str, form: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = tokio::net::TcpStream::connect(authority).await.expect("connect");
    let request = format!(
        "POST /{path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer sk_test_123\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("an HTTP status line")
}
