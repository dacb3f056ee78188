//! The shipped schemas stay what they were released as, and every version of a record can
//! read every other.

use std::collections::BTreeSet;

use apache_avro::schema_compatibility::SchemaCompatibility;
use tollgate_schemas::{fingerprint_of, shipped, ApiKeyRecord, AvroRecord, BudgetRecord, ConsumerRecord, UsageEvent};

/// Fingerprints of the released schemas, pinned when each was released (and checked against an
/// independent implementation of the specification's canonical form and CRC-64-AVRO). A failure
/// here means a released `.avsc` was edited: revert it and add a new version instead. The test
/// prints the current values, ready to pin a new version.
const PINNED: &[(&str, u64)] = &[
    ("usage_event.v1.avsc", 0xa2c7_82c9_f36b_0a9e),
    ("usage_event.v2.avsc", 0x19a3_7ff6_5b04_a153),
    ("consumer_record.v1.avsc", 0xe637_534a_5adb_af18),
    ("api_key_record.v1.avsc", 0xefbe_3373_8f08_a9ab),
    ("budget_record.v1.avsc", 0xba60_f84d_460f_08f8),
];

#[test]
fn released_schemas_keep_their_fingerprints() {
    let actual: Vec<(&str, u64)> = shipped().iter().map(|s| (s.file, s.fingerprint)).collect();
    for (file, fingerprint) in &actual {
        println!("(\"{file}\", {fingerprint:#018x}),");
    }
    assert_eq!(actual, PINNED);
}

#[test]
fn every_avsc_file_is_shipped() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/avro");
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".avsc"))
        .collect();
    let listed: BTreeSet<String> = shipped().iter().map(|s| s.file.to_owned()).collect();
    assert_eq!(on_disk, listed, "add new files to SOURCES in src/registry.rs");
}

#[test]
fn shipped_schemas_are_consistent() {
    let fingerprints: BTreeSet<u64> = shipped().iter().map(|s| s.fingerprint).collect();
    assert_eq!(fingerprints.len(), shipped().len(), "two versions share a fingerprint");
    for s in shipped() {
        let apache_avro::Schema::Record(record) = &s.schema else {
            panic!("{}: not a record", s.file);
        };
        assert_eq!(record.name.fullname(None), s.record, "{}", s.file);
        let stem = s.file.strip_suffix(&format!(".v{}.avsc", s.version));
        assert!(
            stem.is_some(),
            "{}: file name does not say version {}",
            s.file,
            s.version
        );
    }
    for name in [
        UsageEvent::NAME,
        ConsumerRecord::NAME,
        ApiKeyRecord::NAME,
        BudgetRecord::NAME,
    ] {
        let versions: Vec<u32> = shipped()
            .iter()
            .filter(|s| s.record == name)
            .map(|s| s.version)
            .collect();
        let expected: Vec<u32> = (1..=versions.len() as u32).collect();
        assert_eq!(versions, expected, "{name}: versions must run 1, 2, ... in order");
    }
    assert!(fingerprint_of::<UsageEvent>(2).is_some());
    assert!(fingerprint_of::<UsageEvent>(3).is_none());
}

/// Full compatibility: for every pair of versions of a record, each reads the other's data.
#[test]
fn every_pair_of_versions_is_fully_compatible() {
    let mut pairs = 0;
    for writer in shipped() {
        for reader in shipped().iter().filter(|r| r.record == writer.record) {
            if let Err(e) = SchemaCompatibility::can_read(&writer.schema, &reader.schema) {
                panic!("{} cannot read {}: {e}", reader.file, writer.file);
            }
            pairs += 1;
        }
    }
    // 2×2 for UsageEvent, 1 each for the others: proves the loop saw every version.
    assert_eq!(pairs, 7);
}

#[test]
fn compatibility_check_would_catch_a_breaking_change() {
    // The check above can fail: a new required field without a default breaks old writers.
    let current = shipped().iter().find(|s| s.file == "usage_event.v2.avsc").unwrap();
    let broken = apache_avro::Schema::parse_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/avro/usage_event.v2.avsc"))
            .unwrap()
            .replace(
                r#"{"name": "request_id", "type": ["null", "string"], "default": null,"#,
                r#"{"name": "request_id", "type": "string","#,
            ),
    )
    .unwrap();
    assert!(SchemaCompatibility::can_read(&current.schema, &broken).is_ok());
    let v1 = shipped().iter().find(|s| s.file == "usage_event.v1.avsc").unwrap();
    assert!(SchemaCompatibility::can_read(&v1.schema, &broken).is_err());
}
