//! Every shipped schema version, embedded from `schemas/avro/` and parsed once.
//!
//! In: the `.avsc` texts listed in [`SOURCES`]. Out: writer schemas by CRC-64-AVRO fingerprint
//! (for [`crate::decode`]) and the current schema of each record (for [`crate::encode`] and as
//! the reader schema). A new version is one more line in [`SOURCES`].

use std::sync::LazyLock;

use apache_avro::{rabin::Rabin, Schema};

use crate::{ApiKeyRecord, AvroRecord, BudgetRecord, ConsumerRecord, UsageEvent};

struct Source {
    record: &'static str,
    version: u32,
    file: &'static str,
    text: &'static str,
}

macro_rules! source {
    ($record:ty, $version:literal, $file:literal) => {
        Source {
            record: <$record as AvroRecord>::NAME,
            version: $version,
            file: $file,
            text: include_str!(concat!("../avro/", $file)),
        }
    };
}

/// Every released schema. Never remove a line: old events stay on topics and in spool files.
const SOURCES: &[Source] = &[
    source!(UsageEvent, 1, "usage_event.v1.avsc"),
    source!(UsageEvent, 2, "usage_event.v2.avsc"),
    source!(ConsumerRecord, 1, "consumer_record.v1.avsc"),
    source!(ApiKeyRecord, 1, "api_key_record.v1.avsc"),
    source!(BudgetRecord, 1, "budget_record.v1.avsc"),
];

/// One released version of a record's schema.
#[derive(Debug)]
pub struct ShippedSchema {
    /// Full Avro name of the record, e.g. `dev.tollgate.UsageEvent`.
    pub record: &'static str,
    /// 1 for the first release, then one more per new file.
    pub version: u32,
    /// File name under `schemas/avro/`.
    pub file: &'static str,
    /// CRC-64-AVRO (Rabin) fingerprint of the schema's Parsing Canonical Form, as it appears
    /// (little-endian) in the single-object header.
    pub fingerprint: u64,
    /// The parsed schema.
    pub schema: Schema,
}

// Parsed once per process: the texts are compile-time constants, so this is a cache of
// constants, not mutable global state.
static SHIPPED: LazyLock<Vec<ShippedSchema>> = LazyLock::new(|| {
    SOURCES
        .iter()
        .map(|source| {
            // A shipped file that does not parse can only be a build mistake, and the tests
            // that parse every file catch it before release.
            let parsed = serde_json::from_str(source.text)
                .map_err(|e| e.to_string())
                .and_then(|json| {
                    let schema = Schema::parse(&json).map_err(|e| e.to_string())?;
                    Ok((schema, fingerprint(json)?))
                });
            let (schema, fingerprint) = parsed.unwrap_or_else(|e| panic!("schemas/avro/{}: {e}", source.file));
            ShippedSchema {
                record: source.record,
                version: source.version,
                file: source.file,
                fingerprint,
                schema,
            }
        })
        .collect()
});

/// CRC-64-AVRO fingerprint of a schema's Parsing Canonical Form, as the specification defines it.
///
/// Not `Schema::fingerprint` on the schema as written: apache-avro 0.22 drops a `logicalType`
/// but keeps the object around the primitive (`{"type":"long"}` where the specification and
/// the Java implementation write `"long"`), so its fingerprint of any schema with a logical type
/// differs from other languages' and would change the day that is fixed. The specification
/// strips `logicalType` from the canonical form anyway, so stripping it before parsing gives
/// the same canonical form, spelled correctly.
fn fingerprint(mut json: serde_json::Value) -> Result<u64, String> {
    strip_logical_types(&mut json);
    let plain = Schema::parse(&json).map_err(|e| e.to_string())?;
    let digest = plain.fingerprint::<Rabin>().bytes;
    let mut le = [0u8; 8];
    le.copy_from_slice(&digest[..8]);
    Ok(u64::from_le_bytes(le))
}

fn strip_logical_types(json: &mut serde_json::Value) {
    match json {
        serde_json::Value::Object(map) => {
            map.remove("logicalType");
            map.values_mut().for_each(strip_logical_types);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_logical_types),
        _ => {}
    }
}

/// Every shipped schema version of every record, oldest first within each record.
pub fn shipped() -> &'static [ShippedSchema] {
    &SHIPPED
}

/// Fingerprint of version `version` of `T`'s schema, or `None` if that version was never shipped.
pub fn fingerprint_of<T: AvroRecord>(version: u32) -> Option<u64> {
    version_of::<T>(version).map(|s| s.fingerprint)
}

pub(crate) fn version_of<T: AvroRecord>(version: u32) -> Option<&'static ShippedSchema> {
    shipped().iter().find(|s| s.record == T::NAME && s.version == version)
}

/// The newest version of `T`'s schema: what [`crate::encode`] writes and what
/// [`crate::decode`] resolves to.
pub(crate) fn current<T: AvroRecord>() -> &'static ShippedSchema {
    shipped()
        .iter()
        .filter(|s| s.record == T::NAME)
        .max_by_key(|s| s.version)
        // Every `AvroRecord` (a sealed trait) has a line in `SOURCES`; the tests cover each.
        .unwrap_or_else(|| panic!("no schema shipped for {}", T::NAME))
}

pub(crate) fn by_fingerprint(fingerprint: u64) -> Option<&'static ShippedSchema> {
    shipped().iter().find(|s| s.fingerprint == fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint_of_text(text: &str) -> u64 {
        fingerprint(serde_json::from_str(text).unwrap()).unwrap()
    }

    #[test]
    fn logical_types_do_not_change_the_fingerprint() {
        let with = r#"{"type":"record","name":"R","fields":[
            {"name":"t","type":{"type":"long","logicalType":"timestamp-millis"},"doc":"x"}]}"#;
        let without = r#"{"type":"record","name":"R","fields":[{"name":"t","type":"long"}]}"#;
        assert_eq!(fingerprint_of_text(with), fingerprint_of_text(without));
    }

    #[test]
    fn fingerprint_agrees_with_apache_avro_where_it_follows_the_specification() {
        // Without logical types apache-avro's canonical form is the specification's.
        let text = r#"{"type":"record","name":"R","namespace":"n","fields":[
            {"name":"a","type":["null","string"],"default":null},
            {"name":"m","type":{"type":"map","values":"long"}}]}"#;
        let digest = Schema::parse_str(text).unwrap().fingerprint::<Rabin>().bytes;
        let expected = u64::from_le_bytes(digest[..8].try_into().unwrap());
        assert_eq!(fingerprint_of_text(text), expected);
    }

    #[test]
    fn the_primitive_schema_null_has_the_specification_fingerprint() {
        // CRC-64-AVRO of "null", a test vector of the Avro project.
        assert_eq!(fingerprint_of_text(r#"{"type":"null"}"#), 7_195_948_357_588_979_594);
    }
}
