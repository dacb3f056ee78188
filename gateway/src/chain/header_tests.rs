//! Headers at the tenant boundary, in-process: identity headers in every spelling never
//! reach the upstream, underscored names can be refused, forwarding headers are the
//! gateway's own unless the peer is a trusted proxy, framing headers are regenerated.

use super::edge_tests::problem_type;
use super::tests::Harness;

#[tokio::test]
async fn identity_headers_from_the_client_never_reach_the_upstream_in_any_spelling() {
    let h = Harness::new();
    let spoofed = [
        ("x_tollgate_tenant", "t_other"),
        ("X-Tollgate-Consumer", "other"),
        ("x-tollgate-anything", "1"),
        ("x-consumer-username", "other"),
        ("x-authenticated-userid", "other"),
        ("x-remote-user", "other"),
        ("x-forwarded-email", "boss@example.com"),
        ("x-auth-request-user", "other"),
        ("x_consumer_username", "other"),
        ("x_tenant_id", "t_other"),
        ("x-original-url", "/v1/tenants/t_other/"),
        ("x-api-key", "tg_live_not_a_real_key_000000"),
        ("accept", "application/json"),
    ];
    assert_eq!(h.send("GET", "/v1/orders", &spoofed, b"").await.status, 200);
    let seen = &h.seen()[0].headers;
    let names: Vec<&str> = seen.keys().map(|n| n.as_str()).collect();
    assert!(names.iter().all(|n| !n.contains('_')), "{names:?}");
    for gone in [
        "x-tollgate-anything",
        "x-consumer-username",
        "x-authenticated-userid",
        "x-remote-user",
        "x-forwarded-email",
        "x-auth-request-user",
        "x-original-url",
        "x-api-key",
        "authorization",
    ] {
        assert!(seen.get(gone).is_none(), "{gone} forwarded");
    }
    assert_eq!(seen["x-tollgate-tenant"], "t_acme");
    assert_eq!(seen["x-tollgate-consumer"], "acme");
    assert_eq!(seen.get_all("x-tollgate-tenant").iter().count(), 1);
    assert_eq!(seen["accept"], "application/json");
}

#[tokio::test]
async fn underscored_header_names_can_be_refused_instead() {
    let h = Harness::with(|t| {
        t.replace(
            "underscores_in_headers = \"drop\"",
            "underscores_in_headers = \"refuse\"",
        )
    });
    let reply = h
        .send("GET", "/v1/orders", &[("x_tollgate_tenant", "t_other")], b"")
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(problem_type(&reply), "underscore-in-header");
    assert!(h.seen().is_empty());
}

#[tokio::test]
async fn forwarding_headers_are_the_gateways_own_unless_the_peer_is_a_trusted_proxy() {
    let client_says = [
        ("x-forwarded-for", "10.9.9.9"),
        ("forwarded", "for=10.9.9.9;host=evil.example"),
        ("x-real-ip", "10.9.9.9"),
        ("x-forwarded-host", "t-other.example"),
        ("x-forwarded-proto", "https"),
        ("host", "t-other.example"),
    ];
    let untrusted = Harness::new();
    assert_eq!(untrusted.send("GET", "/v1/x", &client_says, b"").await.status, 200);
    let seen = &untrusted.seen()[0].headers;
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7");
    assert_eq!(seen["forwarded"], "for=203.0.113.7;proto=http");
    assert_eq!(seen["x-real-ip"], "203.0.113.7");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(seen.get("x-forwarded-host").is_none(), "not configured: never set");
    assert!(seen.get("host").is_none(), "the upstream's Host is its own");

    let trusted = Harness::with(|t| {
        t.replace("trusted_proxies = []", "trusted_proxies = [\"203.0.113.0/24\"]")
            .replace("forward_host = false", "forward_host = true")
    });
    assert_eq!(trusted.send("GET", "/v1/x", &client_says, b"").await.status, 200);
    let seen = &trusted.seen()[0].headers;
    assert_eq!(seen["x-forwarded-for"], "10.9.9.9, 203.0.113.7");
    assert_eq!(seen["forwarded"], "for=10.9.9.9;host=evil.example, for=203.0.113.7");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-forwarded-host"], "t-other.example", "the trusted proxy's");

    let host_only = Harness::with(|t| t.replace("forward_host = false", "forward_host = true"));
    assert_eq!(
        host_only
            .send("GET", "/v1/x", &[("host", "api.example")], b"")
            .await
            .status,
        200
    );
    assert_eq!(host_only.seen()[0].headers["x-forwarded-host"], "api.example");
}

#[tokio::test]
async fn content_length_is_regenerated_and_unknown_transfer_codings_refused() {
    let h = Harness::new();
    let reply = h
        .send("POST", "/v1/x", &[("content-length", "010")], b"0123456789")
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(h.seen()[0].headers["content-length"], "10");
    assert_eq!(&h.seen()[0].body[..], b"0123456789");
    for coding in ["gzip", "gzip, chunked", "chunked, identity", "x"] {
        let reply = h.send("POST", "/v1/x", &[("transfer-encoding", coding)], b"abc").await;
        assert_eq!(reply.status, 501, "{coding}");
        assert_eq!(problem_type(&reply), "transfer-coding");
    }
    assert_eq!(
        h.send("POST", "/v1/x", &[("transfer-encoding", "chunked")], b"abc")
            .await
            .status,
        200
    );
    let chunked = &h.seen()[1].headers;
    assert!(chunked.get("transfer-encoding").is_none());
    assert_eq!(chunked["content-length"], "3");
}
