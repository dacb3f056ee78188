//! One usage event per request, over the real Kafka: fields and outcomes for a mixed run;
//! nothing lost and nothing twice through a broker crash and through SIGTERM under load.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message};
use serde_json::json;
use tollgate_schemas::{decode, Outcome, UsageEvent};
use tollgate_tests::gateway::{create_keys_topic, create_topic, dead_route, settings, TestGateway};
use tollgate_tests::http::{send, try_send_with, EchoUpstream};
use tollgate_tests::private_kafka::PrivateKafka;
use tollgate_tests::unique;

/// Reads events from `topic` until `expected` have arrived (for at most `patience`), then a
/// little longer to catch any extra; returns them all.
async fn collect_events(brokers: &str, topic: &str, expected: usize, patience: Duration) -> Vec<UsageEvent> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("events-test"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let wait = if events.len() >= expected {
            Duration::from_secs(2)
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(message)) => {
                let event = decode::<UsageEvent>(message.payload().expect("payload")).expect("an event decodes");
                let key = String::from_utf8_lossy(message.key().expect("keyed")).into_owned();
                assert_eq!(
                    key,
                    event.tenant_id.clone().unwrap_or_else(|| "-".to_owned()),
                    "keyed by tenant"
                );
                events.push(event);
            }
            Ok(Err(err)) => panic!("consume: {err}"),
            Err(_) => break,
        }
    }
    assert!(
        events.len() >= expected,
        "only {} of {expected} events arrived",
        events.len()
    );
    events
}

fn by_request_id(events: &[UsageEvent]) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for event in events {
        *seen.entry(event.request_id.clone().expect("request id")).or_insert(0) += 1;
    }
    seen
}

#[tokio::test]
async fn every_request_yields_exactly_one_event_with_the_right_fields() {
    let upstream = EchoUpstream::start().await;
    let usage_topic = unique("test.usage");
    create_topic(&usage_topic, 3, &[]).await;
    let mut s = settings(&create_keys_topic().await, &upstream.url());
    s.topics.usage = usage_topic.clone();
    s.routes.push(dead_route());
    let gw = TestGateway::start(s, None).await;
    let (key, key_id) = gw
        .consumer_with_key("acme-corp", json!({"tenantId": "tenant_abc123", "plan": "enterprise"}))
        .await;
    let auth = format!("Bearer {key}");

    // (path, credentials?, expected status, outcome)
    let plan: Vec<(&str, bool, u16, Outcome)> = vec![
        ("/v1/orders", true, 200, Outcome::Allowed),
        ("/v1/orders/2", true, 200, Outcome::Allowed),
        ("/v1/tenants/tenant_abc123/cost", true, 200, Outcome::Allowed),
        ("/v1/orders", false, 401, Outcome::Unauthenticated),
        ("/v1/tenants/tenant_other/x", true, 403, Outcome::Forbidden),
        ("/nowhere", true, 404, Outcome::Rejected),
        ("/dead/x", true, 502, Outcome::UpstreamError),
    ];
    for (i, (path, with_key, status, _)) in plan.iter().enumerate() {
        let request_id = format!("mixed-{i}");
        let mut headers = vec![("x-request-id", request_id.as_str())];
        if *with_key {
            headers.push(("authorization", auth.as_str()));
        }
        let reply = send("GET", &format!("{}{path}", gw.public), &headers, b"").await;
        assert_eq!(reply.status, *status, "{path}: {}", reply.text());
        if path.ends_with("/cost") {
            assert!(
                reply.header("x-tollgate-cost").is_none(),
                "the reported cost stays between upstream and gateway"
            );
        }
    }
    let events = collect_events(
        &tollgate_tests::kafka(),
        &usage_topic,
        plan.len(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(events.len(), plan.len(), "exactly one event per request");
    let mut ids: Vec<_> = events.iter().map(|e| e.event_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), plan.len(), "event ids are unique");
    let events: BTreeMap<String, UsageEvent> = events.into_iter().map(|e| (e.request_id.clone().unwrap(), e)).collect();
    for (i, (path, with_key, status, outcome)) in plan.iter().enumerate() {
        let e = &events[&format!("mixed-{i}")];
        assert_eq!(e.status, *status, "{path}");
        assert_eq!(e.outcome, *outcome, "{path}");
        assert_eq!(
            e.billable,
            *outcome == Outcome::Allowed,
            "{path}: only upstream answers below 500 are billable"
        );
        assert_eq!(e.method, "GET");
        assert_eq!(e.gateway_id, "gw-local-1");
        assert_eq!(e.units["requests"], 1);
        assert!(e.response_bytes > 0, "{path}: response bytes counted");
        // An unknown path is refused before the key is read: no identity.
        if *with_key && *outcome != Outcome::Rejected {
            assert_eq!(e.tenant_id.as_deref(), Some("tenant_abc123"), "{path}");
            assert_eq!(e.key_id.as_deref(), Some(key_id.as_str()));
            assert_eq!(e.plan.as_deref(), Some("enterprise"));
        } else {
            assert_eq!((e.tenant_id.as_deref(), e.key_id.as_deref()), (None, None));
        }
        assert!(!format!("{e:?}").contains(&key), "no key in an event");
    }
    assert_eq!(events["mixed-0"].units["compute_units"], 1, "route cost");
    assert_eq!(events["mixed-0"].route, "v1");
    assert_eq!(
        events["mixed-2"].units["compute_units"], 42,
        "reported cost replaces the route's 5"
    );
    assert_eq!(events["mixed-2"].route, "tenant-scoped");
    assert!(events["mixed-0"].upstream_latency_ms.is_some());
    assert!(events["mixed-3"].upstream_latency_ms.is_none());
    gw.stop().await;
}

/// Sends requests with ids `<prefix>-<n>` until `stop`; returns the ids answered 200, and
/// counts them in `count` as they come.
async fn load(
    public: String,
    auth: String,
    prefix: String,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> Vec<String> {
    let mut answered = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("{prefix}-{n}");
        n += 1;
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            try_send_with(
                false,
                "GET",
                &format!("{public}/v1/load"),
                &[("authorization", &auth), ("x-request-id", &id)],
                b"",
            ),
        )
        .await;
        if let Ok(Ok(reply)) = reply {
            assert_eq!(reply.status, 200, "the gateway keeps serving: {}", reply.text());
            answered.push(id);
            count.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    answered
}

#[tokio::test]
async fn a_broker_crash_loses_no_event_and_duplicates_none() {
    crash_the_broker_under_load(Duration::from_secs(20)).await;
}

/// Longer than the transaction timeout: the coordinator aborts the transaction the shipper
/// had open at the crash and fences its producer; the shipper replaces it and ships on.
#[tokio::test]
async fn an_outage_longer_than_the_transaction_timeout_loses_no_event() {
    let outage = Duration::from_millis(tollgate_gateway::events::transactions::TRANSACTION_TIMEOUT_MS + 15_000);
    crash_the_broker_under_load(outage).await;
}

/// Tenants call through a gateway whose private broker is killed (SIGKILL) for `outage`,
/// then restarted: every answered request has exactly one event, none extra.
async fn crash_the_broker_under_load(outage: Duration) {
    let mut kafka = tokio::task::spawn_blocking(PrivateKafka::start).await.unwrap();
    let upstream = EchoUpstream::start().await;
    let keys_topic = unique("test.keys");
    let usage_topic = unique("test.usage");
    tollgate_tests::create_topic(&kafka.brokers, &keys_topic, 1, &[("cleanup.policy", "compact")]).await;
    tollgate_tests::create_topic(&kafka.brokers, &usage_topic, 3, &[]).await;
    let mut s = settings(&keys_topic, &upstream.url());
    s.kafka.brokers = kafka.brokers.clone();
    s.topics.usage = usage_topic.clone();
    let gw = TestGateway::start(s, None).await;
    let (key, _) = gw
        .consumer_with_key("acme-corp", json!({"tenantId": "tenant_abc123", "plan": "enterprise"}))
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let traffic = tokio::spawn(load(
        gw.public.clone(),
        format!("Bearer {key}"),
        "outage".to_owned(),
        Arc::clone(&stop),
        Arc::clone(&count),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    kafka = tokio::task::spawn_blocking(move || {
        kafka.kill();
        kafka
    })
    .await
    .unwrap();
    let at_kill = count.load(Ordering::Relaxed);
    // The broker stays down while tenants keep calling.
    tokio::time::sleep(outage).await;
    let during_outage = count.load(Ordering::Relaxed) - at_kill;
    kafka = tokio::task::spawn_blocking(move || {
        kafka.restart();
        kafka
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let answered = traffic.await.unwrap();
    assert!(
        during_outage > 200,
        "requests were answered while the broker was down: {during_outage}"
    );

    // The property is no loss and no duplicate, not how soon: after a crash the broker replays
    // its logs and reloads transaction state, and a transaction open at the crash may end only
    // by its timeout (`TRANSACTION_TIMEOUT_MS`, 60 s) or by a replaced producer (20 s more) on a
    // loaded machine, so the wait covers both.
    let events = collect_events(&kafka.brokers, &usage_topic, answered.len(), Duration::from_secs(180)).await;
    let seen = by_request_id(&events);
    for id in &answered {
        assert_eq!(seen.get(id), Some(&1), "request {id}: one event");
    }
    // The consumer_with_key calls are admin calls: no events. Nothing else was sent.
    assert_eq!(events.len(), answered.len(), "no event twice, none extra");
    gw.stop().await;
}

/// The in-process graceful stop (what SIGTERM triggers; the real signal to the real binary,
/// with Kafka down during the drain, is `gateway_sigterm.rs`).
#[tokio::test]
async fn graceful_stop_under_load_ships_every_answered_event() {
    let upstream = EchoUpstream::start().await;
    let usage_topic = unique("test.usage");
    create_topic(&usage_topic, 3, &[]).await;
    let mut s = settings(&create_keys_topic().await, &upstream.url());
    s.topics.usage = usage_topic.clone();
    let spool = s.events.spool_dir.clone();
    let gw = TestGateway::start(s, None).await;
    let (key, _) = gw
        .consumer_with_key("acme-corp", json!({"tenantId": "tenant_abc123", "plan": "enterprise"}))
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            tokio::spawn(load(
                gw.public.clone(),
                format!("Bearer {key}"),
                format!("term-{c}"),
                Arc::clone(&stop),
                Arc::clone(&count),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Shutdown while requests are in flight: they finish, their events reach Kafka.
    gw.stop().await;
    stop.store(true, Ordering::Relaxed);
    let mut answered = Vec::new();
    for client in clients {
        answered.extend(client.await.expect("client task"));
    }
    assert!(!answered.is_empty());
    let events = collect_events(
        &tollgate_tests::kafka(),
        &usage_topic,
        answered.len(),
        Duration::from_secs(60),
    )
    .await;
    let seen = by_request_id(&events);
    for id in &answered {
        assert_eq!(
            seen.get(id),
            Some(&1),
            "request {id} answered before shutdown has one event"
        );
    }
    let _ = std::fs::remove_dir_all(spool);
}

/// Steady traffic ships in few transactions: after a short batch the shipper waits
/// `ship_interval_ms` before the next one, and every event still arrives once. Shipping each
/// batch as soon as the previous one is in would commit a transaction every few requests.
#[tokio::test]
async fn steady_traffic_ships_in_transactions_at_most_one_per_interval() {
    let upstream = EchoUpstream::start().await;
    let usage_topic = unique("test.usage");
    create_topic(&usage_topic, 3, &[]).await;
    let mut s = settings(&create_keys_topic().await, &upstream.url());
    s.topics.usage = usage_topic.clone();
    s.events.ship_interval_ms = 250;
    let gw = TestGateway::start(s, None).await;
    let (key, _) = gw
        .consumer_with_key("acme-corp", json!({"tenantId": "tenant_abc123", "plan": "enterprise"}))
        .await;
    let transactions = || async {
        let metrics = gw.admin("GET", "/metrics", None).await.text();
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("gateway_events_delivery_seconds_count "))
            .map_or(0, |n| n.trim().parse::<u64>().expect("a count"))
    };
    let before = transactions().await;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            tokio::spawn(load(
                gw.public.clone(),
                format!("Bearer {key}"),
                format!("steady-{c}"),
                Arc::clone(&stop),
                Arc::clone(&count),
            ))
        })
        .collect();
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answered = Vec::new();
    for client in clients {
        answered.extend(client.await.expect("client"));
    }
    let elapsed = started.elapsed();
    let events = collect_events(
        &tollgate_tests::kafka(),
        &usage_topic,
        answered.len(),
        Duration::from_secs(30),
    )
    .await;
    let shipped = transactions().await - before;
    let seen = by_request_id(&events);
    assert_eq!(seen.len(), answered.len(), "one event per answered request");
    assert!(seen.values().all(|n| *n == 1), "no event twice");
    assert!(answered.len() > 100, "steady traffic: {} requests", answered.len());
    // One transaction per interval while traffic lasts, plus what was left when it ended.
    let most = elapsed.as_millis() as u64 / 250 + 3;
    assert!(
        (1..=most).contains(&shipped),
        "{} events in {shipped} transactions over {elapsed:?}: at most {most}",
        answered.len()
    );
    gw.stop().await;
}
