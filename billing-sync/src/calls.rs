//! Stripe calls other than meter events (setup's products and prices, provisioning's
//! customers and subscriptions), sent under the same rules as a push.
//!
//! In: a method, path, form and idempotency key. Out: Stripe's JSON, or a [`CallError`] that
//! says whether trying again later may help. Every attempt of one call carries the same
//! `Idempotency-Key`, takes a slot of the global rate cap shared with the pusher, and is
//! retried as [`crate::retry::classify`] says, with the one backoff every service uses.

use std::sync::Arc;

use metrics::Counter;
use tollgate_runtime::backoff::Backoff;
use tollgate_runtime::shutdown::Shutdown;

use crate::retry::{classify, RateLimiter, Verdict};
use crate::settings::StripeSettings;
use crate::stripe::{Form, StripeApi, StripeCallError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Stripe refused the call (a 4xx that is not transient); trying it again as it is will
    /// not help. `status` is Stripe's, so a lookup can tell "not found" from other refusals.
    #[error("{reason}")]
    Refused { status: Option<u16>, reason: String },
    /// Still failing transiently after the configured attempts, or shutting down: the same
    /// call (same key) is tried again on the next pass.
    #[error("{reason}")]
    Unresolved { reason: String },
}

impl CallError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, CallError::Refused { status: Some(404), .. })
    }
}

#[derive(Clone)]
pub struct Caller {
    api: StripeApi,
    limiter: Arc<RateLimiter>,
    backoff: Backoff,
    max_attempts: u32,
    shutdown: Shutdown,
    attempts: Counter,
}

impl Caller {
    pub fn new(api: StripeApi, settings: &StripeSettings, limiter: Arc<RateLimiter>, shutdown: Shutdown) -> Self {
        Self {
            api,
            limiter,
            backoff: Backoff::new(
                std::time::Duration::from_millis(settings.initial_backoff_ms),
                std::time::Duration::from_millis(settings.max_backoff_ms),
            ),
            max_attempts: settings.max_attempts,
            shutdown,
            attempts: Counter::noop(),
        }
    }

    /// Counts every attempt on `counter` (the pusher's `billing_sync_stripe_attempts_total`).
    pub fn counting(mut self, counter: Counter) -> Self {
        self.attempts = counter;
        self
    }

    pub async fn get(&self, path: &str, query: &Form) -> Result<serde_json::Value, CallError> {
        self.call(hyper::Method::GET, path, query, None).await
    }

    pub async fn post(&self, path: &str, form: &Form, key: &str) -> Result<serde_json::Value, CallError> {
        self.call(hyper::Method::POST, path, form, Some(key)).await
    }

    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        form: &Form,
        key: Option<&str>,
    ) -> Result<serde_json::Value, CallError> {
        let mut attempt = 0;
        loop {
            if self.shutdown.is_triggered() {
                return Err(CallError::Unresolved {
                    reason: "shutting down".to_owned(),
                });
            }
            self.limiter.acquire().await;
            attempt += 1;
            self.attempts.increment(1);
            let err = match self.api.send_form(method.clone(), path, form, key).await {
                Ok(value) => return Ok(value),
                Err(err) => err,
            };
            let status = match &err {
                StripeCallError::Status { status, .. } => Some(*status),
                _ => None,
            };
            match classify(&err) {
                Verdict::Fail { reason } => return Err(CallError::Refused { status, reason }),
                Verdict::Retry { reason, .. } if attempt >= self.max_attempts => {
                    return Err(CallError::Unresolved { reason })
                }
                Verdict::Retry { after, reason } => {
                    let delay = self.backoff.delay(attempt, after).min(self.backoff.max);
                    tracing::debug!(path, attempt, ?delay, %reason, "stripe call failed, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.wait() => {}
                    }
                }
            }
        }
    }
}

/// An idempotency key of at most 255 characters (Stripe's limit): readable when short, else
/// the readable start and a digest of the whole.
pub fn idempotency_key(parts: &[&str]) -> String {
    let readable = parts.join(":");
    if readable.len() <= 200 && readable.is_ascii() {
        return readable;
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(readable.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let start: String = parts[0].chars().filter(char::is_ascii).take(60).collect();
    format!("{start}:h:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_keys_are_digested_and_distinct() {
        assert_eq!(idempotency_key(&["tollgate-customer", "t1"]), "tollgate-customer:t1");
        let a = idempotency_key(&["tollgate-customer", &"t".repeat(300)]);
        let b = idempotency_key(&["tollgate-customer", &"t".repeat(301)]);
        assert!(a.len() <= 255 && a.starts_with("tollgate-customer:h:"), "{a}");
        assert_ne!(a, b);
    }
}
