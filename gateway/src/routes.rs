//! Routes: which configured upstream serves a request path.
//!
//! In: the `[[routes]]` settings and a request's method and canonical path segments (see
//! `chain::canonical`). Out: the matched [`Route`] and the values of its `{param}` segments.
//! Only configured upstreams are ever reached: the gateway is never an open proxy.
//!
//! Precedence: the route with the most segments wins, then the one with the most literal
//! segments, then an exact pattern over a prefix. Literal segments match ASCII
//! case-insensitively unless `http.case_sensitive_routes` is set, so `/V1/Tenants/t/x` is served
//! by `/v1/tenants/{tenantId}/` and its tenant check, never by the broader `/v1/` (an upstream
//! that routes case-insensitively would otherwise serve another tenant's resource).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// Route id, carried in usage events.
    pub id: String,
    /// Path pattern, starting with `/`: literal segments and `{param}` segments; a trailing
    /// `/` makes it a prefix (`/v1/tenants/{tenantId}/`). `{tenantId}` must equal the
    /// authenticated tenant.
    pub path: String,
    /// Methods served; empty: all.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Upstream base URL the request is proxied to (the request path is appended).
    pub upstream: String,
    /// Named alternative upstreams a consumer's metadata may pick (a dedicated cluster).
    #[serde(default)]
    pub upstreams: BTreeMap<String, String>,
    /// PEM bundle of CA certificates trusted for this route's `https://` upstreams, beside
    /// the system's roots (a private CA).
    #[serde(default)]
    pub upstream_ca_file: Option<std::path::PathBuf>,
    /// Time the upstream has to answer with its response head (504 after).
    #[serde(default = "default_route_timeout_ms")]
    pub timeout_ms: u64,
    /// Units a request costs per meter (`compute_units = 5`); `requests` is always 1. The
    /// upstream may report the real cost in `x-tollgate-cost: compute_units=42`.
    #[serde(default)]
    pub cost: BTreeMap<String, u64>,
    /// Encoded slashes (`%2F`) inside a segment: `refuse` (400, the default) or `keep` (kept
    /// encoded, within one segment, for APIs whose ids hold `/`). Envoy's
    /// `path_with_escaped_slashes_action` is the model. `keep` on a broad route lets a request
    /// meant for a narrower one reach an upstream that decodes `%2F`: use it on leaf routes.
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
    /// Non-ASCII characters in the path (valid UTF-8, percent-encoded): `refuse` (400, the
    /// default; an upstream's Unicode normalisation can turn them into ASCII syntax) or `allow`.
    #[serde(default)]
    pub non_ascii: NonAscii,
    /// Also check the tenant parameter (`identity.tenant_query_param`) in request bodies of
    /// type `application/x-www-form-urlencoded` or `application/json` (top-level member).
    #[serde(default)]
    pub check_body_tenant: bool,
    /// Origins of browser pages that may call this route (`https://portal.example.com`):
    /// the gateway answers their CORS preflights and lets them read its answers. The tenant
    /// portal's try-it console needs the portal's origin here. Empty: no CORS.
    #[serde(default)]
    pub cors_origins: Vec<String>,
}

/// What a route does with `%2F` inside a path segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    #[default]
    Refuse,
    Keep,
}

/// What a route does with non-ASCII characters in the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonAscii {
    #[default]
    Refuse,
    Allow,
}

impl Default for RouteSettings {
    fn default() -> Self {
        Self {
            id: String::new(),
            path: "/".to_owned(),
            methods: Vec::new(),
            upstream: String::new(),
            upstreams: BTreeMap::new(),
            upstream_ca_file: None,
            timeout_ms: default_route_timeout_ms(),
            cost: BTreeMap::new(),
            escaped_slashes: EscapedSlashes::default(),
            non_ascii: NonAscii::default(),
            check_body_tenant: false,
            cors_origins: Vec::new(),
        }
    }
}

fn default_route_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// A parsed route path: `/v1/tenants/{tenantId}/` (a prefix) or `/health` (exact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    segments: Vec<Segment>,
    prefix: bool,
}

impl Pattern {
    pub fn parse(path: &str) -> Option<Self> {
        let body = path.strip_prefix('/')?;
        let prefix = body.is_empty() || body.ends_with('/');
        let mut segments = Vec::new();
        for raw in body.split('/').filter(|s| !s.is_empty()) {
            let segment = match raw.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
                    Segment::Param(name.to_owned())
                }
                Some(_) => return None,
                None if raw.contains(['{', '}']) => return None,
                None => Segment::Literal(raw.to_owned()),
            };
            segments.push(segment);
        }
        Some(Self { segments, prefix })
    }

    /// Matches decoded path segments; returns the params on success.
    fn matches(&self, path: &[String], case_sensitive: bool) -> Option<BTreeMap<String, String>> {
        if path.len() < self.segments.len() || (!self.prefix && path.len() != self.segments.len()) {
            return None;
        }
        let mut params = BTreeMap::new();
        for (segment, value) in self.segments.iter().zip(path) {
            match segment {
                Segment::Literal(lit) if lit == value => {}
                Segment::Literal(lit) if !case_sensitive && lit.eq_ignore_ascii_case(value) => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => {
                    params.insert(name.clone(), value.clone());
                }
            }
        }
        Some(params)
    }

    /// The pattern with its literals lower-cased: two patterns equal in this form cannot both
    /// be served when literals match case-insensitively.
    pub fn folded(&self) -> String {
        let mut out = String::new();
        for s in &self.segments {
            out.push('/');
            match s {
                Segment::Literal(l) => out.push_str(&l.to_ascii_lowercase()),
                Segment::Param(_) => out.push_str("{}"),
            }
        }
        if self.prefix {
            out.push('/');
        }
        out
    }

    /// More segments first, then more literal segments, then exact before prefix.
    fn specificity(&self) -> (usize, usize, bool) {
        let literals = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        (self.segments.len(), literals, !self.prefix)
    }
}

#[derive(Debug)]
pub struct Route {
    pub settings: RouteSettings,
    pattern: Pattern,
}

/// Why no route serves a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    NoRoute,
    MethodNotAllowed,
}

pub struct Matched {
    pub route: Arc<Route>,
    pub params: BTreeMap<String, String>,
}

pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    case_sensitive: bool,
}

impl RouteTable {
    /// Builds the table from validated settings.
    pub fn new(settings: &[RouteSettings], case_sensitive: bool) -> Self {
        let mut routes: Vec<Arc<Route>> = settings
            .iter()
            .map(|s| {
                Arc::new(Route {
                    pattern: Pattern::parse(&s.path).expect("validated by GatewaySettings::validate"),
                    settings: s.clone(),
                })
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.pattern.specificity()));
        Self { routes, case_sensitive }
    }

    /// The route serving `method` on a canonical path's decoded `segments`.
    pub fn find(&self, method: &str, segments: &[String]) -> Result<Matched, Miss> {
        let mut method_mismatch = false;
        for route in &self.routes {
            if let Some(params) = route.pattern.matches(segments, self.case_sensitive) {
                let methods = &route.settings.methods;
                if methods.is_empty() || methods.iter().any(|m| m == method) {
                    return Ok(Matched {
                        route: Arc::clone(route),
                        params,
                    });
                }
                method_mismatch = true;
            }
        }
        Err(if method_mismatch {
            Miss::MethodNotAllowed
        } else {
            Miss::NoRoute
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, path: &str, methods: &[&str]) -> RouteSettings {
        RouteSettings {
            id: id.into(),
            path: path.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            upstream: "http://127.0.0.1:1".into(),
            ..RouteSettings::default()
        }
    }

    fn table(case_sensitive: bool) -> RouteTable {
        RouteTable::new(
            &[
                route("v1", "/v1/", &[]),
                route("tenants", "/v1/tenants/{tenantId}/", &[]),
                route("health", "/health", &["GET"]),
            ],
            case_sensitive,
        )
    }

    fn find(t: &RouteTable, method: &str, path: &str) -> Result<Matched, Miss> {
        let segments: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect();
        t.find(method, &segments)
    }

    #[test]
    fn most_specific_route_wins_and_params_are_captured() {
        let t = table(false);
        let m = find(&t, "GET", "/v1/tenants/t_1/orders/7").unwrap();
        assert_eq!(m.route.settings.id, "tenants");
        assert_eq!(m.params["tenantId"], "t_1");
        assert_eq!(find(&t, "POST", "/v1/orders").unwrap().route.settings.id, "v1");
        assert_eq!(find(&t, "GET", "/v1").unwrap().route.settings.id, "v1");
        assert_eq!(find(&t, "GET", "/health").unwrap().route.settings.id, "health");
    }

    #[test]
    fn literal_case_variants_hit_the_tenant_scoped_route_unless_case_sensitive() {
        let t = table(false);
        for path in ["/V1/TENANTS/T_1/x", "/v1/Tenants/t_1/x", "/V1/tEnAnTs/t_1"] {
            let m = find(&t, "GET", path).unwrap();
            assert_eq!(m.route.settings.id, "tenants", "{path}");
        }
        // The param keeps its case: the tenant check compares it exactly.
        assert_eq!(find(&t, "GET", "/V1/TENANTS/T_1/x").unwrap().params["tenantId"], "T_1");
        let strict = table(true);
        assert_eq!(
            find(&strict, "GET", "/v1/Tenants/t_1/x").unwrap().route.settings.id,
            "v1"
        );
        assert_eq!(find(&strict, "GET", "/V1/x").err(), Some(Miss::NoRoute));
    }

    #[test]
    fn misses_say_why() {
        let t = table(false);
        assert_eq!(find(&t, "GET", "/v2/x").err(), Some(Miss::NoRoute));
        assert_eq!(find(&t, "GET", "/health/deep").err(), Some(Miss::NoRoute));
        assert_eq!(find(&t, "POST", "/health").err(), Some(Miss::MethodNotAllowed));
    }

    #[test]
    fn folded_patterns_ignore_literal_case_and_param_names() {
        let a = Pattern::parse("/V1/Tenants/{tenantId}/").unwrap();
        let b = Pattern::parse("/v1/tenants/{id}/").unwrap();
        assert_eq!(a.folded(), b.folded());
        assert_ne!(a.folded(), Pattern::parse("/v1/tenants/{id}").unwrap().folded());
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["v1/", "/a/{}/", "/a/{x/", "/a/x}/", "/a/{x-y}/"] {
            assert!(Pattern::parse(bad).is_none(), "{bad}");
        }
    }
}
