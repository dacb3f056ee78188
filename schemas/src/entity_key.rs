//! The message keys of the compacted keys topic (`tollgate.keys`): which entity a record is
//! the full state of. One owner of this wire contract: the admin API writes these keys, the
//! gateways' key index and the meter consumer's mirror read them.
//!
//! In: a message key as bytes-turned-text (`consumer/<id>`, `key/<id>`, `budget/<tenant id>`). Out: an
//! [`EntityKey`]; and back, the text to write. Compaction keeps the last record per key, so a
//! key must name one entity forever: the id is the entity's immutable id, never its name.

use std::fmt;

/// The entity a keys-topic record (or tombstone) is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntityKey<'a> {
    /// `consumer/<id>`: a [`crate::ConsumerRecord`].
    Consumer(&'a str),
    /// `key/<id>`: an [`crate::ApiKeyRecord`].
    ApiKey(&'a str),
    /// `budget/<tenant id>`: a [`crate::BudgetRecord`]. Keyed by tenant, not consumer: one cap
    /// covers every consumer of the tenant, and tenant ids are immutable identities too.
    Budget(&'a str),
}

/// A message key that names no entity this version knows (a newer writer's kind, or damage).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("keys topic message key {0:?} is none of consumer/<id>, key/<id>, budget/<tenant id>")]
pub struct UnknownEntityKey(pub String);

impl<'a> EntityKey<'a> {
    /// Reads a message key; the id must be non-empty.
    pub fn parse(key: &'a str) -> Result<Self, UnknownEntityKey> {
        let parsed = if let Some(id) = key.strip_prefix("consumer/") {
            Some(EntityKey::Consumer(id))
        } else if let Some(id) = key.strip_prefix("key/") {
            Some(EntityKey::ApiKey(id))
        } else {
            key.strip_prefix("budget/").map(EntityKey::Budget)
        };
        parsed
            .filter(|entity| !entity.id().is_empty())
            .ok_or_else(|| UnknownEntityKey(key.to_owned()))
    }

    /// The entity's id, without its kind.
    pub fn id(&self) -> &'a str {
        match self {
            EntityKey::Consumer(id) | EntityKey::ApiKey(id) | EntityKey::Budget(id) => id,
        }
    }
}

impl fmt::Display for EntityKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntityKey::Consumer(id) => write!(f, "consumer/{id}"),
            EntityKey::ApiKey(id) => write!(f, "key/{id}"),
            EntityKey::Budget(tenant) => write!(f, "budget/{tenant}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn known_kinds_parse_and_others_are_refused() {
        assert_eq!(EntityKey::parse("consumer/c_1"), Ok(EntityKey::Consumer("c_1")));
        assert_eq!(EntityKey::parse("key/key_9"), Ok(EntityKey::ApiKey("key_9")));
        assert_eq!(EntityKey::parse("budget/acme"), Ok(EntityKey::Budget("acme")));
        for bad in ["consumer/", "key/", "budget/", "plan/p1", "consumer", "", "Consumer/c1"] {
            assert_eq!(EntityKey::parse(bad), Err(UnknownEntityKey(bad.to_owned())), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(id in "[^\\s]{1,40}", kind in 0..3u8) {
            let key = match kind {
                0 => EntityKey::Consumer(&id),
                1 => EntityKey::ApiKey(&id),
                _ => EntityKey::Budget(&id),
            };
            let text = key.to_string();
            prop_assert_eq!(EntityKey::parse(&text), Ok(key));
        }
    }
}
