//! Chain step: authentication.
//!
//! In: the request's credential headers (`keys.headers`, in order; `authorization` expects
//! `Bearer <key>`) and the directory. Out: the [`Identity`] (consumer and key id), or 401. A
//! malformed key is refused without a lookup, and every refusal is the same 401, so the answer
//! never tells whether a key exists.

use hyper::header::HeaderMap;
use hyper::StatusCode;

use super::Proxy;
use crate::apikey;
use crate::directory::Identity;
use crate::problem::Problem;

impl Proxy {
    pub(super) fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, Problem> {
        let presented = self.credential_headers.iter().find_map(|name| {
            let value = headers.get(name)?.to_str().ok()?.trim();
            if name == hyper::header::AUTHORIZATION {
                let (scheme, token) = value.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            } else {
                Some(value)
            }
        });
        let digest = presented
            .and_then(|key| apikey::parse(key).ok())
            .ok_or_else(unauthorized)?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        self.directory
            .read()
            .expect("directory lock")
            .authenticate(&digest, now_ms)
            .map_err(|_| unauthorized())
    }
}

fn unauthorized() -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "invalid-api-key", "Unauthorized")
        .with_detail("a valid API key is required (Authorization: Bearer <key> or X-API-Key)")
        .with_header("www-authenticate", "Bearer")
}
