//! The Stripe client billing-sync uses, the start-up check that Stripe answers, and `setup`.
//!
//! In: the `[stripe]` section and the secret key. Out: [`StripeApi`], async-stripe's request
//! types sent over our own HTTP transport, or one line naming the URL that failed.
//!
//! Why our own transport: async-stripe's client turns an error response into a status and a
//! parsed body only, so `Retry-After` and `Stripe-Should-Retry` never reach the caller, and a
//! non-JSON 5xx (a load balancer's page) loses even its status. [`StripeApi`] implements
//! async-stripe's `StripeClient` trait, so the requests themselves (paths, form encoding,
//! the `Idempotency-Key` from `RequestStrategy::Idempotent`) are still async-stripe's.

use std::collections::HashSet;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use stripe::{IdempotencyKey, RequestStrategy, StripeRequest};
use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterCustomerMapping, CreateBillingMeterCustomerMappingType,
    CreateBillingMeterDefaultAggregation, CreateBillingMeterDefaultAggregationFormula, CreateBillingMeterValueSettings,
    ListBillingMeter,
};
use stripe_client_core::{CustomizedStripeRequest, StripeClient, StripeClientErr, StripeMethod};

use crate::settings::{MeterSettings, StripeSettings};

#[derive(Debug, thiserror::Error)]
pub enum StripeCheckError {
    #[error("{env} is not set: billing-sync needs a Stripe secret key", env = crate::settings::STRIPE_KEY_ENV)]
    MissingKey,
    #[error("stripe at {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// Why one Stripe call failed. Messages never hold the secret key (see [`redact`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StripeCallError {
    /// Stripe (or something in front of it) answered with a non-2xx status.
    #[error("stripe answered {status}: {message}")]
    Status {
        status: u16,
        message: String,
        /// `Retry-After`, in seconds, when the response had one.
        retry_after: Option<Duration>,
        /// `Stripe-Should-Retry`, when the response had one.
        should_retry: Option<bool>,
    },
    #[error("connection to stripe failed: {0}")]
    Transport(String),
    #[error("stripe did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected response from stripe: {0}")]
    Decode(String),
}

impl StripeClientErr for StripeCallError {
    fn deserialize_err(msg: impl std::fmt::Display) -> Self {
        Self::Decode(msg.to_string())
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// An HTTP client for the Stripe API (or stripe-mock) that async-stripe requests are sent with.
#[derive(Clone)]
pub struct StripeApi {
    http: HttpClient<Connector, Full<Bytes>>,
    base: String,
    authorization: HeaderValue,
    timeout: Duration,
}

impl std::fmt::Debug for StripeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("StripeApi")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Builds a client for `settings.api_base`. The key is never logged or echoed.
pub fn client(settings: &StripeSettings, api_key: &str) -> Result<StripeApi, StripeCheckError> {
    if api_key.is_empty() {
        return Err(StripeCheckError::MissingKey);
    }
    let unusable = |reason: &str| StripeCheckError::Unreachable {
        url: settings.api_base.clone(),
        reason: reason.to_owned(),
    };
    let mut authorization = HeaderValue::try_from(format!("Bearer {api_key}"))
        .map_err(|_| unusable("the secret key is not a valid header value"))?;
    authorization.set_sensitive(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let http = HttpClient::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    Ok(StripeApi {
        http,
        base: format!("{}/", settings.api_base.trim_end_matches('/')),
        authorization,
        timeout: Duration::from_millis(settings.timeout_ms),
    })
}

impl StripeApi {
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn call(&self, request: hyper::Request<Full<Bytes>>) -> Result<Bytes, StripeCallError> {
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| StripeCallError::Transport(error_chain(&e)))?;
        let status = response.status();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .map(str::to_owned)
        };
        let retry_after = header("retry-after")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64);
        let should_retry = header("stripe-should-retry").and_then(|v| v.parse::<bool>().ok());
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| StripeCallError::Transport(error_chain(&e)))?
            .to_bytes();
        if status.is_success() {
            return Ok(body);
        }
        Err(StripeCallError::Status {
            status: status.as_u16(),
            message: redact(&error_message(&body)),
            retry_after,
            should_retry,
        })
    }
}

/// Form fields of a Stripe call, in order (`items[0][price]=…`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form(pub Vec<(String, String)>);

impl Form {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.push((key.into(), value.into()));
        self
    }

    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), value.into()));
    }

    /// `application/x-www-form-urlencoded`, everything but unreserved characters escaped.
    pub fn encode(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl StripeApi {
    /// One call for which the async-stripe crates we build have no request type (products,
    /// prices, customers, subscriptions, invoices): the form is the body of a POST and the
    /// query of a GET; the answer is Stripe's JSON. Same transport, key handling and error
    /// mapping as every other call.
    pub async fn send_form(
        &self,
        method: hyper::Method,
        path: &str,
        form: &Form,
        idempotency_key: Option<&str>,
    ) -> Result<serde_json::Value, StripeCallError> {
        let encoded = form.encode();
        let mut uri = format!("{}v1{path}", self.base);
        let mut body = Bytes::new();
        let mut builder = hyper::Request::builder();
        if method == hyper::Method::GET {
            if !encoded.is_empty() {
                uri.push(if path.contains('?') { '&' } else { '?' });
                uri.push_str(&encoded);
            }
        } else {
            builder = builder.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
            body = Bytes::from(encoded);
        }
        builder = builder
            .method(method)
            .uri(uri)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(USER_AGENT, concat!("tollgate-billing-sync/", env!("CARGO_PKG_VERSION")))
            .header(
                HeaderName::from_static("stripe-version"),
                stripe_client_core::VERSION.as_str(),
            );
        if let Some(key) = idempotency_key {
            builder = builder.header(HeaderName::from_static("idempotency-key"), key);
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| StripeCallError::Transport(e.to_string()))?;
        let bytes = tokio::time::timeout(self.timeout, self.call(request))
            .await
            .unwrap_or(Err(StripeCallError::Timeout(self.timeout)))?;
        serde_json::from_slice(&bytes).map_err(|e| StripeCallError::Decode(e.to_string()))
    }
}

impl StripeClient for StripeApi {
    type Err = StripeCallError;

    async fn execute(&self, req: CustomizedStripeRequest) -> Result<Bytes, StripeCallError> {
        let (req, config) = req.into_pieces();
        let mut uri = format!("{}v1{}", self.base, req.path);
        if let Some(query) = &req.query {
            uri.push('?');
            uri.push_str(query);
        }
        let method = match req.method {
            StripeMethod::Get => hyper::Method::GET,
            StripeMethod::Post => hyper::Method::POST,
            StripeMethod::Delete => hyper::Method::DELETE,
        };
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(USER_AGENT, concat!("tollgate-billing-sync/", env!("CARGO_PKG_VERSION")))
            // The API version async-stripe's types were generated for.
            .header(
                HeaderName::from_static("stripe-version"),
                stripe_client_core::VERSION.as_str(),
            );
        if let Some(key) = config.request_strategy.as_ref().and_then(RequestStrategy::get_key) {
            builder = builder.header(HeaderName::from_static("idempotency-key"), key.as_str());
        }
        let body = match req.body {
            Some(body) => {
                builder = builder.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
                Bytes::from(body)
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(body))
            .map_err(|e| StripeCallError::Transport(e.to_string()))?;
        let timeout = config.timeout.unwrap_or(self.timeout);
        tokio::time::timeout(timeout, self.call(request))
            .await
            .unwrap_or(Err(StripeCallError::Timeout(timeout)))
    }
}

/// The reason in a Stripe error body (`{"error": {"type", "code", "message"}}`), or the start
/// of a body that is not one.
fn error_message(body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    if let Some(error) = parsed.as_ref().and_then(|v| v.get("error")) {
        let field = |name: &str| error.get(name).and_then(|v| v.as_str()).unwrap_or_default();
        let kind = [field("type"), field("code")]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("/");
        return format!("{kind}: {}", field("message"));
    }
    let text = String::from_utf8_lossy(body);
    text.trim().chars().take(200).collect()
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Masks anything shaped like a Stripe secret or restricted key (`sk_…`, `rk_…`), so an error
/// echoing one can be logged and stored.
pub fn redact(text: &str) -> String {
    text.split_inclusive(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ',')
        .map(|word| {
            let trimmed = word.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
            if trimmed.starts_with("sk_") || trimmed.starts_with("rk_") {
                let keep = word.len() - trimmed.len();
                let tail: String = word
                    .chars()
                    .rev()
                    .take_while(|c| !c.is_ascii_alphanumeric() && *c != '_')
                    .collect();
                format!("{}[redacted]{}", &word[..keep], tail.chars().rev().collect::<String>())
            } else {
                word.to_owned()
            }
        })
        .collect()
}

/// Lists one billing meter: proves the URL answers and the key is accepted.
pub async fn check_reachable(settings: &StripeSettings, client: &StripeApi) -> Result<(), StripeCheckError> {
    ListBillingMeter::new()
        .limit(1)
        .send(client)
        .await
        .map(|_| ())
        .map_err(|e| StripeCheckError::Unreachable {
            url: settings.api_base.clone(),
            reason: e.to_string(),
        })
}

/// What `setup` did for one configured meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeterSetup {
    Existing { event_name: String, id: String },
    Created { event_name: String, id: String },
}

/// Makes sure an active Stripe meter (sum of `value`, customer from `stripe_customer_id`)
/// exists for every configured meter. Idempotent: existing meters are found by event name,
/// and a creation carries an idempotency key derived from the event name.
pub async fn setup_meters(client: &StripeApi, meters: &[MeterSettings]) -> Result<Vec<MeterSetup>, StripeCallError> {
    let mut existing = std::collections::HashMap::new();
    let mut starting_after: Option<String> = None;
    loop {
        let mut list = ListBillingMeter::new()
            .limit(100)
            .status(stripe_billing::BillingMeterStatus::Active);
        if let Some(after) = &starting_after {
            list = list.starting_after(after.clone());
        }
        let page = list.send(client).await?;
        for meter in &page.data {
            existing.insert(meter.event_name.clone(), meter.id.to_string());
        }
        match (page.has_more, page.data.last()) {
            (true, Some(last)) => starting_after = Some(last.id.to_string()),
            _ => break,
        }
    }
    let mut done = Vec::new();
    let mut seen = HashSet::new();
    for meter in meters {
        if !seen.insert(&meter.event_name) {
            continue;
        }
        if let Some(id) = existing.get(&meter.event_name) {
            done.push(MeterSetup::Existing {
                event_name: meter.event_name.clone(),
                id: id.clone(),
            });
            continue;
        }
        let key = IdempotencyKey::new(format!("tollgate-meter-setup:{}", meter.event_name))
            .map_err(|e| StripeCallError::Decode(e.to_string()))?;
        let created = CreateBillingMeter::new(
            CreateBillingMeterDefaultAggregation::new(CreateBillingMeterDefaultAggregationFormula::Sum),
            format!("Tollgate {}", meter.meter),
            meter.event_name.clone(),
        )
        .customer_mapping(CreateBillingMeterCustomerMapping::new(
            "stripe_customer_id",
            CreateBillingMeterCustomerMappingType::ById,
        ))
        .value_settings(CreateBillingMeterValueSettings::new("value"))
        .customize()
        .request_strategy(RequestStrategy::Idempotent(key))
        .send(client)
        .await?;
        done.push(MeterSetup::Created {
            event_name: meter.event_name.clone(),
            id: created.id.to_string(),
        });
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripe_error_bodies_become_one_line() {
        let body = br#"{"error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such customer: 'cus_x'"}}"#;
        assert_eq!(
            error_message(body),
            "invalid_request_error/resource_missing: No such customer: 'cus_x'"
        );
        assert_eq!(error_message(b"<html>bad gateway</html>"), "<html>bad gateway</html>");
    }

    #[test]
    fn forms_escape_brackets_and_spaces() {
        let form = Form::new()
            .with("items[0][price]", "price_1")
            .with("description", "Tollgate tenant a&b");
        assert_eq!(
            form.encode(),
            "items%5B0%5D%5Bprice%5D=price_1&description=Tollgate%20tenant%20a%26b"
        );
    }

    #[test]
    fn keys_are_redacted() {
        let text = "Invalid API Key provided: sk_test_abc123, also 'rk_live_zz' and sky";
        let out = redact(text);
        assert!(!out.contains("abc123") && !out.contains("rk_live_zz"), "{out}");
        assert!(
            out.contains("[redacted],") && out.contains("'[redacted]'") && out.ends_with("sky"),
            "{out}"
        );
    }
}
