//! RFC 9457 problems: the one place a portal error becomes an HTTP response.
//!
//! In: a [`Problem`] from any handler. Out: `application/problem+json` with a detail written
//! for the tenant; internal error text (the admin API's, ClickHouse's) is logged, never sent.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

const TYPE_BASE: &str = "https://tollgate.dev/problems/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub status: StatusCode,
    pub slug: &'static str,
    pub detail: String,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            slug,
            detail: detail.into(),
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid-request", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "portal-session-required",
            "no valid portal session: open a new session link from your application",
        )
    }

    /// Something behind the portal failed; what, goes to the log only.
    pub fn unavailable(what: &'static str, error: &dyn std::fmt::Display) -> Self {
        tracing::error!(%error, what, "portal backend call failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "portal-backend-unavailable",
            format!("{what} is unavailable right now; retry later"),
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = json!({
            "type": format!("{TYPE_BASE}{}", self.slug),
            "title": self.status.canonical_reason().unwrap_or("Error"),
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}
