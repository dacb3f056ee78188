//! Records survive encode → decode unchanged, and events from v1 writers still decode.

mod common;

use apache_avro::{reader::datum::GenericDatumReader, types::Value};
use proptest::prelude::*;
use tollgate_schemas::{
    decode, decode_usage_event, encode, encode_usage_event, encode_value, fingerprint_of, shipped, ApiKeyRecord,
    AvroRecord, BudgetRecord, ConsumerRecord, Outcome, UsageEvent,
};

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

    /// The meter consumer's hand-written reader reads what either writer of either version
    /// wrote as the generic reader does.
    #[test]
    fn hand_written_usage_event_reader_matches_the_generic_one(event in common::usage_event()) {
        let current = encode(&event);
        prop_assert_eq!(decode_usage_event(&current).unwrap().to_event(), event.clone());
        let v1 = encode_value::<UsageEvent>(common::v1_value(&event), 1).unwrap();
        let read = decode_usage_event(&v1).unwrap();
        prop_assert_eq!(read.request_id, None);
        prop_assert_eq!(read.to_event(), decode::<UsageEvent>(&v1).unwrap());
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
        let bytes = encode_value::<UsageEvent>(common::v1_value(&event), 1).unwrap();
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
        prop_assert_eq!(value, common::v1_value(&event).resolve(schema(1)).unwrap());
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
