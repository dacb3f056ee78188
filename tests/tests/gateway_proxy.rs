//! The public request chain over a real upstream: authentication failures, tenant isolation,
//! identity headers and their signature, bad input (413, 431, 408), upstream faults (502,
//! 504), hop-by-hop headers, request ids, h2c, and the per-tenant bulkhead.

// Needs the running stack (Kafka, ClickHouse, Redis, stripe-mock): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde_json::json;
use tollgate_tests::gateway::{create_keys_topic, dead_route, settings, TestGateway};
use tollgate_tests::http::{send, send_with, EchoUpstream};

const SECRET: &str = "upstream-signing-secret-for-tests";

async fn gateway_with_key(
    upstream: &EchoUpstream,
    tweak: impl FnOnce(&mut tollgate_gateway::GatewaySettings),
) -> (TestGateway, String) {
    let mut s = settings(&create_keys_topic().await, &upstream.url());
    tweak(&mut s);
    let gw = TestGateway::start(s, Some(SECRET)).await;
    let (key, _) = gw
        .consumer_with_key("acme-corp", json!({"tenantId": "tenant_abc123", "plan": "enterprise"}))
        .await;
    (gw, format!("Bearer {key}"))
}

fn assert_problem(reply: &tollgate_tests::http::Reply, status: u16) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/problem+json"));
    assert_eq!(reply.json()["status"], status);
}

#[tokio::test]
async fn unauthenticated_requests_get_one_indistinguishable_401() {
    let upstream = EchoUpstream::start().await;
    let (gw, auth) = gateway_with_key(&upstream, |_| {}).await;
    let real = auth.trim_start_matches("Bearer ").to_owned();
    // Well-formed keys with valid checksums: one never issued, one issued then revoked.
    let never_issued = tollgate_gateway::apikey::generate("live").plaintext;
    let revoked = {
        let issued = gw
            .admin("POST", "/v1/consumers/acme-corp/keys", Some(json!({})))
            .await
            .json();
        gw.admin(
            "DELETE",
            &format!("/v1/consumers/acme-corp/keys/{}", issued["id"].as_str().unwrap()),
            None,
        )
        .await;
        issued["key"].as_str().unwrap().to_owned()
    };
    let mut typo = real.clone().into_bytes();
    typo[12] = if typo[12] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).unwrap();
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("authorization", "Bearer".to_owned())],
        vec![("authorization", "Basic dXNlcjpwYXNz".to_owned())],
        vec![("authorization", format!("Bearer {typo}"))],
        vec![("x-api-key", "not-a-key".to_owned())],
        vec![("authorization", format!("Bearer {never_issued}"))],
        vec![("x-api-key", revoked)],
    ];
    let mut bodies = Vec::new();
    for headers in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let reply = gw.get("/v1/orders", &headers).await;
        assert_problem(&reply, 401);
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        bodies.push(reply.text());
    }
    bodies.dedup();
    assert_eq!(bodies.len(), 1, "every 401 reads the same: {bodies:?}");
    assert_eq!(upstream.received(), 0, "no refused request reached the upstream");
    assert_eq!(gw.get("/v1/orders", &[("authorization", &auth)]).await.status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn identity_comes_only_from_the_key() {
    let upstream = EchoUpstream::start().await;
    let (gw, auth) = gateway_with_key(&upstream, |_| {}).await;

    let spoofed = gw
        .get(
            "/v1/tenants/tenant_abc123/orders?x=1",
            &[
                ("authorization", &auth),
                ("x-tollgate-tenant", "tenant_evil"),
                ("x-tollgate-consumer", "evil"),
                ("x-tollgate-anything", "1"),
                ("x-tenant-id", "tenant_evil"),
                ("x-request-id", "req-from-client-1"),
            ],
        )
        .await;
    assert_eq!(spoofed.status, 200, "{}", spoofed.text());
    assert_eq!(spoofed.header("x-request-id"), Some("req-from-client-1"));
    let seen = spoofed.json();
    let headers = &seen["headers"];
    assert_eq!(headers["x-tollgate-tenant"], "tenant_abc123");
    assert_eq!(headers["x-tollgate-consumer"], "acme-corp");
    assert!(headers.get("x-tollgate-anything").is_none());
    assert!(headers.get("x-tenant-id").is_none());
    assert_eq!(headers["x-request-id"], "req-from-client-1");
    assert_eq!(seen["path"], "/v1/tenants/tenant_abc123/orders");
    assert_eq!(seen["query"], "x=1");

    // The signature verifies with the shared secret, computed here independently.
    let signature = headers["x-tollgate-signature"].as_str().expect("signed");
    let (t, v1) = signature.split_once(",v1=").expect("t=…,v1=…");
    let t = t.strip_prefix("t=").unwrap();
    let signed = format!(
        "{t}\nGET\n/v1/tenants/tenant_abc123/orders?x=1\nacme-corp\ntenant_abc123\n{}\nenterprise",
        headers["x-tollgate-key-id"].as_str().unwrap()
    );
    assert_eq!(v1, hmac_hex(&signed));
    assert!((chrono::Utc::now().timestamp() - t.parse::<i64>().unwrap()).abs() < 60);

    // A consumer naming no plan is on the default plan: the header says so, and the signature
    // covers what the header says.
    let (solo_key, _) = gw.consumer_with_key("solo", json!({"tenantId": "tenant_solo"})).await;
    let solo = gw
        .get("/v1/x", &[("authorization", &format!("Bearer {solo_key}"))])
        .await;
    assert_eq!(solo.status, 200, "{}", solo.text());
    let solo = solo.json();
    let solo_headers = &solo["headers"];
    assert_eq!(solo_headers["x-tollgate-plan"], "free");
    let (t, v1) = solo_headers["x-tollgate-signature"]
        .as_str()
        .expect("signed")
        .split_once(",v1=")
        .expect("t=…,v1=…");
    let signed = format!(
        "{}\nGET\n/v1/x\nsolo\ntenant_solo\n{}\n{}",
        t.strip_prefix("t=").unwrap(),
        solo_headers["x-tollgate-key-id"].as_str().unwrap(),
        solo_headers["x-tollgate-plan"].as_str().unwrap()
    );
    assert_eq!(v1, hmac_hex(&signed));

    // Another tenant's path or query: 403 before the upstream is touched.
    let before = upstream.received();
    assert_problem(
        &gw.get("/v1/tenants/tenant_other/orders", &[("authorization", &auth)])
            .await,
        403,
    );
    assert_problem(
        &gw.get("/v1/tenants/tenant%5Fother/orders", &[("authorization", &auth)])
            .await,
        403,
    );
    assert_problem(
        &gw.get("/v1/orders?tenant_id=tenant_other", &[("authorization", &auth)])
            .await,
        403,
    );
    assert_problem(
        &gw.get(
            "/v1/tenants/tenant_abc123/../tenant_other/x",
            &[("authorization", &auth)],
        )
        .await,
        400,
    );
    assert_eq!(upstream.received(), before);
    assert_eq!(
        gw.get("/v1/orders?tenant_id=tenant_abc123", &[("authorization", &auth)])
            .await
            .status,
        200
    );
    gw.stop().await;
}

#[tokio::test]
async fn bad_input_and_upstream_faults_are_problems() {
    let upstream = EchoUpstream::start().await;
    let (gw, auth) = gateway_with_key(&upstream, |s| {
        s.http.max_body_bytes = 1024;
        s.routes[0].timeout_ms = 500;
        s.routes.push(dead_route());
    })
    .await;
    let url = format!("{}/v1/upload", gw.public);
    let ok = send("POST", &url, &[("authorization", &auth)], &[b'x'; 1024]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["body_bytes"], 1024);
    assert_problem(
        &send("POST", &url, &[("authorization", &auth)], &[b'x'; 1025]).await,
        413,
    );

    let huge = "h".repeat(20 * 1024);
    assert_problem(
        &gw.get("/v1/x", &[("authorization", &auth), ("x-huge", &huge)]).await,
        431,
    );

    assert_problem(&gw.get("/dead/x", &[("authorization", &auth)]).await, 502);
    let slow = gw.get("/v1/slow", &[("authorization", &auth)]).await;
    assert_problem(&slow, 504);
    assert_problem(&gw.get("/nowhere", &[("authorization", &auth)]).await, 404);

    // Hop-by-hop headers of the upstream's response stay on its connection.
    let reply = gw.get("/v1/x", &[("authorization", &auth)]).await;
    assert!(reply.header("x-upstream-private").is_none());
    assert!(
        reply.header("x-request-id").is_some(),
        "a request id is generated when none came"
    );
    gw.stop().await;
}

#[tokio::test]
async fn h2c_is_served() {
    let upstream = EchoUpstream::start().await;
    let (gw, auth) = gateway_with_key(&upstream, |_| {}).await;
    let reply = send_with(
        true,
        "GET",
        &format!("{}/v1/h2", gw.public),
        &[("authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["x-tollgate-consumer"], "acme-corp");
    gw.stop().await;
}

#[tokio::test]
async fn slow_body_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = EchoUpstream::start().await;
    let (gw, auth) = gateway_with_key(&upstream, |s| s.http.body_read_timeout_ms = 300).await;
    let addr = gw.public.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!("POST /v1/slow-upload HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nContent-Length: 100\r\n\r\nonly-part");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut response))
        .await
        .expect("answered")
        .unwrap();
    let text = String::from_utf8_lossy(&response[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(upstream.received(), 0);
    gw.stop().await;
}

#[tokio::test]
async fn one_tenants_flood_cannot_take_another_tenants_slots() {
    let upstream = EchoUpstream::start().await;
    let (gw, flooder) = gateway_with_key(&upstream, |s| s.http.tenant_max_in_flight = 4).await;
    let (other_key, _) = gw
        .consumer_with_key("globex", json!({"tenantId": "tenant_globex"}))
        .await;
    let other = format!("Bearer {other_key}");
    let url = format!("{}/v1/slow", gw.public);
    let flood: Vec<_> = (0..8)
        .map(|_| {
            let (url, auth) = (url.clone(), flooder.clone());
            tokio::spawn(async move { send("GET", &url, &[("authorization", &auth)], b"").await.status })
        })
        .collect();
    // While the flood holds its 4 slots, the same tenant is refused and the other is served.
    tollgate_tests::eventually("flooder saturated", Duration::from_secs(5), || async {
        (gw.get("/v1/fast", &[("authorization", &flooder)]).await.status == 429).then_some(())
    })
    .await;
    let served = gw.get("/v1/fast", &[("authorization", &other)]).await;
    assert_eq!(served.status, 200, "{}", served.text());
    let mut statuses = Vec::new();
    for task in flood {
        statuses.push(task.await.unwrap());
    }
    // Route timeout is 30 s, the slow path 3 s: admitted ones succeed, the rest were refused.
    assert_eq!(
        statuses.iter().filter(|s| **s == 504 || **s == 200).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 4, "{statuses:?}");
    gw.stop().await;
}

/// HMAC-SHA256 of `signed` with the upstream signing secret, in lowercase hex.
fn hmac_hex(signed: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(signed.as_bytes());
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}
