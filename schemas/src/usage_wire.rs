//! The usage event's writer and reader, by hand: the gateway encodes one event per request
//! and the meter consumer decodes each of them, and the generic Avro code (serde through a
//! schema walk, a heap value per field, schema resolution for older writers) cost more CPU
//! than the rest of either path together.
//!
//! In: a [`UsageEvent`] and a buffer to append to (writer); the single-object bytes of any
//! shipped usage event version (reader). Out: the same datum [`crate::encode`] writes with the
//! current schema (`usage_event.v2.avsc`), byte for byte; and a [`UsageEventRef`] whose text
//! borrows from the bytes, equal to what [`crate::decode`] returns and refusing exactly the
//! bytes it refuses. The tests below and the property tests in `tests/round_trip.rs` and
//! `tests/decode_errors.rs` hold the hand code and the generic code to each other, and the
//! schema evolution test pins the fingerprints.
//!
//! Avro binary encoding ([specification]): `long`/`int` are zig-zag varints, `string` a long
//! length then UTF-8, `boolean` one byte, `enum` the symbol's index as an int, a union the
//! branch index then the value, a `map` blocks of (count, entries) ended by a zero count (a
//! negative count is followed by the block's size in bytes).
//!
//! [specification]: https://avro.apache.org/docs/1.12.0/specification/#binary-encoding

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::codec::{writer_schema_of, BodyError, DecodeError, HEADER_LEN, MAGIC};
use crate::records::{Outcome, UsageEvent};
use crate::registry;
use crate::AvroRecord;

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
    Outcome::ALL
        .iter()
        .position(|o| *o == outcome)
        .expect("every outcome is in Outcome::ALL") as i64
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

/// A usage event read in place: [`UsageEvent`] with its text borrowed from the bytes it was
/// decoded from, so a reader that copies fields onward (the meter consumer's rows) pays no
/// allocation for the fields it does not keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEventRef<'a> {
    pub event_id: Uuid,
    pub timestamp_ms: i64,
    pub tenant_id: Option<&'a str>,
    pub consumer: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub plan: Option<&'a str>,
    pub route: &'a str,
    pub method: &'a str,
    pub status: u16,
    pub outcome: Outcome,
    pub billable: bool,
    /// Ascending by meter, each meter once: a map's order and, for a meter written twice,
    /// the last value, as [`UsageEvent::units`] holds them.
    pub units: Vec<(&'a str, i64)>,
    pub request_bytes: i64,
    pub response_bytes: i64,
    pub latency_ms: i64,
    pub upstream_latency_ms: Option<i64>,
    pub gateway_id: &'a str,
    /// `None` in events of v1 writers, which predate the field.
    pub request_id: Option<&'a str>,
}

impl UsageEventRef<'_> {
    /// The owned event, as [`crate::decode`] returns it for the same bytes.
    pub fn to_event(&self) -> UsageEvent {
        let owned = |s: Option<&str>| s.map(str::to_owned);
        UsageEvent {
            event_id: self.event_id,
            timestamp_ms: self.timestamp_ms,
            tenant_id: owned(self.tenant_id),
            consumer: owned(self.consumer),
            key_id: owned(self.key_id),
            plan: owned(self.plan),
            route: self.route.to_owned(),
            method: self.method.to_owned(),
            status: self.status,
            outcome: self.outcome,
            billable: self.billable,
            units: self
                .units
                .iter()
                .map(|(m, v)| ((*m).to_owned(), *v))
                .collect::<BTreeMap<_, _>>(),
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            latency_ms: self.latency_ms,
            upstream_latency_ms: self.upstream_latency_ms,
            gateway_id: self.gateway_id.to_owned(),
            request_id: owned(self.request_id),
        }
    }
}

impl<'a> From<&'a UsageEvent> for UsageEventRef<'a> {
    fn from(event: &'a UsageEvent) -> Self {
        UsageEventRef {
            event_id: event.event_id,
            timestamp_ms: event.timestamp_ms,
            tenant_id: event.tenant_id.as_deref(),
            consumer: event.consumer.as_deref(),
            key_id: event.key_id.as_deref(),
            plan: event.plan.as_deref(),
            route: &event.route,
            method: &event.method,
            status: event.status,
            outcome: event.outcome,
            billable: event.billable,
            units: event.units.iter().map(|(m, v)| (m.as_str(), *v)).collect(),
            request_bytes: event.request_bytes,
            response_bytes: event.response_bytes,
            latency_ms: event.latency_ms,
            upstream_latency_ms: event.upstream_latency_ms,
            gateway_id: &event.gateway_id,
            request_id: event.request_id.as_deref(),
        }
    }
}

/// Decodes a single-object usage event written with any shipped version of its schema.
///
/// Accepts and refuses what [`crate::decode::<UsageEvent>`] does, with the same header errors;
/// a bad body is a [`BodyError::Truncated`] or a [`BodyError::Invalid`] naming the field.
pub fn decode_usage_event(bytes: &[u8]) -> Result<UsageEventRef<'_>, DecodeError> {
    let writer = writer_schema_of(bytes)?;
    if writer.record != UsageEvent::NAME {
        return Err(DecodeError::WrongRecord {
            expected: UsageEvent::NAME,
            found: writer.record,
        });
    }
    let body_error = |source| DecodeError::Body {
        record: writer.record,
        version: writer.version,
        source,
    };
    // v2 appended `request_id`; every other field is where v1 has it.
    let has_request_id = match writer.version {
        1 => false,
        2 => true,
        _ => {
            return Err(body_error(BodyError::Invalid {
                field: "(record)",
                problem: "a usage event version this reader was not built for",
            }))
        }
    };
    let mut body = Cursor {
        rest: &bytes[HEADER_LEN..],
    };
    let event = body.usage_event(has_request_id).map_err(body_error)?;
    if !body.rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            record: writer.record,
            version: writer.version,
            count: body.rest.len(),
        });
    }
    Ok(event)
}

/// The unread rest of a body.
struct Cursor<'a> {
    rest: &'a [u8],
}

fn invalid(field: &'static str, problem: &'static str) -> BodyError {
    BodyError::Invalid { field, problem }
}

impl<'a> Cursor<'a> {
    fn usage_event(&mut self, has_request_id: bool) -> Result<UsageEventRef<'a>, BodyError> {
        let event_id = self.string("event_id")?;
        // The generic reader's rule (`Uuid::parse_str`), so both accept the same texts.
        let event_id = Uuid::parse_str(event_id).map_err(|_| invalid("event_id", "not a UUID"))?;
        Ok(UsageEventRef {
            event_id,
            timestamp_ms: self.long("timestamp_ms")?,
            tenant_id: self.optional_string("tenant_id")?,
            consumer: self.optional_string("consumer")?,
            key_id: self.optional_string("key_id")?,
            plan: self.optional_string("plan")?,
            route: self.string("route")?,
            method: self.string("method")?,
            status: u16::try_from(self.int("status")?).map_err(|_| invalid("status", "outside 0 to 65535"))?,
            outcome: *usize::try_from(self.int("outcome")?)
                .ok()
                .and_then(|i| Outcome::ALL.get(i))
                .ok_or(invalid("outcome", "no such symbol"))?,
            billable: match self.byte()? {
                0 => false,
                1 => true,
                _ => return Err(invalid("billable", "a boolean byte other than 0 or 1")),
            },
            units: self.units()?,
            request_bytes: self.long("request_bytes")?,
            response_bytes: self.long("response_bytes")?,
            latency_ms: self.long("latency_ms")?,
            upstream_latency_ms: match self.union_branch("upstream_latency_ms")? {
                false => None,
                true => Some(self.long("upstream_latency_ms")?),
            },
            gateway_id: self.string("gateway_id")?,
            request_id: match has_request_id {
                true => self.optional_string("request_id")?,
                false => None,
            },
        })
    }

    fn byte(&mut self) -> Result<u8, BodyError> {
        let (&first, rest) = self.rest.split_first().ok_or(BodyError::Truncated)?;
        self.rest = rest;
        Ok(first)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], BodyError> {
        if len > self.rest.len() {
            return Err(BodyError::Truncated);
        }
        let (now, later) = self.rest.split_at(len);
        self.rest = later;
        Ok(now)
    }

    /// A zig-zag varint of at most ten bytes; bits past the 64th are dropped, as the generic
    /// reader drops them.
    fn long(&mut self, field: &'static str) -> Result<i64, BodyError> {
        let mut z = 0u64;
        for group in 0..10 {
            let byte = self.byte()?;
            z |= u64::from(byte & 0x7f) << (group * 7);
            if byte & 0x80 == 0 {
                return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        Err(invalid(field, "a varint longer than ten bytes"))
    }

    fn int(&mut self, field: &'static str) -> Result<i32, BodyError> {
        i32::try_from(self.long(field)?).map_err(|_| invalid(field, "an int outside 32 bits"))
    }

    fn length(&mut self, field: &'static str) -> Result<usize, BodyError> {
        usize::try_from(self.long(field)?).map_err(|_| invalid(field, "a negative length"))
    }

    fn string(&mut self, field: &'static str) -> Result<&'a str, BodyError> {
        let len = self.length(field)?;
        std::str::from_utf8(self.take(len)?).map_err(|_| invalid(field, "text that is not UTF-8"))
    }

    /// A `["null", T]` union's branch: false for null.
    fn union_branch(&mut self, field: &'static str) -> Result<bool, BodyError> {
        match self.long(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(invalid(field, "no such union branch")),
        }
    }

    fn optional_string(&mut self, field: &'static str) -> Result<Option<&'a str>, BodyError> {
        match self.union_branch(field)? {
            false => Ok(None),
            true => self.string(field).map(Some),
        }
    }

    fn units(&mut self) -> Result<Vec<(&'a str, i64)>, BodyError> {
        let mut units = Vec::new();
        loop {
            let count = self.long("units")?;
            if count == 0 {
                break;
            }
            if count < 0 {
                // The block's size in bytes, for readers that skip it; this one reads it.
                self.long("units")?;
            }
            for _ in 0..count.unsigned_abs() {
                units.push((self.string("units")?, self.long("units")?));
            }
        }
        // Stable, so of a meter written twice the last stays last, and is the one kept.
        units.sort_by(|a, b| a.0.cmp(b.0));
        units.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                earlier.1 = later.1;
            }
            same
        });
        Ok(units)
    }
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
