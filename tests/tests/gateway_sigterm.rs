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
use tollgate_tests::http::{send, try_send_with, EchoUpstream};
use tollgate_tests::meter::read_topic;
use tollgate_tests::private_kafka::PrivateKafka;
use tollgate_tests::process::{free_port, repo, ServiceProcess};
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
    let (public_port, admin_port) = (free_port(), free_port());
    let (public, admin) = (
        format!("http://127.0.0.1:{public_port}"),
        format!("http://127.0.0.1:{admin_port}"),
    );
    let config = repo().join("config/gateway.toml").display().to_string();
    let env = [
        ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
        ("TOLLGATE_SERVICE__ID", format!("{run}-gw")),
        ("TOLLGATE_PUBLIC__LISTEN", format!("127.0.0.1:{public_port}")),
        ("TOLLGATE_ADMIN__LISTEN", format!("127.0.0.1:{admin_port}")),
        ("TOLLGATE_KAFKA__BROKERS", kafka.brokers.clone()),
        ("TOLLGATE_TOPICS__KEYS", keys_topic.clone()),
        ("TOLLGATE_TOPICS__USAGE", usage_topic.clone()),
        ("TOLLGATE_ROUTES__0__UPSTREAM", upstream.url()),
        ("TOLLGATE_ROUTES__1__UPSTREAM", upstream.url()),
        ("TOLLGATE_EVENTS__SPOOL_DIR", dir.join("spool").display().to_string()),
        // Kafka is down during the drain: give it a moment, then leave the rest in the spool.
        ("TOLLGATE_EVENTS__SHUTDOWN_FLUSH_MS", "1000".to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    let mut gateway = ServiceProcess::new(
        "tollgate-gateway",
        &["--config", &config],
        env,
        format!("{admin}/readyz"),
        &dir,
    );
    gateway.start().await;

    let tenant = format!("t_{}", &unique("x")[2..12]);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let admin_headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let body = json!({"name": "sigterm-tenant", "metadata": {"tenantId": tenant, "plan": "enterprise"}});
    let created = send(
        "POST",
        &format!("{admin}/v1/consumers"),
        &admin_headers,
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let key = send(
        "POST",
        &format!("{admin}/v1/consumers/sigterm-tenant/keys"),
        &admin_headers,
        b"{}",
    )
    .await;
    let key = key.json()["key"].as_str().expect("plaintext key").to_owned();
    let bearer = format!("Bearer {key}");

    // Answers the clients saw: request id → status.
    let answers: Arc<Mutex<HashMap<String, u16>>> = Arc::default();
    let call = |path: String| {
        let (answers, bearer, public) = (answers.clone(), bearer.clone(), public.clone());
        async move {
            let url = format!("{public}{path}");
            if let Ok(reply) = try_send_with(false, "GET", &url, &[("authorization", &bearer)], b"").await {
                let id = reply
                    .header("x-request-id")
                    .expect("every answer has a request id")
                    .to_owned();
                answers.lock().unwrap().insert(id, reply.status);
            }
        }
    };
    for i in 0..200 {
        call(format!("/v1/tenants/{tenant}/before/{i}")).await;
    }
    // Kafka goes away; traffic goes on (into the spool); slow requests are in flight when
    // the signal arrives.
    kafka.kill();
    for i in 0..100 {
        call(format!("/v1/tenants/{tenant}/outage/{i}")).await;
    }
    let slow: Vec<_> = (0..IN_FLIGHT)
        .map(|i| tokio::spawn(call(format!("/v1/tenants/{tenant}/slow/{i}"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    gateway.terminate();
    for request in slow {
        request.await.expect("slow request task");
    }
    let status = gateway.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "the gateway exits cleanly on SIGTERM: {status}");

    let answers = answers.lock().unwrap().clone();
    let slow_answered = answers.values().filter(|s| **s == 200).count();
    assert_eq!(
        answers.len(),
        200 + 100 + IN_FLIGHT,
        "every accepted request was answered, the slow ones too"
    );
    assert_eq!(slow_answered, answers.len(), "all answered 200");

    // Kafka and the gateway come back; the spool drains.
    kafka.restart();
    gateway.start().await;
    read_topic(&kafka.brokers, &usage_topic, answers.len(), Duration::from_secs(120)).await;
    // Read everything again, a little past the expected count, so a duplicate would show.
    let records = read_topic(&kafka.brokers, &usage_topic, answers.len() + 1, Duration::from_secs(5)).await;
    let mut events: HashMap<String, usize> = HashMap::new();
    for (_, payload) in &records {
        let event: UsageEvent = tollgate_schemas::decode(payload.as_deref().expect("payload")).expect("an event");
        *events.entry(event.request_id.clone().expect("request id")).or_default() += 1;
    }
    for (request, status) in &answers {
        assert_eq!(
            events.get(request),
            Some(&1),
            "request {request} (answered {status}) has one event"
        );
    }
    assert_eq!(records.len(), answers.len(), "no event beyond the answered requests");

    gateway.kill();
    kafka.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
