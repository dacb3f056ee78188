//! The whole chain in-process: an in-memory directory, usage sink and upstream, the local
//! limiter. No sockets, Kafka or Redis.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::HeaderMap;
use hyper::{Request, Response, StatusCode};
use tollgate_schemas::{ApiKeyRecord, ConsumerRecord, UsageEvent};

use super::{Body, Proxy, Upstream, UpstreamFuture};
use crate::directory::Directory;
use crate::events::{RecordedEvents, UsageSink};
use crate::metrics::GatewayMetrics;
use crate::settings::GatewaySettings;

pub(crate) const EXAMPLE: &str = include_str!("../../../config/gateway.toml");

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
#[allow(dead_code)] // every field is read by some test
pub(crate) struct Seen {
    pub method: String,
    /// Path and query as sent on the wire.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An upstream that records every request and answers 200 with the configured headers.
#[derive(Default)]
pub(crate) struct RecordingUpstream {
    pub seen: Mutex<Vec<Seen>>,
    pub reply_headers: Mutex<Vec<(&'static str, String)>>,
    pub reply_status: Mutex<Option<StatusCode>>,
    /// Fail every request as an unreachable upstream would.
    pub unreachable: std::sync::atomic::AtomicBool,
}

impl Upstream for RecordingUpstream {
    fn send(&self, _route: &crate::routes::RouteSettings, req: Request<Bytes>) -> UpstreamFuture {
        if self.unreachable.load(std::sync::atomic::Ordering::Relaxed) {
            return Box::pin(async { Err("connection refused".into()) });
        }
        let (parts, body) = req.into_parts();
        self.seen.lock().unwrap().push(Seen {
            method: parts.method.to_string(),
            target: parts
                .uri
                .path_and_query()
                .map_or("/".to_owned(), |pq| pq.as_str().to_owned()),
            headers: parts.headers,
            body,
        });
        let mut response = Response::builder().status(self.reply_status.lock().unwrap().unwrap_or(StatusCode::OK));
        for (name, value) in self.reply_headers.lock().unwrap().iter() {
            response = response.header(*name, value);
        }
        let response = response
            .body(
                Full::new(Bytes::from_static(b"upstream says hi"))
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap();
        Box::pin(async move { Ok(response) })
    }
}

/// A chain over the example settings (with `edit` applied to their text), one consumer
/// `acme` of tenant `t_acme` on plan `free` with one key, and a recording upstream.
pub(crate) struct Harness {
    pub proxy: Arc<Proxy>,
    pub upstream: Arc<RecordingUpstream>,
    pub events: RecordedEvents,
    pub directory: Arc<RwLock<Directory>>,
    pub key: String,
}

pub(crate) const PEER: &str = "203.0.113.7:40000";

impl Harness {
    pub fn new() -> Self {
        Self::with(|text| text.to_owned())
    }

    pub fn with(edit: impl FnOnce(&str) -> String) -> Self {
        Self::build(edit, None)
    }

    /// The example settings (with `edit` applied), with spend caps enforced from `ledger`.
    pub fn with_spend_caps(edit: impl FnOnce(&str) -> String, ledger: Arc<crate::spend::SpendLedger>) -> Self {
        Self::build(edit, Some(ledger))
    }

    fn build(edit: impl FnOnce(&str) -> String, ledger: Option<Arc<crate::spend::SpendLedger>>) -> Self {
        let settings: GatewaySettings =
            tollgate_runtime::settings::from_str_with_env(&edit(EXAMPLE), "gateway.toml", Vec::new())
                .expect("test settings load");
        let settings = Arc::new(settings);
        let directory: Arc<RwLock<Directory>> = Arc::default();
        let (usage, events) = UsageSink::in_memory(
            settings.events.clone(),
            Arc::new(crate::events::metrics::EventMetrics::new(&metrics::NoopRecorder)),
        );
        let upstream = Arc::new(RecordingUpstream::default());
        let proxy = Proxy::new(
            Arc::clone(&settings),
            Arc::clone(&directory),
            None,
            usage,
            Arc::new(crate::limits::LocalLimiter::new()),
            Arc::new(GatewayMetrics::noop()),
            upstream.clone(),
        );
        let proxy = match ledger {
            Some(ledger) => proxy.with_spend_caps(ledger),
            None => proxy,
        };
        let mut harness = Self {
            proxy: Arc::new(proxy),
            upstream,
            events,
            directory,
            key: String::new(),
        };
        harness.key = harness.consumer("acme", "t_acme", Some("free"), "{}");
        harness
    }

    /// Adds a consumer with one key; returns the key's plaintext.
    pub fn consumer(&self, name: &str, tenant: &str, plan: Option<&str>, metadata_json: &str) -> String {
        let id = format!("c_{name}");
        let record = ConsumerRecord {
            id: id.clone(),
            name: name.into(),
            tenant_id: Some(tenant.into()),
            plan: plan.map(str::to_owned),
            stripe_customer_id: None,
            metadata_json: metadata_json.into(),
            created_at_ms: 1,
            updated_at_ms: 1,
            version: 1,
            updated_by: "test".into(),
        };
        let key = crate::apikey::generate("live");
        let key_record = ApiKeyRecord {
            id: format!("k_{name}"),
            consumer_id: id.clone(),
            consumer_name: name.into(),
            prefix: key.prefix.clone(),
            secret_sha256: key.digest,
            description: String::new(),
            labels: BTreeMap::new(),
            created_at_ms: 1,
            expires_at_ms: None,
            revoked_at_ms: None,
            rolled_from: None,
            version: 1,
            updated_by: "test".into(),
        };
        let mut directory = self.directory.write().unwrap();
        directory.apply_consumer(&id, Some(&record));
        directory.apply_key(&key_record.id, Some(&key_record));
        key.plaintext
    }

    /// Sends a request with acme's key plus `headers`; returns the status, headers and body.
    pub async fn send(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let auth = format!("Bearer {}", self.key);
        let mut all = vec![("authorization", auth.as_str())];
        all.extend_from_slice(headers);
        self.send_raw(method, target, &all, Full::new(Bytes::copy_from_slice(body)))
            .await
    }

    /// Sends a request exactly as given (no key added), with any body.
    pub async fn send_raw<B>(&self, method: &str, target: &str, headers: &[(&str, &str)], body: B) -> Reply
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let mut req = Request::builder().method(method).uri(target);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(body).expect("a valid test request");
        let response = Arc::clone(&self.proxy)
            .handle(req, PEER.parse::<SocketAddr>().unwrap())
            .await;
        Reply::read(response).await
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.upstream.seen.lock().unwrap().clone()
    }

    pub fn last_event(&self) -> UsageEvent {
        self.events.all().pop().expect("a usage event was recorded")
    }
}

pub(crate) struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    async fn read(response: Response<Body>) -> Self {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        Self {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[tokio::test]
async fn an_allowed_request_reaches_the_upstream_with_the_gateways_identity_and_one_event() {
    let h = Harness::new();
    let reply = h
        .send("GET", "/v1/orders?x=1", &[("x-tollgate-tenant", "t_evil")], b"")
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], b"upstream says hi");
    assert!(reply.header("x-request-id").is_some());
    assert!(reply.header("ratelimit-policy").is_some());
    let seen = h.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "/v1/orders?x=1");
    assert_eq!(seen[0].headers["x-tollgate-tenant"], "t_acme");
    assert!(
        seen[0].headers.get("authorization").is_none(),
        "the key is never forwarded"
    );
    let event = h.last_event();
    assert_eq!(event.tenant_id.as_deref(), Some("t_acme"));
    assert_eq!(event.route, "v1");
    assert!(event.billable);
    assert_eq!(event.response_bytes, 16);
}

#[tokio::test]
async fn refusals_are_problems_with_a_request_id_and_a_non_billable_event() {
    let h = Harness::new();
    let unauthenticated = h.send_raw("GET", "/v1/orders", &[], Full::new(Bytes::new())).await;
    assert_eq!(unauthenticated.status, 401);
    assert_eq!(unauthenticated.header("content-type"), Some("application/problem+json"));
    assert!(unauthenticated.header("x-request-id").is_some());
    let other_tenant = h.send("GET", "/v1/tenants/t_other/orders", &[], b"").await;
    assert_eq!(other_tenant.status, 403);
    assert!(h.seen().is_empty(), "nothing refused reaches the upstream");
    let events = h.events.all();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| !e.billable));
}

/// Each `/v1/` request on `free` costs 10 + 1 compute unit at 1.
fn priced_catalogue() -> tollgate_runtime::catalogue::Catalogue {
    let mut text = String::new();
    for plan in ["free", "starter", "professional", "enterprise"] {
        text.push_str(&format!(
            "[plans.{plan}]\ncurrency = \"usd\"\nmeters.requests = {{ unit_price_minor = \"10\" }}\nmeters.compute_units = {{ unit_price_minor = \"1\" }}\n"
        ));
    }
    tollgate_runtime::catalogue::Catalogue::parse(&text, "test catalogue").unwrap()
}

fn cap(h: &Harness, tenant: &str, cap_minor: i64) {
    let record = tollgate_schemas::BudgetRecord {
        tenant_id: tenant.into(),
        monthly_cap_minor: cap_minor,
        alert_at: vec![50, 80, 100],
        updated_at_ms: 1,
        version: 1,
        updated_by: "test".into(),
    };
    h.directory.write().unwrap().apply_budget(tenant, Some(&record));
}

#[tokio::test]
async fn a_capped_tenant_is_refused_once_the_next_request_would_pass_the_cap_and_pays_nothing_for_it() {
    let ledger = crate::spend::SpendLedger::new(priced_catalogue());
    let h = Harness::with_spend_caps(|text| text.to_owned(), Arc::clone(&ledger));
    cap(&h, "t_acme", 50);
    let now = chrono::Utc::now().timestamp_millis();
    let month = crate::spend::Month::of(now);

    // Before ClickHouse has been read for the tenant: no blind admission.
    let unknown = h.send("GET", "/v1/orders", &[], b"").await;
    assert_eq!(unknown.status, 503);
    assert!(unknown.json()["type"].as_str().unwrap().ends_with("/spend-unknown"));
    assert!(h.seen().is_empty());

    ledger.apply_counted(month, &["t_acme".to_owned()], &[]);
    for _ in 0..3 {
        assert_eq!(h.send("GET", "/v1/orders", &[], b"").await.status, 200);
    }
    // An upstream 5xx is not billable: its reservation is given back.
    *h.upstream.reply_status.lock().unwrap() = Some(StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(h.send("GET", "/v1/orders", &[], b"").await.status, 500);
    *h.upstream.reply_status.lock().unwrap() = None;
    assert_eq!(ledger.status("t_acme", Some("free"), now).spent_minor, Some(33));
    assert_eq!(h.send("GET", "/v1/orders", &[], b"").await.status, 200);
    assert_eq!(ledger.status("t_acme", Some("free"), now).spent_minor, Some(44));

    let refused = h.send("GET", "/v1/orders", &[], b"").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("content-type"), Some("application/problem+json"));
    let body = refused.json();
    assert_eq!(body["type"], "https://tollgate.dev/problems/spend-cap-exceeded");
    assert_eq!(body["monthlyCap"], 50);
    assert_eq!(body["spent"], 44);
    let period_end = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(month.end_ms()).unwrap();
    assert_eq!(
        body["periodEnd"],
        period_end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    assert!(refused.header("retry-after").is_some());
    assert!(
        refused.header("ratelimit-policy").is_none(),
        "refused before the limits: none taken"
    );
    assert_eq!(h.seen().len(), 5, "the refusal never reached the upstream");
    let event = h.last_event();
    assert!(!event.billable);
    assert_eq!(event.outcome, tollgate_schemas::Outcome::RateLimited);
    assert_eq!(ledger.status("t_acme", Some("free"), now).spent_minor, Some(44));

    // Another tenant, or the same one with its cap raised, goes on.
    cap(&h, "t_acme", 55);
    assert_eq!(h.send("GET", "/v1/orders", &[], b"").await.status, 200);
    assert_eq!(h.send("GET", "/v1/orders", &[], b"").await.status, 429);
    h.directory.write().unwrap().apply_budget("t_acme", None);
    assert_eq!(h.send("GET", "/v1/orders", &[], b"").await.status, 200);
}

#[tokio::test]
async fn a_request_the_limits_refuse_holds_nothing_against_the_spend_cap() {
    let ledger = crate::spend::SpendLedger::new(priced_catalogue());
    let h = Harness::with_spend_caps(
        |text| text.replacen("window = \"1m\", limit = 100 }", "window = \"1m\", limit = 2 }", 1),
        Arc::clone(&ledger),
    );
    cap(&h, "t_acme", 1000);
    let now = chrono::Utc::now().timestamp_millis();
    ledger.apply_counted(crate::spend::Month::of(now), &["t_acme".to_owned()], &[]);
    for _ in 0..2 {
        assert_eq!(h.send("GET", "/v1/orders", &[], b"").await.status, 200);
    }
    let limited = h.send("GET", "/v1/orders", &[], b"").await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.json()["type"], crate::limits::headers::QUOTA_EXCEEDED);
    assert_eq!(ledger.status("t_acme", Some("free"), now).spent_minor, Some(22));
}

#[tokio::test]
async fn every_key_of_a_tenant_is_limited_by_one_plan_and_a_consumer_without_one_by_the_default() {
    let h = Harness::new();
    // acme (free, 100 a minute) and acme-ci (enterprise) are one tenant; with equal update
    // times the smaller id rules, so the tenant is on free whichever key is used.
    let ci = h.consumer("acme-ci", "t_acme", Some("enterprise"), "{}");
    let send = |key: &str| {
        let auth = format!("Bearer {key}");
        let h = &h;
        async move {
            h.send_raw(
                "GET",
                "/v1/orders",
                &[("authorization", &auth)],
                Full::new(Bytes::new()),
            )
            .await
        }
    };
    for i in 0..100 {
        let key = if i % 2 == 0 { h.key.clone() } else { ci.clone() };
        let reply = send(&key).await;
        assert_eq!(reply.status, 200, "request {i}");
        assert_eq!(reply.header("ratelimit-limit"), Some("100"), "request {i}");
    }
    for key in [&h.key, &ci] {
        let reply = send(key).await;
        assert_eq!(reply.status, 429, "the tenant's one allowance is used up");
    }
    assert!(h.seen().iter().all(|s| s.headers["x-tollgate-plan"] == "free"));
    assert!(h.events.all().iter().all(|e| e.plan.as_deref() == Some("free")));

    // A consumer naming no plan, or one these settings no longer define, is on the default
    // (without overrides checked against another plan).
    let legacy_limits = r#"{"limits": {"requests_per_minute": 5}}"#;
    for (name, plan, metadata) in [("solo", None, "{}"), ("legacy", Some("platinum"), legacy_limits)] {
        let key = h.consumer(name, &format!("t_{name}"), plan, metadata);
        let reply = send(&key).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("ratelimit-limit"), Some("100"), "{name}");
        assert_eq!(h.seen().last().unwrap().headers["x-tollgate-plan"], "free");
    }
}

/// The example's grant for the stack's portal, on its two API routes.
const EXAMPLE_ORIGINS: &str = "cors_origins = [\"http://127.0.0.1:8082\"]\n";

/// The example with another portal's origin allowed on the first route (`/v1/`), which then
/// serves GET only, and no origin on the tenant-scoped route.
fn with_cors(text: &str) -> String {
    assert_eq!(
        text.matches(EXAMPLE_ORIGINS).count(),
        2,
        "the example grants two routes"
    );
    text.replacen(
        EXAMPLE_ORIGINS,
        "methods = [\"GET\"]\ncors_origins = [\"https://portal.example.com\"]\n",
        1,
    )
    .replacen(EXAMPLE_ORIGINS, "", 1)
}

const PORTAL: &str = "https://portal.example.com";

#[tokio::test]
async fn an_allowed_origin_gets_its_preflight_answered_at_the_edge_and_reads_every_answer() {
    let h = Harness::with(with_cors);
    let asks = |origin: &'static str| {
        [
            ("origin", origin),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "authorization"),
        ]
    };
    // The preflight carries no key, is routed as the GET it asks about, never reaches the
    // upstream, and says what may be sent.
    let preflight = h
        .send_raw("OPTIONS", "/v1/orders", &asks(PORTAL), Full::new(Bytes::new()))
        .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(preflight.header("access-control-allow-origin"), Some(PORTAL));
    assert_eq!(preflight.header("access-control-allow-methods"), Some("GET"));
    let allowed_headers = preflight.header("access-control-allow-headers").unwrap_or_default();
    assert!(allowed_headers.contains("authorization") && allowed_headers.contains("x-api-key"));
    assert!(preflight.header("access-control-allow-credentials").is_none());
    assert!(h.seen().is_empty(), "a preflight never reaches the upstream");
    assert!(!h.last_event().billable);

    // The answers themselves, refusals included, are readable by the page, limits too.
    let ok = h.send("GET", "/v1/orders", &[("origin", PORTAL)], b"").await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("access-control-allow-origin"), Some(PORTAL));
    assert!(ok
        .header("access-control-expose-headers")
        .is_some_and(|h| h.contains("ratelimit")));
    assert_eq!(ok.header("vary"), Some("origin"));
    let refused = h
        .send_raw("GET", "/v1/orders", &[("origin", PORTAL)], Full::new(Bytes::new()))
        .await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("access-control-allow-origin"), Some(PORTAL));
}

#[tokio::test]
async fn other_origins_and_other_routes_get_no_grant() {
    let h = Harness::with(with_cors);
    let preflight = |origin: &'static str, target: &'static str| {
        let h = &h;
        async move {
            h.send_raw(
                "OPTIONS",
                target,
                &[("origin", origin), ("access-control-request-method", "GET")],
                Full::new(Bytes::new()),
            )
            .await
        }
    };
    // Another origin, a look-alike, and a route that names no origin: refused, no grant.
    for (origin, target) in [
        ("https://evil.example.com", "/v1/orders"),
        ("https://portal.example.com.evil.example", "/v1/orders"),
        ("null", "/v1/orders"),
        (PORTAL, "/v1/tenants/t_acme/orders"),
    ] {
        let reply = preflight(origin, target).await;
        assert_eq!(reply.status, 403, "{origin} {target}");
        assert!(reply.json()["type"].as_str().unwrap().ends_with("cors-origin-refused"));
        assert!(
            reply.header("access-control-allow-origin").is_none(),
            "{origin} {target}"
        );
    }
    let ok = h
        .send("GET", "/v1/orders", &[("origin", "https://evil.example.com")], b"")
        .await;
    assert_eq!(
        ok.status, 200,
        "a request is served whatever its origin: the key decides"
    );
    assert!(ok.header("access-control-allow-origin").is_none());
    // An OPTIONS that is not a preflight is an ordinary request: it needs a key.
    let plain = h
        .send_raw("OPTIONS", "/v1/tenants/t_acme/orders", &[], Full::new(Bytes::new()))
        .await;
    assert_eq!(plain.status, 401);
    assert_eq!(h.seen().len(), 1, "only the keyed GET reached the upstream");
    // A preflight for a method the route does not serve is the route's 405.
    let post = h
        .send_raw(
            "OPTIONS",
            "/v1/orders",
            &[("origin", PORTAL), ("access-control-request-method", "POST")],
            Full::new(Bytes::new()),
        )
        .await;
    assert_eq!(post.status, 405);
}

#[test]
fn a_route_origin_must_be_one_browsers_send() {
    let text = EXAMPLE.replacen(EXAMPLE_ORIGINS, "cors_origins = [\"https://portal.example.com/\"]\n", 1);
    let err = tollgate_runtime::settings::from_str_with_env::<GatewaySettings>(&text, "gateway.toml", Vec::new())
        .expect_err("refused")
        .to_string();
    assert!(err.contains("routes[0].cors_origins[0]"), "{err}");
}
