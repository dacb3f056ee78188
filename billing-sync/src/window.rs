//! Billing windows and the names Stripe sees for them: pure arithmetic, no IO.
//!
//! In: the `[billing]` settings and the clock. Out: which windows are closed, the meter event
//! `identifier` and `Idempotency-Key` of one (tenant, meter, window, revision), the event
//! `timestamp`, and whether Stripe still accepts it.

use sha2::{Digest, Sha256};

use crate::settings::WindowSettings;

/// Stripe accepts meter event timestamps up to 35 days in the past
/// (<https://docs.stripe.com/api/billing/meter-event/create#create_billing_meter_event-timestamp>).
pub const STRIPE_MAX_AGE_SECS: i64 = 35 * 86_400;
/// Kept off Stripe's limit so that a push started just inside it is not refused by the time
/// (and the retries) it takes to arrive.
pub const STRIPE_AGE_MARGIN_SECS: i64 = 3_600;
/// Stripe's limit on `identifier` length.
pub const MAX_IDENTIFIER_LEN: usize = 100;

/// One billing window, `[start, end)` in Unix seconds, aligned to the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window {
    pub start: u32,
    pub end: u32,
}

impl Window {
    /// The window holding `at` (Unix seconds).
    pub fn containing(at: i64, window_secs: u64) -> Self {
        let len = window_secs as i64;
        let start = at.div_euclid(len) * len;
        Self::from_start(start as u32, window_secs)
    }

    pub fn from_start(start: u32, window_secs: u64) -> Self {
        Self {
            start,
            end: start + window_secs as u32,
        }
    }

    /// The meter event timestamp: the window's last second, so that it is inside the window
    /// and stays acceptable to Stripe as long as possible.
    pub fn event_timestamp(&self) -> i64 {
        i64::from(self.end) - 1
    }

    /// Whether Stripe still accepts an event for this window at `now`.
    pub fn stripe_accepts(&self, now: i64) -> bool {
        now - self.event_timestamp() <= STRIPE_MAX_AGE_SECS - STRIPE_AGE_MARGIN_SECS
    }
}

/// The range of window starts a pass looks at, `[from, to)`: windows closed at `now` (their
/// end plus the lateness allowance has passed) and no older than the lookback.
pub fn closed_range(settings: &WindowSettings, now: i64) -> (u32, u32) {
    let len = settings.window_secs as i64;
    // A window [s, s + len) is closed once s + len + lateness <= now.
    let to = (now - settings.lateness_secs as i64).div_euclid(len) * len;
    let lookback = settings.lookback_days as i64 * 86_400;
    let from = (now - lookback).div_euclid(len) * len;
    (from.max(0) as u32, to.max(0) as u32)
}

/// The meter event `identifier` of one revision: readable when it fits Stripe's 100
/// characters, otherwise a SHA-256 digest of the same parts. Deterministic, so a retry or a
/// restart sends the same identifier and Stripe counts the event once.
pub fn identifier(tenant: &str, meter: &str, window: Window, revision: u32) -> String {
    let readable = format!("tg:{tenant}:{meter}:{}-{}:r{revision}", window.start, window.end);
    if readable.len() <= MAX_IDENTIFIER_LEN && readable.is_ascii() {
        return readable;
    }
    let mut hasher = Sha256::new();
    for part in [
        tenant,
        meter,
        &window.start.to_string(),
        &window.end.to_string(),
        &revision.to_string(),
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0u8]);
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("tg:h:{hex}")
}

/// The `Idempotency-Key` of a push: derived from the identifier, so a retry after a lost
/// response is answered by Stripe from its idempotency cache.
pub fn idempotency_key(identifier: &str) -> String {
    format!("tollgate-meter-event:{identifier}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(window_secs: u64, lateness_secs: u64) -> WindowSettings {
        WindowSettings {
            window_secs,
            lateness_secs,
            ..WindowSettings::default()
        }
    }

    #[test]
    fn windows_align_to_the_hour() {
        let w = Window::containing(1_795_000_123, 3_600);
        assert_eq!(w.start % 3_600, 0);
        assert!(w.start as i64 <= 1_795_000_123 && 1_795_000_123 < w.end as i64);
        assert_eq!(w.event_timestamp(), w.end as i64 - 1);
    }

    #[test]
    fn a_window_closes_after_the_lateness_allowance() {
        let s = settings(3_600, 300);
        let hour = 1_795_003_200; // a multiple of 3600
        let (_, to) = closed_range(&s, hour + 299);
        assert_eq!(
            to as i64,
            hour - 3_600,
            "the previous hour is still open 299 s after its end"
        );
        let (_, to) = closed_range(&s, hour + 300);
        assert_eq!(to as i64, hour, "and closed at 300 s");
    }

    #[test]
    fn stripe_refuses_timestamps_older_than_35_days() {
        let w = Window::from_start(1_795_000_000 / 3_600 * 3_600, 3_600);
        let end = w.end as i64;
        assert!(w.stripe_accepts(end + 34 * 86_400));
        assert!(!w.stripe_accepts(end + 35 * 86_400));
    }

    #[test]
    fn identifiers_are_deterministic_distinct_and_short() {
        let w = Window::from_start(1_795_000_000 / 3_600 * 3_600, 3_600);
        let a = identifier("tenant_a", "requests", w, 0);
        assert_eq!(a, identifier("tenant_a", "requests", w, 0));
        assert_ne!(a, identifier("tenant_a", "requests", w, 1));
        assert_ne!(a, identifier("tenant_a", "compute_units", w, 0));
        assert_ne!(a, identifier("tenant_b", "requests", w, 0));
        let long = identifier(&"t".repeat(200), "requests", w, 0);
        assert!(long.len() <= MAX_IDENTIFIER_LEN, "{long}");
        assert_ne!(long, identifier(&"t".repeat(201), "requests", w, 0));
        assert!(idempotency_key(&long).len() <= 255);
    }
}
