//! Tollgate on the cluster stack: two gateways limiting on the Redis Cluster and shipping to
//! three Kafka nodes, two meter-consumers in one group writing to two ClickHouse replicas.
//! A tenant's allowance holds across both gateways, and every answer is in ClickHouse once, on
//! both replicas, raw and rolled up.

// Needs the cluster stack with Tollgate on it: `scripts/stack test --cluster`.
#![cfg(feature = "cluster-tests")]

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tollgate_tests::http::{send, try_send_with};
use tollgate_tests::{cluster_clickhouse, eventually, unique};

/// The free plan's `requests_per_minute` in config/gateway.toml.
const FREE_PER_MINUTE: usize = 100;

#[derive(Debug, serde::Deserialize, clickhouse::Row)]
struct Event {
    request_id: String,
    status: u16,
    billable: u8,
}

fn urls(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_admit_one_allowance_and_every_answer_is_counted_once_on_both_replicas() {
    let clickhouse = cluster_clickhouse();
    let publics = urls(
        "TOLLGATE_TEST_CLUSTER_GATEWAYS",
        "http://127.0.0.1:19080,http://127.0.0.1:19082",
    );
    let admins = urls(
        "TOLLGATE_TEST_CLUSTER_GATEWAY_ADMINS",
        "http://127.0.0.1:19081,http://127.0.0.1:19083",
    );
    let token =
        std::env::var("TOLLGATE_ADMIN_TOKEN").expect("TOLLGATE_ADMIN_TOKEN (scripts/stack test --cluster sets it)");
    for admin in &admins {
        let ready = try_send_with(false, "GET", &format!("{admin}/readyz"), &[], b"").await;
        assert!(
            ready.is_ok_and(|r| r.status == 200),
            "no ready gateway at {admin}: start the cluster stack with `scripts/stack up --cluster`"
        );
    }

    // A free-plan tenant, made on gateway 1; gateway 2 learns the key from the keys topic.
    let tenant = unique("t_cluster");
    let auth = format!("Bearer {token}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let name = unique("c");
    let body = json!({"name": name, "metadata": {"tenantId": tenant, "plan": "free"}}).to_string();
    let consumers = format!("{}/v1/consumers", admins[0]);
    let created = send("POST", &consumers, &headers, body.as_bytes()).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let key = send("POST", &format!("{consumers}/{name}/keys"), &headers, b"{}").await;
    assert_eq!(key.status, 201, "{}", key.text());
    let key = key.json()["key"].as_str().expect("plaintext key").to_owned();
    let bearer = format!("Bearer {key}");
    let path = format!("/v1/tenants/{tenant}/items");
    // Gateway 2 learns the key from the keys topic; waiting on its admin API costs no request
    // of the allowance.
    eventually("gateway 2 knows the key", Duration::from_secs(30), || {
        let url = format!("{}/v1/consumers/{name}/keys", admins[1]);
        async move {
            let reply = send("GET", &url, &headers, b"").await;
            let known = reply.status == 200 && reply.json()["data"].as_array().is_some_and(|k| !k.is_empty());
            known.then_some(())
        }
    })
    .await;

    // Three times the allowance, from 16 clients alternating between the gateways.
    let attempts = 3 * FREE_PER_MINUTE;
    let mut clients = Vec::new();
    for c in 0..16 {
        let (publics, bearer, path) = (publics.clone(), bearer.clone(), path.clone());
        clients.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in (c..attempts).step_by(16) {
                let url = format!("{}{path}", publics[i % publics.len()]);
                let reply = send("GET", &url, &[("authorization", &bearer)], b"").await;
                let id = reply.header("x-request-id").unwrap_or_default().to_owned();
                answers.push((id, reply.status));
            }
            answers
        }));
    }
    let mut answers: HashMap<String, u16> = HashMap::new();
    for client in clients {
        answers.extend(client.await.expect("client"));
    }
    assert_eq!(answers.len(), attempts, "every answer has its own x-request-id");
    let admitted = answers.values().filter(|s| **s == 200).count();
    let refused = answers.values().filter(|s| **s == 429).count();
    assert_eq!(
        (admitted, refused),
        (FREE_PER_MINUTE, attempts - FREE_PER_MINUTE),
        "two gateways on one Redis Cluster admit the allowance exactly: {answers:?}"
    );

    // Both replicas: every answer's event once, billable exactly for the admitted ones, and
    // the rollups agreeing.
    for url in &clickhouse {
        let client = clickhouse::Client::default()
            .with_url(url)
            .with_database("tollgate")
            .with_validation(false);
        let events: Vec<Event> = eventually(
            &format!("every answer's event on {url}"),
            Duration::from_secs(120),
            || {
                let (client, tenant) = (client.clone(), tenant.clone());
                async move {
                    let events: Vec<Event> = client
                        .query("SELECT request_id, status, billable FROM usage_events WHERE tenant_id = ?")
                        .bind(tenant)
                        .fetch_all()
                        .await
                        .ok()?;
                    (events.len() >= attempts).then_some(events)
                }
            },
        )
        .await;
        assert_eq!(events.len(), attempts, "no event twice on {url}");
        for event in &events {
            assert_eq!(
                answers.get(&event.request_id),
                Some(&event.status),
                "{event:?} on {url}"
            );
            assert_eq!(event.billable == 1, event.status == 200, "{event:?} on {url}");
        }
        for table in ["usage_meter_minute", "usage_meter_hour", "usage_meter_day"] {
            let billed = eventually(&format!("{table} on {url}"), Duration::from_secs(60), || {
                let (client, tenant) = (client.clone(), tenant.clone());
                let sql = format!(
                    "SELECT toUInt64(sum(billable_units)) FROM {table} WHERE tenant_id = ? AND meter = 'requests'"
                );
                async move {
                    let units: u64 = client.query(&sql).bind(tenant).fetch_one().await.ok()?;
                    (units >= FREE_PER_MINUTE as u64).then_some(units)
                }
            })
            .await;
            assert_eq!(billed, FREE_PER_MINUTE as u64, "{table} on {url}");
        }
    }
}
