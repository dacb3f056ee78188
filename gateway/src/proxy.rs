//! The public request chain: one function, read top to bottom, from a tenant's request to
//! the upstream's response.
//!
//! In: a request on the public listener. Out: the upstream's response, or a problem+json
//! refusal; and the per-request [`RequestContext`] the usage event is built from.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tollgate_schemas::{Outcome, UsageEvent};

use crate::apikey;
use crate::directory::{Directory, Identity};
use crate::events::UsageSink;
use crate::limits::{Charge, Decision, LimitSpec, Limiter, Subject};
use crate::problem::Problem;
use crate::routes::{Matched, Miss, RouteTable};
use crate::settings::GatewaySettings;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Headers meaningful only for one connection (RFC 9110 section 7.6.1): never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// What one request did, carried through the chain; the usage event is built from it.
#[derive(Debug, Default)]
pub struct RequestContext {
    pub request_id: String,
    pub route: Option<Arc<crate::routes::Route>>,
    pub identity: Option<Identity>,
    pub request_bytes: u64,
    pub upstream_latency: Option<Duration>,
    /// Set once the upstream answered (whatever its status).
    pub upstream_status: Option<u16>,
    /// Units the upstream reported in `x-tollgate-cost`, replacing the route's cost.
    pub reported_cost: BTreeMap<String, u64>,
    /// The limit decision, once made: its headers go on the response.
    pub limits: Option<LimitCharge>,
    /// The tenant's bulkhead slot, held until the response body has been sent.
    pub bulkhead: Option<OwnedSemaphorePermit>,
}

/// A request's limit decision and what to undo or add when its response ends.
#[derive(Debug)]
pub struct LimitCharge {
    pub decision: Decision,
    pub charges: Vec<Charge>,
    pub specs: Arc<Vec<Arc<LimitSpec>>>,
    pub subject_keys: (String, String, String),
}

pub struct Proxy {
    settings: Arc<GatewaySettings>,
    routes: RouteTable,
    directory: Arc<RwLock<Directory>>,
    client: Client<HttpConnector, Full<Bytes>>,
    bulkheads: Mutex<HashMap<String, Arc<Semaphore>>>,
    signing_secret: Option<Vec<u8>>,
    credential_headers: Vec<HeaderName>,
    strip_headers: Vec<HeaderName>,
    usage: UsageSink,
    limiter: Arc<dyn Limiter>,
    /// Each plan's limits, parsed once.
    plans: HashMap<String, Arc<Vec<Arc<LimitSpec>>>>,
    /// Consumers with their own `metadata.limits`: their effective limits, by consumer id and
    /// record version.
    overrides: Mutex<HashMap<String, (i64, Arc<Vec<Arc<LimitSpec>>>)>>,
}

/// Header in which an upstream reports what a request really cost: `compute_units=42, x=1`.
const COST_HEADER: &str = "x-tollgate-cost";

impl Proxy {
    pub fn new(
        settings: Arc<GatewaySettings>,
        directory: Arc<RwLock<Directory>>,
        signing_secret: Option<Vec<u8>>,
        usage: UsageSink,
        limiter: Arc<dyn Limiter>,
    ) -> Self {
        let plans = settings
            .plans
            .iter()
            .map(|(name, plan)| {
                let specs = plan
                    .specs(&format!("plans.{name}"))
                    .expect("validated by GatewaySettings::validate");
                (
                    name.clone(),
                    Arc::new(specs.into_iter().map(Arc::new).collect::<Vec<_>>()),
                )
            })
            .collect();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(settings.http.upstream_connect_timeout_ms)));
        connector.set_nodelay(true);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        let names = |list: &[String]| {
            list.iter()
                .map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).expect("validated header name"))
                .collect::<Vec<_>>()
        };
        Self {
            routes: RouteTable::new(&settings.routes),
            credential_headers: names(&settings.keys.headers),
            strip_headers: names(&settings.identity.strip_headers),
            settings,
            directory,
            client,
            bulkheads: Mutex::default(),
            signing_secret,
            usage,
            limiter,
            plans,
            overrides: Mutex::default(),
        }
    }

    /// The limits that apply to a consumer: its plan's (or the default plan's), with its own
    /// `metadata.limits` overrides.
    fn limits_of(&self, consumer: &crate::directory::Consumer) -> Option<Arc<Vec<Arc<LimitSpec>>>> {
        let plan_name = consumer
            .plan
            .as_ref()
            .or(self.settings.identity.default_plan.as_ref())?;
        let plan = self.plans.get(plan_name)?;
        if !consumer.metadata.contains_key("limits") {
            return Some(Arc::clone(plan));
        }
        let mut cache = self.overrides.lock().expect("override cache lock");
        if let Some((version, specs)) = cache.get(&consumer.id) {
            if *version == consumer.version {
                return Some(Arc::clone(specs));
            }
        }
        let metadata = serde_json::Value::Object(consumer.metadata.clone());
        let specs = match crate::limits::effective_limits(&self.settings.plans[plan_name], &metadata) {
            Ok(specs) => Arc::new(specs.into_iter().map(Arc::new).collect::<Vec<_>>()),
            // The admin API refuses bad overrides; a record written otherwise keeps the plan.
            Err(_) => Arc::clone(plan),
        };
        cache.insert(consumer.id.clone(), (consumer.version, Arc::clone(&specs)));
        Some(specs)
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let timestamp_ms = chrono::Utc::now().timestamp_millis();
        let method = req.method().to_string();
        let request_id = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 200)
            .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned);
        let mut ctx = RequestContext {
            request_id,
            ..RequestContext::default()
        };
        let result = self.chain(req, peer, &mut ctx).await;
        let status = result
            .as_ref()
            .map_or_else(|p| p.status.as_u16(), |r| r.status().as_u16());
        // One usage event per request, whatever happened: built now, finished when the
        // response body has been sent (its size is known only then).
        let pending = PendingEvent {
            event: self.usage_event(&ctx, method, status, timestamp_ms),
            started,
            sink: self.usage.clone(),
        };
        let mut response = match result {
            Ok(response) => response,
            Err(problem) => problem
                .into_response()
                .map(|b| b.map_err(|never| match never {}).boxed()),
        };
        if let Ok(value) = HeaderValue::from_str(&ctx.request_id) {
            response.headers_mut().insert("x-request-id", value);
        }
        // Every response after a limit decision says where the tenant stands.
        let mut release = None;
        if let Some(limits) = ctx.limits.take() {
            for (name, value) in crate::limits::response_headers(&limits.decision) {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, value);
                }
            }
            // In-flight (`concurrent`) counts end with the response; a refused or degraded
            // decision counted nothing to give back.
            if limits.decision.allowed && !limits.decision.degraded {
                release = Some((Arc::clone(&self.limiter), limits.charges));
            }
        }
        response.map(|body| {
            Metered {
                inner: body,
                bytes: 0,
                pending: Some(pending),
                release,
                _bulkhead: ctx.bulkhead.take(),
            }
            .boxed()
        })
    }

    fn usage_event(&self, ctx: &RequestContext, method: String, status: u16, timestamp_ms: i64) -> UsageEvent {
        let consumer = ctx.identity.as_ref().map(|i| &i.consumer);
        let outcome = match (ctx.upstream_status, status) {
            (Some(s), _) if s >= 500 => Outcome::UpstreamError,
            (Some(_), _) => Outcome::Allowed,
            (None, 401) => Outcome::Unauthenticated,
            (None, 403) => Outcome::Forbidden,
            (None, 429) => Outcome::RateLimited,
            (None, 502 | 504) => Outcome::UpstreamError,
            (None, _) => Outcome::Rejected,
        };
        let billable = ctx
            .upstream_status
            .is_some_and(|s| s < self.usage.settings().billable_below_status);
        let mut units: BTreeMap<String, i64> = BTreeMap::from([("requests".to_owned(), 1)]);
        if let Some(route) = &ctx.route {
            for (meter, cost) in route.settings.cost.iter().chain(&ctx.reported_cost) {
                units.insert(meter.clone(), i64::try_from(*cost).unwrap_or(i64::MAX));
            }
        }
        UsageEvent {
            event_id: uuid::Uuid::now_v7(),
            timestamp_ms,
            tenant_id: consumer.map(|c| c.tenant_id.clone()),
            consumer: consumer.map(|c| c.name.clone()),
            key_id: ctx.identity.as_ref().map(|i| i.key_id.clone()),
            plan: consumer.and_then(|c| c.plan.clone()),
            route: ctx.route.as_ref().map(|r| r.settings.id.clone()).unwrap_or_default(),
            method,
            status,
            outcome,
            billable,
            units,
            request_bytes: ctx.request_bytes as i64,
            response_bytes: 0,
            latency_ms: 0,
            upstream_latency_ms: ctx.upstream_latency.map(|d| d.as_millis() as i64),
            gateway_id: self.settings.service.id.clone(),
            request_id: Some(ctx.request_id.clone()),
        }
    }

    async fn chain(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        ctx: &mut RequestContext,
    ) -> Result<Response<Body>, Problem> {
        // 1. Oversized headers are refused before anything reads them.
        let header_bytes: usize = req.headers().iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
        if header_bytes > self.settings.http.max_header_bytes {
            return Err(Problem::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers-too-large",
                "Request Header Fields Too Large",
            )
            .with_detail(format!(
                "request headers are limited to {} bytes",
                self.settings.http.max_header_bytes
            )));
        }

        // 2. Route: only configured upstreams are reachable.
        let Matched { route, params } = self
            .routes
            .find(req.method().as_str(), req.uri().path())
            .map_err(|miss| match miss {
                Miss::DotSegment => Problem::new(StatusCode::BAD_REQUEST, "invalid-path", "Bad Request")
                    .with_detail("paths may not contain `.` or `..` segments"),
                Miss::NoRoute => Problem::new(StatusCode::NOT_FOUND, "no-route", "Not Found")
                    .with_detail("no route serves this path"),
                Miss::MethodNotAllowed => Problem::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method-not-allowed",
                    "Method Not Allowed",
                ),
            })?;
        ctx.route = Some(Arc::clone(&route));

        // 3. Authentication: a malformed key is refused without a lookup; every refusal is the
        //    same 401, so the answer never tells whether a key exists.
        let identity = self.authenticate(req.headers())?;
        ctx.identity = Some(identity.clone());
        let consumer = &identity.consumer;

        // 4. Tenant isolation: identity comes only from the key.
        if params.get("tenantId").is_some_and(|t| *t != consumer.tenant_id) {
            return Err(forbidden("the tenant in the path is not the key's tenant"));
        }
        if let Some(param) = &self.settings.identity.tenant_query_param {
            if query_values(req.uri(), param).any(|t| t != consumer.tenant_id) {
                return Err(forbidden("the tenant in the query is not the key's tenant"));
            }
        }

        // 5. Bulkhead: one tenant cannot hold all upstream capacity.
        ctx.bulkhead = Some(self.bulkhead(&consumer.tenant_id)?);

        // 6. Usage must be recordable: with the spool full, billable traffic is refused rather
        //    than served unbilled (unless configured otherwise).
        if !self.usage.accepting_billable() {
            self.usage.metrics().refused.increment(1);
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "usage-spool-full",
                "Service Unavailable",
            )
            .with_detail("usage cannot be recorded right now; retry later")
            .with_header("retry-after", "5"));
        }

        // 7. Limits: every dimension checked, all committed or none.
        if let Some(specs) = self.limits_of(consumer) {
            let content_length = parts_content_length(req.headers());
            let units = crate::limits::upfront_units(&route.settings.cost, content_length);
            let ip = peer.ip().to_string();
            let subject = Subject {
                tenant: &consumer.tenant_id,
                key: &identity.key_id,
                ip: &ip,
            };
            let charges = crate::limits::charges(&specs, &subject, &units);
            let decision = self
                .limiter
                .decide(&charges, chrono::Utc::now().timestamp_millis())
                .await;
            let refused = !decision.allowed;
            ctx.limits = Some(LimitCharge {
                decision,
                charges,
                specs,
                subject_keys: (consumer.tenant_id.clone(), identity.key_id.clone(), ip),
            });
            if refused {
                let body = crate::limits::refusal_problem_json(&ctx.limits.as_ref().expect("just set").decision);
                return Err(Problem::from_json(body));
            }
        }

        // 8. Body: bounded in size and in time, so a slow or huge upload cannot pin us.
        let (parts, body) = req.into_parts();
        let max = self.settings.http.max_body_bytes;
        if parts
            .headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|len| len > max)
        {
            return Err(too_large(max));
        }
        let read = tokio::time::timeout(
            Duration::from_millis(self.settings.http.body_read_timeout_ms),
            Limited::new(body, max).collect(),
        );
        let body = match read.await {
            Err(_) => {
                return Err(
                    Problem::new(StatusCode::REQUEST_TIMEOUT, "body-timeout", "Request Timeout")
                        .with_detail("the request body arrived too slowly"),
                )
            }
            Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => return Err(too_large(max)),
            Ok(Err(_)) => {
                return Err(Problem::new(StatusCode::BAD_REQUEST, "body-unreadable", "Bad Request")
                    .with_detail("the request body could not be read"))
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        ctx.request_bytes = body.len() as u64;

        // 9. Proxy to the route's upstream, or the consumer's dedicated one.
        let base = consumer
            .metadata
            .get(&self.settings.identity.upstream_field)
            .and_then(|v| v.as_str())
            .and_then(|name| route.settings.upstreams.get(name))
            .unwrap_or(&route.settings.upstream);
        let uri = upstream_uri(base, &parts.uri)?;
        let mut upstream_req = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .body(Full::new(body))
            .expect("parts are valid");
        *upstream_req.headers_mut() =
            self.upstream_headers(&parts.headers, peer, &identity, ctx, &parts.method, &parts.uri);
        let sent = Instant::now();
        let answered = tokio::time::timeout(
            Duration::from_millis(route.settings.timeout_ms),
            self.client.request(upstream_req),
        )
        .await;
        ctx.upstream_latency = Some(sent.elapsed());
        let response = match answered {
            Err(_) => {
                return Err(
                    Problem::new(StatusCode::GATEWAY_TIMEOUT, "upstream-timeout", "Gateway Timeout")
                        .with_detail("the upstream did not answer in time"),
                )
            }
            Ok(Err(err)) => {
                tracing::warn!(route = %route.settings.id, error = %err, "upstream request failed");
                return Err(
                    Problem::new(StatusCode::BAD_GATEWAY, "upstream-unreachable", "Bad Gateway")
                        .with_detail("the upstream could not be reached"),
                );
            }
            Ok(Ok(response)) => response,
        };

        // 10. Response: hop-by-hop headers dropped, the reported cost taken (and kept from the
        //    client); the bulkhead slot stays in `ctx` until the body ends.
        let (mut parts, body) = response.into_parts();
        ctx.upstream_status = Some(parts.status.as_u16());
        remove_hop_by_hop(&mut parts.headers);
        if let Some(reported) = parts.headers.remove(COST_HEADER) {
            match crate::limits::parse_cost_header(reported.to_str().unwrap_or_default()) {
                Ok(units) => {
                    ctx.reported_cost = units.iter().map(|(m, n)| (m.as_str().to_owned(), *n)).collect();
                    self.charge_reported(ctx, &units).await;
                }
                // An upstream's typo must not fail the tenant's request.
                Err(reason) => {
                    tracing::debug!(route = %route.settings.id, %reason, "ignored a malformed x-tollgate-cost")
                }
            }
        }
        Ok(Response::from_parts(parts, body.map_err(Into::into).boxed()))
    }

    /// Counts what the upstream reported, beyond what the route charged up front, so the next
    /// request sees it.
    async fn charge_reported(&self, ctx: &RequestContext, reported: &BTreeMap<crate::limits::Meter, u64>) {
        let Some(limits) = &ctx.limits else { return };
        let route_cost = ctx.route.as_ref().map(|r| r.settings.cost.clone()).unwrap_or_default();
        let upfront = crate::limits::upfront_units(&route_cost, None);
        let extra: BTreeMap<_, _> = reported
            .iter()
            .map(|(meter, n)| (*meter, n.saturating_sub(upfront.get(meter).copied().unwrap_or(0))))
            .collect();
        let (tenant, key, ip) = &limits.subject_keys;
        let subject = Subject { tenant, key, ip };
        let charges = crate::limits::charges_after(&limits.specs, &subject, &extra);
        if !charges.is_empty() {
            self.limiter.add(&charges, chrono::Utc::now().timestamp_millis()).await;
        }
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, Problem> {
        let presented = self.credential_headers.iter().find_map(|name| {
            let value = headers.get(name)?.to_str().ok()?.trim();
            if name == hyper::header::AUTHORIZATION {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            } else {
                Some(value)
            }
        });
        let digest = presented
            .and_then(|key| apikey::parse(key).ok())
            .ok_or_else(unauthorized)?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        self.directory
            .read()
            .expect("directory lock")
            .authenticate(&digest, now_ms)
            .map_err(|_| unauthorized())
    }

    fn bulkhead(&self, tenant: &str) -> Result<OwnedSemaphorePermit, Problem> {
        let semaphore = Arc::clone(
            self.bulkheads
                .lock()
                .expect("bulkhead lock")
                .entry(tenant.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.settings.http.tenant_max_in_flight as usize))),
        );
        semaphore.try_acquire_owned().map_err(|_| {
            Problem::new(StatusCode::TOO_MANY_REQUESTS, "tenant-concurrency", "Too Many Requests")
                .with_detail(format!(
                    "at most {} requests of one tenant may be in flight",
                    self.settings.http.tenant_max_in_flight
                ))
                .with_header("retry-after", "1")
        })
    }

    fn upstream_headers(
        &self,
        incoming: &HeaderMap,
        peer: SocketAddr,
        identity: &Identity,
        ctx: &RequestContext,
        method: &hyper::Method,
        uri: &Uri,
    ) -> HeaderMap {
        let mut headers = incoming.clone();
        remove_hop_by_hop(&mut headers);
        headers.remove(hyper::header::HOST);
        for name in self.credential_headers.iter().chain(&self.strip_headers) {
            headers.remove(name);
        }
        let spoofed: Vec<HeaderName> = headers
            .keys()
            .filter(|n| n.as_str().starts_with("x-tollgate-"))
            .cloned()
            .collect();
        for name in spoofed {
            headers.remove(name);
        }
        let consumer = &identity.consumer;
        let plan = consumer.plan.as_deref().unwrap_or_default();
        let identity_headers = [
            ("x-tollgate-consumer", consumer.name.as_str()),
            ("x-tollgate-tenant", consumer.tenant_id.as_str()),
            ("x-tollgate-key-id", identity.key_id.as_str()),
            ("x-tollgate-plan", plan),
            ("x-request-id", ctx.request_id.as_str()),
        ];
        for (name, value) in identity_headers {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(name, value);
            }
        }
        let forwarded_for = match incoming.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
            headers.insert("x-forwarded-for", value);
        }
        if let Some(host) = incoming.get(hyper::header::HOST) {
            headers.insert("x-forwarded-host", host.clone());
        }
        if let Some(secret) = &self.signing_secret {
            let timestamp = chrono::Utc::now().timestamp();
            let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
            let signature = sign(
                secret,
                timestamp,
                method.as_str(),
                path,
                &consumer.name,
                &consumer.tenant_id,
                &identity.key_id,
                plan,
            );
            headers.insert(
                "x-tollgate-signature",
                HeaderValue::from_str(&format!("t={timestamp},v1={signature}")).expect("hex is a valid header"),
            );
        }
        headers
    }
}

/// HMAC-SHA256, hex, over the identity headers and the request line, one per line:
/// `timestamp \n method \n path?query \n consumer \n tenant \n key id \n plan`. The upstream
/// recomputes it with the shared secret and checks the timestamp is recent.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    secret: &[u8],
    timestamp: i64,
    method: &str,
    path_and_query: &str,
    consumer: &str,
    tenant: &str,
    key_id: &str,
    plan: &str,
) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{timestamp}\n{method}\n{path_and_query}\n{consumer}\n{tenant}\n{key_id}\n{plan}").as_bytes());
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn upstream_uri(base: &str, incoming: &Uri) -> Result<Uri, Problem> {
    let path_and_query = incoming.path_and_query().map_or("/", |pq| pq.as_str());
    format!("{}{}", base.trim_end_matches('/'), path_and_query)
        .parse()
        .map_err(|_| {
            Problem::new(StatusCode::BAD_REQUEST, "invalid-path", "Bad Request")
                .with_detail("the request path cannot be forwarded")
        })
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP.iter().copied().chain(named.iter().map(String::as_str)) {
        headers.remove(name);
    }
}

fn query_values<'a>(uri: &'a Uri, param: &'a str) -> impl Iterator<Item = String> + 'a {
    uri.query().unwrap_or_default().split('&').filter_map(move |pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (crate::routes::percent_decode(key) == param).then(|| crate::routes::percent_decode(&value.replace('+', " ")))
    })
}

fn unauthorized() -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "invalid-api-key", "Unauthorized")
        .with_detail("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")
        .with_header("www-authenticate", "Bearer")
}

fn forbidden(detail: &str) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "tenant-mismatch", "Forbidden").with_detail(detail)
}

fn parts_content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(hyper::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn too_large(max: usize) -> Problem {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", "Payload Too Large")
        .with_detail(format!("request bodies are limited to {max} bytes"))
}

/// The response body as sent to the client: counts its bytes and, when it ends (or the
/// client goes away), completes and records the request's usage event, gives back the
/// request's in-flight limit and releases the tenant's bulkhead slot.
struct Metered {
    inner: Body,
    bytes: u64,
    pending: Option<PendingEvent>,
    release: Option<(Arc<dyn Limiter>, Vec<Charge>)>,
    _bulkhead: Option<OwnedSemaphorePermit>,
}

struct PendingEvent {
    event: UsageEvent,
    started: Instant,
    sink: UsageSink,
}

impl hyper::body::Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        if let Some(PendingEvent {
            mut event,
            started,
            sink,
        }) = self.pending.take()
        {
            event.response_bytes = self.bytes as i64;
            event.units.insert("request_bytes".to_owned(), event.request_bytes);
            event.units.insert("response_bytes".to_owned(), event.response_bytes);
            event.latency_ms = started.elapsed().as_millis() as i64;
            sink.record(event);
        }
        if let Some((limiter, charges)) = self.release.take() {
            if charges.iter().any(|c| c.spec.meter == crate::limits::Meter::Concurrent) {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move { limiter.release(&charges).await });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), vec!["accept"]);
    }

    #[test]
    fn upstream_uri_joins_base_and_raw_path() {
        let incoming: Uri = "/v1/a%20b?x=1".parse().unwrap();
        assert_eq!(
            upstream_uri("http://10.0.0.1:8090/", &incoming).unwrap().to_string(),
            "http://10.0.0.1:8090/v1/a%20b?x=1"
        );
        assert_eq!(
            upstream_uri("http://h/base", &incoming).unwrap().to_string(),
            "http://h/base/v1/a%20b?x=1"
        );
    }

    #[test]
    fn signature_covers_every_identity_field() {
        let base = sign(b"k", 1, "GET", "/v1/x", "acme", "t1", "key_1", "free");
        assert_eq!(base.len(), 64);
        assert_ne!(base, sign(b"k", 1, "GET", "/v1/x", "acme", "t2", "key_1", "free"));
        assert_ne!(base, sign(b"k", 1, "GET", "/v1/x", "acme", "t1", "key_1", "enterprise"));
        assert_ne!(base, sign(b"k", 2, "GET", "/v1/x", "acme", "t1", "key_1", "free"));
        assert_ne!(base, sign(b"other", 1, "GET", "/v1/x", "acme", "t1", "key_1", "free"));
    }

    #[test]
    fn query_values_decode() {
        let uri: Uri = "/x?tenant_id=t%5F1&a=b&tenant_id=t2".parse().unwrap();
        assert_eq!(query_values(&uri, "tenant_id").collect::<Vec<_>>(), vec!["t_1", "t2"]);
    }
}
