//! Chain step: admission.
//!
//! In: the authenticated identity, the route's cost, the declared body length, the usage
//! spool's state and the limiter. Out: the tenant's bulkhead slot and the limit decision in
//! the context (its headers go on every later response), or 429/503.
//!
//! Order: bulkhead first (cheap, in-process), then room in the spool (a request that cannot
//! be billed is refused before it consumes quota), then the spend cap (`cap`: refused there,
//! nothing is consumed), then one limit decision over every dimension (refused there, the
//! cap's reservation is given back).

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::header::HeaderMap;
use hyper::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Proxy, RequestContext};
use crate::directory::Identity;
use crate::limits::{Charge, Decision, LimitSpec, Subject};
use crate::problem::Problem;
use crate::routes::Route;

/// A request's limit decision and what to undo or add when its response ends.
#[derive(Debug)]
pub struct LimitCharge {
    pub decision: Decision,
    pub charges: Vec<Charge>,
    pub specs: Arc<Vec<Arc<LimitSpec>>>,
    pub subject_keys: (String, String, String),
    /// Charges added after the decision (bytes streamed beyond what was declared), with the
    /// time each was counted at: given back too if the gateway then refuses.
    pub added: Vec<(Vec<Charge>, i64)>,
}

impl LimitCharge {
    /// Whether the decision counted anything (admitted, and not on a failed backend).
    pub fn counted(&self) -> bool {
        self.decision.allowed && !self.decision.degraded
    }

    /// One charge per limit of `meter`-bearing units, for this request's subject.
    pub fn charges_after(&self, units: &std::collections::BTreeMap<crate::limits::Meter, u64>) -> Vec<Charge> {
        let (tenant, key, ip) = &self.subject_keys;
        let subject = Subject { tenant, key, ip };
        crate::limits::charges_after(&self.specs, &subject, units)
    }
}

impl Proxy {
    pub(super) async fn admit(
        &self,
        headers: &HeaderMap,
        peer: SocketAddr,
        identity: &Identity,
        route: &Route,
        ctx: &mut RequestContext,
    ) -> Result<(), Problem> {
        let consumer = &identity.consumer;
        // One tenant cannot hold all upstream capacity.
        ctx.bulkhead = Some(self.bulkhead(&consumer.tenant_id)?);

        // With the spool full, billable traffic is refused rather than served unbilled (unless
        // configured otherwise).
        if !self.usage.accepting_billable() {
            self.usage.metrics().refused.increment(1);
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "usage-spool-full",
                "Service Unavailable",
            )
            .with_detail("usage cannot be recorded right now; retry later")
            .with_header("retry-after", "5"));
        }

        self.check_spend_cap(identity, route, ctx)?;

        let Some(specs) = self.limits_of(identity).filter(|specs| !specs.is_empty()) else {
            return Ok(());
        };
        let content_length = declared_length(headers);
        let units = crate::limits::upfront_units(&route.settings.cost, &self.settings.meters, content_length);
        let ip = peer.ip().to_string();
        let subject = Subject {
            tenant: &consumer.tenant_id,
            key: &identity.key_id,
            ip: &ip,
        };
        let charges = crate::limits::charges(&specs, &subject, &units);
        let decision = self
            .limiter
            .decide(&charges, chrono::Utc::now().timestamp_millis())
            .await;
        let refused = (!decision.allowed).then(|| crate::limits::refusal_problem_json(&decision));
        ctx.limits = Some(LimitCharge {
            decision,
            charges,
            specs,
            subject_keys: (consumer.tenant_id.clone(), identity.key_id.clone(), ip),
            added: Vec::new(),
        });
        match refused {
            Some(body) => {
                // Not admitted, so nothing held against the spend cap either.
                ctx.spend = None;
                Err(Problem::from_json(body))
            }
            None => Ok(()),
        }
    }

    /// The plan a request is limited and priced by: the tenant's (its ruling consumer's,
    /// `Directory::terms_of`), or `identity.default_plan` when that names none or one these
    /// settings do not define (a plan removed from the settings does not make its tenants
    /// unlimited).
    pub(super) fn plan_of<'a>(&'a self, identity: &'a Identity) -> Option<&'a str> {
        self.named_plan(identity)
            .or(self.settings.identity.default_plan.as_deref())
    }

    /// The tenant's plan when it names one these settings define.
    fn named_plan<'a>(&self, identity: &'a Identity) -> Option<&'a str> {
        identity
            .terms
            .plan
            .as_deref()
            .filter(|plan| self.plans.contains_key(*plan))
    }

    /// The limits that apply to a tenant: its plan's, with its `metadata.limits` overrides
    /// (both from its ruling consumer). Overrides were checked against the plan named, so on
    /// the default plan's fallback they do not apply.
    pub(super) fn limits_of(&self, identity: &Identity) -> Option<Arc<Vec<Arc<LimitSpec>>>> {
        let plan_name = self.plan_of(identity)?;
        let plan = self.plans.get(plan_name)?;
        let terms = &identity.terms;
        if !terms.metadata.contains_key("limits") || self.named_plan(identity).is_none() {
            return Some(Arc::clone(plan));
        }
        let mut cache = self.overrides.lock().expect("override cache lock");
        // Keyed by the very record applied: two writers can produce different records with
        // one id and version.
        if let Some((computed_for, specs)) = cache.get(&terms.id) {
            if Arc::ptr_eq(computed_for, terms) {
                return Some(Arc::clone(specs));
            }
        }
        let metadata = serde_json::Value::Object(terms.metadata.clone());
        let specs =
            match crate::limits::effective_limits(&self.settings.plans[plan_name], &self.settings.meters, &metadata) {
                Ok(specs) => Arc::new(specs.into_iter().map(Arc::new).collect::<Vec<_>>()),
                // The admin API refuses bad overrides; a record written otherwise keeps the plan.
                Err(_) => Arc::clone(plan),
            };
        cache.insert(terms.id.clone(), (Arc::clone(terms), Arc::clone(&specs)));
        Some(specs)
    }

    fn bulkhead(&self, tenant: &str) -> Result<OwnedSemaphorePermit, Problem> {
        let semaphore = Arc::clone(
            self.bulkheads
                .lock()
                .expect("bulkhead lock")
                .entry(tenant.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.settings.http.tenant_max_in_flight as usize))),
        );
        semaphore.try_acquire_owned().map_err(|_| {
            Problem::new(StatusCode::TOO_MANY_REQUESTS, "tenant-concurrency", "Too Many Requests")
                .with_detail(format!(
                    "at most {} requests of one tenant may be in flight",
                    self.settings.http.tenant_max_in_flight
                ))
                .with_header("retry-after", "1")
        })
    }
}

impl Proxy {
    /// Counts body bytes the decision could not see (a chunked upload declares no length), so
    /// `request_bytes` limits count what was actually streamed.
    pub(super) async fn charge_streamed_request_bytes(&self, declared: Option<u64>, ctx: &mut RequestContext) {
        let Some(limits) = ctx.limits.as_mut().filter(|l| l.counted()) else {
            return;
        };
        let extra = ctx.request_bytes.saturating_sub(declared.unwrap_or(0));
        let charges = limits.charges_after(&std::collections::BTreeMap::from([(
            crate::limits::Meter::RequestBytes,
            extra,
        )]));
        if charges.is_empty() {
            return;
        }
        let at_ms = chrono::Utc::now().timestamp_millis();
        self.limiter.add(&charges, at_ms).await;
        limits.added.push((charges, at_ms));
    }
}

/// The body length the client declared, when it declared one.
pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(hyper::header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
