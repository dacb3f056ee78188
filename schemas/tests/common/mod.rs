//! proptest strategies for the records, shared by the integration tests.
#![allow(dead_code)] // each test file uses its own subset

use std::collections::HashMap;

use apache_avro::types::Value;
use proptest::{collection::btree_map, option, prelude::*};
use tollgate_schemas::{ApiKeyRecord, BudgetRecord, ConsumerRecord, Outcome, UsageEvent};
use uuid::Uuid;

/// Empty, ASCII, or any Unicode (control characters and astral planes included).
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z_]{1,12}", any::<String>()]
}

pub fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Allowed),
        Just(Outcome::RateLimited),
        Just(Outcome::Unauthenticated),
        Just(Outcome::Forbidden),
        Just(Outcome::UpstreamError),
        Just(Outcome::Rejected),
    ]
}

pub fn usage_event() -> impl Strategy<Value = UsageEvent> {
    let identity = (
        any::<u128>().prop_map(Uuid::from_u128),
        any::<i64>(),
        option::of(text()),
        option::of(text()),
        option::of(text()),
        option::of(text()),
    );
    let request = (text(), text(), any::<u16>(), outcome(), any::<bool>());
    let measures = (
        btree_map(text(), any::<i64>(), 0..5),
        any::<i64>(),
        any::<i64>(),
        any::<i64>(),
        option::of(any::<i64>()),
        text(),
        option::of(text()),
    );
    (identity, request, measures).prop_map(
        |(
            (event_id, timestamp_ms, tenant_id, consumer, key_id, plan),
            (route, method, status, outcome, billable),
            (units, request_bytes, response_bytes, latency_ms, upstream_latency_ms, gateway_id, request_id),
        )| UsageEvent {
            event_id,
            timestamp_ms,
            tenant_id,
            consumer,
            key_id,
            plan,
            route,
            method,
            status,
            outcome,
            billable,
            units,
            request_bytes,
            response_bytes,
            latency_ms,
            upstream_latency_ms,
            gateway_id,
            request_id,
        },
    )
}

pub fn consumer_record() -> impl Strategy<Value = ConsumerRecord> {
    (
        (
            text(),
            text(),
            option::of(text()),
            option::of(text()),
            option::of(text()),
        ),
        (text(), any::<i64>(), any::<i64>(), any::<i64>(), text()),
    )
        .prop_map(
            |(
                (id, name, tenant_id, plan, stripe_customer_id),
                (metadata_json, created_at_ms, updated_at_ms, version, updated_by),
            )| ConsumerRecord {
                id,
                name,
                tenant_id,
                plan,
                stripe_customer_id,
                metadata_json,
                created_at_ms,
                updated_at_ms,
                version,
                updated_by,
            },
        )
}

pub fn api_key_record() -> impl Strategy<Value = ApiKeyRecord> {
    (
        (text(), text(), text(), text(), any::<[u8; 32]>(), text()),
        (
            btree_map(text(), text(), 0..5),
            any::<i64>(),
            option::of(any::<i64>()),
            option::of(any::<i64>()),
            option::of(text()),
            any::<i64>(),
            text(),
        ),
    )
        .prop_map(
            |(
                (id, consumer_id, consumer_name, prefix, secret_sha256, description),
                (labels, created_at_ms, expires_at_ms, revoked_at_ms, rolled_from, version, updated_by),
            )| ApiKeyRecord {
                id,
                consumer_id,
                consumer_name,
                prefix,
                secret_sha256,
                description,
                labels,
                created_at_ms,
                expires_at_ms,
                revoked_at_ms,
                rolled_from,
                version,
                updated_by,
            },
        )
}

pub fn budget_record() -> impl Strategy<Value = BudgetRecord> {
    (
        text(),
        any::<i64>(),
        proptest::collection::vec(any::<i32>(), 0..5),
        any::<i64>(),
        any::<i64>(),
        text(),
    )
        .prop_map(
            |(tenant_id, monthly_cap_minor, alert_at, updated_at_ms, version, updated_by)| BudgetRecord {
                tenant_id,
                monthly_cap_minor,
                alert_at,
                updated_at_ms,
                version,
                updated_by,
            },
        )
}

/// What a v1 writer (which predates `request_id`) would have sent for `event`.
pub fn v1_value(event: &UsageEvent) -> Value {
    let text = |s: &str| Value::String(s.to_owned());
    let nullable = |s: &Option<String>| s.as_deref().map_or(Value::Null, text);
    let outcome = Outcome::ALL.iter().position(|o| *o == event.outcome).unwrap();
    let units: HashMap<String, Value> = event.units.iter().map(|(k, v)| (k.clone(), Value::Long(*v))).collect();
    Value::Record(vec![
        ("event_id".into(), text(&event.event_id.to_string())),
        ("timestamp_ms".into(), Value::TimestampMillis(event.timestamp_ms)),
        ("tenant_id".into(), nullable(&event.tenant_id)),
        ("consumer".into(), nullable(&event.consumer)),
        ("key_id".into(), nullable(&event.key_id)),
        ("plan".into(), nullable(&event.plan)),
        ("route".into(), text(&event.route)),
        ("method".into(), text(&event.method)),
        ("status".into(), Value::Int(event.status.into())),
        (
            "outcome".into(),
            Value::Enum(outcome as u32, event.outcome.as_str().to_owned()),
        ),
        ("billable".into(), Value::Boolean(event.billable)),
        ("units".into(), Value::Map(units)),
        ("request_bytes".into(), Value::Long(event.request_bytes)),
        ("response_bytes".into(), Value::Long(event.response_bytes)),
        ("latency_ms".into(), Value::Long(event.latency_ms)),
        (
            "upstream_latency_ms".into(),
            event.upstream_latency_ms.map_or(Value::Null, Value::Long),
        ),
        ("gateway_id".into(), text(&event.gateway_id)),
    ])
}
