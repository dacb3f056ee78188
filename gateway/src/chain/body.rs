//! Chain step: the request body.
//!
//! In: the request body and its declared length. Out: the whole body in memory (its size in
//! the context), or 413 (over `http.max_body_bytes`), 408 (slower than
//! `http.body_read_timeout_ms`), 400 (cut short or unreadable). Bounded in size and in time, so
//! a slow or huge upload cannot pin the gateway.

use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Bytes;
use hyper::header::HeaderMap;
use hyper::StatusCode;

use super::admit::declared_length;
use super::{Proxy, RequestBody, RequestContext};
use crate::problem::Problem;

impl Proxy {
    pub(super) async fn read_body(
        &self,
        headers: &HeaderMap,
        body: RequestBody,
        ctx: &mut RequestContext,
    ) -> Result<Bytes, Problem> {
        let max = self.settings.http.max_body_bytes;
        if declared_length(headers).is_some_and(|len| len > max as u64) {
            return Err(too_large(max));
        }
        let read = tokio::time::timeout(
            Duration::from_millis(self.settings.http.body_read_timeout_ms),
            Limited::new(body, max).collect(),
        );
        let body = match read.await {
            Err(_) => {
                return Err(
                    Problem::new(StatusCode::REQUEST_TIMEOUT, "body-timeout", "Request Timeout")
                        .with_detail("the request body arrived too slowly"),
                )
            }
            Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => return Err(too_large(max)),
            Ok(Err(_)) => {
                return Err(Problem::new(StatusCode::BAD_REQUEST, "body-unreadable", "Bad Request")
                    .with_detail("the request body could not be read"))
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        ctx.request_bytes = body.len() as u64;
        Ok(body)
    }
}

fn too_large(max: usize) -> Problem {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", "Payload Too Large")
        .with_detail(format!("request bodies are limited to {max} bytes"))
}
