//! The answer while the gateway starts (keys topic not yet replayed): 503 with `Retry-After`,
//! an `x-request-id`, and a usage event like any other request's (not billable, outcome
//! rejected), so every answer the public listener gives is accounted for.
//!
//! In: a request that arrived before the chain was ready, and the usage sink once it exists
//! (it opens before the replay starts). Out: the 503 and its event.

use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use tollgate_schemas::{Outcome, UsageEvent};

use super::Body;
use crate::events::UsageSink;
use crate::metrics::GatewayMetrics;
use crate::problem::Problem;

/// What the start-up answer records into.
pub struct Starting {
    pub usage: UsageSink,
    pub metrics: Arc<GatewayMetrics>,
    pub gateway_id: String,
}

/// 503 `starting`, with a request id; recorded when `starting` is known.
pub fn starting_response<B>(req: &Request<B>, starting: Option<&Starting>) -> Response<Body> {
    let request_id = super::request_id(req.headers());
    let mut response = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "starting", "Service Unavailable")
        .with_detail("the gateway is loading its keys")
        .with_header("retry-after", "1")
        .into_response()
        .map(|b| b.map_err(|never| match never {}).boxed());
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    if let Some(starting) = starting {
        starting.metrics.request(Outcome::Rejected);
        starting.usage.record(UsageEvent {
            event_id: crate::events::ids::now_v7(),
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
            tenant_id: None,
            consumer: None,
            key_id: None,
            plan: None,
            route: String::new(),
            method: req.method().to_string(),
            status: 503,
            outcome: Outcome::Rejected,
            billable: false,
            units: [("requests".to_owned(), 1)].into_iter().collect(),
            request_bytes: 0,
            response_bytes: 0,
            latency_ms: 0,
            upstream_latency_ms: None,
            gateway_id: starting.gateway_id.clone(),
            request_id: Some(request_id),
        });
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_up_answer_has_a_request_id_and_an_event() {
        let (usage, events) = UsageSink::in_memory(
            Default::default(),
            Arc::new(crate::events::metrics::EventMetrics::new(&metrics::NoopRecorder)),
        );
        let starting = Starting {
            usage,
            metrics: Arc::new(GatewayMetrics::noop()),
            gateway_id: "gw".into(),
        };
        let req = Request::get("/v1/x").header("x-request-id", "abc").body(()).unwrap();
        let response = starting_response(&req, Some(&starting));
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["x-request-id"], "abc");
        assert_eq!(response.headers()["retry-after"], "1");
        let events = events.all();
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].status, events[0].billable), (503, false));
        assert_eq!(events[0].request_id.as_deref(), Some("abc"));
        let without = starting_response(&Request::get("/").body(()).unwrap(), None);
        assert!(without.headers().contains_key("x-request-id"));
    }
}
