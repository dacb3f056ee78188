//! The in-process backend: counters in sharded maps, one mutex per counter.
//!
//! In: charges from the request chain. Out: decisions. A decision takes the shard lock only
//! to find its counters, then locks its counters (sorted by id, so two decisions never wait
//! on each other in a cycle), checks all, commits all or nothing, and unlocks; no lock is
//! held across an await and there is no global lock. What a restart loses: see `mod.rs`.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use super::counter::{Check, Counter};
use super::{assemble, group, Charge, Decision, LimitFuture, Limiter};

const SHARDS: usize = 64;
/// A shard looks for idle counters to drop once it holds this many (then twice as many as after the last sweep).
const FIRST_SWEEP: usize = 1024;

type Slot = Arc<Mutex<Counter>>;

struct Shard {
    counters: HashMap<String, Slot>,
    sweep_at: usize,
}

pub struct LocalLimiter {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// A mutex guard even if another thread panicked while holding it (counters stay consistent:
/// every update is a single assignment).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl LocalLimiter {
    pub fn new() -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    counters: HashMap::new(),
                    sweep_at: FIRST_SWEEP,
                })
            })
            .collect();
        Self { shards }
    }

    /// The counter for `id`, created for `charge`'s window when missing.
    fn slot(&self, id: &str, charge: &Charge, now_ms: i64) -> Slot {
        let mut hasher = DefaultHasher::new();
        id.hash(&mut hasher);
        let mut shard = lock(&self.shards[hasher.finish() as usize % SHARDS]);
        if let Some(slot) = shard.counters.get(id) {
            return slot.clone();
        }
        if shard.counters.len() >= shard.sweep_at {
            // Only counters nobody else holds (strong count 1: the map) can go; a holder would
            // otherwise commit into a counter that is no longer in the map.
            // Idle a second ago: a decision that read the clock just before this one loses nothing.
            let before = now_ms.saturating_sub(1000);
            shard
                .counters
                .retain(|_, slot| Arc::strong_count(slot) > 1 || !lock(slot).is_idle(before));
            shard.sweep_at = (shard.counters.len() * 2).max(FIRST_SWEEP);
        }
        let slot = Arc::new(Mutex::new(Counter::new(charge.spec.window)));
        shard.counters.insert(id.to_owned(), slot.clone());
        slot
    }

    /// Runs `f` with the counters of `charges` locked in id order.
    fn with_counters<R>(
        &self,
        charges: &[Charge],
        now_ms: i64,
        f: impl FnOnce(&[super::Group], &mut [MutexGuard<'_, Counter>]) -> R,
    ) -> R {
        let groups = group(charges);
        let slots: Vec<Slot> = groups
            .iter()
            .map(|g| self.slot(&g.id, &charges[g.members[0]], now_ms))
            .collect();
        let mut guards: Vec<MutexGuard<'_, Counter>> = slots.iter().map(|s| lock(s)).collect();
        f(&groups, &mut guards)
    }

    /// The synchronous decision (the trait method wraps it).
    pub fn decide_now(&self, charges: &[Charge], now_ms: i64) -> Decision {
        self.with_counters(charges, now_ms, |groups, counters| {
            let checks: Vec<Check> = groups
                .iter()
                .zip(counters.iter_mut())
                .map(|(g, c)| c.check(now_ms, g.cost, g.spec.limit))
                .collect();
            if checks.iter().all(|c| c.passes) {
                for (g, c) in groups.iter().zip(counters.iter_mut()) {
                    c.commit(now_ms, g.cost);
                }
            }
            Decision {
                at_ms: now_ms,
                ..assemble(charges, groups, &checks)
            }
        })
    }

    pub fn refund_now(&self, charges: &[Charge], at_ms: i64) {
        self.with_counters(charges, at_ms, |groups, counters| {
            for (g, c) in groups.iter().zip(counters.iter_mut()) {
                c.refund(at_ms, g.cost);
            }
        })
    }

    pub fn add_now(&self, charges: &[Charge], now_ms: i64) {
        self.with_counters(charges, now_ms, |groups, counters| {
            for (g, c) in groups.iter().zip(counters.iter_mut()) {
                if !matches!(**c, Counter::InFlight(_)) {
                    c.commit(now_ms, g.cost);
                }
            }
        })
    }

    pub fn release_now(&self, charges: &[Charge]) {
        self.with_counters(charges, 0, |groups, counters| {
            for (g, c) in groups.iter().zip(counters.iter_mut()) {
                c.release(g.cost);
            }
        })
    }

    /// The synchronous peek: counters that do not exist yet are read as fresh ones, not created.
    pub fn peek_now(&self, charges: &[Charge], now_ms: i64) -> Decision {
        let charges = super::costless(charges);
        let groups = group(&charges);
        let checks: Vec<Check> = groups
            .iter()
            .map(|g| {
                let mut hasher = DefaultHasher::new();
                g.id.hash(&mut hasher);
                let existing = lock(&self.shards[hasher.finish() as usize % SHARDS])
                    .counters
                    .get(&g.id)
                    .cloned();
                match existing {
                    Some(slot) => lock(&slot).check(now_ms, 0, g.spec.limit),
                    None => Counter::new(g.spec.window).check(now_ms, 0, g.spec.limit),
                }
            })
            .collect();
        Decision {
            at_ms: now_ms,
            ..assemble(&charges, &groups, &checks)
        }
    }

    /// Counters currently held (for tests of the sweep).
    pub fn counters(&self) -> usize {
        self.shards.iter().map(|s| lock(s).counters.len()).sum()
    }
}

impl Limiter for LocalLimiter {
    fn decide<'a>(&'a self, charges: &'a [Charge], now_ms: i64) -> LimitFuture<'a, Decision> {
        Box::pin(async move { self.decide_now(charges, now_ms) })
    }

    fn add<'a>(&'a self, charges: &'a [Charge], now_ms: i64) -> LimitFuture<'a, ()> {
        Box::pin(async move { self.add_now(charges, now_ms) })
    }

    fn refund<'a>(&'a self, charges: &'a [Charge], at_ms: i64) -> LimitFuture<'a, ()> {
        self.refund_now(charges, at_ms);
        Box::pin(std::future::ready(()))
    }

    fn release<'a>(&'a self, charges: &'a [Charge]) -> LimitFuture<'a, ()> {
        Box::pin(async move { self.release_now(charges) })
    }

    fn peek<'a>(&'a self, charges: &'a [Charge], now_ms: i64) -> LimitFuture<'a, Decision> {
        Box::pin(async move { self.peek_now(charges, now_ms) })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use proptest::prelude::*;

    use super::*;
    use crate::limits::{KeyBy, LimitSpec, Meter, Window};

    fn spec(name: &str, meter: Meter, window: Window, limit: u64) -> Arc<LimitSpec> {
        Arc::new(LimitSpec {
            name: name.into(),
            meter,
            window,
            limit,
            by: KeyBy::Tenant,
        })
    }

    fn charge(spec: &Arc<LimitSpec>, key: &str, cost: u64) -> Charge {
        Charge {
            spec: spec.clone(),
            key: key.into(),
            scope: "t".into(),
            cost,
        }
    }

    #[test]
    fn enterprise_first_request_shows_the_seed_values() {
        let limiter = LocalLimiter::new();
        let rpm = spec(
            "requests_per_minute",
            Meter::Requests,
            Window::Sliding { secs: 60 },
            10_000,
        );
        let cud = spec("compute_units_per_day", Meter::ComputeUnits, Window::Day, 1_000_000);
        let d = limiter.decide_now(
            &[charge(&rpm, "tenant:e", 1), charge(&cud, "tenant:e", 5)],
            1_764_284_400_123,
        );
        assert!(d.allowed);
        assert_eq!((d.states[0].limit, d.states[0].remaining), (10_000, 9_999));
        assert!(d.states[0].reset_secs <= 60 && d.states[0].reset_secs > 0);
        assert_eq!(d.states[0].window_secs, 60);
        assert_eq!(d.states[1].remaining, 999_995);
        assert_eq!(d.states[1].window_secs, 86_400);
    }

    #[test]
    fn a_refusal_names_the_violated_limit_and_consumes_nothing() {
        let limiter = LocalLimiter::new();
        let rps = spec("rps", Meter::Requests, Window::Sliding { secs: 1 }, 100);
        let cu = spec("cu", Meter::ComputeUnits, Window::Day, 10);
        let both = |cost| [charge(&rps, "tenant:a", 1), charge(&cu, "tenant:a", cost)];
        assert!(limiter.decide_now(&both(8), 0).allowed);
        let refused = limiter.decide_now(&both(3), 1);
        assert!(!refused.allowed);
        assert_eq!(refused.violated, ["cu"]);
        assert_eq!(
            refused.states[0].remaining, 99,
            "the passing dimension was not consumed"
        );
        assert_eq!(refused.retry_after_secs, 86_400);
        let next = limiter.decide_now(&both(2), 2);
        assert!(next.allowed);
        assert_eq!(next.states[0].remaining, 98);
        assert_eq!(next.states[1].remaining, 0);
    }

    #[test]
    fn added_cost_is_seen_by_the_next_decision() {
        let limiter = LocalLimiter::new();
        let cu = spec("cu", Meter::ComputeUnits, Window::Sliding { secs: 60 }, 100);
        limiter.decide_now(&[charge(&cu, "tenant:a", 0)], 0);
        limiter.add_now(&[charge(&cu, "tenant:a", 42)], 10);
        assert_eq!(
            limiter.decide_now(&[charge(&cu, "tenant:a", 0)], 20).states[0].remaining,
            58
        );
        limiter.add_now(&[charge(&cu, "tenant:a", 100)], 30);
        let d = limiter.decide_now(&[charge(&cu, "tenant:a", 0)], 40);
        assert!(!d.allowed, "a used-up quota refuses even zero-cost requests");
    }

    #[test]
    fn concurrent_counts_in_flight_until_released() {
        let limiter = LocalLimiter::new();
        let inflight = spec("inflight", Meter::Concurrent, Window::InFlight, 2);
        let c = [charge(&inflight, "tenant:a", 1)];
        assert!(limiter.decide_now(&c, 0).allowed);
        assert!(limiter.decide_now(&c, 0).allowed);
        let d = limiter.decide_now(&c, 0);
        assert!(!d.allowed);
        assert_eq!(d.states[0].window_secs, 0);
        limiter.release_now(&c);
        assert!(limiter.decide_now(&c, 0).allowed);
    }

    #[test]
    fn idle_counters_are_swept() {
        let limiter = LocalLimiter::new();
        let rps = spec("rps", Meter::Requests, Window::Sliding { secs: 1 }, 10);
        for i in 0..100_000 {
            limiter.decide_now(&[charge(&rps, &format!("tenant:{i}"), 1)], i);
        }
        assert!(limiter.counters() < 80_000, "{} counters kept", limiter.counters());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_tasks_on_one_tenant_admit_exactly_the_limit() {
        let limiter = Arc::new(LocalLimiter::new());
        let rpm = spec("rpm", Meter::Requests, Window::Sliding { secs: 60 }, 1_000);
        let cud = spec("cud", Meter::ComputeUnits, Window::Day, 1_000_000);
        let admitted = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let (limiter, rpm, cud, admitted) = (limiter.clone(), rpm.clone(), cud.clone(), admitted.clone());
                tokio::spawn(async move {
                    for _ in 0..50 {
                        let c = [charge(&rpm, "tenant:one", 1), charge(&cud, "tenant:one", 3)];
                        if limiter.decide(&c, 1_000).await.allowed {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
        let d = limiter.decide_now(&[charge(&rpm, "tenant:one", 0), charge(&cud, "tenant:one", 0)], 1_000);
        assert_eq!((d.states[0].remaining, d.states[1].remaining), (0, 1_000_000 - 3_000));
        let other = limiter.decide_now(&[charge(&rpm, "tenant:two", 1)], 1_000);
        assert_eq!(other.states[0].remaining, 999);
    }

    proptest! {
        /// Random multi-dimension decisions: a refused one changes no counter, an admitted one
        /// moves each by its cost, and no dimension ever goes above its limit.
        #[test]
        fn a_refused_decision_changes_no_counter(
            limits in prop::collection::vec(1u64..40, 1..6),
            requests in prop::collection::vec((prop::collection::vec(0u64..9, 6), 0i64..300), 1..120),
        ) {
            let limiter = LocalLimiter::new();
            let specs: Vec<_> = limits
                .iter()
                .enumerate()
                .map(|(i, &l)| {
                    let window = [Window::Sliding { secs: 2 }, Window::Day, Window::Sliding { secs: 60 }][i % 3];
                    spec(&format!("d{i}"), Meter::ComputeUnits, window, l)
                })
                .collect();
            let probe = |now| {
                let zero: Vec<_> = specs.iter().map(|s| charge(s, "tenant:p", 0)).collect();
                // A zero-cost probe never commits anything.
                let d = limiter.decide_now(&zero, now);
                d.states.iter().map(|s| s.remaining).collect::<Vec<_>>()
            };
            let mut now = 0;
            for (costs, gap) in requests {
                now += gap;
                let before = probe(now);
                let c: Vec<_> = specs.iter().zip(&costs).map(|(s, &n)| charge(s, "tenant:p", n)).collect();
                let d = limiter.decide_now(&c, now);
                let after = probe(now);
                if d.allowed {
                    for ((b, a), ch) in before.iter().zip(&after).zip(&c) {
                        prop_assert_eq!(b - a, ch.cost);
                    }
                } else {
                    prop_assert_eq!(&before, &after);
                    prop_assert!(!d.violated.is_empty());
                }
            }
        }
    }

    proptest! {
        /// A peek reads what the last decision left (the same `remaining` as its answer, which
        /// is what the `RateLimit` header shows), and changes nothing: after any number of
        /// peeks the next decision answers as if none had happened.
        #[test]
        fn a_peek_reads_the_last_decision_and_counts_nothing(
            limit in 1u64..30,
            costs in prop::collection::vec((0u64..5, 0i64..400, 0usize..3), 1..60),
        ) {
            let peeked = LocalLimiter::new();
            let plain = LocalLimiter::new();
            let rps = spec("rps", Meter::ComputeUnits, Window::Sliding { secs: 2 }, limit);
            let daily = spec("daily", Meter::ComputeUnits, Window::Day, limit * 3);
            let mut now = 0;
            for (cost, gap, peeks) in costs {
                now += gap;
                let c = [charge(&rps, "tenant:q", cost), charge(&daily, "tenant:q", cost)];
                let d = peeked.decide_now(&c, now);
                prop_assert_eq!(&d, &plain.decide_now(&c, now));
                for _ in 0..peeks {
                    let p = peeked.peek_now(&c, now);
                    let remaining: Vec<u64> = p.states.iter().map(|s| s.remaining).collect();
                    let after: Vec<u64> = d.states.iter().map(|s| s.remaining).collect();
                    prop_assert_eq!(remaining, after);
                }
            }
        }
    }

    #[test]
    fn a_peek_at_an_unknown_counter_creates_none() {
        let limiter = LocalLimiter::new();
        let rps = spec("rps", Meter::Requests, Window::Sliding { secs: 1 }, 5);
        let p = limiter.peek_now(&[charge(&rps, "tenant:new", 1)], 10);
        assert!(p.allowed);
        assert_eq!((p.states[0].remaining, p.states[0].reset_secs), (5, 0));
        assert_eq!(limiter.counters(), 0);
    }
}
