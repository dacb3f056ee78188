//! The public request chain: one function ([`Proxy::chain`]), read top to bottom, from a
//! tenant's request to the upstream's response. Each step lives in its own file:
//!
//! canonical path → route → authenticate → isolate → admit (bulkhead, spool, spend cap,
//! limits) → body → forward → settle
//!
//! In: a request on the public listener (any body type: hyper's `Incoming` from the socket,
//! or an in-memory body in tests) and the peer address. Out: the upstream's response, or a
//! problem+json refusal; and one usage event per request, recorded when the response body has
//! been sent (`settle`). Per-request state is one [`RequestContext`] carried through.
//!
//! Collaborators are injected, so tests drive the whole chain in-process: the directory (an
//! in-memory map fed by the keys topic), the [`UsageSink`] (Kafka through a spool, or memory),
//! the [`Limiter`] (local or Redis) and the [`Upstream`] (hyper's client, or a recorder).

mod admit;
mod authenticate;
mod body;
pub mod canonical;
mod cap;
mod cors;
mod forward;
pub mod headers;
mod isolate;
mod route;
mod settle;
pub mod starting;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use self::admit::LimitCharge;
pub use self::cors::valid_origin;
pub use self::forward::{sign, HyperUpstream, Upstream, UpstreamFuture};
use crate::directory::{Directory, Identity};
use crate::events::UsageSink;
use crate::limits::{LimitSpec, Limiter};
use crate::metrics::GatewayMetrics;
use crate::problem::Problem;
use crate::routes::RouteTable;
use crate::settings::GatewaySettings;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// A request body inside the chain, whatever it was outside.
pub type RequestBody = BoxBody<Bytes, ClientBodyError>;

/// The client's body failed (reset, cut short, malformed chunking). A named type rather than
/// [`BoxError`]: a boxed error in the body type trips rustc's higher-ranked lifetime check
/// when the connection task is spawned.
#[derive(Debug, thiserror::Error)]
#[error("request body: {0}")]
pub struct ClientBodyError(BoxError);

/// What one request did, carried through the chain; the usage event is built from it.
#[derive(Debug, Default)]
pub struct RequestContext {
    pub request_id: String,
    pub method: String,
    pub route: Option<Arc<crate::routes::Route>>,
    pub identity: Option<Identity>,
    pub request_bytes: u64,
    pub upstream_latency: Option<Duration>,
    /// Set once the upstream answered (whatever its status).
    pub upstream_status: Option<u16>,
    /// Units the upstream reported in `x-tollgate-cost`, replacing the route's cost.
    pub reported_cost: BTreeMap<String, u64>,
    /// The request path in canonical form: what was routed on, and what is forwarded.
    pub path: String,
    /// The limit decision, once made: its headers go on the response.
    pub limits: Option<LimitCharge>,
    /// The tenant's bulkhead slot, held until the response body has been sent.
    pub bulkhead: Option<OwnedSemaphorePermit>,
    /// What the request holds against its tenant's spend cap, settled when its response ends.
    pub spend: Option<crate::spend::Reservation>,
    /// The request came on the TLS listener (forwarded as `proto=https`).
    pub over_tls: bool,
    /// The page origin the route lets read this answer (`cors_origins`).
    pub cors_origin: Option<String>,
}

/// One set of checked limits, shared by the requests it applies to.
pub type Specs = Arc<Vec<Arc<LimitSpec>>>;

pub struct Proxy {
    settings: Arc<GatewaySettings>,
    routes: RouteTable,
    directory: Arc<RwLock<Directory>>,
    upstream: Arc<dyn Upstream>,
    bulkheads: Mutex<HashMap<String, Arc<Semaphore>>>,
    signing_secret: Option<Vec<u8>>,
    credential_headers: Vec<HeaderName>,
    /// `identity.strip_headers`, normalised (lower-case, `_` as `-`).
    strip_headers: Vec<String>,
    trusted_proxies: Vec<headers::Cidr>,
    usage: UsageSink,
    limiter: Arc<dyn Limiter>,
    metrics: Arc<GatewayMetrics>,
    /// Each plan's limits, parsed once.
    plans: HashMap<String, Specs>,
    /// Tenants' `metadata.limits`: their effective limits by ruling consumer id, with the
    /// record they were computed for.
    overrides: Mutex<HashMap<String, (Arc<crate::directory::Consumer>, Specs)>>,
    /// Month-to-date spend of budgeted tenants, when `[budgets]` is configured.
    spend: Option<Arc<crate::spend::SpendLedger>>,
    /// One line per request, when `[access_log]` is enabled.
    access_log: Option<crate::access_log::AccessLog>,
}

impl Proxy {
    /// A proxy over validated settings, forwarding with hyper's client.
    pub fn new(
        settings: Arc<GatewaySettings>,
        directory: Arc<RwLock<Directory>>,
        signing_secret: Option<Vec<u8>>,
        usage: UsageSink,
        limiter: Arc<dyn Limiter>,
        metrics: Arc<GatewayMetrics>,
        upstream: Arc<dyn Upstream>,
    ) -> Self {
        let plans = settings
            .plans
            .iter()
            .map(|(name, plan)| {
                let specs = plan
                    .specs(&format!("plans.{name}"), &settings.meters)
                    .expect("validated by GatewaySettings::validate");
                (
                    name.clone(),
                    Arc::new(specs.into_iter().map(Arc::new).collect::<Vec<_>>()),
                )
            })
            .collect();
        let access_log = settings.access_log.logger();
        Self {
            routes: RouteTable::new(&settings.routes, settings.http.case_sensitive_routes),
            upstream,
            credential_headers: headers::header_names(&settings.keys.headers),
            strip_headers: headers::normalised_names(&settings.identity.strip_headers),
            trusted_proxies: settings
                .forwarding
                .trusted_proxies
                .iter()
                .map(|c| headers::Cidr::parse(c).expect("validated by GatewaySettings::validate"))
                .collect(),
            settings,
            directory,
            bulkheads: Mutex::default(),
            signing_secret,
            usage,
            limiter,
            metrics,
            plans,
            overrides: Mutex::default(),
            spend: None,
            access_log,
        }
    }

    /// Enforces the tenants' spend caps with `ledger` (kept current by `spend::refresh`).
    pub fn with_spend_caps(mut self, ledger: Arc<crate::spend::SpendLedger>) -> Self {
        self.spend = Some(ledger);
        self
    }

    /// Serves one request: the chain, then the response headers every answer carries, then the
    /// usage event (recorded when the response body ends).
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>, peer: SocketAddr) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let started = Instant::now();
        let timestamp_ms = chrono::Utc::now().timestamp_millis();
        let req = req.map(|b| b.map_err(|e| ClientBodyError(Box::new(e))).boxed());
        let mut ctx = RequestContext {
            request_id: request_id(req.headers()),
            method: req.method().to_string(),
            over_tls: req.extensions().get::<crate::tls::OverTls>().is_some(),
            ..RequestContext::default()
        };
        let result = self.chain(req, peer, &mut ctx).await;
        self.settle(ctx, result, started, timestamp_ms).await
    }

    /// The chain. Order matters: nothing reads the body before the request is known to be
    /// routable, authenticated, in its tenant's scope and within its limits; the limits are
    /// decided once, before the upstream is called.
    async fn chain(
        &self,
        req: Request<RequestBody>,
        peer: SocketAddr,
        ctx: &mut RequestContext,
    ) -> Result<Response<Body>, Problem> {
        // 1. Headers that cannot be forwarded as checked are refused before anything reads
        //    them: oversized, unknown transfer codings, `_` in names (when so configured).
        self.check_request_headers(req.headers())?;

        // 2. Canonical path, then route: only configured upstreams are reachable, and the path
        //    routed on is the one forwarded. A CORS preflight is routed as the request it asks
        //    about and answered here: it carries no key, and nothing of it reaches an upstream.
        let preflight = cors::preflight_method(&req);
        let (path, matched) = self.route(&req, preflight.as_deref(), ctx)?;
        ctx.path = path.encoded;
        ctx.cors_origin = cors::allowed_origin(req.headers(), &matched.route.settings);
        if preflight.is_some() {
            return self.preflight(&matched.route.settings, ctx);
        }

        // 3. Authentication: identity comes only from the key.
        let identity = self.authenticate(req.headers())?;
        ctx.identity = Some(identity.clone());

        // 4. Tenant isolation: the path and query may only name the key's tenant.
        self.isolate(&req, &matched.params, &identity)?;

        // 5. Admission: the tenant's bulkhead, room in the usage spool, its spend cap, then the
        //    limits (every dimension checked, all committed or none).
        self.admit(req.headers(), peer, &identity, &matched.route, ctx).await?;

        // 6. Body: bounded in size and in time.
        let (parts, body) = req.into_parts();
        let body = self.read_body(&parts.headers, body, ctx).await?;
        self.charge_streamed_request_bytes(admit::declared_length(&parts.headers), ctx)
            .await;
        self.isolate_body(
            &parts.headers,
            &body,
            &identity,
            matched.route.settings.check_body_tenant,
        )?;

        // 7. Forward to the route's upstream (or the consumer's dedicated one).
        self.forward(parts, body, peer, &identity, &matched.route, ctx).await
    }
}

/// The client's `x-request-id` when it is sane, else a new UUIDv7.
fn request_id(headers: &hyper::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| crate::events::ids::text(crate::events::ids::now_v7()), str::to_owned)
}

/// Sets a header, skipping values that cannot be one.
fn set_header(headers: &mut hyper::HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod edge_tests;
#[cfg(test)]
mod header_tests;
#[cfg(test)]
mod refund_tests;
#[cfg(test)]
mod tests;
