//! The gateway's admin API, as the portal calls it: always for the session's consumer.
//!
//! In: a consumer name from a session (never from the client), a method, a path below
//! `/v1/consumers/{name}`, an optional JSON body. Out: the status and JSON body the admin API
//! answered, or an [`AdminError`] when it could not be reached. Every write carries
//! `tollgate-actor: portal:<consumer>`, so the audit trail says the tenant did it.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin API {path}: {reason}")]
    Unreachable { path: String, reason: String },
    #[error("admin API {path}: answered {status} with a body that is not JSON")]
    NotJson { path: String, status: StatusCode },
}

pub struct AdminClient {
    base: String,
    token: String,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// An admin API answer: status and JSON body (`null` when empty).
#[derive(Debug)]
pub struct AdminReply {
    pub status: StatusCode,
    pub body: Value,
}

impl AdminClient {
    pub fn new(base: &str, token: String, timeout: Duration) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            timeout,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Calls `path` (starting with `/v1/`); `actor` names who a write is for.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        actor: Option<&str>,
    ) -> Result<AdminReply, AdminError> {
        let unreachable = |reason: String| AdminError::Unreachable {
            path: path.to_owned(),
            reason,
        };
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token));
        if let Some(actor) = actor {
            request = request.header("tollgate-actor", actor);
        }
        let bytes = match body {
            Some(body) => {
                request = request.header("content-type", "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(bytes)).map_err(|e| unreachable(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok::<_, AdminError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {} ms", self.timeout.as_millis())))??;
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).map_err(|_| AdminError::NotJson {
                path: path.to_owned(),
                status,
            })?
        };
        Ok(AdminReply { status, body })
    }

    /// `/v1/consumers/{consumer}{rest}`: the only paths the portal's tenant-facing calls use.
    pub fn consumer_path(consumer: &str, rest: &str) -> String {
        format!("/v1/consumers/{consumer}{rest}")
    }
}
