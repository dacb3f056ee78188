//! SIGTERM of the real gateway binary with requests in flight while Kafka is down: the
//! gateway finishes what it accepted, keeps the events it could not hand to Kafka in its
//! spool, exits, and ships them at the next start. Every request a client saw answered has
//! exactly one usage event on the topic afterwards.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tollgate_schemas::UsageEvent;
use tollgate_tests::http::{try_send_with, EchoUpstream};
use tollgate_tests::meter::read_topic;
use tollgate_tests::private_kafka::PrivateKafka;
use tollgate_tests::{create_topic, unique};

const ADMIN_TOKEN: &str = "sigterm-admin-token-0123456789abcdef";
/// Slow requests held in flight when the signal arrives (the upstream answers `/slow` after
/// three seconds).
const IN_FLIGHT: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_kafka_down_loses_no_answered_request() {
    let run = unique("sigterm");
    let dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&dir).expect("test directory");
    let mut kafka = PrivateKafka::start();
    let (keys_topic, usage_topic) = (format!("{run}.keys"), format!("{run}.usage"));
    create_topic(&kafka.brokers, &keys_topic, 1, &[("cleanup.policy", "compact")]).await;
    create_topic(&kafka.brokers, &usage_topic, 3, &[]).await;
    let upstream = EchoUpstream::start().await;
    let mut gateway = tollgate_tests::process::gateway(
        &dir,
        ADMIN_TOKEN,
        &kafka.brokers,
        (&keys_topic, &usage_topic),
        &upstream.url(),
        // Kafka is down during the drain: give it a moment, then leave the rest in the spool.
        &[("TOLLGATE_EVENTS__SHUTDOWN_FLUSH_MS", "1000")],
    );
    gateway.process.start().await;

    let tenant = format!("t_{}", &unique("x")[2..12]);
    let key = gateway
        .consumer_with_key(
            ADMIN_TOKEN,
            "sigterm-tenant",
            json!({"tenantId": tenant, "plan": "enterprise"}),
        )
        .await;
    let bearer = format!("Bearer {key}");

    // Answers the clients saw: request id → (status, path).
    let answers: Arc<Mutex<HashMap<String, (u16, String)>>> = Arc::default();
    let call = |path: String| {
        let (answers, bearer, public) = (answers.clone(), bearer.clone(), gateway.public.clone());
        async move {
            let url = format!("{public}{path}");
            if let Ok(reply) = try_send_with(false, "GET", &url, &[("authorization", &bearer)], b"").await {
                let id = reply
                    .header("x-request-id")
                    .expect("every answer has a request id")
                    .to_owned();
                answers.lock().unwrap().insert(id, (reply.status, path));
            }
        }
    };
    for i in 0..200 {
        call(format!("/v1/tenants/{tenant}/before/{i}")).await;
    }
    // Kafka goes away once it has these; traffic goes on (into the spool); slow requests are
    // in flight when the signal arrives. Waiting first keeps a transaction of the gateway
    // from being open on a partition at the kill: a broker killed then and restarted alone
    // has been seen to leave it hanging (its abort marker never written), which holds every
    // committed reader of that partition at that offset until an operator aborts it.
    let shipped = read_topic(&kafka.brokers, &usage_topic, 200, Duration::from_secs(120)).await;
    assert_eq!(
        shipped.len(),
        200,
        "the first requests' events reached Kafka while it was up"
    );
    kafka.kill();
    for i in 0..100 {
        call(format!("/v1/tenants/{tenant}/outage/{i}")).await;
    }
    let slow: Vec<_> = (0..IN_FLIGHT)
        .map(|i| tokio::spawn(call(format!("/v1/tenants/{tenant}/slow/{i}"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.process.terminate();
    for request in slow {
        request.await.expect("slow request task");
    }
    let status = gateway.process.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "the gateway exits cleanly on SIGTERM: {status}");

    let answers = answers.lock().unwrap().clone();
    let slow_answered = answers.values().filter(|(s, _)| *s == 200).count();
    assert_eq!(
        answers.len(),
        200 + 100 + IN_FLIGHT,
        "every accepted request was answered, the slow ones too"
    );
    assert_eq!(slow_answered, answers.len(), "all answered 200");

    // Kafka and the gateway come back; the spool drains.
    kafka.restart();
    gateway.process.start().await;
    read_topic(&kafka.brokers, &usage_topic, answers.len(), Duration::from_secs(120)).await;
    // Read everything again, a little past the expected count, so a duplicate would show.
    let records = read_topic(&kafka.brokers, &usage_topic, answers.len() + 1, Duration::from_secs(5)).await;
    let mut events: HashMap<String, usize> = HashMap::new();
    for (_, payload) in &records {
        let event: UsageEvent = tollgate_schemas::decode(payload.as_deref().expect("payload")).expect("an event");
        *events.entry(event.request_id.clone().expect("request id")).or_default() += 1;
    }
    let mut wrong: Vec<String> = answers
        .iter()
        .filter(|(request, _)| events.get(*request) != Some(&1))
        .map(|(request, (status, path))| format!("{path} ({status}, {request}): {:?} events", events.get(request)))
        .collect();
    wrong.sort();
    let log = gateway.process.output();
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    assert!(
        wrong.is_empty(),
        "{} of {} answered requests do not have exactly one event: {wrong:?}\ngateway log (last 60 lines):\n{}",
        wrong.len(),
        answers.len(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(records.len(), answers.len(), "no event beyond the answered requests");

    gateway.process.kill();
    kafka.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
