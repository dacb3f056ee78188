//! The typed records: each matches the current (latest) `.avsc` of its record, field for field.
//!
//! Built by the gateway (usage events) and the admin API (consumers, keys); read back by the
//! key index, the meter consumer and billing. Field docs repeat the schema's where it matters.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One request through the gateway, whatever its outcome (`usage_event.v2.avsc`).
///
/// The identity fields (`tenant_id`, `consumer`, `key_id`, `plan`) are `None` for a request
/// that was not authenticated: without a valid key there is no tenant to attribute it to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// UUIDv7, carried as hyphenated text; the deduplication key downstream.
    #[serde(with = "uuid_text")]
    pub event_id: Uuid,
    /// When the request arrived, milliseconds since the Unix epoch (UTC).
    pub timestamp_ms: i64,
    pub tenant_id: Option<String>,
    /// Consumer name.
    pub consumer: Option<String>,
    /// Id of the API key used, never the key itself.
    pub key_id: Option<String>,
    pub plan: Option<String>,
    /// Configured route id; empty when no route matched.
    pub route: String,
    pub method: String,
    /// HTTP status returned to the client.
    pub status: u16,
    pub outcome: Outcome,
    /// Whether `units` count towards the tenant's invoice.
    pub billable: bool,
    /// Units consumed per meter (`requests`, `compute_units`, ...).
    pub units: BTreeMap<String, i64>,
    pub request_bytes: i64,
    pub response_bytes: i64,
    /// Total time in the gateway.
    pub latency_ms: i64,
    /// Time waiting for the upstream; `None` when the request never reached it.
    pub upstream_latency_ms: Option<i64>,
    pub gateway_id: String,
    /// The request's `x-request-id` (added in v2; `None` in events written by v1 writers).
    pub request_id: Option<String>,
}

/// Why a request ended the way it did (Avro enum `dev.tollgate.Outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    Allowed,
    RateLimited,
    Unauthenticated,
    Forbidden,
    UpstreamError,
    /// Bad input: the gateway refused the request before proxying it.
    Rejected,
}

impl Outcome {
    /// Every outcome, in the order of the schema's symbols: an Avro enum is written as its
    /// symbol's position in this list.
    pub const ALL: [Outcome; 6] = [
        Outcome::Allowed,
        Outcome::RateLimited,
        Outcome::Unauthenticated,
        Outcome::Forbidden,
        Outcome::UpstreamError,
        Outcome::Rejected,
    ];

    /// The Avro symbol, e.g. `RATE_LIMITED`: the same text in Kafka, ClickHouse and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "ALLOWED",
            Outcome::RateLimited => "RATE_LIMITED",
            Outcome::Unauthenticated => "UNAUTHENTICATED",
            Outcome::Forbidden => "FORBIDDEN",
            Outcome::UpstreamError => "UPSTREAM_ERROR",
            Outcome::Rejected => "REJECTED",
        }
    }
}

/// Full current state of a consumer on the compacted keys topic (`consumer_record.v1.avsc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerRecord {
    pub id: String,
    pub name: String,
    /// `None` for an operator-owned consumer with no tenant.
    pub tenant_id: Option<String>,
    /// `None` means the gateway's default plan.
    pub plan: Option<String>,
    pub stripe_customer_id: Option<String>,
    /// The consumer's free metadata, serialized JSON.
    pub metadata_json: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Bumped by one on every change.
    pub version: i64,
    /// Actor name that made the change; never a secret.
    pub updated_by: String,
}

/// Full current state of an API key on the compacted keys topic (`api_key_record.v1.avsc`).
/// Holds only the SHA-256 of the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub consumer_id: String,
    pub consumer_name: String,
    /// Short non-secret start of the key, for display.
    pub prefix: String,
    /// SHA-256 of the secret (Avro `fixed` `dev.tollgate.Sha256`, 32 bytes).
    #[serde(with = "apache_avro::serde::fixed")]
    pub secret_sha256: [u8; 32],
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub created_at_ms: i64,
    /// A rolled key gets its grace deadline here.
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
    /// Id of the key this one replaced by a roll.
    pub rolled_from: Option<String>,
    pub version: i64,
    pub updated_by: String,
}

/// Full current state of a tenant's monthly spend cap on the compacted keys topic
/// (`budget_record.v1.avsc`), keyed `budget/<tenant id>`: a cap covers every consumer of the
/// tenant, as its invoice does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetRecord {
    pub tenant_id: String,
    /// In the plan currency's minor units, the monthly fee included.
    pub monthly_cap_minor: i64,
    /// Percentages of the cap, ascending, each in 1..=100.
    pub alert_at: Vec<i32>,
    pub updated_at_ms: i64,
    pub version: i64,
    pub updated_by: String,
}

/// `Uuid` as hyphenated text whatever the serializer: apache-avro serializes as
/// non-human-readable by default, where `Uuid` would become 16 raw bytes and no longer match
/// the schema's `string`.
mod uuid_text {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};
    use uuid::Uuid;

    pub(super) fn serialize<S: Serializer>(id: &Uuid, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Uuid, D::Error> {
        let text = String::deserialize(deserializer)?;
        // The error names the field but not the text: a garbage value can be megabytes long.
        Uuid::parse_str(&text).map_err(|e| D::Error::custom(format!("event_id: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::Outcome;

    #[test]
    fn outcome_text_is_its_serde_name() {
        for outcome in Outcome::ALL {
            assert_eq!(serde_json::to_value(outcome).unwrap(), outcome.as_str());
        }
    }
}
