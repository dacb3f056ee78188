//! Chain step: settling a request, whatever its outcome.
//!
//! In: the chain's result and the [`RequestContext`]; later, the response body as it streams to
//! the client. Out: the response with `x-request-id` and the rate-limit headers; the reported
//! cost counted; and, when the body has been sent (or the client went away), the usage event
//! recorded, the request's in-flight count given back and its bulkhead slot released.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame, SizeHint};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::Response;
use tokio::sync::OwnedSemaphorePermit;
use tollgate_schemas::{Outcome, UsageEvent};

use super::{Body, BoxError, Proxy, RequestContext};
use crate::events::UsageSink;
use crate::limits::{Charge, Limiter, Subject};
use crate::metrics::GatewayMetrics;
use crate::problem::Problem;

/// Header in which an upstream reports what a request really cost: `compute_units=42, x=1`.
const COST_HEADER: &str = "x-tollgate-cost";

impl Proxy {
    pub(super) fn settle(
        &self,
        mut ctx: RequestContext,
        result: Result<Response<Body>, Problem>,
        started: Instant,
        timestamp_ms: i64,
    ) -> Response<Body> {
        let status = result
            .as_ref()
            .map_or_else(|p| p.status.as_u16(), |r| r.status().as_u16());
        // One usage event per request, whatever happened: built now, finished when the
        // response body has been sent (its size is known only then).
        let pending = PendingEvent {
            event: self.usage_event(&ctx, status, timestamp_ms),
            started,
            sink: self.usage.clone(),
            metrics: Arc::clone(&self.metrics),
        };
        let mut response = match result {
            Ok(response) => response,
            Err(problem) => problem
                .into_response()
                .map(|b| b.map_err(|never| match never {}).boxed()),
        };
        if let Ok(value) = HeaderValue::from_str(&ctx.request_id) {
            response.headers_mut().insert("x-request-id", value);
        }
        // Every response after a limit decision says where the tenant stands.
        let mut release = None;
        if let Some(limits) = ctx.limits.take() {
            for (name, value) in crate::limits::response_headers(&limits.decision) {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, value);
                }
            }
            // In-flight (`concurrent`) counts end with the response; a refused or degraded
            // decision counted nothing to give back.
            if limits.decision.allowed && !limits.decision.degraded {
                release = Some((Arc::clone(&self.limiter), limits.charges));
            }
        }
        response.map(|body| {
            Metered {
                inner: body,
                bytes: 0,
                pending: Some(pending),
                release,
                _bulkhead: ctx.bulkhead.take(),
            }
            .boxed()
        })
    }

    fn usage_event(&self, ctx: &RequestContext, status: u16, timestamp_ms: i64) -> UsageEvent {
        let consumer = ctx.identity.as_ref().map(|i| &i.consumer);
        let outcome = match (ctx.upstream_status, status) {
            (Some(s), _) if s >= 500 => Outcome::UpstreamError,
            (Some(_), _) => Outcome::Allowed,
            (None, 401) => Outcome::Unauthenticated,
            (None, 403) => Outcome::Forbidden,
            (None, 429) => Outcome::RateLimited,
            (None, 502 | 504) => Outcome::UpstreamError,
            (None, _) => Outcome::Rejected,
        };
        let billable = ctx
            .upstream_status
            .is_some_and(|s| s < self.usage.settings().billable_below_status);
        let mut units: BTreeMap<String, i64> = BTreeMap::from([("requests".to_owned(), 1)]);
        if let Some(route) = &ctx.route {
            for (meter, cost) in route.settings.cost.iter().chain(&ctx.reported_cost) {
                units.insert(meter.clone(), i64::try_from(*cost).unwrap_or(i64::MAX));
            }
        }
        UsageEvent {
            event_id: uuid::Uuid::now_v7(),
            timestamp_ms,
            tenant_id: consumer.map(|c| c.tenant_id.clone()),
            consumer: consumer.map(|c| c.name.clone()),
            key_id: ctx.identity.as_ref().map(|i| i.key_id.clone()),
            plan: consumer.and_then(|c| c.plan.clone()),
            route: ctx.route.as_ref().map(|r| r.settings.id.clone()).unwrap_or_default(),
            method: ctx.method.clone(),
            status,
            outcome,
            billable,
            units,
            request_bytes: ctx.request_bytes as i64,
            response_bytes: 0,
            latency_ms: 0,
            upstream_latency_ms: ctx.upstream_latency.map(|d| d.as_millis() as i64),
            gateway_id: self.settings.service.id.clone(),
            request_id: Some(ctx.request_id.clone()),
        }
    }

    /// Takes the upstream's `x-tollgate-cost` off the response and counts what it reports
    /// beyond what the route charged up front, so the next request sees it.
    pub(super) async fn take_reported_cost(&self, headers: &mut HeaderMap, ctx: &mut RequestContext) {
        let Some(reported) = headers.remove(COST_HEADER) else {
            return;
        };
        let route_id = ctx.route.as_ref().map(|r| r.settings.id.clone()).unwrap_or_default();
        let units = match crate::limits::parse_cost_header(reported.to_str().unwrap_or_default()) {
            Ok(units) => units,
            // An upstream's typo must not fail the tenant's request.
            Err(reason) => {
                tracing::debug!(route = %route_id, %reason, "ignored a malformed x-tollgate-cost");
                return;
            }
        };
        ctx.reported_cost = units.iter().map(|(m, n)| (m.as_str().to_owned(), *n)).collect();
        let Some(limits) = &ctx.limits else { return };
        let route_cost = ctx.route.as_ref().map(|r| r.settings.cost.clone()).unwrap_or_default();
        let upfront = crate::limits::upfront_units(&route_cost, None);
        let extra: BTreeMap<_, _> = units
            .iter()
            .map(|(meter, n)| (*meter, n.saturating_sub(upfront.get(meter).copied().unwrap_or(0))))
            .collect();
        let (tenant, key, ip) = &limits.subject_keys;
        let subject = Subject { tenant, key, ip };
        let charges = crate::limits::charges_after(&limits.specs, &subject, &extra);
        if !charges.is_empty() {
            self.limiter.add(&charges, chrono::Utc::now().timestamp_millis()).await;
        }
    }
}

/// The response body as sent to the client: counts its bytes and, when it ends (or the
/// client goes away), completes and records the request's usage event, gives back the
/// request's in-flight limit and releases the tenant's bulkhead slot.
struct Metered {
    inner: Body,
    bytes: u64,
    pending: Option<PendingEvent>,
    release: Option<(Arc<dyn Limiter>, Vec<Charge>)>,
    _bulkhead: Option<OwnedSemaphorePermit>,
}

struct PendingEvent {
    event: UsageEvent,
    started: Instant,
    sink: UsageSink,
    metrics: Arc<GatewayMetrics>,
}

impl hyper::body::Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        if let Some(PendingEvent {
            mut event,
            started,
            sink,
            metrics,
        }) = self.pending.take()
        {
            event.response_bytes = self.bytes as i64;
            event.units.insert("request_bytes".to_owned(), event.request_bytes);
            event.units.insert("response_bytes".to_owned(), event.response_bytes);
            event.latency_ms = started.elapsed().as_millis() as i64;
            metrics.request(event.outcome);
            sink.record(event);
        }
        if let Some((limiter, charges)) = self.release.take() {
            if charges.iter().any(|c| c.spec.meter == crate::limits::Meter::Concurrent) {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move { limiter.release(&charges).await });
                }
            }
        }
    }
}
