//! The usage event's writer, by hand: the gateway encodes one event per request, and the
//! generic Avro writer (serde into a schema walk, a heap value per field) cost more CPU than
//! the rest of the event's path together.
//!
//! In: a [`UsageEvent`] and a buffer to append to. Out: the same single-object datum as
//! [`crate::encode`] writes for it with the current schema (`usage_event.v2.avsc`), byte for
//! byte; the tests below and the property test in `tests/round_trip.rs` hold the two writers
//! equal, and the schema evolution test pins the fingerprint both write.
//!
//! Avro binary encoding ([specification]): `long`/`int` are zig-zag varints, `string` a long
//! length then UTF-8, `boolean` one byte, `enum` the symbol's index as an int, a union the
//! branch index then the value, a `map` blocks of (count, entries) ended by a zero count.
//!
//! [specification]: https://avro.apache.org/docs/1.12.0/specification/#binary-encoding

use crate::codec::MAGIC;
use crate::records::{Outcome, UsageEvent};
use crate::registry;

/// Appends `event` to `out` as a single-object datum of the current usage event schema.
pub fn encode_usage_event(event: &UsageEvent, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&registry::current::<UsageEvent>().fingerprint.to_le_bytes());
    let mut id = uuid::Uuid::encode_buffer();
    string(out, event.event_id.hyphenated().encode_lower(&mut id));
    long(out, event.timestamp_ms);
    optional_string(out, event.tenant_id.as_deref());
    optional_string(out, event.consumer.as_deref());
    optional_string(out, event.key_id.as_deref());
    optional_string(out, event.plan.as_deref());
    string(out, &event.route);
    string(out, &event.method);
    long(out, i64::from(event.status));
    long(out, outcome_index(event.outcome));
    out.push(u8::from(event.billable));
    if !event.units.is_empty() {
        long(out, event.units.len() as i64);
        for (meter, units) in &event.units {
            string(out, meter);
            long(out, *units);
        }
    }
    long(out, 0);
    long(out, event.request_bytes);
    long(out, event.response_bytes);
    long(out, event.latency_ms);
    match event.upstream_latency_ms {
        None => long(out, 0),
        Some(ms) => {
            long(out, 1);
            long(out, ms);
        }
    }
    string(out, &event.gateway_id);
    optional_string(out, event.request_id.as_deref());
}

/// The symbol's position in the schema's `Outcome` enum.
fn outcome_index(outcome: Outcome) -> i64 {
    match outcome {
        Outcome::Allowed => 0,
        Outcome::RateLimited => 1,
        Outcome::Unauthenticated => 2,
        Outcome::Forbidden => 3,
        Outcome::UpstreamError => 4,
        Outcome::Rejected => 5,
    }
}

/// A `["null", "string"]` union.
fn optional_string(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        None => long(out, 0),
        Some(text) => {
            long(out, 1);
            string(out, text);
        }
    }
}

fn string(out: &mut Vec<u8>, text: &str) {
    long(out, text.len() as i64);
    out.extend_from_slice(text.as_bytes());
}

/// Zig-zag, then base-128 varint, low groups first.
fn long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn event() -> UsageEvent {
        UsageEvent {
            event_id: uuid::Uuid::now_v7(),
            timestamp_ms: 1_764_000_000_000,
            tenant_id: Some("tenant_1".into()),
            consumer: Some("acme".into()),
            key_id: Some("key_1".into()),
            plan: None,
            route: "v1".into(),
            method: "GET".into(),
            status: 200,
            outcome: Outcome::UpstreamError,
            billable: true,
            units: BTreeMap::from([("requests".into(), 1), ("compute_units".into(), -300)]),
            request_bytes: 0,
            response_bytes: 1 << 40,
            latency_ms: 3,
            upstream_latency_ms: Some(2),
            gateway_id: "gw-1".into(),
            request_id: None,
        }
    }

    #[test]
    fn writes_what_the_generic_writer_writes() {
        let mut e = event();
        let mut out = Vec::new();
        encode_usage_event(&e, &mut out);
        assert_eq!(out, crate::encode(&e));
        e.units.clear();
        e.upstream_latency_ms = None;
        e.tenant_id = None;
        e.request_id = Some("r".repeat(200));
        out.clear();
        encode_usage_event(&e, &mut out);
        assert_eq!(out, crate::encode(&e));
        assert_eq!(crate::decode::<UsageEvent>(&out).unwrap(), e);
    }

    #[test]
    fn varints_are_zig_zag() {
        for (n, bytes) in [
            (0i64, vec![0u8]),
            (-1, vec![1]),
            (1, vec![2]),
            (-64, vec![0x7f]),
            (64, vec![0x80, 1]),
        ] {
            let mut out = Vec::new();
            long(&mut out, n);
            assert_eq!(out, bytes, "{n}");
        }
        let mut out = Vec::new();
        long(&mut out, i64::MIN);
        assert_eq!(out, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    }
}
