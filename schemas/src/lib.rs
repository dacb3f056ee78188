//! Tollgate's Avro records and their wire codec.
//!
//! In: the `.avsc` files under `schemas/avro/` (embedded at build time) and typed records from
//! the gateway and the admin API. Out: Avro single-object encoded bytes for Kafka
//! (`tollgate.usage.v1`, `tollgate.keys`), and typed records back from those bytes for the
//! gateway's key index (consumers, keys and budgets), the meter consumer and billing; and the keys topic's message keys
//! ([`EntityKey`]).
//!
//! Wire format ([Avro single-object encoding]): `C3 01`, the 8-byte little-endian CRC-64-AVRO
//! (Rabin) fingerprint of the writer's schema, then the Avro binary body. The fingerprint names
//! the writer's schema without a registry service; [`decode`] looks it up among every shipped
//! version and resolves the body to the current schema, which the Rust types match.
//!
//! # Evolving a schema
//! - Never edit a released `.avsc`: readers in the field know it by its fingerprint, and
//!   `tests/schema_evolution.rs` pins every fingerprint, so an edit that changes what is on the
//!   wire fails the tests.
//! - Add `<record>.v<N+1>.avsc`, add a line to `SOURCES` in `src/registry.rs`, and change the Rust type to match it.
//! - Keep each new version fully compatible with every older one (old and new readers can read
//!   both): only add fields that have a default, or remove fields that had one. The evolution
//!   test checks every pair of shipped versions in both directions.
//! - Roll a new version out to every reader (gateways' key index, meter consumer) before any
//!   writer uses it: a reader rejects fingerprints it does not know, and an old reader also
//!   rejects enum symbols it does not know.
//!
//! [Avro single-object encoding]: https://avro.apache.org/docs/1.12.0/specification/#single-object-encoding
#![forbid(unsafe_code)]

mod codec;
mod entity_key;
mod records;
mod registry;
mod usage_wire;

pub use codec::{
    decode, encode, encode_value, writer_schema_of, BodyError, DecodeError, EncodeError, MAX_DECODE_ALLOCATION_BYTES,
};
pub use entity_key::{EntityKey, UnknownEntityKey};
pub use records::{ApiKeyRecord, BudgetRecord, ConsumerRecord, Outcome, UsageEvent};
pub use registry::{fingerprint_of, shipped, ShippedSchema};
pub use usage_wire::{decode_usage_event, encode_usage_event, UsageEventRef};

/// A record type with shipped Avro schemas. Sealed: only this crate's records implement it, so
/// every implementor is covered by the round-trip and evolution tests.
pub trait AvroRecord: serde::Serialize + serde::de::DeserializeOwned + private::Sealed {
    /// Full Avro name of the record, as in its `.avsc` files.
    const NAME: &'static str;
}

mod private {
    pub trait Sealed {}
}

impl private::Sealed for UsageEvent {}
impl private::Sealed for ConsumerRecord {}
impl private::Sealed for ApiKeyRecord {}
impl private::Sealed for BudgetRecord {}

impl AvroRecord for UsageEvent {
    const NAME: &'static str = "dev.tollgate.UsageEvent";
}
impl AvroRecord for ConsumerRecord {
    const NAME: &'static str = "dev.tollgate.ConsumerRecord";
}
impl AvroRecord for ApiKeyRecord {
    const NAME: &'static str = "dev.tollgate.ApiKeyRecord";
}
impl AvroRecord for BudgetRecord {
    const NAME: &'static str = "dev.tollgate.BudgetRecord";
}
