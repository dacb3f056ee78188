//! The counting algorithms, pure and single-threaded: sliding windows, calendar periods and
//! in-flight counts. The local backend keeps one [`Counter`] per limit and subject behind a
//! mutex; the Redis script (`decide.lua`) implements the same rules over Redis hashes.
//!
//! Sliding window of length W: time is cut into buckets of `B = ceil(W / 60)` ms, and a
//! decision at `now` counts IN FULL every bucket that overlaps `(now - W, now]`, including the
//! oldest, only partly overlapping one. Every admission inside any interval of length W ending
//! at `now` lies in a counted bucket, so the check `counted + cost <= limit` bounds every such
//! interval: never more than the limit, under any arrival pattern. The price: an admission
//! keeps counting for between W and W + B after it happened, so under steady demand at
//! exactly the limit the admitted rate can be up to 1/61 (≈1.6 %) below it. Memory is at most
//! 61 buckets per counter, whatever the allowance (a sliding log would be exact both ways but
//! cost one entry per admission).
//!
//! Calendar `day` / `month`: one fixed UTC period, reset at its end. In-flight: a count that
//! `release` decrements.
//!
//! Time: each counter only moves forward (`now = max(now, latest now seen)`), so decisions
//! taken in lock order see non-decreasing time even when callers read the clock a little out of
//! order; an admission is then recorded no earlier than it happened (counted longer, never
//! shorter).
//!
//! A dimension passes when `used + max(cost, 1) <= limit`: a zero-cost charge (e.g. compute
//! units reported only after the response) is still refused once its dimension is used up.

use std::collections::VecDeque;

use super::spec::{calendar_period, Window};

/// Buckets per sliding window.
pub const BUCKETS_PER_WINDOW: u64 = 60;

/// A sliding window's bucket length in milliseconds.
pub fn bucket_ms(window_secs: u64) -> i64 {
    let window_ms = window_secs.saturating_mul(1000);
    window_ms.div_ceil(BUCKETS_PER_WINDOW).max(1) as i64
}

/// What a check found on one counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    /// Counted use before this charge.
    pub used: u64,
    /// Whether `used + max(cost, 1) <= limit`.
    pub passes: bool,
    /// Milliseconds until some counted use is released (0 when nothing is counted).
    pub reset_ms: i64,
    /// Milliseconds until enough is released for this cost to pass (when it does not).
    pub retry_ms: i64,
    /// Window length in milliseconds (0 for in-flight counts).
    pub window_ms: i64,
}

/// Whether `cost` fits on top of `used` under `limit`.
pub fn fits(used: u64, cost: u64, limit: u64) -> bool {
    used.saturating_add(cost.max(1)) <= limit
}

#[derive(Debug, Clone)]
pub enum Counter {
    Sliding(Sliding),
    Calendar(Calendar),
    InFlight(u64),
}

impl Counter {
    pub fn new(window: Window) -> Counter {
        match window {
            Window::Sliding { secs } => Counter::Sliding(Sliding::new(secs)),
            Window::Day | Window::Month => Counter::Calendar(Calendar {
                window,
                start: i64::MIN,
                end: i64::MIN,
                used: 0,
                latest: i64::MIN,
            }),
            Window::InFlight => Counter::InFlight(0),
        }
    }

    /// Looks, without committing: what is used and whether `cost` fits under `limit`.
    pub fn check(&mut self, now_ms: i64, cost: u64, limit: u64) -> Check {
        match self {
            Counter::Sliding(s) => s.check(now_ms, cost, limit),
            Counter::Calendar(c) => c.check(now_ms, cost, limit),
            Counter::InFlight(n) => Check {
                used: *n,
                passes: fits(*n, cost, limit),
                reset_ms: 0,
                // Nobody knows when a request in flight ends; one second is a polite guess.
                retry_ms: 1000,
                window_ms: 0,
            },
        }
    }

    /// Adds `cost` now (after a passing check, or unconditionally for post-response costs).
    pub fn commit(&mut self, now_ms: i64, cost: u64) {
        match self {
            Counter::Sliding(s) => s.commit(now_ms, cost),
            Counter::Calendar(c) => c.commit(now_ms, cost),
            Counter::InFlight(n) => *n = n.saturating_add(cost),
        }
    }

    /// Gives back `cost` committed by a decision at `at_ms` (a request the gateway refused after
    /// admitting it). In-flight counts ignore it (`release` ends those). Saturating: what has
    /// already left the window stays gone.
    pub fn refund(&mut self, at_ms: i64, cost: u64) {
        match self {
            Counter::Sliding(s) => s.refund(at_ms, cost),
            Counter::Calendar(c) => {
                if (c.start..c.end).contains(&at_ms) {
                    c.used = c.used.saturating_sub(cost);
                }
            }
            Counter::InFlight(_) => {}
        }
    }

    /// Ends `cost` in-flight requests; other counters ignore it.
    pub fn release(&mut self, cost: u64) {
        if let Counter::InFlight(n) = self {
            *n = n.saturating_sub(cost);
        }
    }

    /// Whether the counter holds nothing any decision at `now_ms` or later would see.
    pub fn is_idle(&mut self, now_ms: i64) -> bool {
        match self {
            Counter::Sliding(s) => {
                s.prune(now_ms);
                s.total == 0
            }
            Counter::Calendar(c) => c.used == 0 || now_ms >= c.end,
            Counter::InFlight(n) => *n == 0,
        }
    }
}

/// Sub-window buckets; see the module header for the counting rule.
#[derive(Debug, Clone)]
pub struct Sliding {
    window_ms: i64,
    bucket_ms: i64,
    /// (bucket index, amount), indexes strictly increasing.
    buckets: VecDeque<(i64, u64)>,
    total: u64,
    /// Latest time seen (see the module header).
    latest: i64,
}

impl Sliding {
    pub fn new(window_secs: u64) -> Sliding {
        Sliding {
            window_ms: (window_secs.saturating_mul(1000)) as i64,
            bucket_ms: bucket_ms(window_secs),
            buckets: VecDeque::new(),
            total: 0,
            latest: i64::MIN,
        }
    }

    /// Drops buckets that no longer overlap `(now - W, now]`.
    fn prune(&mut self, now_ms: i64) {
        let lowest = (now_ms - self.window_ms).div_euclid(self.bucket_ms);
        while let Some(&(index, amount)) = self.buckets.front() {
            if index >= lowest {
                break;
            }
            self.total = self.total.saturating_sub(amount);
            self.buckets.pop_front();
        }
    }

    /// When bucket `index` stops being counted.
    fn released_at(&self, index: i64) -> i64 {
        (index + 1) * self.bucket_ms + self.window_ms
    }

    fn check(&mut self, now_ms: i64, cost: u64, limit: u64) -> Check {
        let now_ms = self.advance(now_ms);
        self.prune(now_ms);
        let used = self.total;
        let reset_ms = self.buckets.front().map_or(0, |&(i, _)| self.released_at(i) - now_ms);
        let passes = fits(used, cost, limit);
        let mut retry_ms = 0;
        if !passes {
            // Walk oldest first until enough is released; a cost above the limit never fits,
            // then the answer is "when everything counted now is gone".
            let need = used.saturating_add(cost.max(1)).saturating_sub(limit);
            let mut freed = 0u64;
            for &(index, amount) in &self.buckets {
                freed += amount;
                retry_ms = self.released_at(index) - now_ms;
                if freed >= need {
                    break;
                }
            }
            retry_ms = retry_ms.max(1);
        }
        Check {
            used,
            passes,
            reset_ms,
            retry_ms,
            window_ms: self.window_ms,
        }
    }

    fn commit(&mut self, now_ms: i64, cost: u64) {
        let now_ms = self.advance(now_ms);
        if cost == 0 {
            return;
        }
        let index = now_ms.div_euclid(self.bucket_ms);
        match self.buckets.back_mut() {
            // A clock that stepped back writes into the newest bucket: counted longer, never shorter.
            Some((last, amount)) if *last >= index => *amount = amount.saturating_add(cost),
            _ => self.buckets.push_back((index, cost)),
        }
        self.total = self.total.saturating_add(cost);
    }

    /// The admission went into the bucket of `at_ms`, or into a later one when the clock had
    /// stepped back (see `commit`): the oldest bucket at or after `at_ms`'s.
    fn refund(&mut self, at_ms: i64, cost: u64) {
        let index = at_ms.div_euclid(self.bucket_ms);
        if let Some((_, amount)) = self.buckets.iter_mut().find(|(i, _)| *i >= index) {
            let taken = cost.min(*amount);
            *amount -= taken;
            self.total = self.total.saturating_sub(taken);
        }
    }

    /// `now`, or the latest time seen if that is later.
    fn advance(&mut self, now_ms: i64) -> i64 {
        self.latest = self.latest.max(now_ms);
        self.latest
    }
}

/// One fixed UTC period (`day` or `month`).
#[derive(Debug, Clone)]
pub struct Calendar {
    window: Window,
    start: i64,
    end: i64,
    used: u64,
    /// Latest time seen (see the module header).
    latest: i64,
}

impl Calendar {
    /// Moves to the period holding `now_ms` if it is later than the stored one (a clock that
    /// stepped back keeps counting into the stored, later period).
    fn roll(&mut self, now_ms: i64) -> i64 {
        self.latest = self.latest.max(now_ms);
        let now_ms = self.latest;
        if now_ms >= self.end {
            let (start, end) = calendar_period(self.window, now_ms);
            self.start = start;
            self.end = end;
            self.used = 0;
        }
        now_ms
    }

    fn check(&mut self, now_ms: i64, cost: u64, limit: u64) -> Check {
        let now_ms = self.roll(now_ms);
        let passes = fits(self.used, cost, limit);
        let to_end = self.end - now_ms;
        Check {
            used: self.used,
            passes,
            reset_ms: to_end,
            retry_ms: if passes { 0 } else { to_end.max(1) },
            window_ms: self.end - self.start,
        }
    }

    fn commit(&mut self, now_ms: i64, cost: u64) {
        self.roll(now_ms);
        self.used = self.used.saturating_add(cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs arrivals (gap ms, cost) through one counter; returns the admitted (time, cost).
    fn admit_all(window: Window, limit: u64, start: i64, arrivals: &[(i64, u64)]) -> Vec<(i64, u64)> {
        let mut counter = Counter::new(window);
        let mut now = start;
        let mut admitted = Vec::new();
        for &(gap, cost) in arrivals {
            now += gap;
            if counter.check(now, cost, limit).passes {
                counter.commit(now, cost);
                admitted.push((now, cost));
            }
        }
        admitted
    }

    /// The largest admitted sum over any interval `[s, s + w)`.
    fn max_in_any_interval(admitted: &[(i64, u64)], w: i64) -> u64 {
        let mut best = 0;
        let mut lo = 0;
        let mut sum = 0u64;
        for hi in 0..admitted.len() {
            sum += admitted[hi].1;
            while admitted[hi].0 - admitted[lo].0 >= w {
                sum -= admitted[lo].1;
                lo += 1;
            }
            best = best.max(sum);
        }
        best
    }

    fn arrivals(max_gap: i64, max_cost: u64) -> impl Strategy<Value = Vec<(i64, u64)>> {
        prop::collection::vec((0..max_gap, 0..=max_cost), 1..400)
    }

    proptest! {
        #[test]
        fn sliding_never_admits_more_than_the_limit_in_any_window(
            secs in 1u64..=120,
            limit in 0u64..50,
            start in -10_000_000i64..10_000_000,
            arrivals in arrivals(3_000, 7),
        ) {
            let admitted = admit_all(Window::Sliding { secs }, limit, start, &arrivals);
            let worst = max_in_any_interval(&admitted, secs as i64 * 1000);
            prop_assert!(worst <= limit, "admitted {worst} > {limit} in some {secs}s interval");
        }

        #[test]
        fn sliding_first_window_admits_exactly_the_limit(
            secs in 1u64..=3_600,
            limit in 1u64..300,
            start in 0i64..1_000_000_000,
            gaps in prop::collection::vec(0i64..2, 300..600),
        ) {
            // Demand above the limit, all within the first window (under 600 ms in all).
            let demand: Vec<(i64, u64)> = gaps.into_iter().map(|g| (g, 1)).collect();
            let admitted = admit_all(Window::Sliding { secs }, limit, start, &demand);
            prop_assert_eq!(admitted.len() as u64, limit.min(demand.len() as u64));
        }

        #[test]
        fn calendar_never_admits_more_than_the_limit_in_any_period(
            month in any::<bool>(),
            limit in 0u64..50,
            start in 1_700_000_000_000i64..1_900_000_000_000,
            arrivals in arrivals(30 * 3_600_000, 7),
        ) {
            let window = if month { Window::Month } else { Window::Day };
            let admitted = admit_all(window, limit, start, &arrivals);
            let mut per_period = std::collections::BTreeMap::<i64, u64>::new();
            for (t, cost) in admitted {
                *per_period.entry(calendar_period(window, t).0).or_default() += cost;
            }
            for (period, sum) in per_period {
                prop_assert!(sum <= limit, "period {period}: {sum} > {limit}");
            }
        }

        #[test]
        fn calendar_first_period_admits_exactly_the_limit(
            month in any::<bool>(),
            limit in 1u64..300,
            day in 19_700i64..21_000,
            n in 300usize..600,
        ) {
            let window = if month { Window::Month } else { Window::Day };
            let start = day * 86_400_000;
            let demand = vec![(1, 1); n];
            let admitted = admit_all(window, limit, start, &demand);
            prop_assert_eq!(admitted.len() as u64, limit.min(n as u64));
        }

        #[test]
        fn in_flight_never_exceeds_the_limit(
            limit in 0u64..20,
            ops in prop::collection::vec(any::<bool>(), 1..300),
        ) {
            let mut counter = Counter::new(Window::InFlight);
            let mut held = 0u64;
            for start in ops {
                if start {
                    if counter.check(0, 1, limit).passes {
                        counter.commit(0, 1);
                        held += 1;
                    }
                } else if held > 0 {
                    counter.release(1);
                    held -= 1;
                }
                prop_assert!(held <= limit);
                prop_assert_eq!(counter.check(0, 1, limit).used, held);
            }
        }
    }

    #[test]
    fn sliding_reset_and_retry_point_at_the_oldest_bucket() {
        let mut s = Sliding::new(60);
        assert_eq!(s.bucket_ms, 1000);
        s.commit(10_500, 3);
        s.commit(30_200, 2);
        let c = s.check(40_000, 1, 5);
        assert!(!c.passes);
        assert_eq!(c.used, 5);
        // Bucket 10 (10 s … 11 s) is released at 11 s + 60 s.
        assert_eq!(c.reset_ms, 71_000 - 40_000);
        assert_eq!(c.retry_ms, 71_000 - 40_000);
        // Needing 4 units frees bucket 30 too.
        assert_eq!(s.check(40_000, 4, 5).retry_ms, 91_000 - 40_000);
        assert!(s.check(71_000, 3, 5).passes);
        assert_eq!(s.check(91_000, 0, 5).used, 0);
    }

    #[test]
    fn a_refund_gives_back_what_the_decision_took() {
        for window in [Window::Sliding { secs: 60 }, Window::Day, Window::Month] {
            let mut c = Counter::new(window);
            let at = 1_700_000_000_000;
            assert!(c.check(at, 3, 5).passes);
            c.commit(at, 3);
            assert!(!c.check(at + 10, 3, 5).passes, "{window:?}");
            c.refund(at, 3);
            assert_eq!(c.check(at + 10, 5, 5).used, 0, "{window:?}");
            assert!(c.check(at + 10, 5, 5).passes, "{window:?}");
            c.refund(at, 3);
            assert_eq!(c.check(at + 10, 5, 5).used, 0, "never below zero: {window:?}");
        }
    }

    #[test]
    fn zero_cost_is_refused_once_used_up() {
        let mut c = Counter::new(Window::Day);
        c.commit(0, 10);
        assert!(!c.check(1, 0, 10).passes);
        assert!(c.check(1, 0, 11).passes);
    }

    #[test]
    fn a_clock_stepping_back_never_shortens_counting() {
        let mut s = Sliding::new(1);
        s.commit(5_000, 1);
        s.commit(4_000, 1);
        assert_eq!(s.check(5_900, 1, 10).used, 2);
    }
}
