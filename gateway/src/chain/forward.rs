//! Chain step: forwarding.
//!
//! In: the checked request (head and collected body), the identity and the route. Out: the
//! request the upstream gets (the route's or the consumer's dedicated upstream, the gateway's
//! identity headers, client identity and hop-by-hop headers removed, optionally signed), and
//! the upstream's response head with hop-by-hop headers and `x-tollgate-cost` removed; or
//! 502/504.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use super::{Body, BoxError, Proxy, RequestContext};
use crate::directory::Identity;
use crate::problem::Problem;
use crate::routes::{Route, RouteSettings};

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

pub type UpstreamFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// Where checked requests go: hyper's client in the gateway, a recorder in tests.
/// The request body is whole (the chain has read it within its limits).
pub trait Upstream: Send + Sync {
    fn send(&self, route: &RouteSettings, req: Request<Bytes>) -> UpstreamFuture;
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The gateway's HTTP/1.1 client to upstreams, `http://` and `https://`, with a connect timeout
/// and pooled connections (TLS sessions included): one client trusting the system's roots,
/// and one more per distinct `upstream_ca_file` that routes name.
pub struct HyperUpstream {
    system: HttpsClient,
    by_ca_file: HashMap<PathBuf, HttpsClient>,
}

impl HyperUpstream {
    /// Reads the system's roots and every route's CA bundle: a missing or unreadable bundle
    /// stops the gateway at start rather than failing its route's requests later.
    pub fn new(connect_timeout: Duration, routes: &[RouteSettings]) -> Result<Self, crate::tls::TlsError> {
        let client = |ca_file: Option<&std::path::Path>| -> Result<HttpsClient, crate::tls::TlsError> {
            let mut http = HttpConnector::new();
            http.set_connect_timeout(Some(connect_timeout));
            http.set_nodelay(true);
            // Lets the https connector see https:// URIs (hyper's connector refuses them).
            http.enforce_http(false);
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(crate::tls::upstream_client_config(ca_file)?)
                .https_or_http()
                .enable_http1()
                .wrap_connector(http);
            Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
        };
        let mut by_ca_file = HashMap::new();
        for ca_file in routes.iter().filter_map(|r| r.upstream_ca_file.as_ref()) {
            if !by_ca_file.contains_key(ca_file) {
                by_ca_file.insert(ca_file.clone(), client(Some(ca_file))?);
            }
        }
        Ok(Self {
            system: client(None)?,
            by_ca_file,
        })
    }
}

impl Upstream for HyperUpstream {
    fn send(&self, route: &RouteSettings, req: Request<Bytes>) -> UpstreamFuture {
        let client = route
            .upstream_ca_file
            .as_ref()
            .and_then(|ca_file| self.by_ca_file.get(ca_file))
            .unwrap_or(&self.system);
        let answer = client.request(req.map(Full::new));
        Box::pin(async move {
            let response = answer.await.map_err(|e| Box::new(e) as BoxError)?;
            Ok(response.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed()))
        })
    }
}

impl Proxy {
    pub(super) async fn forward(
        &self,
        parts: Parts,
        body: Bytes,
        peer: SocketAddr,
        identity: &Identity,
        route: &Arc<Route>,
        ctx: &mut RequestContext,
    ) -> Result<Response<Body>, Problem> {
        let base = identity
            .consumer
            .metadata
            .get(&self.settings.identity.upstream_field)
            .and_then(|v| v.as_str())
            .and_then(|name| route.settings.upstreams.get(name))
            .unwrap_or(&route.settings.upstream);
        let uri = upstream_uri(base, &ctx.path, parts.uri.query())?;
        let mut upstream_req = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .body(body)
            .expect("parts are valid");
        let body_len = upstream_req.body().len();
        let mut headers = self.upstream_headers(&parts.headers, peer, identity, ctx, body_len);
        // Signed over what the upstream receives: the canonical path and the query.
        if let Some(secret) = &self.signing_secret {
            let target = upstream_req.uri().path_and_query().map_or("/", |pq| pq.as_str());
            let consumer = &identity.consumer;
            let timestamp = chrono::Utc::now().timestamp();
            let signature = sign(
                secret,
                timestamp,
                parts.method.as_str(),
                target,
                &consumer.name,
                &consumer.tenant_id,
                &identity.key_id,
                // The plan `x-tollgate-plan` carries: the tenant's, not this consumer's.
                self.plan_of(identity).unwrap_or_default(),
            );
            headers.insert(
                "x-tollgate-signature",
                HeaderValue::from_str(&format!("t={timestamp},v1={signature}")).expect("hex is a valid header"),
            );
        }
        *upstream_req.headers_mut() = headers;
        let sent = Instant::now();
        let answered = tokio::time::timeout(
            Duration::from_millis(route.settings.timeout_ms),
            self.upstream.send(&route.settings, upstream_req),
        )
        .await;
        ctx.upstream_latency = Some(sent.elapsed());
        let response = match answered {
            Err(_) => {
                self.metrics.count("gateway_upstream_failures_total", "timeout");
                return Err(
                    Problem::new(StatusCode::GATEWAY_TIMEOUT, "upstream-timeout", "Gateway Timeout")
                        .with_detail("the upstream did not answer in time"),
                );
            }
            Ok(Err(err)) if crate::tls::is_certificate_error(err.as_ref()) => {
                self.metrics.count("gateway_upstream_failures_total", "certificate");
                tracing::warn!(route = %route.settings.id, error = %err, "upstream's TLS certificate not accepted");
                return Err(
                    Problem::new(StatusCode::BAD_GATEWAY, "upstream-certificate", "Bad Gateway")
                        .with_detail("the upstream's TLS certificate was not accepted"),
                );
            }
            Ok(Err(err)) => {
                self.metrics.count("gateway_upstream_failures_total", "unreachable");
                tracing::warn!(route = %route.settings.id, error = %err, "upstream request failed");
                return Err(
                    Problem::new(StatusCode::BAD_GATEWAY, "upstream-unreachable", "Bad Gateway")
                        .with_detail("the upstream could not be reached"),
                );
            }
            Ok(Ok(response)) => response,
        };

        // The response: hop-by-hop headers dropped, the reported cost taken (and kept from the
        // client); the bulkhead slot stays in `ctx` until the body ends.
        let (mut parts, body) = response.into_parts();
        ctx.upstream_status = Some(parts.status.as_u16());
        remove_hop_by_hop(&mut parts.headers);
        self.take_reported_cost(&mut parts.headers, ctx).await;
        Ok(Response::from_parts(parts, body))
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

/// The upstream's URI: its base, the canonical path, the client's query as sent.
fn upstream_uri(base: &str, path: &str, query: Option<&str>) -> Result<Uri, Problem> {
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    format!("{}{path}{query}", base.trim_end_matches('/'))
        .parse()
        .map_err(|_| {
            Problem::new(StatusCode::BAD_REQUEST, "invalid-path", "Bad Request")
                .with_detail("the request path cannot be forwarded")
        })
}

pub(super) fn remove_hop_by_hop(headers: &mut HeaderMap) {
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
    fn upstream_uri_joins_base_path_and_query() {
        assert_eq!(
            upstream_uri("http://10.0.0.1:8090/", "/v1/a%20b", Some("x=1"))
                .unwrap()
                .to_string(),
            "http://10.0.0.1:8090/v1/a%20b?x=1"
        );
        assert_eq!(
            upstream_uri("http://h/base", "/v1/a%20b", None).unwrap().to_string(),
            "http://h/base/v1/a%20b"
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
}
