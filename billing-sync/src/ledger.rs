//! The billing ledger in ClickHouse: what was pushed to Stripe, per tenant, meter, window and
//! revision, and its migrations.
//!
//! In: rows from the sync pass. Out: `billing_ledger`, read back by the next pass (what is
//! already accounted for, what is still pending) and by `reconcile`.
//!
//! A revision's row is written `pending` (with its value and identifier) before its push and
//! rewritten with the outcome after it; `ReplacingMergeTree(row_version)` keeps the latest
//! and queries read it with `FINAL`. A crash between push and outcome leaves `pending`, and
//! the next pass re-sends exactly that event: same identifier, value and idempotency key.

use clickhouse::Client;
use serde::{Deserialize, Serialize};
use tollgate_runtime::clickhouse::OnCluster;

pub const TABLE: &str = "billing_ledger";
const MIGRATIONS_TABLE: &str = "billing_migrations";

/// Versioned, idempotent migrations, applied in order; a version is never edited once released.
const MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "billing_ledger",
        "CREATE TABLE IF NOT EXISTS billing_ledger (
        tenant_id String,
        stripe_customer_id String,
        meter String,
        event_name String,
        window_start DateTime,
        window_end DateTime,
        revision UInt32,
        value Int64,
        window_total Int64,
        identifier String,
        status String,
        stripe_ref String,
        error String,
        attempts UInt32,
        created_at DateTime,
        updated_at DateTime,
        row_version UInt64
    ) ENGINE = ReplacingMergeTree(row_version)
    PARTITION BY toYYYYMM(window_start)
    ORDER BY (tenant_id, meter, window_start, window_end, revision)",
    ),
    (2, "billing_customers", crate::customers::CREATE_TABLE),
    (3, "billing_window_lengths", crate::schedule::CREATE_TABLE),
    (4, "billing_alerts", crate::alerts::store::CREATE_TABLE),
];

/// A revision's state.
pub mod status {
    /// Written before the push; still here after it means the outcome is unknown.
    pub const PENDING: &str = "pending";
    /// Stripe accepted the meter event.
    pub const PUSHED: &str = "pushed";
    /// Stripe refused it (4xx): `error` says why; not retried.
    pub const FAILED: &str = "failed";
    /// The tenant has no Stripe customer id: usage kept, not billed.
    pub const UNBILLABLE: &str = "unbillable";
    /// Late units Stripe no longer accepts (older than 35 days), or a negative difference:
    /// recorded for finance, not pushed.
    pub const ADJUSTMENT: &str = "adjustment";
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    // Fields not named `source`: the message already says it, and `{:#}` would say it twice.
    #[error("ledger migration {version} ({name}): {error}")]
    Migration {
        version: u32,
        name: &'static str,
        error: clickhouse::error::Error,
    },
    #[error("ledger {what}: {error}")]
    Query {
        what: &'static str,
        error: clickhouse::error::Error,
    },
}

fn query_err(what: &'static str) -> impl FnOnce(clickhouse::error::Error) -> LedgerError {
    move |error| LedgerError::Query { what, error }
}

/// Applies the migrations not applied yet on one server. Safe to run from several processes
/// at once.
pub async fn migrate(client: &Client) -> Result<(), LedgerError> {
    migrate_on(client, None).await
}

/// [`migrate`], on every replica of a cluster when `on_cluster` says so (the statements
/// rewritten by [`OnCluster::rewrite`], the migrations table replicated too): an instance on
/// any replica then reads the ledger the active one wrote.
pub async fn migrate_on(client: &Client, on_cluster: Option<OnCluster<'_>>) -> Result<(), LedgerError> {
    const ATTEMPTS: u64 = 5;
    let mut attempt = 1;
    loop {
        match migrate_once(client, on_cluster).await {
            // On replicas a quorum insert is refused while another instance's (starting at
            // the same time) is still being replicated (code 286); it settles by itself.
            Err(err) if attempt < ATTEMPTS && err.to_string().contains("Code: 286") => {
                tracing::warn!(error = %err, attempt, "ledger migration met another instance's; again");
                tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
                attempt += 1;
            }
            done => return done,
        }
    }
}

async fn migrate_once(client: &Client, on_cluster: Option<OnCluster<'_>>) -> Result<(), LedgerError> {
    let statement = |sql: &str| match on_cluster {
        Some(cluster) => cluster.rewrite(sql, &[]),
        None => sql.to_owned(),
    };
    client
        .query(&statement(&format!(
            "CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version UInt32, name String, applied_at DateTime) \
             ENGINE = MergeTree ORDER BY version"
        )))
        .execute()
        .await
        .map_err(|error| LedgerError::Migration {
            version: 0,
            name: MIGRATIONS_TABLE,
            error,
        })?;
    let applied: Vec<u32> = client
        .query(&format!("SELECT version FROM {MIGRATIONS_TABLE}"))
        .fetch_all()
        .await
        .map_err(query_err("migrations read"))?;
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        let failed = |error| LedgerError::Migration { version, name, error };
        client.query(&statement(sql)).execute().await.map_err(failed)?;
        client
            .query(&format!(
                "INSERT INTO {MIGRATIONS_TABLE} (version, name, applied_at) VALUES (?, ?, now())"
            ))
            .bind(version)
            .bind(name)
            .execute()
            .await
            .map_err(failed)?;
    }
    Ok(())
}

/// One ledger row: one revision of one (tenant, meter, window), in one state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct LedgerRow {
    pub tenant_id: String,
    pub stripe_customer_id: String,
    pub meter: String,
    pub event_name: String,
    pub window_start: u32,
    pub window_end: u32,
    pub revision: u32,
    /// Units this revision accounts for: the difference from the revisions before it.
    pub value: i64,
    /// The window's billable units in ClickHouse when this revision was made.
    pub window_total: i64,
    pub identifier: String,
    pub status: String,
    /// What Stripe answered: the event's identifier and creation time.
    pub stripe_ref: String,
    pub error: String,
    pub attempts: u32,
    pub created_at: u32,
    pub updated_at: u32,
    pub row_version: u64,
}

/// A version for a row written now: nanoseconds, strictly increasing within the process, so
/// an outcome always replaces the `pending` row written before it.
pub fn next_row_version() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// Inserts rows in one INSERT (one part per month partition touched).
pub async fn write(client: &Client, rows: &[LedgerRow]) -> Result<(), LedgerError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client.insert::<LedgerRow>(TABLE).await.map_err(query_err("insert"))?;
    for row in rows {
        insert.write(row).await.map_err(query_err("insert"))?;
    }
    insert.end().await.map_err(query_err("insert"))
}

/// Per window start and meter: units accounted for (every status but `pending`) and how many
/// revisions are pending, for windows starting in `[from, to)`.
#[derive(Debug, Clone, Deserialize, clickhouse::Row)]
pub struct WindowAccount {
    pub window_start: u32,
    pub meter: String,
    pub accounted: i64,
    pub pending: u64,
}

pub async fn window_accounts(client: &Client, from: u32, to: u32) -> Result<Vec<WindowAccount>, LedgerError> {
    client
        .query(
            "SELECT toUInt32(window_start) AS ws, meter, \
                    sumIf(value, status != 'pending') AS accounted, \
                    countIf(status = 'pending') AS pending \
             FROM billing_ledger FINAL \
             WHERE window_start >= toDateTime(?) AND window_start < toDateTime(?) \
             GROUP BY ws, meter",
        )
        .bind(from)
        .bind(to)
        .fetch_all()
        .await
        .map_err(query_err("window accounts"))
}

/// Per tenant and meter in one window: units accounted for and the latest revision, whole
/// (a pending one is re-sent as it was).
#[derive(Debug, Clone, Deserialize, clickhouse::Row)]
pub struct TenantAccount {
    pub tenant_id: String,
    pub meter: String,
    pub accounted: i64,
    /// The latest revision: (revision, status, value, identifier, stripe_customer_id,
    /// attempts, window_total).
    pub last: (u32, String, i64, String, String, u32, i64),
}

impl TenantAccount {
    pub fn last_revision(&self) -> u32 {
        self.last.0
    }
    pub fn last_status(&self) -> &str {
        &self.last.1
    }
}

pub async fn tenant_accounts(
    client: &Client,
    window_start: u32,
    window_end: u32,
) -> Result<Vec<TenantAccount>, LedgerError> {
    client
        .query(
            "SELECT tenant_id, meter, \
                    sumIf(value, status != 'pending') AS accounted, \
                    argMax((revision, status, value, identifier, stripe_customer_id, attempts, window_total), revision) AS last \
             FROM billing_ledger FINAL \
             WHERE window_start = toDateTime(?) AND window_end = toDateTime(?) \
             GROUP BY tenant_id, meter",
        )
        .bind(window_start)
        .bind(window_end)
        .fetch_all()
        .await
        .map_err(query_err("tenant accounts"))
}

/// Per tenant, meter and status: units in windows starting in `[from, to)` (reconcile).
#[derive(Debug, Clone, Deserialize, clickhouse::Row)]
pub struct StatusTotal {
    pub tenant_id: String,
    pub meter: String,
    pub status: String,
    pub units: i64,
}

pub async fn status_totals(client: &Client, from: u32, to: u32) -> Result<Vec<StatusTotal>, LedgerError> {
    client
        .query(
            "SELECT tenant_id, meter, status, sum(value) AS units \
             FROM billing_ledger FINAL \
             WHERE window_start >= toDateTime(?) AND window_start < toDateTime(?) \
             GROUP BY tenant_id, meter, status",
        )
        .bind(from)
        .bind(to)
        .fetch_all()
        .await
        .map_err(query_err("status totals"))
}
