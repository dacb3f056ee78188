//! An alert webhook receiver on loopback: records every delivery attempt as it arrived
//! (headers and raw body) and answers 500 to the first `failures` attempts of each
//! `webhook-id`, then 200, as a receiver that is down for a while does; while set down
//! ([`WebhookReceiver::set_down`]) it answers 500 to everything.
//!
//! In: billing-sync's webhook POSTs. Out: [`Attempt`] records for the test to verify
//! (signatures, ids, bodies); nothing here knows how billing-sync signs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// One POST as received.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub content_type: String,
    pub body: String,
    /// What the receiver answered.
    pub status: u16,
}

#[derive(Default)]
struct State {
    attempts: Vec<Attempt>,
    per_id: HashMap<String, usize>,
    down: bool,
}

pub struct WebhookReceiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl WebhookReceiver {
    /// Listens on a free loopback port; each id's first `failures` attempts get a 500.
    pub async fn start(failures: usize) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind webhook receiver");
        let addr = listener.local_addr().expect("receiver address");
        let state = Arc::new(Mutex::new(State::default()));
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
                        async move { Ok::<_, Infallible>(receive(req, &state, failures).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/tollgate-alerts", self.addr)
    }

    /// While down, every attempt gets a 500 (and does not count towards `failures`).
    pub fn set_down(&self, down: bool) {
        self.state.lock().expect("receiver lock").down = down;
    }

    /// Every attempt so far, in arrival order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.state.lock().expect("receiver lock").attempts.clone()
    }
}

async fn receive(req: Request<Incoming>, state: &Mutex<State>, failures: usize) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (id, timestamp, signature, content_type) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
        header("content-type"),
    );
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    let mut state = state.lock().expect("receiver lock");
    let status = if state.down {
        500
    } else {
        let seen = state.per_id.entry(id.clone()).or_default();
        *seen += 1;
        if *seen <= failures {
            500
        } else {
            200
        }
    };
    state.attempts.push(Attempt {
        id,
        timestamp,
        signature,
        content_type,
        body,
        status,
    });
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .expect("response")
}
