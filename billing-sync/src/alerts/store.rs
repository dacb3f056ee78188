//! `billing_alerts` in ClickHouse: every alert raised, recorded before it is delivered, and
//! its delivery state.
//!
//! In: alerts from a check ([`record`], as `pending`), delivery outcomes ([`write`]). Out: the
//! alerts already raised for the current periods ([`recorded`], so none is raised twice) and
//! those not delivered yet ([`pending`], re-sent with the same id and body).
//!
//! One row per alert key (tenant, kind, subject, period, threshold), its latest version kept
//! by `ReplacingMergeTree(row_version)` and read with `FINAL`. The row is written `pending`
//! with its `webhook_id` and exact `payload` before the first attempt, so a crash at any
//! point re-sends the same id and bytes; two checks recording the same alert write the same
//! id and payload's key, and the later row replaces the earlier. No secret is stored: the
//! payload is the body the receiver sees, the error a status or a transport message.

use clickhouse::Client;
use serde::{Deserialize, Serialize};

use super::crossing::{AlertKey, Kind};
use crate::ledger::{next_row_version, LedgerError};

pub const TABLE: &str = "billing_alerts";

pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS billing_alerts (
        tenant_id String,
        kind String,
        subject String,
        period String,
        threshold UInt32,
        webhook_id String,
        observed Int64,
        limit_value Int64,
        payload String,
        status String,
        attempts UInt32,
        error String,
        created_at DateTime,
        updated_at DateTime,
        row_version UInt64
    ) ENGINE = ReplacingMergeTree(row_version)
    ORDER BY (tenant_id, kind, subject, period, threshold)";

/// An alert's delivery state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Recorded; no 2xx yet (or the outcome was lost in a crash).
    Pending,
    /// The receiver answered 2xx.
    Delivered,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, clickhouse::Row)]
pub struct AlertRow {
    pub tenant_id: String,
    pub kind: String,
    pub subject: String,
    pub period: String,
    pub threshold: u32,
    pub webhook_id: String,
    /// The total that crossed the threshold (minor units, or the limit's units).
    pub observed: i64,
    /// The cap or the quota's allowance.
    pub limit_value: i64,
    /// The webhook body, exactly as delivered.
    pub payload: String,
    /// `pending` or `delivered`.
    pub status: String,
    /// Attempts made so far, over every check.
    pub attempts: u32,
    pub error: String,
    pub created_at: u32,
    pub updated_at: u32,
    pub row_version: u64,
}

impl AlertRow {
    pub fn key(&self) -> Option<AlertKey> {
        Some(AlertKey {
            tenant_id: self.tenant_id.clone(),
            kind: Kind::parse(&self.kind)?,
            subject: self.subject.clone(),
            period: self.period.clone(),
            threshold: self.threshold,
        })
    }

    pub fn status(&self) -> Status {
        if self.status == "delivered" {
            Status::Delivered
        } else {
            Status::Pending
        }
    }

    /// The row after a delivery: attempts added, status and error set.
    pub fn after(&self, status: Status, attempts: u32, error: &str, now: u32) -> Self {
        Self {
            status: status_text(status).to_owned(),
            attempts: self.attempts.saturating_add(attempts),
            error: error.to_owned(),
            updated_at: now,
            row_version: next_row_version(),
            ..self.clone()
        }
    }
}

pub fn status_text(status: Status) -> &'static str {
    match status {
        Status::Pending => "pending",
        Status::Delivered => "delivered",
    }
}

fn query_err(what: &'static str) -> impl FnOnce(clickhouse::error::Error) -> LedgerError {
    move |error| LedgerError::Query { what, error }
}

/// Alerts raised for any of `periods` (pending or delivered).
// Columns named, not `?fields`: tests/tests/clickhouse_sql.rs matches the literal text sent.
pub async fn recorded(client: &Client, periods: &[String]) -> Result<Vec<AlertRow>, LedgerError> {
    client
        .query(
            "SELECT tenant_id, kind, subject, period, threshold, webhook_id, observed, limit_value, \
               payload, status, attempts, error, created_at, updated_at, row_version \
             FROM billing_alerts FINAL WHERE has(?, period) \
             ORDER BY tenant_id, kind, subject, period, threshold",
        )
        .bind(periods)
        .fetch_all()
        .await
        .map_err(query_err("alerts read"))
}

/// Alerts not delivered yet, oldest first, whatever their period.
pub async fn pending(client: &Client) -> Result<Vec<AlertRow>, LedgerError> {
    client
        .query(
            "SELECT tenant_id, kind, subject, period, threshold, webhook_id, observed, limit_value, \
               payload, status, attempts, error, created_at, updated_at, row_version \
             FROM billing_alerts FINAL WHERE status = 'pending' ORDER BY created_at, webhook_id",
        )
        .fetch_all()
        .await
        .map_err(query_err("pending alerts read"))
}

/// Writes `rows` in one INSERT: new alerts (`pending`) or their delivery outcomes.
pub async fn write(client: &Client, rows: &[AlertRow]) -> Result<(), LedgerError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client
        .insert::<AlertRow>(TABLE)
        .await
        .map_err(query_err("alerts insert"))?;
    for row in rows {
        insert.write(row).await.map_err(query_err("alerts insert"))?;
    }
    insert.end().await.map_err(query_err("alerts insert"))
}
