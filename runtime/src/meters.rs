//! Meter names: the one spelling every service accepts for a meter, built in or declared in
//! the gateway's `[meters.<name>]`.
//!
//! In: a name from settings. Out: whether it is spelled as a meter. Names travel in usage
//! events, ClickHouse rows, Stripe meter event identifiers and header values, so they are kept
//! to one plain lowercase form that needs quoting nowhere.

/// The meters the gateway counts without a declaration.
pub const BUILT_IN: [&str; 5] = [
    "requests",
    "compute_units",
    "request_bytes",
    "response_bytes",
    "concurrent",
];

/// What [`valid_name`] accepts, for messages.
pub const NAME_RULE: &str = "1 to 64 characters from a-z 0-9 _, starting with a letter";

/// 1 to 64 characters from `a-z 0-9 _`, starting with a letter.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_lowercase_words() {
        for good in ["tokens", "premium_calls", "gpu_seconds2", "a"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "Tokens",
            "9lives",
            "_tokens",
            "to-kens",
            "tokens ",
            "tökens",
            &"a".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(BUILT_IN.iter().all(|name| valid_name(name)));
    }
}
