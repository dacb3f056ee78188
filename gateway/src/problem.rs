//! RFC 9457 problem details: the one place a gateway error becomes an HTTP response.
//!
//! In: a [`Problem`] (status, type slug, title, safe detail). Out: an `application/problem+json`
//! response. Details are written for the client: internal error text never goes here.

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use serde::Serialize;

/// Base of the `type` URIs; each problem type has a page in the docs.
const TYPE_BASE: &str = "https://tollgate.dev/problems/";

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(skip)]
    pub status: StatusCode,
    #[serde(rename = "type")]
    pub kind: String,
    pub title: &'static str,
    #[serde(rename = "status")]
    pub status_code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extra response headers (`Retry-After`, `WWW-Authenticate`).
    #[serde(skip)]
    pub headers: Vec<(&'static str, String)>,
    /// A complete body built elsewhere, sent instead of the fields above.
    #[serde(skip)]
    pub raw: Option<Box<serde_json::Value>>,
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, title: &'static str) -> Self {
        Self {
            status,
            kind: format!("{TYPE_BASE}{slug}"),
            title,
            status_code: status.as_u16(),
            detail: None,
            headers: Vec::new(),
            raw: None,
        }
    }

    /// A problem whose body was built elsewhere (the limiter's 429 `quota-exceeded`), as
    /// given: status from its `status` member.
    pub fn from_json(body: serde_json::Value) -> Self {
        let status = body
            .get("status")
            .and_then(serde_json::Value::as_u64)
            .and_then(|s| StatusCode::from_u16(s as u16).ok())
            .unwrap_or(StatusCode::TOO_MANY_REQUESTS);
        let mut problem = Self::new(status, "", "");
        problem.raw = Some(Box::new(body));
        problem
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = match &self.raw {
            Some(raw) => raw.to_string().into_bytes(),
            None => serde_json::to_vec(&self).expect("a problem always serializes"),
        };
        let mut response = Response::builder()
            .status(self.status)
            .header(hyper::header::CONTENT_TYPE, "application/problem+json");
        for (name, value) in self.headers {
            response = response.header(name, value);
        }
        response
            .body(Full::new(Bytes::from(body)))
            .expect("problem headers are valid")
    }
}
