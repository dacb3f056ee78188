//! Month-to-date usage from ClickHouse into the [`SpendLedger`], for every budgeted tenant.
//!
//! In: the directory's budgeted tenants; meter-consumer's `usage_events` (raw, each event
//! once: what billing-sync bills from). Out: [`SpendLedger::apply_counted`] every
//! `refresh_interval_ms`, and at once when a tenant has no count yet (a cap just set, a new
//! month). A failed read keeps the last count (the cap still holds on what is known) and is
//! logged once per attempt, so at most once per interval.
//!
//! The query leaves out this process's own events (its `service.id`, timed at or after it
//! started): the ledger counts those itself, without ClickHouse's lag. SQL kept to what
//! Debian's ClickHouse 18.16 and current releases both run (`ARRAY JOIN` over the `units`
//! nested column, `has` over a bound array; no alias shadows a column, which 18.16 resolves
//! differently); `usage_events` is ordered by tenant and time, so
//! the tenant and month filters read only the budgeted tenants' parts of the month.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{Month, SpendLedger};
use crate::directory::Directory;

/// How often the loop looks for tenants without a count (a cap just set).
const TICK: Duration = Duration::from_millis(200);

#[derive(Debug, Deserialize, clickhouse::Row)]
struct CountedRow {
    tenant_id: String,
    meter: String,
    total: i64,
}

/// What the refresh needs to leave this process's own events out.
pub struct Own {
    pub gateway_id: String,
    pub started_ms: i64,
}

/// Refreshes the ledger until the process ends.
pub async fn run(
    ledger: Arc<SpendLedger>,
    directory: Arc<RwLock<Directory>>,
    client: clickhouse::Client,
    interval: Duration,
    own: Own,
) {
    let mut last: Option<Instant> = None;
    loop {
        let tenants = directory.read().expect("directory lock").budgeted_tenants();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let due = last.is_none_or(|at| at.elapsed() >= interval) || ledger.any_unknown(&tenants, now_ms);
        if due && !tenants.is_empty() {
            last = Some(Instant::now());
            let month = Month::of(now_ms);
            match counted(&client, &tenants, month, &own).await {
                Ok(rows) => ledger.apply_counted(month, &tenants, &rows),
                Err(err) => {
                    tracing::warn!(error = %err, "spend caps: month-to-date usage not read from clickhouse; keeping the last count")
                }
            }
        }
        tokio::time::sleep(TICK.min(interval)).await;
    }
}

/// Billable units per tenant and meter in `month`, without this process's events.
pub async fn counted(
    client: &clickhouse::Client,
    tenants: &[String],
    month: Month,
    own: &Own,
) -> Result<Vec<(String, String, i64)>, clickhouse::error::Error> {
    let rows: Vec<CountedRow> = client
        .query(
            "SELECT tenant_id, units.meter AS meter, toInt64(sum(units.value)) AS total \
             FROM usage_events ARRAY JOIN units \
             WHERE billable = 1 AND has(?, tenant_id) \
               AND time >= toDateTime(?) AND time < toDateTime(?) \
               AND NOT (gateway_id = ? AND toUInt64(time) * 1000 + time_ms >= ?) \
             GROUP BY tenant_id, meter",
        )
        .bind(tenants)
        .bind(seconds(month.start_ms()))
        .bind(seconds(month.end_ms()))
        .bind(&own.gateway_id)
        .bind(u64::try_from(own.started_ms).unwrap_or(0))
        .fetch_all()
        .await?;
    Ok(rows.into_iter().map(|r| (r.tenant_id, r.meter, r.total)).collect())
}

/// Unix seconds as ClickHouse's `DateTime` takes them (unsigned 32-bit).
fn seconds(ms: i64) -> u32 {
    u32::try_from(ms / 1000).unwrap_or(u32::MAX)
}
