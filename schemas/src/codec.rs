//! Single-object encoding and decoding of the records.
//!
//! In: a typed record (encode) or bytes from Kafka or a spool file (decode). Out: the
//! single-object bytes, or the typed record resolved to the current schema, or a
//! [`DecodeError`] saying why the bytes are not one (the meter consumer dead-letters them with
//! that reason). Decoding never panics, whatever the input.

use std::io::{self, Read};
use std::panic::{self, AssertUnwindSafe};

use apache_avro::{from_value, reader::datum::GenericDatumReader, types::Value, writer::datum::GenericDatumWriter};

use crate::registry::{self, ShippedSchema};
use crate::AvroRecord;

/// The two bytes that open every single-object encoded datum (Avro specification).
pub(crate) const MAGIC: [u8; 2] = [0xC3, 0x01];
/// Magic plus the 8-byte fingerprint.
pub(crate) const HEADER_LEN: usize = 10;

/// The most apache-avro may allocate for one string, byte array, array or map while decoding.
///
/// Without it a length prefix in garbage input makes the decoder allocate up to its default of
/// 512 MiB before noticing the bytes are not there. Our records travel as Kafka messages of
/// about a megabyte at most, so 16 MiB leaves ample room. apache-avro keeps one process-wide
/// value, set by whoever asks first; [`decode`] asks before every decode, so it holds unless
/// another library in the process set a different limit earlier.
pub const MAX_DECODE_ALLOCATION_BYTES: usize = 16 * 1024 * 1024;

/// Why bytes could not be decoded into a record.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("single-object datum of {len} bytes: shorter than the 10-byte header")]
    TooShort { len: usize },
    #[error("single-object header: magic {:02x} {:02x}, expected c3 01", found[0], found[1])]
    BadMagic { found: [u8; 2] },
    #[error("single-object header: unknown writer schema fingerprint {0:#018x}")]
    UnknownFingerprint(u64),
    #[error("expected a {expected}, found a {found} (by its writer schema)")]
    WrongRecord {
        expected: &'static str,
        found: &'static str,
    },
    #[error("{record} v{version} body: {source}")]
    Body {
        record: &'static str,
        version: u32,
        #[source]
        source: BodyError,
    },
    #[error("{record} v{version}: {count} bytes after the end of the body")]
    TrailingBytes {
        record: &'static str,
        version: u32,
        count: usize,
    },
}

/// What was wrong with a body whose header was fine.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("truncated: the bytes end inside the record")]
    Truncated,
    /// Bytes the hand-written usage event reader refused; names the field, never its value
    /// (a garbage value can be megabytes long).
    #[error("{field}: {problem}")]
    Invalid { field: &'static str, problem: &'static str },
    /// Garbage bytes, or a value the record type cannot hold (e.g. an `event_id` that is not
    /// a UUID).
    #[error(transparent)]
    Avro(#[from] apache_avro::Error),
    /// apache-avro panicked; caught so that one bad record cannot take a consumer down.
    #[error("avro decoder panicked: {0}")]
    Panicked(String),
}

/// Why a value could not be encoded with an explicitly chosen schema version.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("{record}: no shipped schema version {version}")]
    UnknownVersion { record: &'static str, version: u32 },
    #[error("{record} v{version}: {source}")]
    Avro {
        record: &'static str,
        version: u32,
        #[source]
        source: apache_avro::Error,
    },
}

/// Encodes `record` with the current schema of its type, as a single-object datum.
///
/// # Panics
/// Only if a record type and its current schema disagree, a bug that the round-trip property
/// tests rule out for every shipped type (the trait is sealed): every value of the Rust types
/// fits the schema.
pub fn encode<T: AvroRecord>(record: &T) -> Vec<u8> {
    let shipped = registry::current::<T>();
    let mut out = header(shipped);
    GenericDatumWriter::builder(&shipped.schema)
        .build()
        .and_then(|writer| writer.write_ser(&mut out, record))
        .unwrap_or_else(|e| panic!("{} does not fit its own schema: {e}", T::NAME));
    out
}

/// Encodes a generic value with version `version` of `T`'s schema: how tests and tools produce
/// what an older writer would have written. Production writers use [`encode`].
pub fn encode_value<T: AvroRecord>(value: Value, version: u32) -> Result<Vec<u8>, EncodeError> {
    let shipped = registry::version_of::<T>(version).ok_or(EncodeError::UnknownVersion {
        record: T::NAME,
        version,
    })?;
    let avro = |source| EncodeError::Avro {
        record: T::NAME,
        version,
        source,
    };
    // Resolving first turns e.g. a bare `Value::String` into the union branch the schema wants.
    let value = value.resolve(&shipped.schema).map_err(avro)?;
    let mut out = header(shipped);
    GenericDatumWriter::builder(&shipped.schema)
        .build()
        .and_then(|writer| writer.write_value(&mut out, value))
        .map_err(avro)?;
    Ok(out)
}

/// Decodes a single-object datum written with any shipped version of `T`'s schema, resolved
/// to the current one (fields added since take their defaults).
///
/// Never panics. Fails on a short or foreign header, an unknown fingerprint (a writer newer
/// than this reader), another record type's bytes, a truncated or garbage body, or bytes left
/// after the body.
pub fn decode<T: AvroRecord>(bytes: &[u8]) -> Result<T, DecodeError> {
    let writer = writer_schema_of(bytes)?;
    if writer.record != T::NAME {
        return Err(DecodeError::WrongRecord {
            expected: T::NAME,
            found: writer.record,
        });
    }
    let reader = registry::current::<T>();
    let body = &bytes[HEADER_LEN..];
    let body_error = |source| DecodeError::Body {
        record: writer.record,
        version: writer.version,
        source,
    };

    apache_avro::util::max_allocation_bytes(MAX_DECODE_ALLOCATION_BYTES);
    let mut input = BodyReader {
        rest: body,
        ran_out: false,
    };
    let decoded = panic::catch_unwind(AssertUnwindSafe(|| read_record::<T>(writer, reader, &mut input)));
    let record = match decoded {
        // Checked before the result: apache-avro turns some early ends into nulls rather than
        // errors, and a null can then pass as a legitimate optional field.
        _ if input.ran_out => return Err(body_error(BodyError::Truncated)),
        Ok(result) => result.map_err(|e| body_error(BodyError::Avro(e)))?,
        Err(payload) => return Err(body_error(BodyError::Panicked(panic_message(&payload)))),
    };
    if !input.rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            record: writer.record,
            version: writer.version,
            count: input.rest.len(),
        });
    }
    Ok(record)
}

/// The shipped schema that `bytes` says it was written with, from the header alone: lets a
/// reader of a topic with several record types (`tollgate.keys`) pick the one to decode.
pub fn writer_schema_of(bytes: &[u8]) -> Result<&'static ShippedSchema, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::TooShort { len: bytes.len() });
    }
    let found = [bytes[0], bytes[1]];
    if found != MAGIC {
        return Err(DecodeError::BadMagic { found });
    }
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[2..HEADER_LEN]);
    let fingerprint = u64::from_le_bytes(le);
    registry::by_fingerprint(fingerprint).ok_or(DecodeError::UnknownFingerprint(fingerprint))
}

fn header(shipped: &ShippedSchema) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&shipped.fingerprint.to_le_bytes());
    out
}

fn read_record<T: AvroRecord>(
    writer: &ShippedSchema,
    reader: &ShippedSchema,
    input: &mut BodyReader<'_>,
) -> Result<T, apache_avro::Error> {
    let value = if writer.fingerprint == reader.fingerprint {
        GenericDatumReader::builder(&writer.schema).build()?.read_value(input)?
    } else {
        // Not `read_deser`: with a reader schema it panics ("does not resolve schemas yet").
        GenericDatumReader::builder(&writer.schema)
            .reader_schema(&reader.schema)
            .build()?
            .read_value(input)?
    };
    from_value::<T>(&value)
}

/// Reads the body and notes whether the decoder ever asked for more bytes than were left.
///
/// A complete body is read with exact-length reads only, so asking past the end means the
/// record was cut short, even where apache-avro itself would carry on with a null.
struct BodyReader<'a> {
    rest: &'a [u8],
    ran_out: bool,
}

impl Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.len() > self.rest.len() {
            self.ran_out = true;
        }
        let n = buf.len().min(self.rest.len());
        let (now, later) = self.rest.split_at(n);
        buf[..n].copy_from_slice(now);
        self.rest = later;
        Ok(n)
    }
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_can_cross_threads_and_into_anyhow() {
        fn assert_error<E: std::error::Error + Send + Sync + 'static>() {}
        assert_error::<DecodeError>();
        assert_error::<EncodeError>();
    }
}
