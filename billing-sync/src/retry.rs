//! When a failed Stripe call is tried again, and how long to wait first; the global rate cap.
//!
//! In: a [`StripeCallError`]. Out: [`Verdict::Retry`] (with Stripe's `Retry-After`, if any)
//! or [`Verdict::Fail`] with the reason to record. Retrying a meter event is always safe (same
//! identifier, same `Idempotency-Key`); retrying a refusal forever is not: bad data is never
//! retried (vector's `ClickhouseRetryLogic` draws the same line).

use std::sync::atomic::{AtomicU64, Ordering};
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

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait before attempt `attempt + 1` (`attempt` ≥ 1 have failed): a random point in
    /// the upper half of `initial · 2^(attempt-1)`, capped at `max`, and never shorter than
    /// what `Retry-After` asked for (the pusher defers a push asking for more than `max`).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        let half = exp / 2;
        let jittered = half + half.mul_f64(unit_random());
        match retry_after {
            Some(asked) => jittered.max(asked),
            None => jittered,
        }
    }
}

/// A number in [0, 1) from a SplitMix64 sequence seeded by the clock: jitter needs spread
/// between concurrent pushers, not cryptographic quality.
fn unit_random() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let mut z = STATE
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(seed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
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

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..100 {
            let d1 = b.delay(1, None);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d3 = b.delay(3, None);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            assert!(b.delay(30, None) <= Duration::from_secs(1));
            assert!(b.delay(1, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
        }
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
