//! `decode` says precisely what is wrong with bad bytes, and never panics on any input.

mod common;

use proptest::prelude::*;
use tollgate_schemas::{
    decode, decode_usage_event, encode, shipped, ApiKeyRecord, BodyError, ConsumerRecord, DecodeError, UsageEvent,
};

fn sample_event() -> UsageEvent {
    UsageEvent {
        event_id: uuid::Uuid::from_u128(0x0190_1234_5678_7abc_8def_0123_4567_89ab),
        timestamp_ms: 1_767_225_600_000,
        tenant_id: Some("acme".into()),
        consumer: Some("acme-web".into()),
        key_id: Some("key_01".into()),
        plan: Some("pro".into()),
        route: "orders".into(),
        method: "POST".into(),
        status: 200,
        outcome: tollgate_schemas::Outcome::Allowed,
        billable: true,
        units: [("requests".to_owned(), 1), ("compute_units".to_owned(), 5)].into(),
        request_bytes: 120,
        response_bytes: 2048,
        latency_ms: 31,
        upstream_latency_ms: Some(29),
        gateway_id: "gw-1".into(),
        // Last field nullable, so a cut before it is where apache-avro would read a null.
        request_id: Some("req-1".into()),
    }
}

#[test]
fn too_short_for_a_header() {
    for len in 0..10 {
        let bytes = &encode(&sample_event())[..len];
        assert!(
            matches!(decode::<UsageEvent>(bytes), Err(DecodeError::TooShort { len: l }) if l == len),
            "{len} bytes"
        );
    }
}

#[test]
fn wrong_magic() {
    let mut bytes = encode(&sample_event());
    bytes[0] = 0x4f;
    let err = decode::<UsageEvent>(&bytes).unwrap_err();
    assert!(matches!(err, DecodeError::BadMagic { found: [0x4f, 0x01] }), "{err:?}");
    assert_eq!(err.to_string(), "single-object header: magic 4f 01, expected c3 01");
}

#[test]
fn unknown_fingerprint() {
    let mut bytes = encode(&sample_event());
    bytes[2..10].copy_from_slice(&0x0123_4567_89ab_cdef_u64.to_le_bytes());
    let err = decode::<UsageEvent>(&bytes).unwrap_err();
    assert!(
        matches!(err, DecodeError::UnknownFingerprint(0x0123_4567_89ab_cdef)),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "single-object header: unknown writer schema fingerprint 0x0123456789abcdef"
    );
}

#[test]
fn another_records_bytes() {
    let err = decode::<ConsumerRecord>(&encode(&sample_event())).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::WrongRecord {
                expected: "dev.tollgate.ConsumerRecord",
                found: "dev.tollgate.UsageEvent"
            }
        ),
        "{err:?}"
    );
}

#[test]
fn every_truncation_of_a_body_is_reported_as_truncated() {
    let bytes = encode(&sample_event());
    for len in 10..bytes.len() {
        match decode::<UsageEvent>(&bytes[..len]) {
            Err(DecodeError::Body {
                version: 2,
                source: BodyError::Truncated,
                ..
            }) => {}
            other => panic!("cut at {len} of {}: {other:?}", bytes.len()),
        }
    }
}

#[test]
fn trailing_bytes() {
    let mut bytes = encode(&sample_event());
    bytes.extend_from_slice(&[0, 0, 0]);
    let err = decode::<UsageEvent>(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::TrailingBytes {
                count: 3,
                version: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "dev.tollgate.UsageEvent v2: 3 bytes after the end of the body"
    );
}

#[test]
fn garbage_body_is_a_body_error() {
    // A header naming UsageEvent v2, then an event_id of length 4 that is not a UUID.
    let mut bytes = encode(&sample_event())[..10].to_vec();
    bytes.extend_from_slice(&[0x08, b'n', b'o', b'p', b'e']);
    bytes.extend_from_slice(&encode(&sample_event())[47..]);
    let err = decode::<UsageEvent>(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Body {
                source: BodyError::Avro(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with("dev.tollgate.UsageEvent v2 body: "),
        "{err}"
    );
}

#[test]
fn huge_length_prefix_is_refused_without_allocating_it() {
    // event_id claiming 100 MiB: below apache-avro's own 512 MiB default, above our limit, so
    // it is refused before allocating rather than allocated and then found missing.
    let claimed = 100u64 << 20;
    let mut bytes = encode(&sample_event())[..10].to_vec();
    let mut zigzag = claimed << 1;
    while zigzag >= 0x80 {
        bytes.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    bytes.push(zigzag as u8);
    let err = decode::<UsageEvent>(&bytes).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Body {
                source: BodyError::Avro(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("allocat"), "{err}");
}

/// Decodes as every record type; only `Body(Panicked)` (apache-avro panicked and `decode`
/// caught it) counts as failure, since that means the safety net was needed.
fn decode_all_without_panicking(bytes: &[u8]) -> Result<(), TestCaseError> {
    let panicked = |r: &Result<(), DecodeError>| {
        matches!(
            r,
            Err(DecodeError::Body {
                source: BodyError::Panicked(_),
                ..
            })
        )
    };
    same_verdict(bytes)?;
    let results = [
        decode::<UsageEvent>(bytes).map(drop),
        decode::<ConsumerRecord>(bytes).map(drop),
        decode::<ApiKeyRecord>(bytes).map(drop),
    ];
    for r in &results {
        prop_assert!(!panicked(r), "{:?}", r);
    }
    Ok(())
}

/// The hand-written usage event reader accepts exactly what the generic one accepts, with the
/// same event, and refuses the rest with the same kind of error.
fn same_verdict(bytes: &[u8]) -> Result<(), TestCaseError> {
    let generic = decode::<UsageEvent>(bytes);
    let hand = decode_usage_event(bytes).map(|e| e.to_event());
    match (&generic, &hand) {
        (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
        (Err(a), Err(b)) => prop_assert_eq!(
            std::mem::discriminant(a),
            std::mem::discriminant(b),
            "generic {} / hand {}",
            a,
            b
        ),
        _ => prop_assert!(false, "generic {:?} / hand {:?}", generic, hand),
    }
    Ok(())
}

/// Every byte of a valid body set to every value, in events of both versions with and without
/// optional fields and units: the hand-written reader's verdict is the generic one's each time.
#[test]
fn every_single_byte_change_gets_the_same_verdict_from_both_readers() {
    let full = sample_event();
    let bare = UsageEvent {
        tenant_id: None,
        plan: None,
        units: Default::default(),
        upstream_latency_ms: None,
        request_id: None,
        ..sample_event()
    };
    let v1 = |event: &UsageEvent| tollgate_schemas::encode_value::<UsageEvent>(common::v1_value(event), 1).unwrap();
    for bytes in [encode(&full), encode(&bare), v1(&full), v1(&bare)] {
        for at in 10..bytes.len() {
            for value in 0..=255u8 {
                let mut changed = bytes.clone();
                changed[at] = value;
                same_verdict(&changed)
                    .map_err(|e| format!("byte {at} set to {value:#04x}: {e}"))
                    .unwrap();
            }
        }
    }
}

#[test]
fn hand_reader_names_the_field_and_never_the_value() {
    // The garbage event_id of `garbage_body_is_a_body_error`.
    let mut bytes = encode(&sample_event())[..10].to_vec();
    bytes.extend_from_slice(&[0x08, b'n', b'o', b'p', b'e']);
    bytes.extend_from_slice(&encode(&sample_event())[47..]);
    let err = decode_usage_event(&bytes).unwrap_err();
    assert_eq!(err.to_string(), "dev.tollgate.UsageEvent v2 body: event_id: not a UUID");
    let bytes = encode(&sample_event());
    for len in 10..bytes.len() {
        assert!(
            matches!(
                decode_usage_event(&bytes[..len]),
                Err(DecodeError::Body {
                    version: 2,
                    source: BodyError::Truncated,
                    ..
                })
            ),
            "cut at {len}"
        );
    }
    assert!(matches!(
        decode_usage_event(&[0xC3, 0x01, 0, 0]),
        Err(DecodeError::TooShort { len: 4 })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        decode_all_without_panicking(&bytes)?;
    }

    #[test]
    fn random_body_after_a_known_header_never_panics(
        which in 0..shipped().len(),
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut bytes = vec![0xC3, 0x01];
        bytes.extend_from_slice(&shipped()[which].fingerprint.to_le_bytes());
        bytes.extend_from_slice(&body);
        decode_all_without_panicking(&bytes)?;
    }

    #[test]
    fn corrupted_valid_event_never_panics(
        event in common::usage_event(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = encode(&event);
        for (at, byte) in flips {
            let i = 10 + at.index(bytes.len() - 10);
            bytes[i] = byte;
        }
        decode_all_without_panicking(&bytes)?;
    }
}
