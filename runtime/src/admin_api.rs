//! The admin API's answers as types: the gateway serializes them, the portal passes them on to
//! tenants, and both OpenAPI documents take their schemas from them, so a documented field
//! cannot differ from a served one.
//!
//! In: values the gateway's admin handlers fill. Out: JSON (camelCase members; times as RFC
//! 3339 UTC with milliseconds) and JSON Schemas (`utoipa::ToSchema`).

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// A consumer: who calls the API with keys, and the metadata that names its tenant and plan.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Consumer {
    pub id: String,
    pub name: String,
    /// Free-form JSON; the identity fields (tenant id, plan, Stripe customer, limit
    /// overrides) are read from it.
    pub metadata: Map<String, Value>,
    pub created_on: String,
    pub updated_on: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerList {
    pub data: Vec<Consumer>,
}

/// An API key as stored: its id and public prefix, never its secret, except `key` in the one
/// answer that creates it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    pub id: String,
    /// The key's first characters, shown so a tenant can tell its keys apart.
    pub prefix: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub created_on: String,
    pub expires_on: Option<String>,
    pub revoked_on: Option<String>,
    /// The whole key, in the answer that creates it and nowhere else, ever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub data: Vec<ApiKey>,
}

/// Where a tenant stands against each limit of its plan, read without charging.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitStatus {
    pub consumer: String,
    pub tenant_id: String,
    pub plan: Option<String>,
    pub backend: LimitBackend,
    /// Whose counters these are: this gateway's alone (local) or every gateway's (Redis).
    pub scope: String,
    /// The shared counters could not be read: the figures are missing or this gateway's.
    pub degraded: bool,
    pub at: String,
    pub limits: Vec<LimitEntry>,
}

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LimitBackend {
    Local,
    Redis,
}

/// One limit and one counter subject. `used` and the figures beside it are missing for a
/// per-address limit (one counter per client address is no tenant's figure).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitEntry {
    pub name: String,
    pub meter: String,
    /// The window: `<seconds>s` (sliding), `day` or `month` (UTC calendar), `inflight`.
    pub window: String,
    pub limit: u64,
    pub subject: LimitSubject,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
}

/// Whose counter an entry is: the tenant's, one key's, or (not counted here) per address.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "by", rename_all = "camelCase")]
pub enum LimitSubject {
    Tenant,
    #[serde(rename_all = "camelCase")]
    Key {
        key_id: String,
    },
    Ip,
}

/// A tenant's monthly spend cap, with this gateway's month-to-date spend.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    pub tenant_id: String,
    /// Minor units of the plan's currency.
    pub monthly_cap: i64,
    /// Percentages of the cap at which the tenant is alerted.
    pub alert_at: Vec<i32>,
    pub updated_on: String,
    /// False when this gateway has no `[budgets]` section: the cap is stored, not enforced.
    pub enforced: bool,
    pub currency: Option<String>,
    pub month_to_date: MonthToDate,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonthToDate {
    /// Minor units spent this month, when spend is tracked.
    pub spent: Option<i64>,
    pub period_start: String,
    pub period_end: String,
}

/// A one-time portal sign-in link for a consumer.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortalLink {
    pub url: String,
    pub expires_at: String,
}

/// Who a redeemed portal link signs in.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortalSession {
    pub consumer: String,
    pub tenant_id: String,
    pub return_url: Option<String>,
    /// The environment segment of this gateway's keys (`live`, `test`).
    pub key_environment: String,
}

/// An RFC 9457 problem: every refusal, of every Tollgate API.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem; its last segment is the stable slug.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A time as these APIs write it: RFC 3339, UTC, milliseconds.
pub fn time(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
