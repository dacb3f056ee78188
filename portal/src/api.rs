//! The portal's JSON API for one session: the link's exchange, the session, keys and limits.
//!
//! In: requests with the session cookie (and `X-CSRF-Token` on every state-changing one).
//! Out: the admin API's answers for the session's consumer, reshaped only where the portal
//! adds a rule (a roll's grace within `max_roll_grace_secs`), or problems. A key id from the
//! URL is checked for shape and then resolved by the admin API within the session's consumer:
//! another consumer's key answers 404, exactly like a key that does not exist.

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State as AxumState};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::admin_client::{AdminClient, AdminReply};
use crate::problem::Problem;
use crate::sessions::{self, Session};
use crate::{now_ms, State};

/// The request's live session, from its cookie; 401 otherwise.
pub struct Authed {
    pub session: Session,
    pub cookie: String,
}

impl FromRequestParts<State> for Authed {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &State) -> Result<Self, Self::Rejection> {
        let cookie = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(sessions::cookie_value)
            .ok_or_else(Problem::unauthenticated)?;
        let session = state
            .sessions
            .get(cookie, now_ms())
            .ok_or_else(Problem::unauthenticated)?;
        Ok(Self {
            session,
            cookie: cookie.to_owned(),
        })
    }
}

impl Authed {
    /// State-changing requests carry the session's CSRF token in `X-CSRF-Token`.
    pub fn csrf(&self, headers: &HeaderMap) -> Result<(), Problem> {
        let presented = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
        if self.session.csrf_ok(presented) {
            Ok(())
        } else {
            Err(Problem::new(
                StatusCode::FORBIDDEN,
                "csrf-token-invalid",
                "state-changing requests need the session's token in X-CSRF-Token (GET /api/session)",
            ))
        }
    }

    fn actor(&self) -> String {
        format!("portal:{}", self.session.consumer)
    }
}

/// The session as `GET /api/session` shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub consumer: String,
    pub tenant_id: String,
    pub csrf_token: String,
    pub expires_at: String,
}

pub(crate) fn time_text(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A session link's token: base64url, as the gateway mints them.
fn token_shaped(token: &str) -> bool {
    (16..=128).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A key id as the admin API makes them (`key_<32 hex>`); anything else is no key of ours.
pub(crate) fn key_id_shaped(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `GET /session/{token}`: exchanges a link for a session cookie, then the home page.
pub async fn open_link(AxumState(state): AxumState<State>, Path(token): Path<String>) -> Response {
    let refused = |status: StatusCode, why: &str| (status, Html(crate::pages::link_refused(why))).into_response();
    if !token_shaped(&token) {
        return refused(StatusCode::NOT_FOUND, "This link is not a portal session link.");
    }
    let reply = state
        .admin
        .call(
            Method::POST,
            "/v1/portal-sessions/exchange",
            Some(&json!({ "token": token })),
            None,
        )
        .await;
    let body = match reply {
        Ok(AdminReply { status, body }) if status == StatusCode::OK => body,
        Ok(AdminReply { status, body }) if status == StatusCode::GONE => {
            let detail = body["detail"].as_str().unwrap_or("the link cannot be used");
            return refused(
                StatusCode::GONE,
                &format!("This session link cannot be used: {detail}. Links work once, for a few minutes: ask your application for a new one."),
            );
        }
        Ok(AdminReply { status, .. }) => {
            tracing::error!(%status, "portal link exchange refused by the admin API");
            return refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "The portal cannot open sessions right now. Try again shortly.",
            );
        }
        Err(error) => {
            tracing::error!(%error, "portal link exchange failed");
            return refused(
                StatusCode::SERVICE_UNAVAILABLE,
                "The portal cannot open sessions right now. Try again shortly.",
            );
        }
    };
    let (Some(consumer), Some(tenant)) = (body["consumer"].as_str(), body["tenantId"].as_str()) else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "The portal cannot open sessions right now.",
        );
    };
    let environment = body["keyEnvironment"].as_str().unwrap_or("live").to_owned();
    let (cookie, _) = state
        .sessions
        .start(consumer.to_owned(), tenant.to_owned(), environment, now_ms());
    let set_cookie = sessions::set_cookie(&cookie, state.settings.portal.session_ttl_secs, state.settings.secure());
    // See-other to the home page: the token leaves the address bar and the history entry.
    ([(header::SET_COOKIE, set_cookie)], Redirect::to("/")).into_response()
}

/// `GET /api/session`.
#[utoipa::path(
    get,
    path = "/api/session",
    summary = "The session: its consumer, tenant, CSRF token and expiry",
    responses(
        (status = 200, description = "the session", body = SessionView),
        (status = 401, description = "no live portal session", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json")
    )
)]
pub async fn session(authed: Authed) -> Json<SessionView> {
    let s = authed.session;
    Json(SessionView {
        consumer: s.consumer,
        tenant_id: s.tenant_id,
        csrf_token: s.csrf_token,
        expires_at: time_text(s.expires_at_ms),
    })
}

/// `DELETE /api/session`: signs out.
#[utoipa::path(
    delete,
    path = "/api/session",
    summary = "Sign out",
    responses(
        (status = 204, description = "signed out; the cookie is cleared"),
        (status = 401, description = "no live portal session", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 403, description = "X-CSRF-Token is missing or not the session's", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json")
    )
)]
pub async fn sign_out(
    AxumState(state): AxumState<State>,
    authed: Authed,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    authed.csrf(&headers)?;
    state.sessions.end(&authed.cookie);
    let clear = format!("{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict", sessions::COOKIE);
    Ok((StatusCode::NO_CONTENT, [(header::SET_COOKIE, clear)]).into_response())
}

/// A JSON body into `T` (unknown members refused); an empty body is `{}`.
fn body_of<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, Problem> {
    if body.is_empty() {
        return serde_json::from_value(json!({})).map_err(|e| Problem::bad_request(e.to_string()));
    }
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "send JSON with Content-Type: application/json",
        ));
    }
    serde_json::from_slice(body).map_err(|e| Problem::bad_request(format!("body: {e}")))
}

/// The admin API's answer as the tenant's: success and client faults pass (their details are
/// written for API clients), anything else is the portal's own 503.
fn pass(reply: Result<AdminReply, crate::admin_client::AdminError>, what: &'static str) -> Result<Response, Problem> {
    let reply = reply.map_err(|e| Problem::unavailable(what, &e))?;
    match reply.status {
        StatusCode::NO_CONTENT => Ok(StatusCode::NO_CONTENT.into_response()),
        s if s.is_success() => Ok((s, Json(reply.body)).into_response()),
        StatusCode::NOT_FOUND => Err(Problem::not_found("no such key")),
        StatusCode::BAD_REQUEST => Err(Problem::bad_request(
            reply.body["detail"]
                .as_str()
                .unwrap_or("the request was refused")
                .to_owned(),
        )),
        other => Err(Problem::unavailable(what, &format!("admin API answered {other}"))),
    }
}

/// `GET /api/keys`: the session's consumer's keys (never a secret: the admin API has none).
#[utoipa::path(
    get,
    path = "/api/keys",
    summary = "The consumer's keys (never their secrets)",
    responses(
        (status = 200, description = "the keys", body = tollgate_runtime::admin_api::KeyList),
        (status = 401, description = "no live portal session", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 503, description = "the gateway's admin API is unavailable", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json")
    )
)]
pub async fn list_keys(AxumState(state): AxumState<State>, authed: Authed) -> Result<Response, Problem> {
    let path = AdminClient::consumer_path(&authed.session.consumer, "/keys");
    pass(state.admin.call(Method::GET, &path, None, None).await, "the key list")
}

#[derive(Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewKey {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// RFC 3339 expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_on: Option<String>,
}

/// `POST /api/keys`: a new key; its plaintext is in this answer only.
#[utoipa::path(
    post,
    path = "/api/keys",
    summary = "Issue a key; the answer is the only place it is ever shown",
    request_body = NewKey,
    responses(
        (status = 201, description = "the key, with `key`", body = tollgate_runtime::admin_api::ApiKey),
        (status = 400, description = "the body or a value in it is not acceptable", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 401, description = "no live portal session", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 403, description = "X-CSRF-Token is missing or not the session's", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 415, description = "the body is not sent as JSON", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 503, description = "the gateway's admin API is unavailable", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json")
    )
)]
pub async fn create_key(
    AxumState(state): AxumState<State>,
    authed: Authed,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    authed.csrf(&headers)?;
    let new: NewKey = body_of(&headers, &body)?;
    if new.description.as_ref().is_some_and(|d| d.len() > 200) {
        return Err(Problem::bad_request("description: at most 200 bytes"));
    }
    let path = AdminClient::consumer_path(&authed.session.consumer, "/keys");
    let body = serde_json::to_value(&new).expect("a key request serializes");
    pass(
        state
            .admin
            .call(Method::POST, &path, Some(&body), Some(&authed.actor()))
            .await,
        "key creation",
    )
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RollKey {
    /// How long the old key keeps working, in seconds (0: it stops now).
    pub grace_secs: u64,
    pub description: Option<String>,
}

/// `POST /api/keys/{id}/roll`: a new key; the old one works for the grace period chosen.
#[utoipa::path(
    post,
    path = "/api/keys/{id}/roll",
    summary = "Replace a key; the old one works for the grace period chosen",
    params(("id" = String, Path, description = "the key's id")),
    request_body = RollKey,
    responses(
        (status = 201, description = "the new key, with `key`", body = tollgate_runtime::admin_api::ApiKey),
        (status = 400, description = "the body or a value in it is not acceptable", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 401, description = "no live portal session", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 403, description = "X-CSRF-Token is missing or not the session's", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such key of this consumer", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 415, description = "the body is not sent as JSON", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 503, description = "the gateway's admin API is unavailable", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json")
    )
)]
pub async fn roll_key(
    AxumState(state): AxumState<State>,
    authed: Authed,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Problem> {
    authed.csrf(&headers)?;
    if !key_id_shaped(&id) {
        return Err(Problem::not_found("no such key"));
    }
    let roll: RollKey = body_of(&headers, &body)?;
    let max = state.settings.portal.max_roll_grace_secs;
    if roll.grace_secs > max {
        return Err(Problem::bad_request(format!(
            "graceSecs: at most {max} seconds (the operator's maximum), found {}",
            roll.grace_secs
        )));
    }
    // The admin API refuses a deadline in the past only for new keys; a zero grace ends the
    // old key a second from now, when the new one already works.
    let deadline = now_ms() + roll.grace_secs.max(1) as i64 * 1000;
    let mut admin_body = json!({ "expiresOn": time_text(deadline) });
    if let Some(description) = roll.description {
        admin_body["description"] = Value::String(description);
    }
    let path = AdminClient::consumer_path(&authed.session.consumer, &format!("/keys/{id}/roll"));
    pass(
        state
            .admin
            .call(Method::POST, &path, Some(&admin_body), Some(&authed.actor()))
            .await,
        "key roll",
    )
}

/// `DELETE /api/keys/{id}`: revokes at once, on every gateway.
#[utoipa::path(
    delete,
    path = "/api/keys/{id}",
    summary = "Revoke a key at once, on every gateway",
    params(("id" = String, Path, description = "the key's id")),
    responses(
        (status = 204, description = "revoked"),
        (status = 401, description = "no live portal session", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 403, description = "X-CSRF-Token is missing or not the session's", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 404, description = "no such key of this consumer", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 503, description = "the gateway's admin API is unavailable", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json")
    )
)]
pub async fn revoke_key(
    AxumState(state): AxumState<State>,
    authed: Authed,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    authed.csrf(&headers)?;
    if !key_id_shaped(&id) {
        return Err(Problem::not_found("no such key"));
    }
    let path = AdminClient::consumer_path(&authed.session.consumer, &format!("/keys/{id}"));
    pass(
        state
            .admin
            .call(Method::DELETE, &path, None, Some(&authed.actor()))
            .await,
        "key revocation",
    )
}

/// `GET /api/limits`: every limit of the tenant's plan, live (read without charging).
#[utoipa::path(
    get,
    path = "/api/limits",
    summary = "Every limit of the tenant's plan, live, read without charging",
    responses(
        (status = 200, description = "the limit status", body = tollgate_runtime::admin_api::LimitStatus),
        (status = 401, description = "no live portal session", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 503, description = "the gateway's admin API is unavailable", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json")
    )
)]
pub async fn limits(AxumState(state): AxumState<State>, authed: Authed) -> Result<Response, Problem> {
    let path = AdminClient::consumer_path(&authed.session.consumer, "/limits");
    pass(
        state.admin.call(Method::GET, &path, None, None).await,
        "the limit status",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_shaped_ids_and_tokens_reach_the_admin_api() {
        assert!(key_id_shaped("key_0192a3b4c5d6e7f80123456789abcdef"));
        for bad in ["", "../x", "key_1/roll", "key%2F1", "a b", &"k".repeat(65)] {
            assert!(!key_id_shaped(bad), "{bad:?}");
        }
        assert!(token_shaped("abcdefghijklmnopqrstuvwxyz-_0123456789ABCDE"));
        for bad in ["short", "has/slash-and-is-long-enough", "has space and is long enough"] {
            assert!(!token_shaped(bad), "{bad:?}");
        }
    }
}
