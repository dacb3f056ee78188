//! Chain step: settling a request, whatever its outcome.
//!
//! In: the chain's result and the [`RequestContext`]; later, the response body as it streams to
//! the client. Out: the response with `x-request-id` and the rate-limit headers; the reported
//! cost counted; and, when the body has been sent (or the client went away), the usage event
//! recorded, the response bytes counted, the request's in-flight count given back, its spend
//! cap reservation replaced by what the event bills, its access log line written (when
//! `[access_log]` asks for it), and its bulkhead slot released.
//!
//! Never charge a refusal: when the gateway itself refuses a request after its limits admitted
//! it (413, 400, 408, 403 on the body, 502, 504: no upstream answer), every dimension the
//! decision and the streamed bytes took is given back before the refusal is sent, and the
//! usage event is not billable (only an upstream's answer below `billable_below_status` is).

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
use crate::limits::{Limiter, Meter};
use crate::metrics::GatewayMetrics;
use crate::problem::Problem;

/// Header in which an upstream reports what a request really cost: `compute_units=42, x=1`.
const COST_HEADER: &str = "x-tollgate-cost";

impl Proxy {
    pub(super) async fn settle(
        &self,
        mut ctx: RequestContext,
        result: Result<Response<Body>, Problem>,
        started: Instant,
        timestamp_ms: i64,
    ) -> Response<Body> {
        let status = result
            .as_ref()
            .map_or_else(|p| p.status.as_u16(), |r| r.status().as_u16());
        if result.is_err() && ctx.upstream_status.is_none() {
            if let Some(limits) = ctx.limits.as_ref().filter(|l| l.counted()) {
                self.limiter.refund(&limits.charges, limits.decision.at_ms).await;
                for (charges, at_ms) in &limits.added {
                    self.limiter.refund(charges, *at_ms).await;
                }
            }
        }
        // One usage event per request, whatever happened: built now, finished when the
        // response body has been sent (its size is known only then).
        let pending = PendingEvent {
            event: self.usage_event(&ctx, status, timestamp_ms),
            started,
            sink: self.usage.clone(),
            metrics: Arc::clone(&self.metrics),
            access_log: self.access_log,
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
        if let Some(origin) = &ctx.cors_origin {
            super::cors::expose(response.headers_mut(), origin);
        }
        // Every response after a limit decision says where the tenant stands.
        let mut release = None;
        if let Some(limits) = ctx.limits.take() {
            for (name, value) in crate::limits::response_headers(&limits.decision) {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    response.headers_mut().insert(name, value);
                }
            }
            // In-flight (`concurrent`) counts end with the response, response bytes are counted
            // as they were sent; a refused or degraded decision counted nothing to give back.
            if limits.counted() {
                let reported_bytes = ctx.reported_cost.contains_key(Meter::ResponseBytes.as_str());
                release = Some(Release {
                    limiter: Arc::clone(&self.limiter),
                    // Bytes of a refusal's problem body are not the tenant's to pay.
                    count_response_bytes: ctx.upstream_status.is_some() && !reported_bytes,
                    limits,
                });
            }
        }
        response.map(|body| {
            Metered {
                inner: body,
                bytes: 0,
                pending: Some(pending),
                release,
                spend: ctx.spend.take(),
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
            event_id: crate::events::ids::now_v7(),
            timestamp_ms,
            tenant_id: consumer.map(|c| c.tenant_id.clone()),
            consumer: consumer.map(|c| c.name.clone()),
            key_id: ctx.identity.as_ref().map(|i| i.key_id.clone()),
            plan: ctx.identity.as_ref().and_then(|i| self.plan_of(i)).map(str::to_owned),
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
    /// beyond what the route charged up front, so the next request sees it. A report that is
    /// malformed, names a meter the settings do not declare, or is above
    /// `limits.max_reported_units` for some meter is counted in a metric by reason and
    /// ignored: the route's cost applies.
    pub(super) async fn take_reported_cost(&self, headers: &mut HeaderMap, ctx: &mut RequestContext) {
        let Some(reported) = headers.remove(COST_HEADER) else {
            return;
        };
        let route_id = ctx.route.as_ref().map(|r| r.settings.id.clone()).unwrap_or_default();
        let cap = self.settings.limits.max_reported_units;
        let units = match crate::limits::parse_cost_header(reported.to_str().unwrap_or_default(), &self.settings.meters)
        {
            Ok(units) if units.values().all(|n| *n <= cap) => units,
            Ok(_) => {
                self.metrics.count("gateway_reported_cost_rejected_total", "over_cap");
                tracing::debug!(route = %route_id, cap, "ignored an x-tollgate-cost above the cap");
                return;
            }
            // An upstream's typo must not fail the tenant's request.
            Err(error) => {
                self.metrics
                    .count("gateway_reported_cost_rejected_total", error.reason());
                tracing::debug!(route = %route_id, %error, "ignored an x-tollgate-cost");
                return;
            }
        };
        ctx.reported_cost = units.iter().map(|(m, n)| (m.as_str().to_owned(), *n)).collect();
        let Some(limits) = ctx.limits.as_ref().filter(|l| l.counted()) else {
            return;
        };
        let route_cost = ctx.route.as_ref().map(|r| r.settings.cost.clone()).unwrap_or_default();
        let upfront = crate::limits::upfront_units(&route_cost, &self.settings.meters, None);
        let extra: BTreeMap<_, _> = units
            .iter()
            .map(|(meter, n)| (*meter, n.saturating_sub(upfront.get(meter).copied().unwrap_or(0))))
            .collect();
        let charges = limits.charges_after(&extra);
        if !charges.is_empty() {
            self.limiter.add(&charges, chrono::Utc::now().timestamp_millis()).await;
        }
    }
}

/// The response body as sent to the client: counts its bytes and, when it ends (or the
/// client goes away), completes and records the request's usage event, counts the response
/// bytes, gives back the request's in-flight limit and releases the tenant's bulkhead slot.
struct Metered {
    inner: Body,
    bytes: u64,
    pending: Option<PendingEvent>,
    release: Option<Release>,
    spend: Option<crate::spend::Reservation>,
    _bulkhead: Option<OwnedSemaphorePermit>,
}

/// What an admitted request still owes or is owed when its response ends.
struct Release {
    limiter: Arc<dyn Limiter>,
    limits: super::LimitCharge,
    count_response_bytes: bool,
}

struct PendingEvent {
    event: UsageEvent,
    started: Instant,
    sink: UsageSink,
    metrics: Arc<GatewayMetrics>,
    access_log: Option<crate::access_log::AccessLog>,
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
            access_log,
        }) = self.pending.take()
        {
            event.response_bytes = self.bytes as i64;
            event.units.insert("request_bytes".to_owned(), event.request_bytes);
            event.units.insert("response_bytes".to_owned(), event.response_bytes);
            event.latency_ms = started.elapsed().as_millis() as i64;
            // The cap counts what the invoice will: this event's units, if it is billable.
            if let Some(reservation) = self.spend.take() {
                reservation.settle(event.billable.then_some(&event.units));
            }
            metrics.request(event.outcome);
            if let Some(access_log) = access_log {
                access_log.record(&event);
            }
            sink.record(event);
        }
        if let Some(Release {
            limiter,
            limits,
            count_response_bytes,
        }) = self.release.take()
        {
            let bytes = if count_response_bytes {
                limits.charges_after(&BTreeMap::from([(Meter::ResponseBytes, self.bytes)]))
            } else {
                Vec::new()
            };
            let in_flight = limits.charges.iter().any(|c| c.spec.meter == Meter::Concurrent);
            if in_flight || !bytes.is_empty() {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        if !bytes.is_empty() {
                            limiter.add(&bytes, chrono::Utc::now().timestamp_millis()).await;
                        }
                        if in_flight {
                            limiter.release(&limits.charges).await;
                        }
                    });
                }
            }
        }
    }
}
