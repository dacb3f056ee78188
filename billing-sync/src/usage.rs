//! Billable usage and Stripe customers, read from the meter consumer's ClickHouse tables.
//!
//! In: `usage_events` (raw, each event once: the source of truth for billing) and `consumers`
//! (`ReplacingMergeTree(version)`, read with `FINAL`, `deleted = 1` rows are gone). Out: units
//! per window and meter, per tenant and meter, and each tenant's Stripe customer id.

use std::collections::HashMap;

use clickhouse::Client;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
#[error("usage {what}: {error}")]
pub struct UsageError {
    what: &'static str,
    // Not `source`: the message already says it, and `{:#}` would say it twice.
    error: clickhouse::error::Error,
}

fn err(what: &'static str) -> impl FnOnce(clickhouse::error::Error) -> UsageError {
    move |error| UsageError { what, error }
}

#[derive(Debug, Clone, Deserialize, clickhouse::Row)]
pub struct WindowUsage {
    pub window_start: u32,
    pub meter: String,
    pub units: i64,
}

/// Billable units per window (of `window_secs`) and meter, for events in `[from, to)`.
pub async fn per_window(
    client: &Client,
    window_secs: u64,
    from: u32,
    to: u32,
    meters: &[String],
) -> Result<Vec<WindowUsage>, UsageError> {
    client
        .query(
            "SELECT toUInt32(intDiv(toUInt32(time), ?) * ?) AS ws, units.meter AS m, sum(units.value) AS u \
             FROM usage_events ARRAY JOIN units \
             WHERE billable = 1 AND time >= toDateTime(?) AND time < toDateTime(?) AND has(?, units.meter) \
             GROUP BY ws, m",
        )
        .bind(window_secs)
        .bind(window_secs)
        .bind(from)
        .bind(to)
        .bind(meters)
        .fetch_all()
        .await
        .map_err(err("per window"))
}

#[derive(Debug, Clone, Deserialize, clickhouse::Row)]
pub struct TenantUsage {
    pub tenant_id: String,
    pub meter: String,
    pub units: i64,
}

/// Billable units per tenant and meter for events in `[from, to)`.
pub async fn per_tenant(
    client: &Client,
    from: u32,
    to: u32,
    meters: &[String],
) -> Result<Vec<TenantUsage>, UsageError> {
    client
        .query(
            "SELECT tenant_id, units.meter AS m, sum(units.value) AS u \
             FROM usage_events ARRAY JOIN units \
             WHERE billable = 1 AND time >= toDateTime(?) AND time < toDateTime(?) AND has(?, units.meter) \
             GROUP BY tenant_id, m",
        )
        .bind(from)
        .bind(to)
        .bind(meters)
        .fetch_all()
        .await
        .map_err(err("per tenant"))
}

#[derive(Debug, Clone, Deserialize, clickhouse::Row)]
struct TenantCustomer {
    tenant_id: String,
    stripe_customer_id: String,
}

/// Each tenant's Stripe customer id, from its live consumers (the most recently updated one
/// with an id, when several have one).
pub async fn customers(client: &Client) -> Result<HashMap<String, String>, UsageError> {
    let rows: Vec<TenantCustomer> = client
        .query(
            "SELECT tenant_id, argMax(stripe_customer_id, updated_at) \
             FROM consumers FINAL \
             WHERE deleted = 0 AND stripe_customer_id != '' \
             GROUP BY tenant_id",
        )
        .fetch_all()
        .await
        .map_err(err("customers"))?;
    Ok(rows.into_iter().map(|r| (r.tenant_id, r.stripe_customer_id)).collect())
}
