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

use serde_json::{json, Value};

use super::Proxy;
use crate::directory::{Consumer, Identity};
use crate::limits::{Backend, Charge, KeyBy, Subject};

impl Proxy {
    /// The consumer's limits with used, remaining, reset and window, as JSON for the admin API.
    pub async fn limit_status(&self, consumer: &Arc<Consumer>) -> Value {
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
                    cost: 0,
                });
                subjects.push(match spec.by {
                    KeyBy::Key => json!({"by": "key", "keyId": key}),
                    _ => json!({"by": "tenant"}),
                });
            }
        }
        let decision = self.limiter.peek(&charges, now_ms).await;
        let mut limits: Vec<Value> = Vec::new();
        for (i, (charge, subject)) in charges.iter().zip(subjects).enumerate() {
            let mut entry = spec_json(charge);
            entry["subject"] = subject;
            if let Some(state) = decision.states.get(i) {
                entry["used"] = json!(state.limit.saturating_sub(state.remaining));
                entry["remaining"] = json!(state.remaining);
                entry["resetSeconds"] = json!(state.reset_secs);
                entry["windowSeconds"] = json!(state.window_secs);
            }
            limits.push(entry);
        }
        for spec in per_ip {
            let mut entry = spec_json(&Charge {
                spec: Arc::clone(spec),
                key: String::new(),
                cost: 0,
            });
            entry["subject"] = json!({"by": "ip"});
            limits.push(entry);
        }
        json!({
            "consumer": consumer.name,
            "tenantId": consumer.tenant_id,
            "plan": plan,
            "backend": match self.settings.limits.backend {
                Backend::Local => "local",
                Backend::Redis => "redis",
            },
            // Local counters are this process's alone: other gateways count on their own.
            "scope": match self.settings.limits.backend {
                Backend::Local => "this gateway's counters",
                Backend::Redis => "counters shared by every gateway on this Redis",
            },
            "degraded": decision.degraded,
            "at": chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now_ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
            "limits": limits,
        })
    }
}

fn spec_json(charge: &Charge) -> Value {
    let spec = &charge.spec;
    json!({
        "name": spec.name,
        "meter": spec.meter.as_str(),
        "window": spec.window.code(),
        "limit": spec.limit,
    })
}
