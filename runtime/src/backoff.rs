//! The one retry backoff every service uses: capped exponential growth with jitter.
//!
//! In: how many attempts have failed (and, where the server said so, how long it asked us to
//! wait). Out: how long to wait before the next attempt. Jitter spreads the retries of many
//! tasks that failed together (a ClickHouse or Stripe outage ends for all of them at once).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Capped exponential backoff with jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The wait before attempt `attempt + 1` (`attempt` ≥ 1 have failed): a random point in
    /// the upper half of `initial · 2^(attempt-1)`, capped at `max`, and never shorter than
    /// what the server asked for in `retry_after`.
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

    /// A counter of failed attempts for one retry loop.
    pub fn attempts(&self) -> Attempts {
        Attempts {
            backoff: self.clone(),
            failed: 0,
        }
    }
}

/// One retry loop's failures so far; each [`Attempts::next_delay`] counts one more.
#[derive(Debug, Clone)]
pub struct Attempts {
    backoff: Backoff,
    failed: u32,
}

impl Attempts {
    /// Counts a failure and says how long to wait before trying again.
    pub fn next_delay(&mut self) -> Duration {
        self.failed = self.failed.saturating_add(1);
        self.backoff.delay(self.failed, None)
    }
}

/// A number in [0, 1) from a SplitMix64 sequence seeded by the clock: jitter needs spread
/// between concurrent retriers, not cryptographic quality.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_grows_is_capped_and_honours_retry_after() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
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

    #[test]
    fn attempts_count_failures_and_reach_the_cap() {
        let mut attempts = Backoff::new(Duration::from_millis(10), Duration::from_millis(80)).attempts();
        let delays: Vec<Duration> = (0..8).map(|_| attempts.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(10), "{delays:?}");
        assert!(
            delays[3] >= Duration::from_millis(40),
            "fourth wait at least half of 80 ms: {delays:?}"
        );
        assert!(
            delays.iter().all(|d| *d <= Duration::from_millis(80)),
            "capped: {delays:?}"
        );
    }

    #[test]
    fn jitter_spreads_concurrent_retries() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        let distinct: std::collections::BTreeSet<Duration> = (0..50).map(|_| b.delay(1, None)).collect();
        assert!(
            distinct.len() > 40,
            "50 retries at the same moment mostly wait differently"
        );
    }
}
