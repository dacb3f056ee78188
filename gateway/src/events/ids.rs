//! UUIDv7s for usage events and request ids, two per request, without a system call each.
//!
//! In: the clock and the OS random source, read 4 KiB at a time per thread. Out: [`now_v7`],
//! a UUIDv7 (RFC 9562: 48-bit Unix milliseconds, version, 74 random bits) as the uuid crate
//! makes, and [`text`], its hyphenated lower-case text.
//!
//! `Uuid::now_v7` asks the OS for ten random bytes per id (a `getrandom` system call each
//! time); drawing them from a per-thread buffer filled by the same source keeps the ids as
//! random and as unique, for one call per 409 ids. Event ids are the deduplication key
//! downstream, so the randomness must stay the OS's, not a seeded generator's.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

const RANDOM_PER_ID: usize = 10;
const POOL_BYTES: usize = 4096;

struct Pool {
    bytes: [u8; POOL_BYTES],
    used: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { bytes: [0; POOL_BYTES], used: POOL_BYTES }) };
}

/// A new UUIDv7 for now.
pub fn now_v7() -> Uuid {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut random = [0u8; RANDOM_PER_ID];
    POOL.with_borrow_mut(|pool| {
        if pool.used + RANDOM_PER_ID > POOL_BYTES {
            getrandom::fill(&mut pool.bytes).expect("the OS random source is available");
            pool.used = 0;
        }
        random.copy_from_slice(&pool.bytes[pool.used..pool.used + RANDOM_PER_ID]);
        pool.used += RANDOM_PER_ID;
    });
    uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid()
}

/// The id as hyphenated lower-case text, without going through `Display`.
pub fn text(id: Uuid) -> String {
    id.hyphenated().encode_lower(&mut Uuid::encode_buffer()).to_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ids_are_version_7_with_the_current_time_and_never_repeat() {
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        // Several pool refills' worth.
        let ids: Vec<Uuid> = (0..5_000).map(|_| now_v7()).collect();
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
            let ms = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!((before..=after).contains(&ms), "{ms} outside {before}..={after}");
        }
        assert_eq!(text(ids[0]), ids[0].to_string());
    }
}
