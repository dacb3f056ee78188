//! Consumers and API keys through the admin API, over the real Kafka keys topic: the seed's
//! consumer body, issue/list/roll/revoke, two replicas sharing the topic, restart replay.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::time::{Duration, Instant};

use serde_json::json;
use tollgate_tests::eventually;
use tollgate_tests::gateway::{create_keys_topic, settings, TestGateway};
use tollgate_tests::http::EchoUpstream;

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test]
async fn seed_consumer_keys_issue_list_roll_revoke() {
    let upstream = EchoUpstream::start().await;
    let topic = create_keys_topic().await;
    let gw = TestGateway::start(settings(&topic, &upstream.url()), None).await;

    // The seed's exact body.
    let body = json!({"name":"acme-corp","metadata":{"tenantId":"tenant_abc123","plan":"enterprise","environment":"production"}});
    let created = gw.admin("POST", "/v1/consumers", Some(body.clone())).await;
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.json()["name"], "acme-corp");
    assert_eq!(created.json()["metadata"]["environment"], "production");
    let again = gw.admin("POST", "/v1/consumers", Some(body)).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.header("content-type"), Some("application/problem+json"));
    let listed = gw.admin("GET", "/v1/consumers", None).await.json();
    assert!(listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "acme-corp"));

    let issued = gw
        .admin(
            "POST",
            "/v1/consumers/acme-corp/keys",
            Some(json!({"description": "ci"})),
        )
        .await;
    assert_eq!(issued.status, 201, "{}", issued.text());
    let issued = issued.json();
    let key = issued["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with(issued["prefix"].as_str().unwrap()));
    for field in ["id", "prefix", "createdOn"] {
        assert!(issued[field].is_string(), "{field}");
    }

    let keys = gw.admin("GET", "/v1/consumers/acme-corp/keys", None).await;
    assert_eq!(keys.status, 200);
    assert!(!keys.text().contains(&key), "a listing never shows a secret");
    assert_eq!(keys.json()["data"][0]["id"], issued["id"]);
    assert!(keys.json()["data"][0].get("key").is_none());

    // The key works with either credential header, and the upstream learns who called.
    let proxied = gw.get("/v1/orders", &[("authorization", &bearer(&key))]).await;
    assert_eq!(proxied.status, 200, "{}", proxied.text());
    let seen = proxied.json();
    assert_eq!(seen["headers"]["x-tollgate-consumer"], "acme-corp");
    assert_eq!(seen["headers"]["x-tollgate-tenant"], "tenant_abc123");
    assert_eq!(seen["headers"]["x-tollgate-plan"], "enterprise");
    assert_eq!(seen["headers"]["x-tollgate-key-id"], issued["id"]);
    assert!(
        seen["headers"].get("authorization").is_none(),
        "the tenant's key is not forwarded"
    );
    assert_eq!(gw.get("/v1/orders", &[("x-api-key", &key)]).await.status, 200);

    // Roll: the new key works at once; the old one until the deadline, then 401.
    let deadline = chrono::Utc::now() + chrono::Duration::seconds(3);
    let rolled = gw
        .admin(
            "POST",
            "/v1/consumers/acme-corp/roll-key",
            Some(json!({"expiresOn": deadline.to_rfc3339()})),
        )
        .await;
    assert_eq!(rolled.status, 201, "{}", rolled.text());
    let new_key = rolled.json()["key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, key);
    assert_eq!(
        gw.get("/v1/x", &[("authorization", &bearer(&new_key))]).await.status,
        200
    );
    assert_eq!(
        gw.get("/v1/x", &[("authorization", &bearer(&key))]).await.status,
        200,
        "old key valid in grace"
    );
    eventually(
        "old key refused after the grace deadline",
        Duration::from_secs(10),
        || async { (gw.get("/v1/x", &[("authorization", &bearer(&key))]).await.status == 401).then_some(()) },
    )
    .await;
    assert!(chrono::Utc::now() >= deadline, "refused only after the deadline");

    // Revoke: refused at once.
    let new_id = rolled.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        gw.admin("DELETE", &format!("/v1/consumers/acme-corp/keys/{new_id}"), None)
            .await
            .status,
        204
    );
    let refused = gw.get("/v1/x", &[("authorization", &bearer(&new_key))]).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("content-type"), Some("application/problem+json"));
    gw.stop().await;
}

#[tokio::test]
async fn admin_api_refuses_bad_input_clearly() {
    let upstream = EchoUpstream::start().await;
    let gw = TestGateway::start(settings(&create_keys_topic().await, &upstream.url()), None).await;
    let unauth = tollgate_tests::http::send(
        "GET",
        &format!("{}/v1/consumers", gw.admin),
        &[("authorization", "Bearer wrong-token-0000000")],
        b"",
    )
    .await;
    assert_eq!(unauth.status, 401);
    for (body, needle) in [
        (json!({"name": "has space"}), "name must be"),
        (json!({"name": "ok", "metadata": {"tenantId": 5}}), "metadata.tenantId"),
        (json!({"name": "ok", "extra": 1}), "unknown field `extra`"),
    ] {
        let reply = gw.admin("POST", "/v1/consumers", Some(body)).await;
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert!(
            reply.json()["detail"].as_str().unwrap().contains(needle),
            "{}",
            reply.text()
        );
    }
    gw.admin(
        "POST",
        "/v1/consumers",
        Some(json!({"name": "ok", "metadata": {"tenantId": "t_ok"}})),
    )
    .await;
    let past = gw
        .admin(
            "POST",
            "/v1/consumers/ok/keys",
            Some(json!({"expiresOn": "2020-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(past.status, 400);
    let bad_time = gw
        .admin("POST", "/v1/consumers/ok/keys", Some(json!({"expiresOn": "tomorrow"})))
        .await;
    assert_eq!(bad_time.status, 400);
    assert_eq!(gw.admin("GET", "/v1/consumers/nobody/keys", None).await.status, 404);
    assert_eq!(
        gw.admin("DELETE", "/v1/consumers/ok/keys/key_nope", None).await.status,
        404
    );
    // Nothing half-done: the refused calls created no key.
    assert_eq!(
        gw.admin("GET", "/v1/consumers/ok/keys", None).await.json()["data"],
        json!([])
    );
    gw.stop().await;
}

#[tokio::test]
async fn replicas_share_the_keys_topic_and_restarts_replay_it() {
    let upstream = EchoUpstream::start().await;
    let topic = create_keys_topic().await;
    let a = TestGateway::start(settings(&topic, &upstream.url()), None).await;
    let b = TestGateway::start(settings(&topic, &upstream.url()), None).await;

    let (key, key_id) = a
        .consumer_with_key("globex", json!({"tenantId": "tenant_globex", "plan": "free"}))
        .await;
    let auth = bearer(&key);
    eventually("key issued on A works on B", Duration::from_secs(30), || async {
        (b.get("/v1/x", &[("authorization", &auth)]).await.status == 200).then_some(())
    })
    .await;
    let (other_key, _) = a
        .consumer_with_key("initech", json!({"tenantId": "tenant_initech"}))
        .await;

    let revoked_at = Instant::now();
    assert_eq!(
        a.admin("DELETE", &format!("/v1/consumers/globex/keys/{key_id}"), None)
            .await
            .status,
        204
    );
    eventually("key revoked on A refused by B", Duration::from_secs(30), || async {
        (b.get("/v1/x", &[("authorization", &auth)]).await.status == 401).then_some(())
    })
    .await;
    println!("revocation reached the other replica in {:?}", revoked_at.elapsed());

    // A fresh replica replays the topic: revoked stays revoked, live keys work.
    a.stop().await;
    let c = TestGateway::start(settings(&topic, &upstream.url()), None).await;
    assert_eq!(c.get("/v1/x", &[("authorization", &auth)]).await.status, 401);
    assert_eq!(
        c.get("/v1/x", &[("authorization", &bearer(&other_key))]).await.status,
        200
    );
    assert_eq!(
        c.admin("GET", "/v1/consumers/globex", None).await.json()["metadata"]["tenantId"],
        "tenant_globex"
    );

    // Deleting a consumer removes its keys everywhere.
    assert_eq!(c.admin("DELETE", "/v1/consumers/initech", None).await.status, 204);
    eventually(
        "deleted consumer's key refused by B",
        Duration::from_secs(1),
        || async { (b.get("/v1/x", &[("authorization", &bearer(&other_key))]).await.status == 401).then_some(()) },
    )
    .await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn concurrent_creates_of_one_name_yield_one_consumer() {
    let upstream = EchoUpstream::start().await;
    let topic = create_keys_topic().await;
    let a = TestGateway::start(settings(&topic, &upstream.url()), None).await;
    let b = TestGateway::start(settings(&topic, &upstream.url()), None).await;
    let body = json!({"name": "race", "metadata": {"tenantId": "t_race"}});
    let (ra, rb) = tokio::join!(
        a.admin("POST", "/v1/consumers", Some(body.clone())),
        b.admin("POST", "/v1/consumers", Some(body))
    );
    let mut statuses = [ra.status, rb.status];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "{} / {}", ra.text(), rb.text());
    let winner = if ra.status == 201 { ra.json() } else { rb.json() };
    for gw in [&a, &b] {
        eventually("both replicas agree on the winner", Duration::from_secs(30), || async {
            (gw.admin("GET", "/v1/consumers/race", None).await.json()["id"] == winner["id"]).then_some(())
        })
        .await;
    }
    a.stop().await;
    b.stop().await;
}
