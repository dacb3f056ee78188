//! CORS for the browser pages a route names in `cors_origins`: the tenant portal's try-it
//! console, an operator's own docs site.
//!
//! In: a request's `Origin` (and, for a preflight, `Access-Control-Request-Method`) and the
//! matched route's `cors_origins`. Out: the preflight's answer (204 with what may be sent, or
//! a 403 problem for an origin the route does not name), and the headers that let an allowed
//! page read any other answer, refusals included (a console must show a 401 or a 429).
//!
//! No credentials mode: the page sends the key it was given in a header, and the gateway
//! never sets `Access-Control-Allow-Credentials`, so cookies of the gateway's origin (there
//! are none) could not ride along. Identity still comes only from the key.

use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::{Body, Proxy, RequestBody, RequestContext};
use crate::problem::Problem;
use crate::routes::RouteSettings;

/// How long a browser may reuse a preflight's answer.
const MAX_AGE_SECS: &str = "600";
/// What an allowed page may read of an answer beyond the CORS-safelisted headers.
const EXPOSED: &str = "ratelimit, ratelimit-policy, ratelimit-limit, ratelimit-remaining, ratelimit-reset, \
                       retry-after, x-request-id";
/// Methods a route without a `methods` list serves.
const ANY_METHOD: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// The method a CORS preflight asks about, when `req` is one (`OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`); it is routed as that method would be.
pub(super) fn preflight_method(req: &Request<RequestBody>) -> Option<String> {
    let headers = req.headers();
    (req.method() == Method::OPTIONS && headers.contains_key("origin"))
        .then(|| headers.get("access-control-request-method"))
        .flatten()
        .and_then(|m| m.to_str().ok())
        .map(str::to_owned)
}

/// The request's `Origin` when the route names it (compared exactly, as browsers send it).
pub(super) fn allowed_origin(headers: &HeaderMap, route: &RouteSettings) -> Option<String> {
    let origin = headers.get("origin")?.to_str().ok()?;
    route
        .cors_origins
        .iter()
        .any(|o| o == origin)
        .then(|| origin.to_owned())
}

/// Lets the page of `origin` read this answer.
pub(super) fn expose(headers: &mut HeaderMap, origin: &str) {
    if let Ok(value) = HeaderValue::from_str(origin) {
        headers.insert("access-control-allow-origin", value);
        headers.insert("access-control-expose-headers", HeaderValue::from_static(EXPOSED));
    }
    // Caches must keep one answer per origin: another origin's page gets no grant.
    headers.append("vary", HeaderValue::from_static("origin"));
}

/// Checks a route's `cors_origins`: each `http(s)://host[:port]`, lower-case, no path.
pub fn valid_origin(origin: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return false;
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (rest, None),
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

impl Proxy {
    /// Answers a preflight on `route` for the origin in `ctx` (set when the route names it).
    pub(super) fn preflight(&self, route: &RouteSettings, ctx: &RequestContext) -> Result<Response<Body>, Problem> {
        if ctx.cors_origin.is_none() {
            return Err(
                Problem::new(StatusCode::FORBIDDEN, "cors-origin-refused", "Forbidden").with_detail(
                    "this route does not accept requests from that origin's pages (the route's cors_origins)",
                ),
            );
        }
        let methods = if route.methods.is_empty() {
            ANY_METHOD.to_owned()
        } else {
            route.methods.join(", ")
        };
        // The key headers, and the two a console sends besides: nothing else reaches the check.
        let mut allowed: Vec<&str> = self.settings.keys.headers.iter().map(String::as_str).collect();
        allowed.extend(["content-type", "x-request-id"]);
        let mut response = Response::new(Body::default());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        for (name, value) in [
            ("access-control-allow-methods", methods),
            ("access-control-allow-headers", allowed.join(", ")),
            ("access-control-max-age", MAX_AGE_SECS.to_owned()),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_host_and_port_only() {
        for good in [
            "http://127.0.0.1:8082",
            "https://portal.example.com",
            "https://a-b.example:443",
        ] {
            assert!(valid_origin(good), "{good}");
        }
        for bad in [
            "",
            "*",
            "null",
            "portal.example.com",
            "https://portal.example.com/",
            "https://Portal.example.com",
            "https://portal.example.com:",
            "https://portal.example.com:99999x",
            "ftp://portal.example.com",
            "https://user@portal.example.com",
        ] {
            assert!(!valid_origin(bad), "{bad:?}");
        }
    }
}
