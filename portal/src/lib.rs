//! Tollgate's tenant portal: a tenant's keys, usage, live limit status and API docs.
//!
//! In: browsers holding a session link minted by the operator's application on the gateway's
//! admin API (`POST /v1/consumers/{name}/portal-sessions`), then the session cookie. Out:
//! server-rendered pages over a JSON API under `/api/` that an operator can embed too.
//!
//! Modules in the order a request meets them: [`settings`]; [`sessions`] (the link's
//! exchange for a cookie, CSRF); [`api`] (session, keys, limits: each a call to the admin API
//! for the session's consumer, through [`admin_client`]); [`usage`] (ClickHouse rollups of
//! the session's tenant) drawn by [`chart`]; [`pages`] (HTML); [`problem`] (every refusal).
//!
//! The tenant boundary: the consumer comes from the session, never from a URL or body; key
//! ids from the client are checked for shape and then resolved by the admin API within that
//! consumer, so another tenant's key is "not found".
#![forbid(unsafe_code)]

pub mod admin_client;
pub mod api;
pub mod chart;
pub mod pages;
pub mod problem;
pub mod sessions;
pub mod settings;
pub mod usage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tollgate_runtime::shutdown::Shutdown;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use settings::PortalSettings;

/// What every handler shares.
pub struct Portal {
    pub settings: PortalSettings,
    pub admin: admin_client::AdminClient,
    pub sessions: sessions::Sessions,
    pub clickhouse: clickhouse::Client,
    /// The operator's OpenAPI document, parsed at start (the docs page).
    pub openapi: Option<serde_json::Value>,
}

pub type State = Arc<Portal>;

#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error("{ADMIN_TOKEN_ENV} is not set: the portal calls the gateway's admin API with it", ADMIN_TOKEN_ENV = settings::ADMIN_TOKEN_ENV)]
    NoAdminToken,
    #[error("portal.openapi {path}: {reason}")]
    OpenApi { path: String, reason: String },
    #[error("portal.listen {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

impl Portal {
    /// The portal's state; no IO but reading the OpenAPI document.
    pub fn new(settings: PortalSettings, admin_token: String) -> Result<Self, PortalError> {
        let openapi = match &settings.portal.openapi {
            None => None,
            Some(path) => {
                let failed = |reason: String| PortalError::OpenApi {
                    path: path.display().to_string(),
                    reason,
                };
                let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
                let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| failed(e.to_string()))?;
                if !doc
                    .get("openapi")
                    .and_then(|v| v.as_str())
                    .is_some_and(|v| v.starts_with("3."))
                {
                    return Err(failed("not an OpenAPI 3 document (no `openapi: 3.x`)".into()));
                }
                Some(doc)
            }
        };
        Ok(Self {
            admin: admin_client::AdminClient::new(
                &settings.gateway.admin_url,
                admin_token,
                Duration::from_millis(settings.gateway.timeout_ms),
            ),
            sessions: sessions::Sessions::new(settings.portal.session_ttl_secs),
            clickhouse: settings.clickhouse.client(),
            openapi,
            settings,
        })
    }
}

/// The portal's JSON API, as an OpenAPI 3.1 document: the `/api/` routes are registered
/// from their handlers' annotations ([`app`]), so the document lists exactly what is served.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Tollgate portal API",
        description = "A tenant's keys, usage and live limits, for the consumer of the session. \
            Every call needs the session cookie that a portal link sets; every state-changing \
            call also needs the session's CSRF token (GET /api/session) in X-CSRF-Token. Every \
            refusal is an RFC 9457 problem."
    ),
    modifiers(&SessionCookie),
    security(("session" = []))
)]
pub struct PortalApi;

struct SessionCookie;

impl utoipa::Modify for SessionCookie {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "session",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(sessions::COOKIE))),
        );
    }
}

/// The portal's routes, and the OpenAPI document of its `/api/` ones.
pub fn app(state: State) -> Router {
    let (api_routes, document) = OpenApiRouter::with_openapi(<PortalApi as utoipa::OpenApi>::openapi())
        .routes(routes!(api::session, api::sign_out))
        .routes(routes!(api::list_keys, api::create_key))
        .routes(routes!(api::roll_key))
        .routes(routes!(api::revoke_key))
        .routes(routes!(api::limits))
        .routes(routes!(usage::usage_json))
        .routes(routes!(usage::usage_csv))
        .split_for_parts();
    let document = Arc::new(document);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/session/{token}", get(api::open_link))
        .merge(api_routes)
        .route("/api/openapi-tenant.json", get(pages::tenant_openapi))
        .route(
            "/openapi.json",
            get(move || {
                let document = Arc::clone(&document);
                async move { axum::Json(document.as_ref().clone()) }
            }),
        )
        .route("/", get(pages::home))
        .route("/keys", get(pages::keys))
        .route("/usage", get(pages::usage))
        .route("/limits", get(pages::limits))
        .route("/docs", get(pages::docs))
        .route("/assets/portal.js", get(pages::script))
        .fallback(|| async { problem::Problem::not_found("no such page") })
        .with_state(state)
}

/// A bound portal, not yet serving (tests read its address first).
pub struct Bound {
    listener: tokio::net::TcpListener,
    state: State,
}

impl Bound {
    pub async fn bind(settings: PortalSettings, admin_token: String) -> Result<Self, PortalError> {
        let addr = settings.portal.listen.clone();
        let state = Arc::new(Portal::new(settings, admin_token)?);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| PortalError::Bind { addr, source })?;
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `shutdown`, then finishes the requests in flight.
    pub async fn serve(self, shutdown: Shutdown) -> Result<(), PortalError> {
        tracing::info!(listen = %self.local_addr(), url = %self.state.settings.portal.url, "portal ready");
        axum::serve(self.listener, app(self.state))
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await
            .map_err(PortalError::Serve)
    }
}

/// Loads nothing, binds and serves: what `main` runs.
pub async fn run(settings: PortalSettings, shutdown: Shutdown) -> Result<(), PortalError> {
    let token = std::env::var(settings::ADMIN_TOKEN_ENV).map_err(|_| PortalError::NoAdminToken)?;
    Bound::bind(settings, token).await?.serve(shutdown).await
}

/// Now, in epoch milliseconds.
pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
