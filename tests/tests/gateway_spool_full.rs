//! `events.when_full`: with Kafka away long enough for the spool to reach its cap, the
//! default policy refuses billable requests (503 `usage-spool-full`, the upstream never
//! called) rather than serve them unbilled; when Kafka returns the spool drains and requests
//! are served again, each answered one with its event.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use tollgate_schemas::UsageEvent;
use tollgate_tests::gateway::{settings, TestGateway};
use tollgate_tests::http::EchoUpstream;
use tollgate_tests::meter::{read_topic_until, TopicRecord};
use tollgate_tests::private_kafka::PrivateKafka;
use tollgate_tests::{create_topic, eventually, unique};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_spool_refuses_billable_requests_until_kafka_takes_it() {
    let mut kafka = PrivateKafka::start();
    let (keys_topic, usage_topic) = (unique("full.keys"), unique("full.usage"));
    create_topic(&kafka.brokers, &keys_topic, 1, &[("cleanup.policy", "compact")]).await;
    create_topic(&kafka.brokers, &usage_topic, 1, &[]).await;
    let upstream = EchoUpstream::start().await;
    let mut settings = settings(&keys_topic, &upstream.url());
    settings.kafka.brokers = kafka.brokers.clone();
    settings.topics.usage = usage_topic.clone();
    // The smallest spool the settings allow: a few dozen events.
    settings.events.segment_bytes = 4096;
    settings.events.max_spool_bytes = 4096;
    let gateway = TestGateway::start(settings, None).await;
    let tenant = format!("t_{}", &unique("x")[2..12]);
    let (key, _) = gateway
        .consumer_with_key("spool-full", json!({"tenantId": tenant, "plan": "enterprise"}))
        .await;
    let auth = format!("Bearer {key}");
    let path = format!("/v1/tenants/{tenant}/items");
    let mut answered_ok = HashSet::new();

    kafka.kill();
    // Served while the spool has room; then refused, with nothing sent upstream.
    let mut refused = None;
    for _ in 0..500 {
        let reply = gateway.get(&path, &[("authorization", &auth)]).await;
        match reply.status {
            200 => {
                answered_ok.insert(reply.header("x-request-id").expect("request id").to_owned());
            }
            503 => {
                refused = Some(reply);
                break;
            }
            other => panic!("unexpected {other}: {}", reply.text()),
        }
    }
    let refused = refused.expect("the spool reached its cap within 500 requests");
    assert!(
        answered_ok.len() >= 5,
        "some requests fit the spool first: {}",
        answered_ok.len()
    );
    let problem = refused.json();
    assert_eq!(
        problem["type"].as_str().map(|t| t.ends_with("usage-spool-full")),
        Some(true),
        "{problem}"
    );
    assert!(refused.header("retry-after").is_some(), "a refusal says when to retry");
    let reached = upstream.received();
    for _ in 0..20 {
        assert_eq!(gateway.get(&path, &[("authorization", &auth)]).await.status, 503);
    }
    assert_eq!(
        upstream.received(),
        reached,
        "refused requests never reach the upstream"
    );

    // Kafka is back: the spool drains and billable requests are served again.
    kafka.restart();
    eventually(
        "served again once the spool drained",
        Duration::from_secs(120),
        || async {
            let reply = gateway.get(&path, &[("authorization", &auth)]).await;
            (reply.status == 200).then(|| reply.header("x-request-id").expect("request id").to_owned())
        },
    )
    .await;

    // Until every request served during the outage has its event: the spool may still be
    // shipping its tail when requests are served again.
    let decode = |records: &[TopicRecord]| -> Vec<UsageEvent> {
        records
            .iter()
            .map(|(_, payload)| tollgate_schemas::decode(payload.as_deref().expect("payload")).expect("an event"))
            .collect()
    };
    let all_shipped = |records: &[TopicRecord]| {
        let ids: HashSet<String> = decode(records).into_iter().filter_map(|e| e.request_id).collect();
        answered_ok.iter().all(|id| ids.contains(id))
    };
    let records = read_topic_until(&kafka.brokers, &usage_topic, Duration::from_secs(120), all_shipped).await;
    let events = decode(&records);
    let shipped: HashSet<String> = events
        .iter()
        .filter(|e| e.billable)
        .filter_map(|e| e.request_id.clone())
        .collect();
    for id in &answered_ok {
        assert!(
            shipped.contains(id),
            "request {id} was served during the outage and has its billable event"
        );
    }
    assert!(
        events.iter().filter(|e| e.status == 503).all(|e| !e.billable),
        "a refusal is never billable"
    );
    gateway.stop().await;
}
