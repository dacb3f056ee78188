//! Chain step 0: the request target's path, parsed once into its canonical form.
//!
//! In: the raw path of the request target (bytes as the client sent them). Out: a
//! [`CanonicalPath`] (what routes match and what the upstream gets), or the [`PathRefusal`]
//! that names why the path is ambiguous (never the path itself: it may carry secrets or
//! markup).
//!
//! Canonical form (RFC 3986 section 6.2.2): percent-encoded unreserved characters
//! (`A-Z a-z 0-9 - . _ ~`) are decoded, every other escape is kept with upper-case hex, empty
//! segments (`//`) are dropped, a trailing `/` is kept. Refused, because some upstream reads
//! them otherwise than the gateway would check them:
//! - `\` raw or encoded (WHATWG URL parsers and IIS read it as `/`);
//! - an encoded `/` (`%2F`), unless the route allows it (`escaped_slashes = "keep"`);
//! - `;` raw or encoded (Tomcat, Jetty and Spring strip `;params` from segments);
//! - `%25` followed by two hex digits (double encoding: decoded twice it is another path);
//! - `%00` and every control character, raw or encoded; raw bytes outside printable ASCII;
//! - escapes that are not `%` + two hex digits, and encoded bytes that are not valid UTF-8
//!   (overlong forms of `.` and `/` such as `%C0%AE` included);
//! - dot segments in any spelling: `.`, `..`, `%2e`, `...`, dots with trailing spaces
//!   (`..%20`), and any segment whose Unicode compatibility form is dots (full-width `．．`,
//!   one-dot leaders); non-ASCII characters are refused altogether unless the route allows
//!   them (`non_ascii = "allow"`), since NFKC in an upstream turns full-width letters, dots
//!   and slashes into ASCII syntax.

/// Why a path is refused; the reason is shown to the client, the path is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    #[error("the path must start with `/`")]
    NotAbsolute,
    #[error("the path contains an encoded slash (%2F)")]
    EncodedSlash,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path contains a `;` parameter")]
    PathParameter,
    #[error("the path is percent-encoded twice (%25 followed by hex digits)")]
    DoubleEncoding,
    #[error("the path contains a control character or %00")]
    ControlCharacter,
    #[error("the path contains a malformed percent escape")]
    BadEscape,
    #[error("the path contains bytes that are not valid UTF-8")]
    InvalidUtf8,
    #[error("the path contains a `.` or `..` segment")]
    DotSegment,
    #[error("the path contains non-ASCII characters")]
    NonAscii,
}

impl PathRefusal {
    /// The problem type slug and metric label.
    pub fn slug(self) -> &'static str {
        match self {
            PathRefusal::NotAbsolute => "not-absolute",
            PathRefusal::EncodedSlash => "encoded-slash",
            PathRefusal::Backslash => "backslash",
            PathRefusal::PathParameter => "path-parameter",
            PathRefusal::DoubleEncoding => "double-encoding",
            PathRefusal::ControlCharacter => "control-character",
            PathRefusal::BadEscape => "bad-escape",
            PathRefusal::InvalidUtf8 => "invalid-utf8",
            PathRefusal::DotSegment => "dot-segment",
            PathRefusal::NonAscii => "non-ascii",
        }
    }
}

/// A path in canonical form, with what the route's policies need to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    /// The canonical path as forwarded: `/v1/tenants/t_1/a%20b`.
    pub encoded: String,
    /// Each segment decoded (what `{param}`s capture and literals are compared with).
    pub segments: Vec<String>,
    /// Whether some segment holds an encoded `/` (refused unless the route keeps them).
    pub escaped_slash: bool,
    /// Whether some segment holds a non-ASCII character (refused unless the route allows it).
    pub non_ascii: bool,
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Raw characters allowed in a segment besides unreserved ones: sub-delims (but `;`), `:`, `@`.
fn allowed_raw(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
    )
}

/// Parses `raw` (the path of the request target, without the query) into canonical form.
pub fn canonicalize(raw: &str) -> Result<CanonicalPath, PathRefusal> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathRefusal::NotAbsolute);
    }
    let mut path = CanonicalPath {
        encoded: String::with_capacity(raw.len()),
        segments: Vec::new(),
        escaped_slash: false,
        non_ascii: false,
    };
    for segment in raw[1..].split('/') {
        if segment.is_empty() {
            continue;
        }
        let (encoded, decoded) = canonical_segment(segment.as_bytes(), &mut path)?;
        path.encoded.push('/');
        path.encoded.push_str(&encoded);
        path.segments.push(decoded);
    }
    if path.segments.is_empty() || raw.ends_with('/') {
        path.encoded.push('/');
    }
    Ok(path)
}

/// One segment: its canonical encoded form and its decoded value.
fn canonical_segment(bytes: &[u8], path: &mut CanonicalPath) -> Result<(String, String), PathRefusal> {
    let mut encoded = String::with_capacity(bytes.len());
    let mut decoded: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathRefusal::BadEscape);
                };
                let value = hi * 16 + lo;
                match value {
                    b'/' => {
                        path.escaped_slash = true;
                        encoded.push_str("%2F");
                    }
                    b'\\' => return Err(PathRefusal::Backslash),
                    b';' => return Err(PathRefusal::PathParameter),
                    b'%' if bytes.get(i + 3).copied().and_then(hex).is_some()
                        && bytes.get(i + 4).copied().and_then(hex).is_some() =>
                    {
                        return Err(PathRefusal::DoubleEncoding)
                    }
                    0..=0x1f | 0x7f => return Err(PathRefusal::ControlCharacter),
                    v if unreserved(v) => encoded.push(v as char),
                    v => {
                        if v >= 0x80 {
                            path.non_ascii = true;
                        }
                        encoded.push_str(&format!("%{v:02X}"));
                    }
                }
                decoded.push(value);
                i += 3;
            }
            b'\\' => return Err(PathRefusal::Backslash),
            b';' => return Err(PathRefusal::PathParameter),
            0..=0x1f | 0x7f => return Err(PathRefusal::ControlCharacter),
            0x80..=0xff => {
                // hyper refuses these in a request target already; refuse them here too, so the
                // rule holds whatever parsed the target.
                return Err(PathRefusal::NonAscii);
            }
            b if unreserved(b) || allowed_raw(b) => {
                encoded.push(b as char);
                decoded.push(b);
                i += 1;
            }
            // Space, `"`, `<`, `>`, `^`, `` ` ``, `{`, `|`, `}`, `[`, `]`, `#`, `?`: kept encoded.
            b => {
                encoded.push_str(&format!("%{b:02X}"));
                decoded.push(b);
                i += 1;
            }
        }
    }
    // Rust's UTF-8 decoder refuses overlong forms and surrogates (RFC 3629).
    let decoded = String::from_utf8(decoded).map_err(|_| PathRefusal::InvalidUtf8)?;
    if dot_like(&decoded) {
        return Err(PathRefusal::DotSegment);
    }
    Ok((encoded, decoded))
}

/// Whether a decoded segment may be read as `.` or `..` by some upstream: only dots once
/// whitespace is trimmed (Windows drops trailing spaces and dots), or a compatibility form of
/// dots (`．`, `․`, `‥`, `…`, `﹒`).
fn dot_like(segment: &str) -> bool {
    let trimmed = segment.trim_matches(|c: char| c.is_whitespace());
    !trimmed.is_empty()
        && trimmed
            .chars()
            .all(|c| matches!(c, '.' | '\u{FF0E}' | '\u{2024}' | '\u{2025}' | '\u{2026}' | '\u{FE52}'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        canonicalize(raw).unwrap_or_else(|e| panic!("{raw}: {e}")).encoded
    }

    fn refused(raw: &str) -> PathRefusal {
        canonicalize(raw).expect_err(raw)
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_the_rest_upper_cased() {
        assert_eq!(ok("/v1/%61%62c"), "/v1/abc");
        assert_eq!(ok("/v1/a%2db%7e"), "/v1/a-b~");
        assert_eq!(ok("/v1/a%3fb%20c"), "/v1/a%3Fb%20c");
        assert_eq!(ok("/v1//orders/"), "/v1/orders/");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("/v1/a b"), "/v1/a%20b");
        assert_eq!(ok("/v1/x@y:z!$&'()*+,="), "/v1/x@y:z!$&'()*+,=");
        assert_eq!(canonicalize("/v1/a%20b").unwrap().segments, ["v1", "a b"]);
    }

    #[test]
    fn every_ambiguous_spelling_is_refused_with_its_reason() {
        use PathRefusal::*;
        for (raw, why) in [
            ("v1/x", NotAbsolute),
            ("*", NotAbsolute),
            ("/v1/a%5Cb", Backslash),
            ("/v1/a\\b", Backslash),
            ("/v1/tenants;x/t", PathParameter),
            ("/v1/..;/x", PathParameter),
            ("/v1/a%3Bb", PathParameter),
            ("/v1/a%252Fb", DoubleEncoding),
            ("/v1/a%2525", DoubleEncoding),
            ("/v1/a%00", ControlCharacter),
            ("/v1/a%0A", ControlCharacter),
            ("/v1/a%7F", ControlCharacter),
            ("/v1/a\tb", ControlCharacter),
            ("/v1/a%zz", BadEscape),
            ("/v1/a%2", BadEscape),
            ("/v1/%C0%AE%C0%AE/x", InvalidUtf8),
            ("/v1/%C0%AF", InvalidUtf8),
            ("/v1/%FF", InvalidUtf8),
            ("/v1/%ED%A0%80", InvalidUtf8),
            ("/v1/../x", DotSegment),
            ("/v1/./x", DotSegment),
            ("/v1/.../x", DotSegment),
            ("/v1/%2e%2E/x", DotSegment),
            ("/v1/.%2e", DotSegment),
            ("/v1/..%20/x", DotSegment),
            ("/v1/%20../x", DotSegment),
            ("/v1/%EF%BC%8E%EF%BC%8E/x", DotSegment),
            ("/v1/%E2%80%A5", DotSegment),
        ] {
            assert_eq!(refused(raw), why, "{raw}");
        }
    }

    #[test]
    fn flags_what_a_route_may_allow() {
        let p = canonicalize("/v1/a%2Fb").unwrap();
        assert!(p.escaped_slash);
        assert_eq!(p.encoded, "/v1/a%2Fb");
        assert_eq!(p.segments, ["v1", "a/b"]);
        let p = canonicalize("/v1/%ef%bd%94").unwrap();
        assert!(p.non_ascii);
        assert_eq!(p.encoded, "/v1/%EF%BD%94");
        assert!(!canonicalize("/v1/a").unwrap().non_ascii);
    }

    #[test]
    fn canonical_form_is_a_fixed_point() {
        for raw in ["/v1/%61%2db", "/v1//x/", "/v1/a%3fb", "/v1/%ef%bd%94/", "/v1/a%2Fb"] {
            let once = ok(raw);
            assert_eq!(ok(&once), once, "{raw}");
        }
    }
}
