//! A small HTTP client and a counting echo upstream for the gateway tests.
//!
//! In: requests the tests make; requests the gateway forwards. Out: [`Reply`]s with status,
//! headers and body; the upstream answers with a JSON echo (like the demo upstream) and counts
//! what reached it, so a test can prove a refused request never touched it. Paths containing
//! `/slow` are answered after [`SLOW_PATH_DELAY`]; paths containing `/cost` report
//! `x-tollgate-cost: compute_units=42`; a path segment `status` followed by a status code
//! (`/v1/status/404`) is answered with that status.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderMap;
use hyper::{Request, Response};
use tokio::net::TcpListener;

pub const SLOW_PATH_DELAY: Duration = Duration::from_secs(3);

pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {}: body is not JSON ({e}): {}", self.status, self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one HTTP/1.1 request (or h2c with `http2_only`); a failure to get an answer is an
/// error, for tests that expect some (a server shutting down).
pub async fn try_send_with(
    http2_only: bool,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Reply, String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(http2_only)
        .build_http::<Full<Bytes>>();
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("valid request");
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{method} {url}: body: {e}"))?
        .to_bytes()
        .to_vec();
    Ok(Reply { status, headers, body })
}

/// Sends one request and panics, naming it, when no answer comes.
pub async fn send_with(http2_only: bool, method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    try_send_with(http2_only, method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub async fn send(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    send_with(false, method, url, headers, body).await
}

/// An upstream that echoes and counts the requests it received.
#[derive(Clone)]
pub struct EchoUpstream {
    pub addr: SocketAddr,
    received: Arc<AtomicUsize>,
}

impl EchoUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("address");
        let received = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&received);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        echo(req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, received }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path().contains("/slow") {
        tokio::time::sleep(SLOW_PATH_DELAY).await;
    }
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        headers.insert(
            name.as_str().to_owned(),
            String::from_utf8_lossy(value.as_bytes()).into_owned().into(),
        );
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json = serde_json::json!({
        "method": method,
        "path": path,
        "query": query,
        "headers": headers,
        "body_bytes": body.len(),
    });
    // An upstream that knows a request's real cost reports it: 42 compute units on `/cost`,
    // what the path says on `/report/<x-tollgate-cost value>` (as an AI API reports tokens).
    let reported_cost = match path.split_once("/report/") {
        Some((_, value)) => value.replace("%20", " "),
        None if path.contains("/cost") => "compute_units=42".to_owned(),
        None => String::new(),
    };
    let status = path
        .split('/')
        .skip_while(|segment| *segment != "status")
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| hyper::StatusCode::from_u16(code).ok())
        .unwrap_or(hyper::StatusCode::OK);
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-tollgate-cost", reported_cost)
        .header("connection", "x-upstream-private")
        .header("x-upstream-private", "hop-by-hop")
        .body(Full::new(Bytes::from(json.to_string())))
        .expect("valid response"))
}
