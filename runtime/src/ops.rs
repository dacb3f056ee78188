//! The ops listener: liveness, readiness and Prometheus metrics over HTTP.
//!
//! In: GET `/healthz`, `/readyz`, `/metrics`. Out: 200 `ok` while the process runs; 200 or
//! 503 from the readiness flag the service sets; the text exposition of the service's own
//! metrics recorder (passed in, never a global one). The gateway mounts [`Ops::respond`] on
//! its admin listener; the other services run [`serve`] on theirs.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

#[derive(Clone)]
pub struct Ops {
    ready: Arc<AtomicBool>,
    reason: Arc<std::sync::Mutex<String>>,
    metrics: PrometheusHandle,
}

impl Ops {
    /// Returns the ops state and the recorder the service registers its metrics with.
    pub fn new() -> (Self, PrometheusRecorder) {
        let recorder = PrometheusBuilder::new().build_recorder();
        let ops = Self {
            ready: Arc::new(AtomicBool::new(false)),
            reason: Arc::new(std::sync::Mutex::new("starting".to_owned())),
            metrics: recorder.handle(),
        };
        (ops, recorder)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Marks the service not ready, saying why (shown by `/readyz`).
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.reason.lock().expect("readiness reason lock") = reason.into();
        self.ready.store(false, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Answers an ops path, or `None` when the request is not for one.
    pub fn respond<B>(&self, req: &Request<B>) -> Option<Response<Full<Bytes>>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return None;
        }
        let (status, content_type, body) = match req.uri().path() {
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            "/readyz" if self.is_ready() => (StatusCode::OK, "text/plain", "ready\n".to_owned()),
            "/readyz" => {
                let reason = self.reason.lock().expect("readiness reason lock").clone();
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {reason}\n"),
                )
            }
            "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", self.metrics.render()),
            _ => return None,
        };
        let response = Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid");
        Some(response)
    }
}

/// Serves the ops endpoints on `listener` until shutdown; anything else is 404.
pub async fn serve(listener: TcpListener, ops: Ops, shutdown: Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(error = %err, "ops listener accept failed");
                    continue;
                }
            },
            _ = shutdown.wait() => return,
        };
        let ops = ops.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = ops.respond(&req).unwrap_or_else(|| {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"not found\n")))
                        .expect("static response parts are valid")
                });
                async move { Ok::<_, Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}
