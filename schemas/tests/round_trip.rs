//! Records survive encode → decode unchanged, and events from v1 writers still decode.

mod common;

use std::collections::HashMap;

use apache_avro::{reader::datum::GenericDatumReader, types::Value};
use proptest::prelude::*;
use tollgate_schemas::{
    decode, encode, encode_usage_event, encode_value, fingerprint_of, shipped, ApiKeyRecord, AvroRecord, BudgetRecord,
    ConsumerRecord, Outcome, UsageEvent,
};

/// What a v1 writer (which predates `request_id`) would have sent for `event`.
fn v1_value(event: &UsageEvent) -> Value {
    let text = |s: &str| Value::String(s.to_owned());
    let nullable = |s: &Option<String>| s.as_deref().map_or(Value::Null, text);
    let outcome = [
        Outcome::Allowed,
        Outcome::RateLimited,
        Outcome::Unauthenticated,
        Outcome::Forbidden,
        Outcome::UpstreamError,
        Outcome::Rejected,
    ]
    .iter()
    .position(|o| *o == event.outcome)
    .unwrap();
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

proptest! {
    #[test]
    fn usage_event_round_trips(event in common::usage_event()) {
        let bytes = encode(&event);
        prop_assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        prop_assert_eq!(&bytes[2..10], &fingerprint_of::<UsageEvent>(2).unwrap().to_le_bytes());
        prop_assert_eq!(decode::<UsageEvent>(&bytes).unwrap(), event);
    }

    /// The gateway's hand-written writer and the generic one agree byte for byte.
    #[test]
    fn hand_written_usage_event_writer_matches_the_generic_one(event in common::usage_event()) {
        let mut out = vec![7u8];
        encode_usage_event(&event, &mut out);
        prop_assert_eq!(&out[1..], &encode(&event)[..]);
    }

    #[test]
    fn consumer_record_round_trips(record in common::consumer_record()) {
        let bytes = encode(&record);
        prop_assert_eq!(&bytes[2..10], &fingerprint_of::<ConsumerRecord>(1).unwrap().to_le_bytes());
        prop_assert_eq!(decode::<ConsumerRecord>(&bytes).unwrap(), record);
    }

    #[test]
    fn api_key_record_round_trips(record in common::api_key_record()) {
        let bytes = encode(&record);
        prop_assert_eq!(&bytes[2..10], &fingerprint_of::<ApiKeyRecord>(1).unwrap().to_le_bytes());
        prop_assert_eq!(decode::<ApiKeyRecord>(&bytes).unwrap(), record);
    }

    #[test]
    fn budget_record_round_trips(record in common::budget_record()) {
        let bytes = encode(&record);
        prop_assert_eq!(&bytes[2..10], &fingerprint_of::<BudgetRecord>(1).unwrap().to_le_bytes());
        prop_assert_eq!(decode::<BudgetRecord>(&bytes).unwrap(), record);
    }

    /// A v1 writer's event decodes to the same values, `request_id` taking its default.
    #[test]
    fn v1_usage_event_resolves_to_the_current_reader(event in common::usage_event()) {
        let bytes = encode_value::<UsageEvent>(v1_value(&event), 1).unwrap();
        prop_assert_eq!(&bytes[2..10], &fingerprint_of::<UsageEvent>(1).unwrap().to_le_bytes());
        let decoded = decode::<UsageEvent>(&bytes).unwrap();
        prop_assert_eq!(decoded, UsageEvent { request_id: None, ..event });
    }

    /// A reader still on v1 can read what today's writer sends: it skips `request_id`.
    #[test]
    fn v1_reader_reads_current_usage_events(event in common::usage_event()) {
        let bytes = encode(&event);
        let schema = |version| {
            &shipped()
                .iter()
                .find(|s| s.record == UsageEvent::NAME && s.version == version)
                .unwrap()
                .schema
        };
        let value = GenericDatumReader::builder(schema(2))
            .reader_schema(schema(1))
            .build()
            .unwrap()
            .read_value(&mut &bytes[10..])
            .unwrap();
        prop_assert_eq!(value, v1_value(&event).resolve(schema(1)).unwrap());
    }
}

#[test]
fn unauthenticated_event_has_no_identity_and_round_trips() {
    let event = UsageEvent {
        event_id: uuid::Uuid::now_v7(),
        timestamp_ms: 1_767_225_600_000,
        tenant_id: None,
        consumer: None,
        key_id: None,
        plan: None,
        route: String::new(),
        method: "GET".into(),
        status: 401,
        outcome: Outcome::Unauthenticated,
        billable: false,
        units: Default::default(),
        request_bytes: 0,
        response_bytes: 112,
        latency_ms: 0,
        upstream_latency_ms: None,
        gateway_id: "gw-1".into(),
        request_id: Some("req-ü-🦀".into()),
    };
    assert_eq!(decode::<UsageEvent>(&encode(&event)).unwrap(), event);
}

#[test]
fn encode_value_rejects_an_unshipped_version() {
    let err = encode_value::<ConsumerRecord>(Value::Null, 9).unwrap_err();
    assert_eq!(
        err.to_string(),
        "dev.tollgate.ConsumerRecord: no shipped schema version 9"
    );
}
