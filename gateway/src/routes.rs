//! Routes: which configured upstream serves a request path.
//!
//! In: the `[[routes]]` settings and a request's method and raw path. Out: the matched
//! [`Route`] and the values of its `{param}` segments. Only configured upstreams are ever
//! reached: the gateway is never an open proxy.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::settings::RouteSettings;

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
    fn matches(&self, path: &[String]) -> Option<BTreeMap<String, String>> {
        if path.len() < self.segments.len() || (!self.prefix && path.len() != self.segments.len()) {
            return None;
        }
        let mut params = BTreeMap::new();
        for (segment, value) in self.segments.iter().zip(path) {
            match segment {
                Segment::Literal(lit) if lit == value => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => {
                    params.insert(name.clone(), value.clone());
                }
            }
        }
        Some(params)
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
    /// A `.` or `..` segment (also percent-encoded): refused, since an upstream that
    /// normalises it would serve another path than the one checked here.
    DotSegment,
    NoRoute,
    MethodNotAllowed,
}

pub struct Matched {
    pub route: Arc<Route>,
    pub params: BTreeMap<String, String>,
}

pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table from validated settings.
    pub fn new(settings: &[RouteSettings]) -> Self {
        let mut routes: Vec<Arc<Route>> = settings
            .iter()
            .map(|s| {
                Arc::new(Route {
                    pattern: Pattern::parse(&s.path).expect("validated by GatewaySettings::validate"),
                    settings: s.clone(),
                })
            })
            .collect();
        routes.sort_by(|a, b| b.pattern.specificity().cmp(&a.pattern.specificity()));
        Self { routes }
    }

    pub fn find(&self, method: &str, raw_path: &str) -> Result<Matched, Miss> {
        let segments: Vec<String> = raw_path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .collect();
        if segments.iter().any(|s| s == "." || s == "..") {
            return Err(Miss::DotSegment);
        }
        let mut method_mismatch = false;
        for route in &self.routes {
            if let Some(params) = route.pattern.matches(&segments) {
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

/// Decodes `%XX` escapes (invalid ones are kept as written).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
            upstreams: BTreeMap::new(),
            timeout_ms: 1000,
            cost: BTreeMap::new(),
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(&[
            route("v1", "/v1/", &[]),
            route("tenants", "/v1/tenants/{tenantId}/", &[]),
            route("health", "/health", &["GET"]),
        ])
    }

    #[test]
    fn most_specific_route_wins_and_params_are_captured() {
        let t = table();
        let m = t.find("GET", "/v1/tenants/t%5F1/orders/7").unwrap();
        assert_eq!(m.route.settings.id, "tenants");
        assert_eq!(m.params["tenantId"], "t_1");
        assert_eq!(t.find("POST", "/v1/orders").unwrap().route.settings.id, "v1");
        assert_eq!(t.find("GET", "/v1").unwrap().route.settings.id, "v1");
        assert_eq!(t.find("GET", "/health").unwrap().route.settings.id, "health");
    }

    #[test]
    fn misses_say_why() {
        let t = table();
        assert_eq!(t.find("GET", "/v2/x").err(), Some(Miss::NoRoute));
        assert_eq!(t.find("GET", "/health/deep").err(), Some(Miss::NoRoute));
        assert_eq!(t.find("POST", "/health").err(), Some(Miss::MethodNotAllowed));
        assert_eq!(t.find("GET", "/v1/tenants/a/../b/x").err(), Some(Miss::DotSegment));
        assert_eq!(t.find("GET", "/v1/tenants/a/%2e%2E/b").err(), Some(Miss::DotSegment));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["v1/", "/a/{}/", "/a/{x/", "/a/x}/", "/a/{x-y}/"] {
            assert!(Pattern::parse(bad).is_none(), "{bad}");
        }
    }
}
