//! Kafka topic names: the defaults every service agrees on, and Kafka's rule for a name.
//!
//! In: a topic setting (`topics.usage`, …). Out: the default name, or a refusal naming the
//! setting when the name is one Kafka would reject, before any connection is made. The native
//! stack (`scripts/stack.d/infra.sh`) and docker-compose create these same topics;
//! `tests/tests/compose.rs` keeps them in step.

use crate::settings::Invalid;

/// Consumers and API keys, one record per entity (compacted).
pub const KEYS: &str = "tollgate.keys";
/// Usage events, keyed by tenant.
pub const USAGE: &str = "tollgate.usage.v1";
/// Usage records the meter consumer could not meter, with the reason in headers.
pub const USAGE_DLQ: &str = "tollgate.usage.v1.dlq";

/// Kafka's rule for topic names: 1 to 249 of `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub fn valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Refuses a topic setting Kafka would reject, naming the setting.
pub fn validate(field: &str, name: &str) -> Result<(), Invalid> {
    if valid(name) {
        Ok(())
    } else {
        Err(Invalid::new(
            field,
            name,
            "a Kafka topic name: 1 to 249 of a-z A-Z 0-9 . _ -",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_names_are_accepted_and_others_refused_by_setting() {
        for good in [KEYS, USAGE, USAGE_DLQ, "a", "A-b_c.9"] {
            assert!(valid(good), "{good}");
        }
        let too_long = "x".repeat(250);
        for bad in ["", ".", "..", "has space", "slash/es", "ümlaut", too_long.as_str()] {
            let err = validate("topics.usage", bad).expect_err(bad).to_string();
            assert!(err.contains("topics.usage"), "{err}");
        }
    }
}
