//! The API key format: `tg_<env>_<secret>_<check>`.
//!
//! In: random bytes (new keys) or a credential a client sent. Out: a [`NewKey`] whose
//! plaintext is shown once, or the SHA-256 digest the key index is searched by.
//!
//! `<secret>` is 32 base62 characters drawn uniformly (about 190 bits); `<check>` is the CRC-32
//! of everything before it, as 6 base62 characters. The checksum lets a mistyped or truncated
//! key be refused without a lookup and lets secret scanners recognise a real key; the fixed
//! `tg_` prefix and shape make it greppable. Only the digest is ever stored.

use sha2::{Digest, Sha256};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const SECRET_LEN: usize = 32;
const CHECK_LEN: usize = 6;
/// Characters of the secret kept in the displayable prefix (`tg_live_AbC123`): enough to tell
/// keys apart in a list, far too few to help guess one.
const PREFIX_SECRET_CHARS: usize = 6;

/// A freshly generated key. `plaintext` is returned to the caller once and dropped.
pub struct NewKey {
    pub plaintext: String,
    pub prefix: String,
    pub digest: [u8; 32],
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Why a credential was refused before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedKey {
    #[error("not a Tollgate key")]
    Shape,
    #[error("checksum mismatch")]
    Checksum,
}

/// Whether `env` may appear in a key (`live`, `test`, …).
pub fn valid_env(env: &str) -> bool {
    (1..=16).contains(&env.len()) && env.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Generates a key for environment `env` (already validated by the settings).
pub fn generate(env: &str) -> NewKey {
    let mut secret = String::with_capacity(SECRET_LEN);
    let mut buf = [0u8; 64];
    while secret.len() < SECRET_LEN {
        getrandom::fill(&mut buf).expect("the OS random source is available");
        // Rejection sampling keeps every character equally likely: 248 = 4 × 62.
        secret.extend(
            buf.iter()
                .filter(|b| **b < 248)
                .map(|b| BASE62[usize::from(*b % 62)] as char),
        );
    }
    secret.truncate(SECRET_LEN);
    from_parts(env, &secret)
}

fn from_parts(env: &str, secret: &str) -> NewKey {
    let body = format!("tg_{env}_{secret}");
    let plaintext = format!("{body}_{}", checksum(&body));
    NewKey {
        prefix: format!("tg_{env}_{}", &secret[..PREFIX_SECRET_CHARS]),
        digest: digest(&plaintext),
        plaintext,
    }
}

fn checksum(body: &str) -> String {
    let mut n = crc32fast::hash(body.as_bytes());
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("base62 is ASCII")
}

/// SHA-256 of the whole key: what the index stores and looks up.
pub fn digest(plaintext: &str) -> [u8; 32] {
    Sha256::digest(plaintext.as_bytes()).into()
}

/// Checks shape and checksum; returns the digest to look up.
pub fn parse(candidate: &str) -> Result<[u8; 32], MalformedKey> {
    let rest = candidate.strip_prefix("tg_").ok_or(MalformedKey::Shape)?;
    let mut parts = rest.split('_');
    let (Some(env), Some(secret), Some(check), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(MalformedKey::Shape);
    };
    let base62 = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric());
    if !valid_env(env) || secret.len() != SECRET_LEN || check.len() != CHECK_LEN || !base62(secret) || !base62(check) {
        return Err(MalformedKey::Shape);
    }
    if checksum(&format!("tg_{env}_{secret}")) != check {
        return Err(MalformedKey::Checksum);
    }
    Ok(digest(candidate))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn generated_keys_parse_and_have_the_documented_shape() {
        let key = generate("live");
        assert!(key.plaintext.starts_with("tg_live_"));
        assert_eq!(key.plaintext.len(), "tg_live_".len() + SECRET_LEN + 1 + CHECK_LEN);
        assert!(key.plaintext.starts_with(&key.prefix));
        assert_eq!(parse(&key.plaintext), Ok(key.digest));
        assert_ne!(generate("live").plaintext, key.plaintext);
    }

    #[test]
    fn debug_never_shows_the_plaintext() {
        let key = generate("test");
        assert!(!format!("{key:?}").contains(&key.plaintext));
    }

    #[test]
    fn malformed_keys_are_refused_without_lookup() {
        let key = generate("live").plaintext;
        assert_eq!(parse(""), Err(MalformedKey::Shape));
        assert_eq!(parse("Bearer abc"), Err(MalformedKey::Shape));
        assert_eq!(parse(&key[..key.len() - 1]), Err(MalformedKey::Shape));
        assert_eq!(parse(&format!("{key}x")), Err(MalformedKey::Shape));
        assert_eq!(parse(&key.replace("tg_live_", "tg_LIVE_")), Err(MalformedKey::Shape));
    }

    proptest! {
        // Any single-character typo in the secret or checksum is caught by the checksum.
        #[test]
        fn one_typo_is_detected(pos in 8usize..(8 + SECRET_LEN + 1 + CHECK_LEN), replacement in 0usize..62) {
            let key = generate("live").plaintext;
            let mut bytes = key.clone().into_bytes();
            prop_assume!(bytes[pos] != b'_' && bytes[pos] != BASE62[replacement]);
            bytes[pos] = BASE62[replacement];
            let typo = String::from_utf8(bytes).unwrap();
            prop_assert_eq!(parse(&typo), Err(MalformedKey::Checksum));
        }

        // Candidates of the right shape reach the checksum: one is accepted exactly when its
        // checksum is right, and then looked up by the digest of exactly that text.
        #[test]
        fn well_shaped_keys_are_accepted_only_with_their_checksum(
            env in "[a-z0-9]{1,16}",
            secret in proptest::collection::vec(0usize..62, SECRET_LEN),
            check in proptest::collection::vec(0usize..62, CHECK_LEN),
            use_real_checksum in any::<bool>(),
        ) {
            let base62 = |chars: &[usize]| chars.iter().map(|c| BASE62[*c] as char).collect::<String>();
            let body = format!("tg_{env}_{}", base62(&secret));
            let check = if use_real_checksum { checksum(&body) } else { base62(&check) };
            let candidate = format!("{body}_{check}");
            match parse(&candidate) {
                Ok(found) => {
                    prop_assert_eq!(&check, &checksum(&body));
                    prop_assert_eq!(found, digest(&candidate));
                    prop_assert_eq!(found, from_parts(&env, &base62(&secret)).digest);
                }
                Err(err) => {
                    prop_assert_eq!(err, MalformedKey::Checksum);
                    prop_assert_ne!(&check, &checksum(&body));
                }
            }
        }

        // Whatever else arrives is refused for its shape, never looked up.
        #[test]
        fn anything_else_is_refused_for_its_shape(s in ".{0,80}") {
            prop_assume!(!s.starts_with("tg_"));
            prop_assert_eq!(parse(&s), Err(MalformedKey::Shape));
        }
    }
}
