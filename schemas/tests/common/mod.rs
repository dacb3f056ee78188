//! proptest strategies for the records, shared by the integration tests.
#![allow(dead_code)] // each test file uses its own subset

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
