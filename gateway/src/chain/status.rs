//! Limit status: where a tenant stands against each of its plan's limits, read without
//! charging anything.
//!
//! In: a consumer (the admin API's `GET /v1/consumers/{name}/limits`, which the portal's
//! limits page reads). Out: one entry per limit and counter subject, from [`Limiter::peek`]:
//! the tenant's counter for `by = "tenant"`, one per active key of the consumer for
//! `by = "key"`, none for `by = "ip"` (one counter per client address: not a tenant's
//! figure). The limits are the ones the chain applies ([`Proxy::limits_of`]: plan and
//! overrides of the tenant's ruling consumer), so a status never disagrees with a decision.
//!
//! [`Limiter::peek`]: crate::limits::Limiter::peek

use std::sync::Arc;

use tollgate_runtime::admin_api as api;

use super::Proxy;
use crate::directory::{Consumer, Identity};
use crate::limits::{Backend, Charge, KeyBy, LimitSpec, Subject};

impl Proxy {
    /// The consumer's limits with used, remaining, reset and window, for the admin API.
    pub async fn limit_status(&self, consumer: &Arc<Consumer>) -> api::LimitStatus {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let (terms, keys) = {
            let directory = self.directory.read().expect("directory lock");
            let terms = directory
                .terms_of(&consumer.tenant_id)
                .unwrap_or_else(|| Arc::clone(consumer));
            let keys: Vec<String> = directory
                .keys_of(&consumer.id)
                .into_iter()
                .filter(|k| k.revoked_at_ms.is_none() && k.expires_at_ms.is_none_or(|at| at > now_ms))
                .map(|k| k.id)
                .collect();
            (terms, keys)
        };
        let identity = Identity {
            consumer: Arc::clone(consumer),
            key_id: String::new(),
            terms,
        };
        let plan = self.plan_of(&identity).map(str::to_owned);
        let specs = self.limits_of(&identity).unwrap_or_default();
        // Each charge's subject as the answer names it, beside the charge.
        let mut charges = Vec::new();
        let mut subjects = Vec::new();
        let mut per_ip = Vec::new();
        for spec in specs.iter() {
            let ids: Vec<&str> = match spec.by {
                KeyBy::Tenant => vec![""],
                KeyBy::Key => keys.iter().map(String::as_str).collect(),
                KeyBy::Ip => {
                    per_ip.push(spec);
                    continue;
                }
            };
            for key in ids {
                let subject = Subject {
                    tenant: &consumer.tenant_id,
                    key,
                    ip: "",
                };
                charges.push(Charge {
                    spec: Arc::clone(spec),
                    key: subject.key_for(spec.by),
                    scope: subject.scope().into(),
                    cost: 0,
                });
                subjects.push(match spec.by {
                    KeyBy::Key => api::LimitSubject::Key { key_id: key.to_owned() },
                    _ => api::LimitSubject::Tenant,
                });
            }
        }
        let decision = self.limiter.peek(&charges, now_ms).await;
        let mut limits = Vec::new();
        for (i, (charge, subject)) in charges.iter().zip(subjects).enumerate() {
            let mut entry = entry(&charge.spec, subject);
            if let Some(state) = decision.states.get(i) {
                entry.used = Some(state.limit.saturating_sub(state.remaining));
                entry.remaining = Some(state.remaining);
                entry.reset_seconds = Some(state.reset_secs);
                entry.window_seconds = Some(state.window_secs);
            }
            limits.push(entry);
        }
        limits.extend(per_ip.into_iter().map(|spec| entry(spec, api::LimitSubject::Ip)));
        let (backend, scope) = match self.settings.limits.backend {
            // Local counters are this process's alone: other gateways count on their own.
            Backend::Local => (api::LimitBackend::Local, "this gateway's counters"),
            Backend::Redis => (
                api::LimitBackend::Redis,
                "counters shared by every gateway on this Redis",
            ),
            Backend::RedisCluster => (
                api::LimitBackend::Redis,
                "counters shared by every gateway on this Redis Cluster",
            ),
        };
        api::LimitStatus {
            consumer: consumer.name.clone(),
            tenant_id: consumer.tenant_id.clone(),
            plan,
            backend,
            scope: scope.to_owned(),
            degraded: decision.degraded,
            at: api::time(now_ms),
            limits,
        }
    }
}

fn entry(spec: &LimitSpec, subject: api::LimitSubject) -> api::LimitEntry {
    api::LimitEntry {
        name: spec.name.clone(),
        meter: spec.meter.as_str().to_owned(),
        window: spec.window.code(),
        limit: spec.limit,
        subject,
        used: None,
        remaining: None,
        reset_seconds: None,
        window_seconds: None,
    }
}
