//! Provisioning: each tenant with a live consumer has a Stripe customer subscribed to its
//! plan's prices; a tenant whose last consumer is gone has its subscription cancel at period
//! end.
//!
//! In: the tenants on the keys topic ([`Consumers`]), their `billing_customers` records, the
//! plans' price ids ([`crate::products::resolve`]). Out: Stripe calls, records, and the
//! customer id written back to the tenant's consumers.
//!
//! Level-triggered: every pass compares what should be (the consumers) with what is (the
//! record) and takes the next step, [`decide`] (pure, tested below). Each step writes its
//! intent to the record before its Stripe call and the outcome after it, so a crash leaves
//! either the intent (the same call, same idempotency key, is sent again) or the outcome.
//! Stripe keeps idempotency keys for 24 hours
//! (<https://docs.stripe.com/api/idempotent_requests>): an intent older than that is first
//! looked up (customers by `metadata['tenantId']`, subscriptions by customer) before it is
//! sent again, so no second customer or subscription is made even after a long outage.

use std::collections::{BTreeMap, BTreeSet};

use clickhouse::Client;

use crate::calls::{idempotency_key, CallError, Caller};
use crate::consumers::{Consumers, Tenant};
use crate::customers::{self, CustomerRecord, CustomerSource, CustomerStatus};
use crate::ledger::LedgerError;
use crate::products::PlanPriceIds;
use crate::settings::{CollectionMethod, ProvisioningSettings};

mod counters;
pub use counters::ProvisionMetrics;

/// An intent older than this may have outlived Stripe's idempotency window (24 h).
const IDEMPOTENCY_WINDOW_SECS: u32 = 23 * 3_600;
/// Steps taken for one tenant in one pass, at most (a new tenant needs four).
const MAX_STEPS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Record(#[from] LedgerError),
}

/// The next thing one tenant needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Create (or, after a crash, create again with the same key) the customer.
    CreateCustomer,
    /// Record the customer id an operator put on a consumer.
    Adopt {
        customer: String,
    },
    /// Subscribe to `plan`'s prices.
    Subscribe {
        plan: String,
        price_ids: Vec<String>,
    },
    /// Move the subscription to `plan`'s prices (a plan change, or new prices from `setup`).
    Update {
        plan: String,
        price_ids: Vec<String>,
    },
    /// Send the recorded intent again, exactly as recorded.
    Resume,
    /// Set the subscription to cancel at period end.
    Cancel,
    /// The tenant's plan has no prices: record it.
    NoPlan,
    /// Plan known but not set up in Stripe yet: record why, wait.
    Wait {
        reason: String,
    },
    /// Try a step Stripe refused again, under fresh keys.
    Retry,
    /// Put the customer id on consumers that lack it.
    WriteBack {
        consumer_ids: Vec<String>,
    },
}

/// Decides the next step for one tenant. `tenant` is `None` when no live consumer has it.
pub fn decide(
    tenant: Option<&Tenant>,
    record: Option<&CustomerRecord>,
    prices: &PlanPriceIds,
    now: u32,
    retry_failed_secs: u64,
) -> Step {
    use CustomerStatus::*;
    let Some(record) = record else {
        return match tenant {
            None => Step::Nothing,
            Some(t) => match &t.stripe_customer_id {
                Some(customer) => Step::Adopt {
                    customer: customer.clone(),
                },
                None => Step::CreateCustomer,
            },
        };
    };
    match record.status {
        // A tenant deleted before its customer existed needs none.
        CreatingCustomer if tenant.is_none() => return Step::Nothing,
        CreatingCustomer => return Step::CreateCustomer,
        // Finished even when the tenant is gone: the call may have taken effect.
        Subscribing | Updating | Cancelling => return Step::Resume,
        Failed if u64::from(now.saturating_sub(record.updated_at)) >= retry_failed_secs && tenant.is_some() => {
            return Step::Retry
        }
        Failed => return Step::Nothing,
        Customer | NoPlan | Active | Cancelled => {}
    }
    let Some(tenant) = tenant else {
        return if record.status == Active {
            Step::Cancel
        } else {
            Step::Nothing
        };
    };
    let plan = tenant.plan.clone().unwrap_or_default();
    let wanted = prices.plans.get(&plan);
    let subscription_step = match (record.status, wanted) {
        (Customer | NoPlan | Cancelled, Some(ids)) => Some(Step::Subscribe {
            plan: plan.clone(),
            price_ids: ids.clone(),
        }),
        (Active, Some(ids)) if plan != record.plan => Some(Step::Update {
            plan: plan.clone(),
            price_ids: ids.clone(),
        }),
        // New prices for the same plan: moved at the next period, so this one is billed
        // at the prices it started with.
        (Active, Some(ids)) if *ids != record.price_ids && now >= record.period_end => Some(Step::Update {
            plan: plan.clone(),
            price_ids: ids.clone(),
        }),
        (Customer | NoPlan, None) => match prices.not_set_up.get(&plan) {
            Some(reason) if record.last_error != *reason => Some(Step::Wait { reason: reason.clone() }),
            Some(_) => None,
            None if record.status == Customer => Some(Step::NoPlan),
            None => None,
        },
        _ => None,
    };
    if let Some(step) = subscription_step {
        return step;
    }
    let lacking: Vec<String> = tenant
        .consumers
        .iter()
        .filter(|c| c.stripe_customer_id.as_deref().is_none_or(str::is_empty))
        .map(|c| c.id.clone())
        .collect();
    if !lacking.is_empty() && !record.stripe_customer_id.is_empty() {
        return Step::WriteBack { consumer_ids: lacking };
    }
    Step::Nothing
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProvisionReport {
    pub steps: usize,
    pub failed: usize,
    pub unresolved: usize,
}

pub struct Provisioner {
    pub client: Client,
    pub caller: Caller,
    pub consumers: Consumers,
    pub settings: ProvisioningSettings,
    pub catalogue: tollgate_runtime::catalogue::Catalogue,
    pub meters: Vec<crate::settings::MeterSettings>,
    pub metrics: ProvisionMetrics,
}

impl Provisioner {
    /// One pass over every tenant; does nothing until the keys topic has been read up to its
    /// end as of start.
    pub async fn pass(&self, now: u32) -> Result<ProvisionReport, ProvisionError> {
        let mut report = ProvisionReport::default();
        if !self.consumers.is_caught_up() {
            return Ok(report);
        }
        let tenants = self.consumers.tenants();
        let records: BTreeMap<String, CustomerRecord> = customers::read_all(&self.client)
            .await?
            .into_iter()
            .map(|r| (r.tenant_id.clone(), r))
            .collect();
        let names: BTreeSet<&String> = tenants.keys().chain(records.keys()).collect();
        let needs_prices = names
            .iter()
            .any(|t| tenants.contains_key(*t) || records.get(*t).is_some_and(|r| r.status == CustomerStatus::Active));
        let prices = if needs_prices {
            match crate::products::resolve(&self.caller, &self.catalogue, &self.meters).await {
                Ok(prices) => prices,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot look up the plans' prices; provisioning waits");
                    report.unresolved += 1;
                    return Ok(report);
                }
            }
        } else {
            PlanPriceIds::default()
        };
        let mut statuses: BTreeMap<&'static str, f64> = BTreeMap::new();
        for name in names {
            let tenant = tenants.get(name);
            let mut record = records.get(name).cloned();
            for _ in 0..MAX_STEPS {
                let step = decide(tenant, record.as_ref(), &prices, now, self.settings.retry_failed_secs);
                if step == Step::Nothing {
                    break;
                }
                report.steps += 1;
                let span = tracing::info_span!("provision", tenant = %name, step = ?step);
                let _entered = span.enter();
                match self.take(name, tenant, record.take(), step, now).await? {
                    Taken::Next(next) => record = Some(next),
                    Taken::Done(last) => {
                        record = Some(last);
                        break;
                    }
                    Taken::Stop(last, outcome) => {
                        match outcome {
                            Stop::Refused => report.failed += 1,
                            Stop::Unresolved => report.unresolved += 1,
                        }
                        record = Some(last);
                        break;
                    }
                }
            }
            if let Some(r) = &record {
                *statuses.entry(r.status.as_str()).or_default() += 1.0;
            }
        }
        for (status, gauge) in &self.metrics.tenants {
            gauge.set(statuses.get(status).copied().unwrap_or(0.0));
        }
        Ok(report)
    }

    async fn take(
        &self,
        tenant_id: &str,
        tenant: Option<&Tenant>,
        record: Option<CustomerRecord>,
        step: Step,
        now: u32,
    ) -> Result<Taken, ProvisionError> {
        let mut rec = record.unwrap_or_else(|| CustomerRecord::new(tenant_id));
        let prev = rec.status;
        rec.updated_at = now;
        match step {
            Step::Nothing => return Ok(Taken::Next(rec)),
            Step::Adopt { customer } => {
                rec.stripe_customer_id = customer;
                rec.customer_source = CustomerSource::Operator;
                rec.status = CustomerStatus::Customer;
                self.metrics.customers_adopted.increment(1);
                tracing::info!(customer = %rec.stripe_customer_id, "operator's Stripe customer recorded");
            }
            Step::NoPlan => {
                rec.status = CustomerStatus::NoPlan;
                rec.last_error = format!(
                    "plan {:?} is not in the catalogue: customer without subscription",
                    tenant.and_then(|t| t.plan.clone()).unwrap_or_default()
                );
                tracing::warn!(reason = %rec.last_error, "tenant not subscribed");
            }
            Step::Wait { reason } => {
                tracing::warn!(%reason, "tenant waits for setup");
                rec.last_error = reason;
                customers::write(&self.client, &rec).await?;
                return Ok(Taken::Done(rec));
            }
            Step::Retry => {
                rec.generation += 1;
                rec.revision += 1;
                rec.last_error.clear();
                rec.status = if rec.stripe_customer_id.is_empty() {
                    CustomerStatus::CreatingCustomer
                } else if rec.subscription_id.is_empty() {
                    CustomerStatus::Customer
                } else {
                    CustomerStatus::Active
                };
                rec.intent_at = now;
            }
            Step::WriteBack { consumer_ids } => {
                for consumer in tenant.map(|t| t.consumers.as_slice()).unwrap_or_default() {
                    if !consumer_ids.contains(&consumer.id) {
                        continue;
                    }
                    if let Err(err) = self.consumers.write_back(consumer, &rec.stripe_customer_id).await {
                        tracing::warn!(error = %err, consumer = %consumer.id, "write-back failed; retried next pass");
                        self.metrics.unresolved.increment(1);
                        return Ok(Taken::Stop(rec, Stop::Unresolved));
                    }
                    self.metrics.write_backs.increment(1);
                    tracing::info!(consumer = %consumer.id, customer = %rec.stripe_customer_id, "customer id written to the consumer");
                }
                // Nothing to record; the next pass sees the consumers as written.
                return Ok(Taken::Done(rec));
            }
            Step::CreateCustomer => {
                if prev != CustomerStatus::CreatingCustomer || rec.intent_at == 0 {
                    rec.status = CustomerStatus::CreatingCustomer;
                    rec.intent_at = now;
                    customers::write(&self.client, &rec).await?;
                }
                let outcome = self.create_customer(&rec, now).await;
                return self
                    .settle(rec, outcome, |rec, id: String| {
                        rec.stripe_customer_id = id;
                        rec.customer_source = CustomerSource::Created;
                        rec.status = CustomerStatus::Customer;
                        self.metrics.customers_created.increment(1);
                        tracing::info!(customer = %rec.stripe_customer_id, "Stripe customer created");
                    })
                    .await;
            }
            Step::Subscribe { plan, price_ids } => {
                if matches!(prev, CustomerStatus::Cancelled) {
                    // A new subscription after a cancelled one: a new key.
                    rec.generation += 1;
                }
                rec.status = CustomerStatus::Subscribing;
                rec.plan = plan;
                rec.price_ids = price_ids;
                rec.subscription_id.clear();
                rec.item_ids.clear();
                rec.intent_at = now;
                customers::write(&self.client, &rec).await?;
                return self.resume(rec, now).await;
            }
            Step::Update { plan, price_ids } => {
                rec.status = CustomerStatus::Updating;
                rec.plan = plan;
                rec.price_ids = price_ids;
                rec.intent_at = now;
                customers::write(&self.client, &rec).await?;
                return self.resume(rec, now).await;
            }
            Step::Cancel => {
                rec.status = CustomerStatus::Cancelling;
                rec.intent_at = now;
                customers::write(&self.client, &rec).await?;
                return self.resume(rec, now).await;
            }
            Step::Resume => return self.resume(rec, now).await,
        }
        customers::write(&self.client, &rec).await?;
        Ok(Taken::Next(rec))
    }

    /// Sends the recorded intent (subscribe, update, cancel) and records its outcome.
    async fn resume(&self, rec: CustomerRecord, now: u32) -> Result<Taken, ProvisionError> {
        match rec.status {
            CustomerStatus::Subscribing => {
                let outcome = self.subscribe(&rec, now).await;
                self.settle(rec, outcome, |rec, sub: serde_json::Value| {
                    rec.subscription_id = sub["id"].as_str().unwrap_or_default().to_owned();
                    rec.item_ids = item_ids(&sub);
                    rec.period_end = period_end(&sub);
                    rec.revision = 0;
                    rec.status = CustomerStatus::Active;
                    self.metrics.subscriptions_created.increment(1);
                    tracing::info!(subscription = %rec.subscription_id, plan = %rec.plan, "subscribed");
                })
                .await
            }
            CustomerStatus::Updating => {
                let key = idempotency_key(&[
                    "tollgate-subscription-update",
                    &rec.subscription_id,
                    &format!("r{}", rec.revision),
                ]);
                let mut form = crate::stripe::Form::new();
                for (i, item) in rec.item_ids.iter().enumerate() {
                    form.push(format!("items[{i}][id]"), item.clone());
                    form.push(format!("items[{i}][deleted]"), "true");
                }
                for (j, price) in rec.price_ids.iter().enumerate() {
                    form.push(format!("items[{}][price]", rec.item_ids.len() + j), price.clone());
                }
                form.push("proration_behavior", self.settings.proration_behavior.as_str());
                form.push("metadata[tollgate_plan]", rec.plan.clone());
                let outcome = self
                    .caller
                    .post(&format!("/subscriptions/{}", rec.subscription_id), &form, &key)
                    .await;
                self.settle(rec, outcome, |rec, sub: serde_json::Value| {
                    rec.item_ids = item_ids(&sub);
                    rec.period_end = period_end(&sub);
                    rec.revision += 1;
                    rec.status = CustomerStatus::Active;
                    self.metrics.subscriptions_updated.increment(1);
                    tracing::info!(subscription = %rec.subscription_id, plan = %rec.plan, "subscription moved");
                })
                .await
            }
            CustomerStatus::Cancelling => {
                let key = idempotency_key(&[
                    "tollgate-subscription-cancel",
                    &rec.subscription_id,
                    &format!("r{}", rec.revision),
                ]);
                let form = crate::stripe::Form::new().with("cancel_at_period_end", "true");
                let outcome = self
                    .caller
                    .post(&format!("/subscriptions/{}", rec.subscription_id), &form, &key)
                    .await;
                self.settle(rec, outcome, |rec, _sub: serde_json::Value| {
                    rec.status = CustomerStatus::Cancelled;
                    self.metrics.subscriptions_cancelled.increment(1);
                    tracing::info!(subscription = %rec.subscription_id, "subscription cancels at period end");
                })
                .await
            }
            _ => Ok(Taken::Next(rec)),
        }
    }

    /// Records a call's outcome: `done` on success, `failed` on a refusal, the error (intent
    /// kept) when it may still go through.
    async fn settle<T>(
        &self,
        mut rec: CustomerRecord,
        outcome: Result<T, CallError>,
        done: impl FnOnce(&mut CustomerRecord, T),
    ) -> Result<Taken, ProvisionError> {
        rec.attempts += 1;
        let stop = match outcome {
            Ok(value) => {
                done(&mut rec, value);
                rec.last_error.clear();
                None
            }
            Err(CallError::Refused { reason, .. }) => {
                tracing::warn!(%reason, status = rec.status.as_str(), "stripe refused a provisioning step");
                self.metrics.failures.increment(1);
                rec.status = CustomerStatus::Failed;
                rec.last_error = crate::stripe::redact(&reason);
                Some(Stop::Refused)
            }
            Err(CallError::Unresolved { reason }) => {
                self.metrics.unresolved.increment(1);
                rec.last_error = crate::stripe::redact(&reason);
                Some(Stop::Unresolved)
            }
        };
        customers::write(&self.client, &rec).await?;
        Ok(match stop {
            None => Taken::Next(rec),
            Some(stop) => Taken::Stop(rec, stop),
        })
    }

    async fn create_customer(&self, rec: &CustomerRecord, now: u32) -> Result<String, CallError> {
        let tenant = &rec.tenant_id;
        if now.saturating_sub(rec.intent_at) > IDEMPOTENCY_WINDOW_SECS {
            // The key may be forgotten: look for the customer the first call may have made.
            let query = crate::stripe::Form::new().with(
                "query",
                format!("metadata['tenantId']:'{}'", tenant.replace('\'', "\\'")),
            );
            let found = self.caller.get("/customers/search", &query).await?;
            let existing = found["data"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["metadata"]["tenantId"].as_str() == Some(tenant.as_str()));
            if let Some(id) = existing.and_then(|c| c["id"].as_str()) {
                return Ok(id.to_owned());
            }
        }
        let mut parts = vec!["tollgate-customer".to_owned(), tenant.clone()];
        if rec.generation > 0 {
            parts.push(format!("g{}", rec.generation));
        }
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let form = crate::stripe::Form::new()
            .with("description", format!("Tollgate tenant {tenant}"))
            .with("metadata[tenantId]", tenant.clone());
        let created = self.caller.post("/customers", &form, &idempotency_key(&parts)).await?;
        created["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| CallError::Unresolved {
                reason: "stripe answered a customer without id".to_owned(),
            })
    }

    async fn subscribe(&self, rec: &CustomerRecord, now: u32) -> Result<serde_json::Value, CallError> {
        let generation = format!("g{}", rec.generation);
        if now.saturating_sub(rec.intent_at) > IDEMPOTENCY_WINDOW_SECS {
            let query = crate::stripe::Form::new()
                .with("customer", rec.stripe_customer_id.clone())
                .with("status", "all")
                .with("limit", "100");
            let found = self.caller.get("/subscriptions", &query).await?;
            let existing = found["data"].as_array().into_iter().flatten().find(|s| {
                s["metadata"]["tenantId"].as_str() == Some(rec.tenant_id.as_str())
                    && s["metadata"]["tollgate_generation"].as_str() == Some(generation.as_str())
            });
            if let Some(sub) = existing {
                return Ok(sub.clone());
            }
        }
        let key = idempotency_key(&[
            "tollgate-subscription",
            &rec.tenant_id,
            &rec.stripe_customer_id,
            &generation,
        ]);
        let mut form = crate::stripe::Form::new().with("customer", rec.stripe_customer_id.clone());
        for (i, price) in rec.price_ids.iter().enumerate() {
            form.push(format!("items[{i}][price]"), price.clone());
        }
        // Periods are calendar months, as Tollgate's invoice preview and reconcile count them.
        form.push("billing_cycle_anchor_config[day_of_month]", "1");
        form.push("collection_method", self.settings.collection_method.as_str());
        if self.settings.collection_method == CollectionMethod::SendInvoice {
            form.push("days_until_due", self.settings.days_until_due.to_string());
        }
        form.push("metadata[tenantId]", rec.tenant_id.clone());
        form.push("metadata[tollgate_plan]", rec.plan.clone());
        form.push("metadata[tollgate_generation]", generation);
        self.caller.post("/subscriptions", &form, &key).await
    }
}

enum Taken {
    /// Decide again.
    Next(CustomerRecord),
    /// Nothing more for this tenant in this pass.
    Done(CustomerRecord),
    /// A call failed.
    Stop(CustomerRecord, Stop),
}

enum Stop {
    Refused,
    Unresolved,
}

fn item_ids(sub: &serde_json::Value) -> Vec<String> {
    sub["items"]["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["id"].as_str().map(str::to_owned))
        .collect()
}

/// The current period's end: on the items since Stripe's 2025-03 API, on the subscription
/// before.
fn period_end(sub: &serde_json::Value) -> u32 {
    sub["items"]["data"][0]["current_period_end"]
        .as_u64()
        .or_else(|| sub["current_period_end"].as_u64())
        .unwrap_or(0)
        .min(u64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests;
