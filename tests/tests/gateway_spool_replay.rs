//! A gateway that crashes after Kafka took a batch but before its spool position file said
//! so sends nothing twice: the position is committed with the batch, in one Kafka
//! transaction, and a restarted gateway starts from the later of the two.
//!
//! The crash state is made exactly: events are shipped, the gateway is killed (-9), and its
//! position file is put back to the start of the spool, as if every commit had happened but
//! no position file write.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tollgate_schemas::UsageEvent;
use tollgate_tests::http::{send, EchoUpstream};
use tollgate_tests::meter::read_topic;
use tollgate_tests::{create_topic, kafka, unique};

const ADMIN_TOKEN: &str = "replay-admin-token-0123456789abcdef";

async fn request_ids(brokers: &str, topic: &str, at_least: usize) -> HashMap<String, usize> {
    read_topic(brokers, topic, at_least, Duration::from_secs(120)).await;
    // Everything again, past the expected count, so a duplicate would show.
    let records = read_topic(brokers, topic, at_least + 1, Duration::from_secs(5)).await;
    let mut ids = HashMap::new();
    for (_, payload) in records {
        let event: UsageEvent = tollgate_schemas::decode(&payload.expect("payload")).expect("an event");
        *ids.entry(event.request_id.expect("request id")).or_default() += 1;
    }
    ids
}

/// One tenant-scoped request; returns its request id.
async fn call(public: &str, auth: &str, tenant: &str) -> String {
    let url = format!("{public}/v1/tenants/{tenant}/items");
    let reply = send("GET", &url, &[("authorization", auth)], b"").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.header("x-request-id").expect("request id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_before_the_position_file_resends_nothing() {
    let run = unique("replay");
    let dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&dir).expect("test directory");
    let brokers = kafka();
    let (keys_topic, usage_topic) = (format!("{run}.keys"), format!("{run}.usage"));
    create_topic(&brokers, &keys_topic, 1, &[("cleanup.policy", "compact")]).await;
    create_topic(&brokers, &usage_topic, 3, &[]).await;
    let upstream = EchoUpstream::start().await;
    let mut gateway = tollgate_tests::process::gateway(
        &dir,
        ADMIN_TOKEN,
        &brokers,
        (&keys_topic, &usage_topic),
        &upstream.url(),
        &[],
    );
    gateway.process.start().await;
    let tenant = format!("t_{}", &unique("x")[2..12]);
    let key = gateway
        .consumer_with_key(
            ADMIN_TOKEN,
            "replay-tenant",
            json!({"tenantId": tenant, "plan": "enterprise"}),
        )
        .await;
    let auth = format!("Bearer {key}");
    let mut answered = Vec::new();
    for _ in 0..300 {
        answered.push(call(&gateway.public, &auth, &tenant).await);
    }
    let shipped = request_ids(&brokers, &usage_topic, answered.len()).await;
    assert_eq!(shipped.len(), 300, "all shipped before the crash");

    // The crash: killed, and the position file as it was before any batch was recorded.
    gateway.process.kill();
    let position = dir.join("spool").join("position");
    assert!(position.exists(), "the spool recorded a position");
    std::fs::write(&position, "1 0\n").expect("rewind the position file");

    gateway.process.start().await;
    for _ in 0..100 {
        answered.push(call(&gateway.public, &auth, &tenant).await);
    }
    let events = request_ids(&brokers, &usage_topic, answered.len()).await;
    for id in &answered {
        assert_eq!(events.get(id), Some(&1), "request {id} has one event");
    }
    assert_eq!(
        events.values().sum::<usize>(),
        answered.len(),
        "no event twice, none extra"
    );
    gateway.process.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
