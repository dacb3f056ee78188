//! Billable usage and Stripe customers, read from the meter consumer's ClickHouse tables.
//!
//! In: the consumer's rollups `usage_meter_hour` and `usage_meter_minute` (each exactly once:
//! every rollup table has its own watermark, see meter-consumer's `sink`), `usage_events`
//! (raw, each event once: what [`Source::Raw`] reads, for windows no rollup bucket fits, and
//! the audit source `reconcile` checks the ledger against), `usage_minutes_touched` (the
//! minutes each consumer batch touched, with the server's insert time) and `consumers`
//! (`ReplacingMergeTree(version)`, read with `FINAL`, `deleted = 1` rows are gone). Out: units
//! per window and meter, per tenant and meter, the minutes touched since a time, and each
//! tenant's Stripe customer id.
//!
//! A pass sums a window from the coarsest rollup whose buckets tile it: an hour window
//! reads a row per tenant, meter and batch of the hour instead of every event of it.

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

/// Where billable units are summed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `usage_events`: every event (reconcile's audit source).
    Raw,
    /// `usage_meter_minute`: for ranges on whole minutes.
    Minute,
    /// `usage_meter_hour`: for ranges on whole hours.
    Hour,
}

impl Source {
    /// The coarsest rollup whose buckets tile `[from, to)` cut into windows of `window_secs`.
    pub fn for_range(window_secs: u64, from: u32, to: u32) -> Self {
        let tiles = |bucket: u64| {
            window_secs.is_multiple_of(bucket)
                && u64::from(from).is_multiple_of(bucket)
                && u64::from(to).is_multiple_of(bucket)
        };
        if tiles(3_600) {
            Source::Hour
        } else if tiles(60) {
            Source::Minute
        } else {
            Source::Raw
        }
    }

    /// (table, time column, billable units expression, meter column, row filter).
    fn sql(self) -> (&'static str, &'static str, &'static str, &'static str, &'static str) {
        match self {
            Source::Raw => (
                "usage_events ARRAY JOIN units",
                "time",
                "units.value",
                "units.meter",
                "billable = 1 AND ",
            ),
            Source::Minute => ("usage_meter_minute", "minute", "billable_units", "meter", ""),
            Source::Hour => ("usage_meter_hour", "hour", "billable_units", "meter", ""),
        }
    }
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
    let (table, time, value, meter, filter) = Source::for_range(window_secs, from, to).sql();
    client
        .query(&format!(
            "SELECT toUInt32(intDiv(toUInt32({time}), ?) * ?) AS ws, {meter} AS m, sum({value}) AS u \
             FROM {table} \
             WHERE {filter}{time} >= toDateTime(?) AND {time} < toDateTime(?) AND has(?, {meter}) \
             GROUP BY ws, m"
        ))
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

/// Billable units per tenant and meter for events in `[from, to)`, summed from `source`.
pub async fn per_tenant(
    client: &Client,
    source: Source,
    from: u32,
    to: u32,
    meters: &[String],
) -> Result<Vec<TenantUsage>, UsageError> {
    let (table, time, value, meter, filter) = source.sql();
    client
        .query(&format!(
            "SELECT tenant_id, {meter} AS m, sum({value}) AS u \
             FROM {table} \
             WHERE {filter}{time} >= toDateTime(?) AND {time} < toDateTime(?) AND has(?, {meter}) \
             GROUP BY tenant_id, m"
        ))
        .bind(from)
        .bind(to)
        .bind(meters)
        .fetch_all()
        .await
        .map_err(err("per tenant"))
}

/// The server's clock: what `usage_minutes_touched.inserted_at` is stamped with.
pub async fn server_now(client: &Client) -> Result<u32, UsageError> {
    client
        .query("SELECT toUInt32(now())")
        .fetch_one()
        .await
        .map_err(err("server time"))
}

/// Distinct minutes in `[from, to)` that a consumer batch inserted at or after `since`
/// (server time) touched.
pub async fn minutes_touched(client: &Client, since: u32, from: u32, to: u32) -> Result<Vec<u32>, UsageError> {
    client
        .query(
            "SELECT DISTINCT toUInt32(minute) FROM usage_minutes_touched \
             WHERE inserted_at >= toDateTime(?) AND minute >= toDateTime(?) AND minute < toDateTime(?)",
        )
        .bind(since)
        .bind(from)
        .bind(to)
        .fetch_all()
        .await
        .map_err(err("minutes touched"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarsest_rollup_that_tiles_the_range() {
        assert_eq!(Source::for_range(3_600, 7_200, 14_400), Source::Hour);
        assert_eq!(Source::for_range(86_400, 0, 86_400), Source::Hour);
        assert_eq!(Source::for_range(60, 120, 180), Source::Minute);
        assert_eq!(Source::for_range(1_800, 1_800, 3_600), Source::Minute);
        // 80 s windows straddle minutes: only raw events can be cut there.
        assert_eq!(Source::for_range(80, 160, 240), Source::Raw);
    }
}
