//! The gateway's settings (`config/gateway.toml`), parsed and validated without IO.

use std::collections::HashSet;

use serde::Deserialize;
use tollgate_runtime::kafka::KafkaSettings;
use tollgate_runtime::settings::{http_url, in_range, socket_addr, Invalid, Validate};

pub use crate::routes::RouteSettings;

/// Where the admin token comes from: never the settings file.
pub const ADMIN_TOKEN_ENV: &str = "TOLLGATE_ADMIN_TOKEN";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    pub service: ServiceSettings,
    pub public: PublicSettings,
    pub admin: ListenerSettings,
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub topics: TopicSettings,
    #[serde(default)]
    pub keys: KeySettings,
    #[serde(default)]
    pub identity: IdentitySettings,
    #[serde(default)]
    pub http: HttpSettings,
    /// Forwarding headers and header-name hygiene.
    #[serde(default)]
    pub forwarding: ForwardingSettings,
    #[serde(default)]
    pub events: crate::events::EventSettings,
    /// Where rate-limit counters live (`local` or `redis`) and what happens when Redis fails.
    #[serde(default)]
    pub limits: crate::limits::LimitsSettings,
    /// Meters beyond the built-in ones (`[meters.tokens]` with `unit = "tokens"`): what
    /// routes may charge, limits may count and upstreams may report in `x-tollgate-cost`.
    #[serde(default)]
    pub meters: crate::limits::Meters,
    /// Plans by name; a consumer's `plan` metadata picks one.
    #[serde(default)]
    pub plans: std::collections::BTreeMap<String, crate::limits::PlanSettings>,
    /// Routes; the most specific pattern that matches a request's path serves it.
    #[serde(default)]
    pub routes: Vec<RouteSettings>,
    /// Monthly spend caps (set per tenant on the admin API); without this section caps are
    /// stored but not enforced.
    #[serde(default)]
    pub budgets: Option<crate::spend::settings::BudgetSettings>,
    /// One log line per request (off by default).
    #[serde(default)]
    pub access_log: crate::access_log::AccessLogSettings,
    /// The tenant portal that session links (`POST /v1/consumers/{name}/portal-sessions`)
    /// point at; without it the admin API mints none.
    #[serde(default)]
    pub portal: Option<crate::admin::portal::PortalLinkSettings>,
}

/// Where the upstream signing secret comes from: never the settings file.
pub const SIGNING_SECRET_ENV: &str = "TOLLGATE_UPSTREAM_SIGNING_SECRET";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    /// Environment label inside new keys (`tg_<environment>_…`): lowercase letters and digits.
    #[serde(default = "default_key_environment")]
    pub environment: String,
    /// Headers a key is read from, in order; `authorization` expects `Bearer <key>`.
    #[serde(default = "default_key_headers")]
    pub headers: Vec<String>,
}

impl Default for KeySettings {
    fn default() -> Self {
        Self {
            environment: default_key_environment(),
            headers: default_key_headers(),
        }
    }
}

fn default_key_environment() -> String {
    "live".to_owned()
}

fn default_key_headers() -> Vec<String> {
    vec!["authorization".to_owned(), "x-api-key".to_owned()]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// Consumer metadata field holding the tenant id (a consumer without one is its own tenant).
    #[serde(default = "default_tenant_field")]
    pub tenant_field: String,
    /// Consumer metadata field naming the plan.
    #[serde(default = "default_plan_field")]
    pub plan_field: String,
    /// Consumer metadata field holding the Stripe customer id.
    #[serde(default = "default_stripe_customer_field")]
    pub stripe_customer_field: String,
    /// Consumer metadata field naming one of a route's `upstreams` (a dedicated cluster).
    #[serde(default = "default_upstream_field")]
    pub upstream_field: String,
    /// Client headers removed before proxying, besides every `x-tollgate-*` header: identity
    /// comes only from the key.
    #[serde(default = "default_strip_headers")]
    pub strip_headers: Vec<String>,
    /// Query parameter that, when present, must equal the authenticated tenant (403 if not).
    #[serde(default)]
    pub tenant_query_param: Option<String>,
    /// Plan of tenants whose consumers name none (or name one not defined here). Required by
    /// validation; a plan with `limits = []` is how an operator says "unlimited".
    #[serde(default)]
    pub default_plan: Option<String>,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            tenant_field: default_tenant_field(),
            plan_field: default_plan_field(),
            stripe_customer_field: default_stripe_customer_field(),
            upstream_field: default_upstream_field(),
            strip_headers: default_strip_headers(),
            tenant_query_param: None,
            default_plan: None,
        }
    }
}

fn default_tenant_field() -> String {
    "tenantId".to_owned()
}
fn default_plan_field() -> String {
    "plan".to_owned()
}
fn default_stripe_customer_field() -> String {
    "stripeCustomerId".to_owned()
}
fn default_upstream_field() -> String {
    "upstream".to_owned()
}
/// Identity-like headers other gateways, auth proxies and platforms set; an upstream behind
/// Tollgate might trust any of them.
pub const DEFAULT_STRIP_HEADERS: [&str; 34] = [
    "x-tenant-id",
    "x-tenant",
    "x-consumer-id",
    "x-consumer-name",
    "x-consumer-username",
    "x-consumer-custom-id",
    "x-consumer-groups",
    "x-credential-identifier",
    "x-credential-username",
    "x-anonymous-consumer",
    "x-authenticated-userid",
    "x-authenticated-scope",
    "x-authenticated-groups",
    "x-user-id",
    "x-user",
    "x-user-email",
    "x-remote-user",
    "remote-user",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-preferred-username",
    "x-forwarded-groups",
    "x-forwarded-access-token",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-preferred-username",
    "x-auth-request-groups",
    "x-auth-request-access-token",
    "x-amzn-oidc-identity",
    "x-amzn-oidc-data",
    "x-ms-client-principal",
    "x-ms-client-principal-name",
    "x-goog-authenticated-user-email",
    "x-original-url",
];

fn default_strip_headers() -> Vec<String> {
    DEFAULT_STRIP_HEADERS.map(str::to_owned).to_vec()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardingSettings {
    /// Peers (CIDRs or addresses) whose `forwarded` / `x-forwarded-*` / `x-real-ip` headers are
    /// kept and extended; from any other peer they are dropped and the gateway sets its own.
    /// Empty (the default): nobody is trusted.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Set `x-forwarded-host` from the request's `Host` (off by default: an upstream that picks
    /// the tenant by host name would then trust the client's choice).
    #[serde(default)]
    pub forward_host: bool,
    /// Client header names containing `_`: `drop` (the default, like nginx) or `refuse` (400).
    #[serde(default)]
    pub underscores_in_headers: UnderscoreHeaders,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreHeaders {
    #[default]
    Drop,
    Refuse,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Largest total size of a request's header names and values (431 above).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Largest request body (413 above).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Time a client has to send its request headers.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Time a client has to send its request body (408 after).
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// Time to connect to an upstream (502 after).
    #[serde(default = "default_connect_timeout_ms")]
    pub upstream_connect_timeout_ms: u64,
    /// Requests one tenant may have in flight at once; more get 429 (a bulkhead, so one
    /// tenant cannot hold all upstream capacity).
    #[serde(default = "default_tenant_max_in_flight")]
    pub tenant_max_in_flight: u32,
    /// Route literal segments match exactly (`true`) or ASCII case-insensitively (`false`, the
    /// default: a case variant of a tenant-scoped path must not fall through to a broader
    /// route, since some upstreams route case-insensitively).
    #[serde(default)]
    pub case_sensitive_routes: bool,
    /// Time from accept to the first complete request head (HTTP/1 head or h2 preface and
    /// first stream); the connection is closed after it.
    #[serde(default = "default_first_request_timeout_ms")]
    pub first_request_timeout_ms: u64,
    /// HTTP/2 keep-alive: ping this often, and close when a ping is unanswered this long.
    #[serde(default = "default_h2_keep_alive_interval_ms")]
    pub h2_keep_alive_interval_ms: u64,
    /// A kept-alive connection (HTTP/1 or h2) with no request in flight for this long is
    /// closed gracefully. On HTTP/1 the wait for the next head also counts against
    /// `header_read_timeout_ms`, so there the shorter of the two applies.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Open connections on one listener; more are closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Open connections from one client IP on one listener; more are closed at accept.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: u32,
}

fn default_first_request_timeout_ms() -> u64 {
    10_000
}
fn default_h2_keep_alive_interval_ms() -> u64 {
    30_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_max_connections() -> u32 {
    10_000
}
fn default_max_connections_per_ip() -> u32 {
    256
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            max_header_bytes: default_max_header_bytes(),
            max_body_bytes: default_max_body_bytes(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
            upstream_connect_timeout_ms: default_connect_timeout_ms(),
            tenant_max_in_flight: default_tenant_max_in_flight(),
            case_sensitive_routes: false,
            first_request_timeout_ms: default_first_request_timeout_ms(),
            h2_keep_alive_interval_ms: default_h2_keep_alive_interval_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
        }
    }
}

fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_max_body_bytes() -> usize {
    10 * 1024 * 1024
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_body_read_timeout_ms() -> u64 {
    30_000
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_tenant_max_in_flight() -> u32 {
    64
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSettings {
    /// This gateway's id, carried in every usage event.
    pub id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSettings {
    /// Address to bind, `ip:port`.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicSettings {
    /// Address of the plain HTTP listener (HTTP/1.1 and h2c), `ip:port`. Left out, the
    /// gateway serves TLS only, and `[public.tls]` is required.
    #[serde(default)]
    pub listen: Option<String>,
    /// A TLS listener beside it (HTTP/1.1 and h2 by ALPN); none without this section.
    #[serde(default)]
    pub tls: Option<crate::tls::TlsListenerSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    /// Compacted topic holding consumers and API keys.
    #[serde(default = "default_keys_topic")]
    pub keys: String,
    /// Topic the usage events go to.
    #[serde(default = "default_usage_topic")]
    pub usage: String,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            keys: default_keys_topic(),
            usage: default_usage_topic(),
        }
    }
}

pub fn default_keys_topic() -> String {
    tollgate_runtime::topics::KEYS.to_owned()
}

pub fn default_usage_topic() -> String {
    tollgate_runtime::topics::USAGE.to_owned()
}

impl Validate for GatewaySettings {
    fn validate(&self) -> Result<(), Invalid> {
        if self.service.id.trim().is_empty() {
            return Err(Invalid::new("service.id", &self.service.id, "a non-empty gateway id"));
        }
        let public = match &self.public.listen {
            Some(listen) => Some(socket_addr("public.listen", listen)?),
            None if self.public.tls.is_none() => {
                return Err(Invalid::new(
                    "public.listen",
                    "nothing",
                    "an address for plain HTTP, or a [public.tls] listener (or both)",
                ))
            }
            None => None,
        };
        let admin = socket_addr("admin.listen", &self.admin.listen)?;
        // Port 0 asks the OS for a free port, distinct for each listener.
        if public == Some(admin) && admin.port() != 0 {
            return Err(Invalid::new(
                "admin.listen",
                &self.admin.listen,
                "an address other than public.listen",
            ));
        }
        if let Some(tls) = &self.public.tls {
            tls.validate()?;
            let addr = socket_addr("public.tls.listen", &tls.listen)?;
            if addr.port() != 0 && (Some(addr) == public || addr == admin) {
                return Err(Invalid::new(
                    "public.tls.listen",
                    &tls.listen,
                    "an address other than public.listen and admin.listen",
                ));
            }
        }
        self.kafka.validate("kafka")?;
        if let Some(portal) = &self.portal {
            portal.validate()?;
        }
        tollgate_runtime::topics::validate("topics.keys", &self.topics.keys)?;
        tollgate_runtime::topics::validate("topics.usage", &self.topics.usage)?;
        if !crate::apikey::valid_env(&self.keys.environment) {
            return Err(Invalid::new(
                "keys.environment",
                &self.keys.environment,
                "1-16 lowercase letters or digits",
            ));
        }
        if self.keys.headers.is_empty()
            || self
                .keys
                .headers
                .iter()
                .any(|h| hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err())
        {
            return Err(Invalid::new(
                "keys.headers",
                format!("{:?}", self.keys.headers),
                "one or more header names",
            ));
        }
        in_range(
            "http.max_header_bytes",
            self.http.max_header_bytes as u64,
            1024,
            1024 * 1024,
        )?;
        in_range(
            "http.max_body_bytes",
            self.http.max_body_bytes as u64,
            0,
            1024 * 1024 * 1024,
        )?;
        in_range(
            "http.header_read_timeout_ms",
            self.http.header_read_timeout_ms,
            100,
            600_000,
        )?;
        in_range(
            "http.body_read_timeout_ms",
            self.http.body_read_timeout_ms,
            100,
            600_000,
        )?;
        in_range(
            "http.upstream_connect_timeout_ms",
            self.http.upstream_connect_timeout_ms,
            10,
            600_000,
        )?;
        in_range(
            "http.first_request_timeout_ms",
            self.http.first_request_timeout_ms,
            100,
            600_000,
        )?;
        in_range(
            "http.h2_keep_alive_interval_ms",
            self.http.h2_keep_alive_interval_ms,
            1_000,
            3_600_000,
        )?;
        in_range("http.idle_timeout_ms", self.http.idle_timeout_ms, 100, 3_600_000)?;
        in_range(
            "http.max_connections",
            u64::from(self.http.max_connections),
            1,
            10_000_000,
        )?;
        in_range(
            "http.max_connections_per_ip",
            u64::from(self.http.max_connections_per_ip),
            1,
            u64::from(self.http.max_connections),
        )?;
        in_range(
            "http.tenant_max_in_flight",
            u64::from(self.http.tenant_max_in_flight),
            1,
            1_000_000,
        )?;
        for (i, cidr) in self.forwarding.trusted_proxies.iter().enumerate() {
            if crate::chain::headers::Cidr::parse(cidr).is_none() {
                return Err(Invalid::new(
                    format!("forwarding.trusted_proxies[{i}]"),
                    cidr,
                    "an address or CIDR block such as 10.0.0.0/8 or fd00::/8",
                ));
            }
        }
        if let Some((i, h)) = self
            .identity
            .strip_headers
            .iter()
            .enumerate()
            .find(|(_, h)| hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err())
        {
            return Err(Invalid::new(format!("identity.strip_headers[{i}]"), h, "a header name"));
        }
        self.events.validate()?;
        self.access_log.validate("access_log")?;
        self.limits.validate("limits")?;
        if let Some(budgets) = &self.budgets {
            budgets.validate("budgets")?;
        }
        self.meters.validate("meters")?;
        for (name, plan) in &self.plans {
            plan.validate(&format!("plans.{name}"), &self.meters)?;
        }
        // Required: a consumer whose metadata names no plan must still be limited by one, or
        // an admin typo would make a tenant unlimited.
        if !self
            .identity
            .default_plan
            .as_ref()
            .is_some_and(|plan| self.plans.contains_key(plan))
        {
            return Err(Invalid::new(
                "identity.default_plan",
                self.identity.default_plan.as_deref().unwrap_or(""),
                format!(
                    "a plan defined under [plans] ({}): the plan of consumers whose metadata names \
                     none (a plan with `limits = []` makes them unlimited, if that is meant)",
                    self.plans.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let mut ids = HashSet::new();
        let mut paths = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            if route.id.is_empty() || !ids.insert(route.id.as_str()) {
                return Err(Invalid::new(
                    format!("routes[{i}].id"),
                    &route.id,
                    "a unique, non-empty route id",
                ));
            }
            let folded = crate::routes::Pattern::parse(&route.path).map(|p| {
                if self.http.case_sensitive_routes {
                    route.path.clone()
                } else {
                    p.folded()
                }
            });
            if !folded.is_some_and(|f| paths.insert(f)) {
                return Err(Invalid::new(
                    format!("routes[{i}].path"),
                    &route.path,
                    "a path starting with `/` of literal and `{name}` segments, not used by another route \
                     (literals compared ignoring case unless http.case_sensitive_routes)",
                ));
            }
            for (j, method) in route.methods.iter().enumerate() {
                if hyper::Method::from_bytes(method.as_bytes()).is_err() || method.to_ascii_uppercase() != *method {
                    return Err(Invalid::new(
                        format!("routes[{i}].methods[{j}]"),
                        method,
                        "an upper-case HTTP method",
                    ));
                }
            }
            http_url(&format!("routes[{i}].upstream"), &route.upstream)?;
            for (name, url) in &route.upstreams {
                http_url(&format!("routes[{i}].upstreams.{name}"), url)?;
            }
            in_range(&format!("routes[{i}].timeout_ms"), route.timeout_ms, 10, 3_600_000)?;
            for (j, origin) in route.cors_origins.iter().enumerate() {
                if !crate::chain::valid_origin(origin) {
                    return Err(Invalid::new(
                        format!("routes[{i}].cors_origins[{j}]"),
                        origin,
                        "an origin as browsers send it: http(s)://host[:port], lower-case, no path",
                    ));
                }
            }
            crate::limits::validate_route_cost(&format!("routes[{i}].cost"), &route.cost, &self.meters)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
