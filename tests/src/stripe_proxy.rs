//! A recording and fault-injecting proxy between billing-sync and stripe-mock: every request
//! is recorded (method, path, form fields, idempotency key) and, as a test's plan says, sent
//! on, answered with an error, or cut off after stripe-mock has seen it.
//!
//! In: billing-sync's Stripe calls. Out: stripe-mock's answers (or the planned faults), and
//! [`Seen`] records for the test to check.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::stripe;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwarded, answered as stripe-mock answered.
    None,
    /// 429 with `Retry-After: 1`, not forwarded.
    TooMany,
    /// 500 with a Stripe error body, not forwarded.
    ServerError,
    /// The connection is closed without an answer, not forwarded.
    Reset,
    /// Forwarded, then the answer is held past billing-sync's timeout.
    SlowAnswer,
    /// Forwarded, then the connection is closed: Stripe has the event, billing-sync does not know.
    LostAnswer,
    /// 400 with a Stripe error body, as for an unknown customer.
    Refused,
}

#[derive(Debug, Clone)]
pub struct Seen {
    /// When the request arrived at the proxy.
    pub at: Instant,
    pub identifier: String,
    /// The Stripe meter the units were reported under (`tollgate_requests`, …).
    pub event_name: String,
    pub idempotency_key: String,
    pub customer: String,
    pub value: i64,
    pub fault: Fault,
    /// stripe-mock's status when the request was forwarded.
    pub upstream: Option<u16>,
}

pub type Plan = Arc<dyn Fn(usize, &str) -> Fault + Send + Sync>;
/// Rewrites stripe-mock's answer to a request (by path) before billing-sync sees it.
pub type Rewrite = Arc<dyn Fn(&str, Bytes) -> Bytes + Send + Sync>;

/// A request other than a meter event (meters, products, prices, customers, subscriptions).
#[derive(Debug, Clone)]
pub struct Other {
    pub method: String,
    pub path: String,
    pub idempotency_key: String,
    pub form: HashMap<String, String>,
    pub upstream: u16,
    /// The answer billing-sync got (JSON), or `Null` when it got none.
    pub response: serde_json::Value,
}

struct ProxyState {
    seen: Mutex<Vec<Seen>>,
    others: Mutex<Vec<Other>>,
    upstream: HttpClient<HttpConnector, Full<Bytes>>,
    target: String,
    plan: Plan,
    rewrite: Rewrite,
    count: Mutex<usize>,
    /// Lookups answered from what was created (see `crate::stripe_state`); off by default.
    stripe_state: Option<Mutex<crate::stripe_state::StripeState>>,
    /// A `(method, path)` whose next requests are forwarded but never answered: billing-sync
    /// is then killed with the call made and its answer not yet seen.
    hold: Mutex<Option<(String, String)>>,
    held: std::sync::atomic::AtomicUsize,
}

pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
}

impl Proxy {
    pub async fn start(plan: Plan) -> Self {
        Self::start_with(plan, Arc::new(|_, body| body)).await
    }

    pub async fn start_with(plan: Plan, rewrite: Rewrite) -> Self {
        Self::start_full(plan, rewrite, false).await
    }

    /// A proxy that also answers lookups from what was created through it, as Stripe would.
    pub async fn start_stateful() -> Self {
        Self::start_stateful_with(Arc::new(|_, body| body)).await
    }

    /// A stateful proxy that also rewrites stripe-mock's answers (before the lookups).
    pub async fn start_stateful_with(rewrite: Rewrite) -> Self {
        Self::start_full(Arc::new(|_, _| Fault::None), rewrite, true).await
    }

    /// From now on, `method path` is forwarded to stripe-mock and its answer withheld.
    pub fn hold(&self, method: &str, path: &str) {
        *self.state.hold.lock().unwrap() = Some((method.to_owned(), path.to_owned()));
    }

    pub fn release(&self) {
        *self.state.hold.lock().unwrap() = None;
    }

    /// Requests held so far.
    pub fn held(&self) -> usize {
        self.state.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The price holding `lookup_key`, as created through this proxy.
    pub fn price(&self, lookup_key: &str) -> Option<serde_json::Value> {
        self.state.stripe_state.as_ref()?.lock().unwrap().price(lookup_key)
    }

    /// Makes Stripe's price at `lookup_key` charge `decimal` per unit (a stateful proxy only).
    pub fn set_unit_price(&self, lookup_key: &str, decimal: &str) {
        let state = self.state.stripe_state.as_ref().expect("a stateful proxy");
        state.lock().unwrap().set_unit_price(lookup_key, decimal);
    }

    /// Requests to `method path` so far.
    pub fn calls(&self, method: &str, path: &str) -> Vec<Other> {
        self.others()
            .into_iter()
            .filter(|o| o.method == method && o.path == path)
            .collect()
    }

    async fn start_full(plan: Plan, rewrite: Rewrite, stateful: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(ProxyState {
            seen: Mutex::new(Vec::new()),
            others: Mutex::new(Vec::new()),
            upstream: HttpClient::builder(TokioExecutor::new()).build_http(),
            target: stripe().trim_end_matches('/').to_owned(),
            plan,
            rewrite,
            count: Mutex::new(0),
            stripe_state: stateful.then(Mutex::default),
            hold: Mutex::new(None),
            held: Default::default(),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { handle(req, &state).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn others(&self) -> Vec<Other> {
        self.state.others.lock().unwrap().clone()
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

#[derive(Debug)]
pub struct Dropped;
impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the fault proxy")
    }
}
impl std::error::Error for Dropped {}

async fn handle(req: Request<Incoming>, state: &ProxyState) -> Result<Response<Full<Bytes>>, Dropped> {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|_| Dropped)?.to_bytes();
    let is_meter_event = parts.method == hyper::Method::POST && parts.uri.path() == "/v1/billing/meter_events";
    let form: HashMap<String, String> = form_fields(&body);
    let customer = form.get("payload[stripe_customer_id]").cloned().unwrap_or_default();
    let fault = if is_meter_event {
        let n = {
            let mut c = state.count.lock().unwrap();
            *c += 1;
            *c - 1
        };
        (state.plan)(n, &customer)
    } else {
        Fault::None
    };
    let forward = matches!(fault, Fault::None | Fault::SlowAnswer | Fault::LostAnswer);
    let mut answer = None;
    let mut upstream_status = None;
    if forward {
        let mut out = Request::builder().method(parts.method.clone()).uri(format!(
            "{}{}",
            state.target,
            parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        ));
        for (name, value) in &parts.headers {
            if name != hyper::header::HOST {
                out = out.header(name, value);
            }
        }
        let response = state
            .upstream
            .request(out.body(Full::new(body.clone())).expect("request"))
            .await
            .expect("stripe-mock answers the proxy");
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("stripe-mock body")
            .to_bytes();
        let bytes = (state.rewrite)(parts.uri.path(), bytes);
        upstream_status = Some(status.as_u16());
        let (status, bytes) = match &state.stripe_state {
            Some(stripe_state) => {
                let query = crate::stripe_state::query_params(parts.uri.query().unwrap_or_default());
                let (code, bytes) = stripe_state.lock().unwrap().answer(
                    parts.method.as_str(),
                    parts.uri.path(),
                    &query,
                    &form,
                    status.as_u16(),
                    bytes,
                );
                (hyper::StatusCode::from_u16(code).expect("status"), bytes)
            }
            None => (status, bytes),
        };
        answer = Some(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(bytes))
                .expect("response"),
        );
    }
    let idempotency_key = parts
        .headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if !is_meter_event {
        let response = match &answer {
            Some(a) => serde_json::from_slice(&a.body().clone().collect().await.map_err(|_| Dropped)?.to_bytes())
                .unwrap_or_default(),
            None => serde_json::Value::Null,
        };
        state.others.lock().unwrap().push(Other {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            idempotency_key,
            form,
            upstream: upstream_status.unwrap_or_default(),
            response,
        });
        let held = state
            .hold
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|(m, p)| parts.method.as_str() == m && parts.uri.path() == p);
        if held {
            state.held.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Never answered: the caller is killed while it waits.
            std::future::pending::<()>().await;
        }
    } else {
        state.seen.lock().unwrap().push(Seen {
            at: arrived,
            identifier: form.get("identifier").cloned().unwrap_or_default(),
            event_name: form.get("event_name").cloned().unwrap_or_default(),
            idempotency_key,
            customer,
            value: form
                .get("payload[value]")
                .and_then(|v| v.parse().ok())
                .unwrap_or(i64::MIN),
            fault,
            upstream: upstream_status,
        });
    }
    let stripe_error = |status: u16, kind: &str, message: &str| {
        let body = format!(r#"{{"error": {{"type": "{kind}", "message": "{message}"}}}}"#);
        let mut response = Response::builder()
            .status(status)
            .header("content-type", "application/json");
        if status == 429 {
            response = response.header("retry-after", "1");
        }
        Ok(response.body(Full::new(Bytes::from(body))).expect("response"))
    };
    match fault {
        Fault::None => Ok(answer.expect("forwarded")),
        Fault::TooMany => stripe_error(429, "rate_limit_error", "too many requests"),
        Fault::ServerError => stripe_error(500, "api_error", "something went wrong"),
        Fault::Refused => stripe_error(400, "invalid_request_error", "No such customer"),
        Fault::Reset | Fault::LostAnswer => Err(Dropped),
        Fault::SlowAnswer => {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            Ok(answer.expect("forwarded"))
        }
    }
}

pub fn form_fields(body: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The price ids `setup` made for `plan` (the newest, by lookup key), fee first, then meters
/// by name: the order billing-sync subscribes in.
pub fn plan_prices(proxy: &Proxy, plan: &str) -> Vec<String> {
    ["fee", "meter:compute_units", "meter:requests"]
        .iter()
        .map(|k| {
            proxy.price(&format!("tollgate:{plan}:{k}")).expect("price set up")["id"]
                .as_str()
                .expect("price id")
                .to_owned()
        })
        .collect()
}

/// The prices a subscription create or update sent (`items[i][price]`), in item order.
pub fn subscribed_prices(call: &Other) -> Vec<String> {
    let mut prices: Vec<(usize, String)> = call
        .form
        .iter()
        .filter_map(|(k, v)| {
            let i = k.strip_prefix("items[")?.strip_suffix("][price]")?;
            Some((i.parse().ok()?, v.clone()))
        })
        .collect();
    prices.sort();
    prices.into_iter().map(|(_, p)| p).collect()
}
