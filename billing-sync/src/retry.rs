//! When a failed Stripe call is tried again, and how long to wait first; the global rate cap.
//!
//! In: a [`StripeCallError`]. Out: [`Verdict::Retry`] (with Stripe's `Retry-After`, if any)
//! or [`Verdict::Fail`] with the reason to record. Retrying a meter event is always safe (same
//! identifier, same `Idempotency-Key`); retrying a refusal forever is not: bad data is never
//! retried (vector's `ClickhouseRetryLogic` draws the same line).

use std::time::{Duration, Instant};

use crate::stripe::StripeCallError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Retry { after: Option<Duration>, reason: String },
    Fail { reason: String },
}

/// Stripe's advice: `Stripe-Should-Retry` wins when present; otherwise 409 (idempotency
/// key in use), 424, 429 and 5xx are transient, other 4xx are final
/// (<https://docs.stripe.com/error-low-level#idempotency>, <https://docs.stripe.com/rate-limits>).
/// Lost connections, timeouts and unreadable answers are retried: the request may or may not
/// have arrived, and the same identifier makes a second arrival harmless.
pub fn classify(err: &StripeCallError) -> Verdict {
    let reason = err.to_string();
    match err {
        StripeCallError::Status {
            status,
            retry_after,
            should_retry,
            ..
        } => {
            let transient = matches!(status, 409 | 424 | 429 | 500..=599);
            match should_retry.unwrap_or(transient) {
                true => Verdict::Retry {
                    after: *retry_after,
                    reason,
                },
                false => Verdict::Fail { reason },
            }
        }
        StripeCallError::Transport(_) | StripeCallError::Timeout(_) | StripeCallError::Decode(_) => {
            Verdict::Retry { after: None, reason }
        }
    }
}

/// The global cap on Stripe calls per second: each call takes the next free slot, slots
/// `1/rate` apart, so calls never burst above the rate (Stripe test mode allows 25/s).
#[derive(Debug)]
pub struct RateLimiter {
    interval: Option<Duration>,
    next: std::sync::Mutex<Instant>,
}

impl RateLimiter {
    /// `per_second` = 0: no cap.
    pub fn new(per_second: u32) -> Self {
        Self {
            interval: (per_second > 0).then(|| Duration::from_secs(1) / per_second),
            next: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// Waits for this call's slot.
    pub async fn acquire(&self) {
        let Some(interval) = self.interval else { return };
        let slot = {
            let mut next = self.next.lock().expect("rate limiter lock");
            let slot = (*next).max(Instant::now());
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, should_retry: Option<bool>) -> StripeCallError {
        StripeCallError::Status {
            status,
            message: "x".into(),
            retry_after: Some(Duration::from_secs(2)),
            should_retry,
        }
    }

    #[test]
    fn transient_statuses_are_retried_and_refusals_are_not() {
        for code in [409, 429, 500, 502, 503] {
            assert!(matches!(classify(&status(code, None)), Verdict::Retry { .. }), "{code}");
        }
        for code in [400, 401, 402, 403, 404] {
            assert!(matches!(classify(&status(code, None)), Verdict::Fail { .. }), "{code}");
        }
        assert_eq!(
            classify(&status(429, None)),
            Verdict::Retry {
                after: Some(Duration::from_secs(2)),
                reason: "stripe answered 429: x".into()
            }
        );
        assert!(matches!(
            classify(&StripeCallError::Timeout(Duration::from_secs(1))),
            Verdict::Retry { .. }
        ));
        assert!(matches!(
            classify(&StripeCallError::Transport("reset".into())),
            Verdict::Retry { .. }
        ));
    }

    #[test]
    fn stripe_should_retry_overrides_the_status() {
        assert!(matches!(classify(&status(500, Some(false))), Verdict::Fail { .. }));
        assert!(matches!(classify(&status(400, Some(true))), Verdict::Retry { .. }));
    }

    #[tokio::test]
    async fn rate_limiter_spaces_calls() {
        let limiter = RateLimiter::new(100);
        let start = Instant::now();
        for _ in 0..11 {
            limiter.acquire().await;
        }
        // 11 calls at 100/s: the last one 100 ms after the first.
        assert!(start.elapsed() >= Duration::from_millis(95), "{:?}", start.elapsed());
    }
}
