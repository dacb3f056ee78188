//! Portal sessions: the cookie a session link is exchanged for, and its CSRF token.
//!
//! In: a consumer the gateway vouched for (the link's exchange), then every request's
//! `Cookie` and, on state-changing ones, `X-CSRF-Token`. Out: the session's consumer and
//! tenant, or nothing. The cookie value is 256 random bits, kept here only as its SHA-256;
//! a session ends `session_ttl_secs` after it began, whatever the activity.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const COOKIE: &str = "tollgate_portal";

/// What a session may see: one consumer and its tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub consumer: String,
    pub tenant_id: String,
    pub csrf_token: String,
    pub expires_at_ms: i64,
    /// `tg_<environment>_`: the start of this gateway's keys, for code samples.
    pub key_environment: String,
}

impl Session {
    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_ok(&self, presented: Option<&str>) -> bool {
        presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(self.csrf_token.as_bytes())))
    }
}

pub struct Sessions {
    ttl_ms: i64,
    by_digest: Mutex<HashMap<[u8; 32], Session>>,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn digest(value: &str) -> [u8; 32] {
    Sha256::digest(value.as_bytes()).into()
}

impl Sessions {
    pub fn new(ttl_secs: u64) -> Self {
        Self {
            ttl_ms: ttl_secs as i64 * 1000,
            by_digest: Mutex::new(HashMap::new()),
        }
    }

    /// Starts a session; returns the cookie value (shown to the browser only).
    pub fn start(
        &self,
        consumer: String,
        tenant_id: String,
        key_environment: String,
        now_ms: i64,
    ) -> (String, Session) {
        let cookie = random_token();
        let session = Session {
            consumer,
            tenant_id,
            csrf_token: random_token(),
            expires_at_ms: now_ms + self.ttl_ms,
            key_environment,
        };
        let mut all = self.by_digest.lock().expect("sessions lock");
        all.retain(|_, s| s.expires_at_ms > now_ms);
        all.insert(digest(&cookie), session.clone());
        (cookie, session)
    }

    /// The live session a cookie value names; an expired one is dropped.
    pub fn get(&self, cookie: &str, now_ms: i64) -> Option<Session> {
        let mut all = self.by_digest.lock().expect("sessions lock");
        let key = digest(cookie);
        match all.get(&key) {
            Some(s) if s.expires_at_ms > now_ms => Some(s.clone()),
            Some(_) => {
                all.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session a cookie names (sign out).
    pub fn end(&self, cookie: &str) {
        self.by_digest.lock().expect("sessions lock").remove(&digest(cookie));
    }
}

/// The session cookie's value in a `Cookie` header, if any.
pub fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// `Set-Cookie` for a new session: HttpOnly, SameSite=Strict, Secure over TLS.
pub fn set_cookie(value: &str, ttl_secs: u64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={value}; Path=/; Max-Age={ttl_secs}; HttpOnly; SameSite=Strict{secure}")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_session_lasts_its_ttl_and_no_longer() {
        let sessions = Sessions::new(60);
        let (cookie, s) = sessions.start("acme".into(), "t1".into(), "live".into(), 1_000);
        assert_eq!(s.expires_at_ms, 61_000);
        assert_eq!(sessions.get(&cookie, 60_999).unwrap().consumer, "acme");
        assert_eq!(sessions.get(&cookie, 61_000), None);
        assert_eq!(sessions.get(&cookie, 1_000), None, "an expired session is gone");
        assert_eq!(sessions.get("forged", 1_000), None);
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_over_tls() {
        let plain = set_cookie("v", 3600, false);
        assert_eq!(
            plain,
            "tollgate_portal=v; Path=/; Max-Age=3600; HttpOnly; SameSite=Strict"
        );
        assert!(set_cookie("v", 3600, true).ends_with("; Secure"));
        assert_eq!(cookie_value("a=b; tollgate_portal=xyz; c=d"), Some("xyz"));
        assert_eq!(cookie_value("tollgate_portalx=xyz"), None);
    }

    #[test]
    fn csrf_needs_the_sessions_own_token() {
        let sessions = Sessions::new(60);
        let (_, s) = sessions.start("acme".into(), "t1".into(), "live".into(), 0);
        assert!(s.csrf_ok(Some(&s.csrf_token.clone())));
        assert!(!s.csrf_ok(None));
        assert!(!s.csrf_ok(Some("")));
        let (_, other) = sessions.start("acme".into(), "t1".into(), "live".into(), 0);
        assert!(!s.csrf_ok(Some(&other.csrf_token)));
    }

    proptest! {
        /// Sessions never leak into each other: each cookie finds its own consumer only.
        #[test]
        fn each_cookie_finds_only_its_own_session(names in prop::collection::vec("[a-z]{1,8}", 1..20)) {
            let sessions = Sessions::new(60);
            let started: Vec<_> = names
                .iter()
                .map(|n| (sessions.start(n.clone(), format!("t-{n}"), "live".into(), 0), n.clone()))
                .collect();
            for ((cookie, session), name) in &started {
                let found = sessions.get(cookie, 1).unwrap();
                prop_assert_eq!(&found.consumer, name);
                prop_assert_eq!(&found.csrf_token, &session.csrf_token);
            }
        }
    }
}
