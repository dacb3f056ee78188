//! `billing_customers`: each tenant's Stripe customer and subscription, and the step
//! provisioning is at, in ClickHouse.
//!
//! In: records from provisioning. Out: the table (`ReplacingMergeTree(row_version)` keyed by
//! tenant, read with `FINAL`), read back at every pass. A step's intent is written before its
//! Stripe call, with what the call needs (its idempotency key's parts, the price ids), so a
//! crash anywhere leaves a row from which the same call, same key, is sent again.

use clickhouse::Client;
use serde::{Deserialize, Serialize};

use crate::ledger::{next_row_version, LedgerError};

pub const TABLE: &str = "billing_customers";

pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS billing_customers (
        tenant_id String,
        stripe_customer_id String,
        customer_source String,
        subscription_id String,
        plan String,
        price_ids Array(String),
        item_ids Array(String),
        status String,
        last_error String,
        generation UInt32,
        revision UInt32,
        intent_at DateTime,
        period_end DateTime,
        attempts UInt32,
        updated_at DateTime,
        row_version UInt64
    ) ENGINE = ReplacingMergeTree(row_version) ORDER BY tenant_id";

/// Where a tenant's provisioning is. `*ing` states are intents: the call may or may not have
/// reached Stripe, and is sent again with the same idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomerStatus {
    /// Creating the customer.
    CreatingCustomer,
    /// The customer exists; no subscription yet.
    Customer,
    /// Creating the subscription to `price_ids`.
    Subscribing,
    /// Subscribed to `plan`'s `price_ids`.
    Active,
    /// Moving the subscription's items to `plan`'s `price_ids`.
    Updating,
    /// Setting the subscription to cancel at period end (the tenant's last consumer is gone).
    Cancelling,
    /// Cancels at period end.
    Cancelled,
    /// The tenant's plan has no prices (no plan, or one the catalogue does not have):
    /// customer, no subscription.
    NoPlan,
    /// Stripe refused the step (`last_error`); tried again after `retry_failed_secs`.
    Failed,
}

impl CustomerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CustomerStatus::CreatingCustomer => "creating_customer",
            CustomerStatus::Customer => "customer",
            CustomerStatus::Subscribing => "subscribing",
            CustomerStatus::Active => "active",
            CustomerStatus::Updating => "updating",
            CustomerStatus::Cancelling => "cancelling",
            CustomerStatus::Cancelled => "cancelled",
            CustomerStatus::NoPlan => "no_plan",
            CustomerStatus::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Self {
        serde_json::from_value(serde_json::Value::String(text.to_owned())).unwrap_or(CustomerStatus::Failed)
    }
}

/// Whether the customer was created by billing-sync or given by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomerSource {
    #[default]
    Created,
    Operator,
}

impl CustomerSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CustomerSource::Created => "created",
            CustomerSource::Operator => "operator",
        }
    }
}

/// One tenant's record, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerRecord {
    pub tenant_id: String,
    pub stripe_customer_id: String,
    pub customer_source: CustomerSource,
    pub subscription_id: String,
    /// The plan subscribed to, or being moved to while `Updating` / `Subscribing`.
    pub plan: String,
    pub price_ids: Vec<String>,
    /// The subscription's items (what a plan change deletes).
    pub item_ids: Vec<String>,
    pub status: CustomerStatus,
    pub last_error: String,
    /// Subscriptions created for this tenant before the current one (part of keys).
    pub generation: u32,
    /// Updates of the current subscription so far (part of the update key).
    pub revision: u32,
    /// When the pending step was first sent: Stripe keeps idempotency keys 24 hours.
    pub intent_at: u32,
    /// End of the subscription's current period, as Stripe last said.
    pub period_end: u32,
    pub attempts: u32,
    pub updated_at: u32,
}

impl CustomerRecord {
    pub fn new(tenant_id: &str) -> Self {
        Self {
            tenant_id: tenant_id.to_owned(),
            stripe_customer_id: String::new(),
            customer_source: CustomerSource::Created,
            subscription_id: String::new(),
            plan: String::new(),
            price_ids: Vec::new(),
            item_ids: Vec::new(),
            status: CustomerStatus::CreatingCustomer,
            last_error: String::new(),
            generation: 0,
            revision: 0,
            intent_at: 0,
            period_end: 0,
            attempts: 0,
            updated_at: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, clickhouse::Row)]
struct CustomerRow {
    tenant_id: String,
    stripe_customer_id: String,
    customer_source: String,
    subscription_id: String,
    plan: String,
    price_ids: Vec<String>,
    item_ids: Vec<String>,
    status: String,
    last_error: String,
    generation: u32,
    revision: u32,
    intent_at: u32,
    period_end: u32,
    attempts: u32,
    updated_at: u32,
    row_version: u64,
}

impl From<&CustomerRecord> for CustomerRow {
    fn from(r: &CustomerRecord) -> Self {
        Self {
            tenant_id: r.tenant_id.clone(),
            stripe_customer_id: r.stripe_customer_id.clone(),
            customer_source: r.customer_source.as_str().to_owned(),
            subscription_id: r.subscription_id.clone(),
            plan: r.plan.clone(),
            price_ids: r.price_ids.clone(),
            item_ids: r.item_ids.clone(),
            status: r.status.as_str().to_owned(),
            // Never a key: Stripe errors pass through `stripe::redact` before they get here.
            last_error: r.last_error.clone(),
            generation: r.generation,
            revision: r.revision,
            intent_at: r.intent_at,
            period_end: r.period_end,
            attempts: r.attempts,
            updated_at: r.updated_at,
            row_version: next_row_version(),
        }
    }
}

impl From<CustomerRow> for CustomerRecord {
    fn from(r: CustomerRow) -> Self {
        Self {
            tenant_id: r.tenant_id,
            stripe_customer_id: r.stripe_customer_id,
            customer_source: if r.customer_source == "operator" {
                CustomerSource::Operator
            } else {
                CustomerSource::Created
            },
            subscription_id: r.subscription_id,
            plan: r.plan,
            price_ids: r.price_ids,
            item_ids: r.item_ids,
            status: CustomerStatus::parse(&r.status),
            last_error: r.last_error,
            generation: r.generation,
            revision: r.revision,
            intent_at: r.intent_at,
            period_end: r.period_end,
            attempts: r.attempts,
            updated_at: r.updated_at,
        }
    }
}

/// Every tenant's latest record.
pub async fn read_all(client: &Client) -> Result<Vec<CustomerRecord>, LedgerError> {
    let rows: Vec<CustomerRow> = client
        .query("SELECT ?fields FROM billing_customers FINAL ORDER BY tenant_id")
        .fetch_all()
        .await
        .map_err(|error| LedgerError::Query {
            what: "billing customers read",
            error,
        })?;
    Ok(rows.into_iter().map(CustomerRecord::from).collect())
}

/// Writes one record; it replaces the tenant's earlier ones.
pub async fn write(client: &Client, record: &CustomerRecord) -> Result<(), LedgerError> {
    let failed = |error| LedgerError::Query {
        what: "billing customers write",
        error,
    };
    let mut insert = client.insert::<CustomerRow>(TABLE).await.map_err(failed)?;
    insert.write(&CustomerRow::from(record)).await.map_err(failed)?;
    insert.end().await.map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_their_text() {
        for status in [
            CustomerStatus::CreatingCustomer,
            CustomerStatus::Customer,
            CustomerStatus::Subscribing,
            CustomerStatus::Active,
            CustomerStatus::Updating,
            CustomerStatus::Cancelling,
            CustomerStatus::Cancelled,
            CustomerStatus::NoPlan,
            CustomerStatus::Failed,
        ] {
            assert_eq!(CustomerStatus::parse(status.as_str()), status);
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
    }
}
