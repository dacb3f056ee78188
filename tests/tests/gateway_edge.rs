//! The tenant boundary through the real gateway binary on real sockets (issue 10's classes 1,
//! 4, 5 and 8): a case variant or `;`-decorated tenant path is tenant-checked or refused, client
//! identity headers with `_` never reach the upstream, a connection that sends nothing is
//! closed by the first-request deadline and a kept-alive one (HTTP/1 and h2) by the idle
//! timeout, and a tenant's quota is unchanged after a 413 and a truncated upload.

// Needs the running stack (Kafka for the keys topic): `scripts/stack test`.
#![cfg(feature = "stack-tests")]

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_tests::gateway::{create_keys_topic, ADMIN_TOKEN};
use tollgate_tests::http::{send, EchoUpstream};
use tollgate_tests::process::GatewayProcess;

/// The gateway binary on the example settings plus `extra` overlays, both routes to
/// `upstream`, on the stack's Kafka.
struct Edge {
    gateway: GatewayProcess,
    public: String,
    dir: std::path::PathBuf,
}

async fn gateway(upstream: &EchoUpstream, extra: &[(&str, &str)]) -> Edge {
    let run = tollgate_tests::unique("edge");
    let dir = std::env::temp_dir().join(&run);
    std::fs::create_dir_all(&dir).expect("test directory");
    let usage = format!("{run}.usage");
    tollgate_tests::create_topic(&tollgate_tests::kafka(), &usage, 1, &[]).await;
    let mut gateway = tollgate_tests::process::gateway(
        &dir,
        ADMIN_TOKEN,
        &tollgate_tests::kafka(),
        (&create_keys_topic().await, &usage),
        &upstream.url(),
        extra,
    );
    gateway.process.start().await;
    let public = gateway.public.clone();
    Edge { gateway, public, dir }
}

impl Edge {
    async fn consumer_with_key(&self, name: &str, metadata: serde_json::Value) -> String {
        self.gateway.consumer_with_key(ADMIN_TOKEN, name, metadata).await
    }

    async fn stop(mut self) {
        self.gateway.process.terminate();
        let status = self.gateway.process.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "the gateway exits cleanly on SIGTERM: {status}");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `head` (and `body`) as raw bytes, optionally half-closing after; returns the status
/// code of the answer (0 if none came).
async fn raw(public: &str, head: &str, body: &[u8], half_close: bool) -> u16 {
    let addr = public.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(body).await.expect("write body");
    if half_close {
        stream.shutdown().await.expect("half close");
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn tenant_paths_in_other_spellings_are_checked_or_refused_never_served() {
    let upstream = EchoUpstream::start().await;
    let gw = gateway(&upstream, &[]).await;
    let key = gw
        .consumer_with_key("edge-acme", json!({"tenantId": "t_acme", "plan": "enterprise"}))
        .await;
    let auth = format!("Bearer {key}");
    for (target, status) in [
        ("/V1/TENANTS/t_other/orders", 403),
        ("/v1/Tenants/t_other/orders", 403),
        ("/v1/tenants;x=1/t_other/orders", 400),
        ("/v1/tenants%5Ct_other/orders", 400),
        ("/v1/tenants%252Ft_other/orders", 400),
        ("/v1/x/..;/tenants/t_other/orders", 400),
        ("/v1/x/%2e%2e/tenants/t_other/orders", 400),
    ] {
        let head = format!("GET {target} HTTP/1.1\r\nhost: gw\r\nauthorization: {auth}\r\nconnection: close\r\n\r\n");
        assert_eq!(raw(&gw.public, &head, b"", false).await, status, "{target}");
    }
    assert_eq!(upstream.received(), 0, "nothing reached the upstream");
    let own = send(
        "GET",
        &format!("{}/V1/Tenants/t_acme/orders", gw.public),
        &[("authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(own.status, 200, "{}", own.text());
    gw.stop().await;
}

#[tokio::test]
async fn client_identity_headers_never_reach_the_upstream() {
    let upstream = EchoUpstream::start().await;
    let gw = gateway(&upstream, &[]).await;
    let key = gw
        .consumer_with_key("edge-headers", json!({"tenantId": "t_headers", "plan": "enterprise"}))
        .await;
    let auth = format!("Bearer {key}");
    let head = format!(
        "GET /v1/whoami HTTP/1.1\r\nhost: gw\r\nauthorization: {auth}\r\nX_Tollgate_Tenant: t_other\r\n\
         x_consumer_username: other\r\nx-consumer-username: other\r\nx-authenticated-userid: other\r\n\
         x-forwarded-for: 10.9.9.9\r\nx-forwarded-host: other.example\r\nconnection: close\r\n\r\n"
    );
    assert_eq!(raw(&gw.public, &head, b"", false).await, 200);
    // The same through a client, reading what the upstream saw.
    let reply = send(
        "GET",
        &format!("{}/v1/whoami", gw.public),
        &[
            ("authorization", &auth),
            ("x-consumer-username", "other"),
            ("x-forwarded-for", "10.9.9.9"),
            ("x-forwarded-host", "other.example"),
        ],
        b"",
    )
    .await;
    let seen = &reply.json()["headers"];
    assert_eq!(seen["x-tollgate-tenant"], "t_headers");
    assert!(seen.get("x-consumer-username").is_none(), "{seen}");
    assert!(seen.get("x-forwarded-host").is_none(), "{seen}");
    assert_eq!(
        seen["x-forwarded-for"], "127.0.0.1",
        "the client's chain is not trusted"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_by_the_first_request_deadline() {
    let upstream = EchoUpstream::start().await;
    // Header reads alone would wait ten minutes: only the first-request deadline can close these.
    let gw = gateway(
        &upstream,
        &[
            ("TOLLGATE_HTTP__FIRST_REQUEST_TIMEOUT_MS", "300"),
            ("TOLLGATE_HTTP__HEADER_READ_TIMEOUT_MS", "600000"),
        ],
    )
    .await;
    let addr = gw.public.trim_start_matches("http://").to_owned();
    for opening in [&b""[..], b"PRI * HTTP/2.0\r\n", b"GET /v1/x HTTP/1.1\r\nhost: gw\r\n"] {
        let mut stream = TcpStream::connect(&addr).await.expect("connect");
        stream.write_all(opening).await.expect("write");
        let mut buf = [0u8; 1024];
        // Closed means EOF or a reset; the deadline here is generous, the gateway's is 300 ms.
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "connection opened with {opening:?} still open");
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_kept_alive_connection_without_requests_is_closed_by_the_idle_timeout() {
    let upstream = EchoUpstream::start().await;
    // Header reads alone would wait ten minutes and the h2 pings are answered by the client:
    // only the idle timeout can close these.
    let gw = gateway(
        &upstream,
        &[
            ("TOLLGATE_HTTP__IDLE_TIMEOUT_MS", "1000"),
            ("TOLLGATE_HTTP__HEADER_READ_TIMEOUT_MS", "600000"),
            ("TOLLGATE_HTTP__H2_KEEP_ALIVE_INTERVAL_MS", "1000"),
        ],
    )
    .await;
    let addr = gw.public.trim_start_matches("http://").to_owned();

    let mut http1 = TcpStream::connect(&addr).await.expect("connect");
    http1
        .write_all(b"GET /v1/idle HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let mut answered_at = None;
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match http1.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    answered_at.get_or_insert_with(std::time::Instant::now);
                }
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle HTTP/1.1 connection is still open after 20 s");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(
        !text.contains("connection: close"),
        "the answer keeps the connection alive: {text}"
    );
    let kept = answered_at.expect("an answer").elapsed();
    assert!(
        kept >= Duration::from_millis(900),
        "closed {kept:?} after the answer, before the idle timeout"
    );

    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(300))
        .keep_alive_while_idle(true)
        .handshake::<_, http_body_util::Empty<hyper::body::Bytes>>(hyper_util::rt::TokioIo::new(
            TcpStream::connect(&addr).await.expect("connect"),
        ))
        .await
        .expect("h2c handshake");
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get(format!("{}/v1/idle", gw.public))
        .body(http_body_util::Empty::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("h2 answer");
    assert_eq!(response.status(), 401);
    let answered = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(20), connection).await;
    assert!(
        ended.is_ok(),
        "an idle h2 connection that answers pings is still open after 20 s"
    );
    let kept = answered.elapsed();
    assert!(
        kept >= Duration::from_millis(900),
        "closed {kept:?} after the answer, before the idle timeout"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_tenants_quota_is_unchanged_after_a_413_and_a_truncated_upload() {
    let upstream = EchoUpstream::start().await;
    let gw = gateway(&upstream, &[("TOLLGATE_HTTP__MAX_BODY_BYTES", "64")]).await;
    let key = gw
        .consumer_with_key(
            "edge-quota",
            json!({"tenantId": "t_quota", "plan": "free", "limits": {"requests_per_minute": 3}}),
        )
        .await;
    let auth = format!("Bearer {key}");
    let url = format!("{}/v1/upload", gw.public);
    assert_eq!(send("POST", &url, &[("authorization", &auth)], b"ok").await.status, 200);
    let too_large = send("POST", &url, &[("authorization", &auth)], &[b'x'; 1000]).await;
    assert_eq!(too_large.status, 413, "{}", too_large.text());
    let head = format!("POST /v1/upload HTTP/1.1\r\nhost: gw\r\nauthorization: {auth}\r\ncontent-length: 50\r\n\r\n");
    let truncated = raw(&gw.public, &head, b"only ten b", true).await;
    assert!(
        truncated == 400 || truncated == 0,
        "a truncated upload is refused, got {truncated}"
    );
    // Two more fit (3 a minute, one used), then the limit.
    assert_eq!(send("POST", &url, &[("authorization", &auth)], b"ok").await.status, 200);
    let last = send("POST", &url, &[("authorization", &auth)], b"ok").await;
    assert_eq!(last.status, 200, "{}", last.text());
    assert_eq!(last.header("ratelimit-remaining"), Some("0"));
    assert_eq!(send("POST", &url, &[("authorization", &auth)], b"ok").await.status, 429);
    gw.stop().await;
}
