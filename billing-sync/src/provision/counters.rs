//! Provisioning's counters and gauges: Stripe objects made, adopted and changed, failures,
//! and tenants per provisioning status after each pass.

use std::collections::BTreeMap;

use metrics::{Counter, Gauge};

use crate::customers::CustomerStatus;

/// Counters and gauges on `/metrics`; no tenant labels (per-tenant state is in ClickHouse).
#[derive(Clone)]
pub struct ProvisionMetrics {
    pub customers_created: Counter,
    pub customers_adopted: Counter,
    pub subscriptions_created: Counter,
    pub subscriptions_updated: Counter,
    pub subscriptions_cancelled: Counter,
    pub write_backs: Counter,
    pub failures: Counter,
    pub unresolved: Counter,
    /// Tenants per status after the last pass.
    pub tenants: BTreeMap<&'static str, Gauge>,
}

const STATUSES: [CustomerStatus; 9] = [
    CustomerStatus::CreatingCustomer,
    CustomerStatus::Customer,
    CustomerStatus::Subscribing,
    CustomerStatus::Active,
    CustomerStatus::Updating,
    CustomerStatus::Cancelling,
    CustomerStatus::Cancelled,
    CustomerStatus::NoPlan,
    CustomerStatus::Failed,
];

impl ProvisionMetrics {
    pub fn noop() -> Self {
        Self {
            customers_created: Counter::noop(),
            customers_adopted: Counter::noop(),
            subscriptions_created: Counter::noop(),
            subscriptions_updated: Counter::noop(),
            subscriptions_cancelled: Counter::noop(),
            write_backs: Counter::noop(),
            failures: Counter::noop(),
            unresolved: Counter::noop(),
            tenants: BTreeMap::new(),
        }
    }

    pub fn register(recorder: &impl metrics::Recorder) -> Self {
        metrics::with_local_recorder(recorder, || Self {
            customers_created: metrics::counter!("billing_sync_customers_total", "outcome" => "created"),
            customers_adopted: metrics::counter!("billing_sync_customers_total", "outcome" => "adopted"),
            subscriptions_created: metrics::counter!("billing_sync_subscriptions_total", "action" => "created"),
            subscriptions_updated: metrics::counter!("billing_sync_subscriptions_total", "action" => "updated"),
            subscriptions_cancelled: metrics::counter!("billing_sync_subscriptions_total", "action" => "cancelled"),
            write_backs: metrics::counter!("billing_sync_customer_write_backs_total"),
            failures: metrics::counter!("billing_sync_provisioning_failures_total", "kind" => "refused"),
            unresolved: metrics::counter!("billing_sync_provisioning_failures_total", "kind" => "unresolved"),
            tenants: STATUSES
                .iter()
                .map(|s| {
                    (
                        s.as_str(),
                        metrics::gauge!("billing_sync_tenants", "status" => s.as_str()),
                    )
                })
                .collect(),
        })
    }
}
