//! Delivering one alert to the operator's webhook, signed as Standard Webhooks specifies
//! (<https://www.standardwebhooks.com/>), retried with backoff.
//!
//! In: an alert's `webhook-id` and JSON body (both fixed when the alert was recorded), the
//! secret, the `[alerts]` retry policy. Out: a POST carrying `webhook-id`, `webhook-timestamp`
//! (Unix seconds of this attempt) and `webhook-signature` = `v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">`; a [`Delivery`] saying whether some attempt got a 2xx.
//!
//! Every failure is retried: a 4xx from a receiver is as likely a deploy in progress as a
//! refusal, and the alert must arrive. The timestamp is the attempt's, not the alert's,
//! because receivers reject timestamps far from their clock (replay protection); the id and
//! body never change, so a receiver dedupes re-sends on the id.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, KeyInit as _, Mac as _};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use tollgate_runtime::backoff::Backoff;
use tollgate_runtime::shutdown::Shutdown;

use super::settings::{AlertsSettings, WebhookSecret};

/// `v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` under the secret's key.
pub fn signature(secret: &WebhookSecret, id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.key()).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let tag = mac.finalize().into_bytes();
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag))
}

/// How one alert's delivery ended within this check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Delivered {
        attempts: u32,
    },
    /// No 2xx in `attempts` tries; `error` is the last one's (a status or a transport error,
    /// never the URL or a header).
    Undelivered {
        attempts: u32,
        error: String,
    },
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

#[derive(Clone)]
pub struct WebhookSender {
    http: HttpClient<Connector, Full<Bytes>>,
    url: hyper::Uri,
    secret: WebhookSecret,
    timeout: Duration,
    max_attempts: u32,
    backoff: Backoff,
    shutdown: Shutdown,
}

impl WebhookSender {
    /// `settings` validated (the URL parses).
    pub fn new(settings: &AlertsSettings, secret: WebhookSecret, shutdown: Shutdown) -> Self {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Self {
            http: HttpClient::builder(TokioExecutor::new()).build(connector),
            url: settings.webhook_url.parse().expect("validated webhook_url"),
            secret,
            timeout: Duration::from_millis(settings.timeout_ms),
            max_attempts: settings.max_attempts,
            backoff: Backoff::new(
                Duration::from_millis(settings.initial_backoff_ms),
                Duration::from_millis(settings.max_backoff_ms),
            ),
            shutdown,
        }
    }

    /// POSTs `body` under `id` until a 2xx, at most `max_attempts` times, backing off between
    /// attempts; `on_failure` is called once per failed attempt (for the metrics).
    pub async fn deliver(&self, id: &str, body: &str, on_failure: impl Fn()) -> Delivery {
        let mut attempts = self.backoff.attempts();
        let mut error = String::new();
        for attempt in 1..=self.max_attempts {
            match self.attempt(id, body).await {
                Ok(()) => return Delivery::Delivered { attempts: attempt },
                Err(e) => {
                    on_failure();
                    tracing::warn!(webhook_id = id, attempt, error = %e, "alert webhook not accepted");
                    error = e;
                }
            }
            if attempt == self.max_attempts || self.shutdown.is_triggered() {
                return Delivery::Undelivered {
                    attempts: attempt,
                    error,
                };
            }
            tokio::select! {
                _ = tokio::time::sleep(attempts.next_delay()) => {}
                _ = self.shutdown.wait() => {}
            }
        }
        Delivery::Undelivered {
            attempts: self.max_attempts,
            error,
        }
    }

    async fn attempt(&self, id: &str, body: &str) -> Result<(), String> {
        let timestamp = chrono::Utc::now().timestamp();
        let request = hyper::Request::post(self.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature(&self.secret, id, timestamp, body))
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| format!("request: {e}"))?;
        let response = tokio::time::timeout(self.timeout, self.http.request(request))
            .await
            .map_err(|_| format!("no answer within {} ms", self.timeout.as_millis()))?
            .map_err(|e| transport_error(&e))?;
        let status = response.status();
        // The body is not needed; dropping the response closes or recycles the connection.
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }
}

/// The error and its causes, without the request (whose URL may carry a token).
fn transport_error(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks reference libraries' tests: secret
    /// `whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw`, id `msg_p5jXN8AQM9LWM0D4loKWxJek`, timestamp
    /// 1614265330, body `{"test": 2432232314}`.
    #[test]
    fn signatures_match_the_specifications_example() {
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            signature(
                &secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                r#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn any_change_to_id_timestamp_or_body_changes_the_signature() {
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let base = signature(&secret, "alert_1", 100, "{}");
        assert_ne!(signature(&secret, "alert_2", 100, "{}"), base);
        assert_ne!(signature(&secret, "alert_1", 101, "{}"), base);
        assert_ne!(signature(&secret, "alert_1", 100, "{ }"), base);
    }
}
