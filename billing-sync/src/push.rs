//! Sends one meter event to Stripe under Stripe's rules, retrying what is transient.
//!
//! In: a [`MeterEvent`] (value, identifier, timestamp decided by the sync pass). Out: its
//! [`PushOutcome`]. Rules (<https://docs.stripe.com/api/billing/meter-event/create>): at most
//! one call in flight per customer and meter, a global rate cap, capped exponential backoff
//! with jitter honouring `Retry-After` and `Stripe-Should-Retry`, and every attempt of one
//! event carries the same identifier and `Idempotency-Key`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Counter;
use stripe::{IdempotencyKey, RequestStrategy, StripeRequest};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use tokio::sync::{Mutex, OwnedMutexGuard, Semaphore};
use tollgate_runtime::backoff::Backoff;
use tollgate_runtime::shutdown::Shutdown;

use crate::retry::{classify, RateLimiter, Verdict};
use crate::settings::StripeSettings;
use crate::stripe::StripeApi;
use crate::window;

/// One meter event, as the ledger's `pending` row recorded it.
#[derive(Debug, Clone)]
pub struct MeterEvent {
    pub event_name: String,
    pub stripe_customer_id: String,
    pub value: i64,
    pub identifier: String,
    pub timestamp: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Accepted; `stripe_ref` is what Stripe echoed (identifier and creation time).
    Pushed { stripe_ref: String, attempts: u32 },
    /// Refused for good (a 4xx that is not transient): recorded, never retried.
    Failed { reason: String, attempts: u32 },
    /// Still failing transiently after the attempts of this pass, or shutdown came first:
    /// stays pending, re-sent (same identifier) next pass.
    Unresolved { reason: String, attempts: u32 },
}

/// Counters for pushes; no tenant labels (per-tenant numbers are in the ledger).
#[derive(Clone)]
pub struct PushMetrics {
    pub attempts: Counter,
    pub retries: Counter,
    pub pushed: Counter,
    pub failed: Counter,
    pub unresolved: Counter,
}

impl PushMetrics {
    pub fn noop() -> Self {
        Self {
            attempts: Counter::noop(),
            retries: Counter::noop(),
            pushed: Counter::noop(),
            failed: Counter::noop(),
            unresolved: Counter::noop(),
        }
    }

    /// Registers the counters with `recorder`.
    pub fn register(recorder: &impl metrics::Recorder) -> Self {
        metrics::with_local_recorder(recorder, || Self {
            attempts: metrics::counter!("billing_sync_stripe_attempts_total"),
            retries: metrics::counter!("billing_sync_stripe_retries_total"),
            pushed: metrics::counter!("billing_sync_meter_events_total", "outcome" => "pushed"),
            failed: metrics::counter!("billing_sync_meter_events_total", "outcome" => "failed"),
            unresolved: metrics::counter!("billing_sync_meter_events_total", "outcome" => "unresolved"),
        })
    }
}

/// Pushes meter events; cheap to share between tasks.
#[derive(Clone)]
pub struct Pusher {
    api: StripeApi,
    limiter: Arc<RateLimiter>,
    in_flight: Arc<Semaphore>,
    locks: Arc<KeyedLocks>,
    /// Identifiers Stripe asked (`Retry-After`) not to send before a given time.
    not_before: Arc<std::sync::Mutex<HashMap<String, Instant>>>,
    backoff: Backoff,
    max_attempts: u32,
    metrics: PushMetrics,
    shutdown: Shutdown,
}

impl Pusher {
    pub fn new(api: StripeApi, settings: &StripeSettings, metrics: PushMetrics, shutdown: Shutdown) -> Self {
        Self {
            api,
            limiter: Arc::new(RateLimiter::new(settings.max_requests_per_second)),
            in_flight: Arc::new(Semaphore::new(settings.max_concurrent_requests as usize)),
            locks: Arc::new(KeyedLocks::default()),
            not_before: Arc::default(),
            backoff: Backoff {
                initial: Duration::from_millis(settings.initial_backoff_ms),
                max: Duration::from_millis(settings.max_backoff_ms),
            },
            max_attempts: settings.max_attempts,
            metrics,
            shutdown,
        }
    }

    /// The global cap on Stripe calls, to share with the other callers of the same account.
    pub fn rate_limiter(&self) -> Arc<RateLimiter> {
        self.limiter.clone()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_triggered()
    }

    pub async fn push(&self, event: &MeterEvent) -> PushOutcome {
        // One call per customer and meter at a time (Stripe's rule), held across retries so a
        // retry never overtakes.
        let _key_lock = self
            .locks
            .lock(format!("{}\u{0}{}", event.stripe_customer_id, event.event_name))
            .await;
        let request = CreateBillingMeterEvent::new(
            event.event_name.clone(),
            HashMap::from([
                ("stripe_customer_id".to_owned(), event.stripe_customer_id.clone()),
                ("value".to_owned(), event.value.to_string()),
            ]),
        )
        .identifier(event.identifier.clone())
        .timestamp(event.timestamp);
        let key = match IdempotencyKey::new(window::idempotency_key(&event.identifier)) {
            Ok(key) => key,
            Err(e) => {
                return PushOutcome::Failed {
                    reason: e.to_string(),
                    attempts: 0,
                }
            }
        };
        let deferred = self
            .not_before
            .lock()
            .expect("not_before lock")
            .remove(&event.identifier);
        if let Some(until) = deferred.filter(|until| *until > Instant::now()) {
            self.not_before
                .lock()
                .expect("not_before lock")
                .insert(event.identifier.clone(), until);
            return PushOutcome::Unresolved {
                reason: "waiting out Stripe's Retry-After".to_owned(),
                attempts: 0,
            };
        }
        let mut attempts = 0;
        loop {
            if self.shutdown.is_triggered() {
                self.metrics.unresolved.increment(1);
                return PushOutcome::Unresolved {
                    reason: "shutting down".to_owned(),
                    attempts,
                };
            }
            // A slot among the calls in flight, taken per attempt: a push waiting out its
            // backoff holds no slot, so it never holds up other tenants.
            let permit = self.in_flight.acquire().await.expect("semaphore never closed");
            self.limiter.acquire().await;
            attempts += 1;
            self.metrics.attempts.increment(1);
            // An attempt already sent is never abandoned: its answer decides what the ledger says.
            let sent = request
                .customize()
                .request_strategy(RequestStrategy::Idempotent(key.clone()))
                .send(&self.api)
                .await;
            drop(permit);
            let err = match sent {
                Ok(created) => {
                    self.metrics.pushed.increment(1);
                    return PushOutcome::Pushed {
                        stripe_ref: format!("{}@{}", created.identifier, created.created),
                        attempts,
                    };
                }
                Err(err) => err,
            };
            match classify(&err) {
                Verdict::Fail { reason } => {
                    self.metrics.failed.increment(1);
                    return PushOutcome::Failed { reason, attempts };
                }
                Verdict::Retry { reason, .. } if attempts >= self.max_attempts => {
                    self.metrics.unresolved.increment(1);
                    return PushOutcome::Unresolved { reason, attempts };
                }
                // A pass waits for all of a window's pushes: one asked to wait longer than
                // the backoff cap is left for a later pass rather than holding up the rest.
                Verdict::Retry {
                    after: Some(after),
                    reason,
                } if after > self.backoff.max => {
                    self.not_before
                        .lock()
                        .expect("not_before lock")
                        .insert(event.identifier.clone(), Instant::now() + after);
                    self.metrics.unresolved.increment(1);
                    return PushOutcome::Unresolved {
                        reason: format!("{reason} (Retry-After {}s: left for a later pass)", after.as_secs()),
                        attempts,
                    };
                }
                Verdict::Retry { after, reason } => {
                    let delay = self.backoff.delay(attempts, after);
                    tracing::debug!(identifier = %event.identifier, attempts, ?delay, %reason, "stripe call failed, retrying");
                    self.metrics.retries.increment(1);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.wait() => {}
                    }
                }
            }
        }
    }
}

/// One async mutex per key, dropped from the map once nobody holds or waits for it.
#[derive(Default)]
struct KeyedLocks {
    map: std::sync::Mutex<LockMap>,
}

#[derive(Default)]
struct LockMap {
    locks: HashMap<String, Arc<Mutex<()>>>,
    /// Unused entries are dropped when the map grows past this; then it doubles, so pruning
    /// stays linear overall even when a window holds tens of thousands of keys at once.
    prune_at: usize,
}

impl KeyedLocks {
    async fn lock(&self, key: String) -> OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.map.lock().expect("keyed locks");
            if map.locks.len() >= map.prune_at.max(1_024) {
                map.locks.retain(|_, l| Arc::strong_count(l) > 1);
                map.prune_at = map.locks.len() * 2;
            }
            map.locks.entry(key).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keyed_locks_forget_released_keys() {
        let locks = KeyedLocks::default();
        let held: Vec<_> = futures_lock_all(&locks, 0..3_000).await;
        for i in 3_000..6_000 {
            drop(locks.lock(format!("k{i}")).await);
        }
        let len = locks.map.lock().unwrap().locks.len();
        assert!(
            (3_000..6_000).contains(&len),
            "held keys kept, released ones dropped: {len}"
        );
        drop(held);
    }

    async fn futures_lock_all(locks: &KeyedLocks, keys: std::ops::Range<u32>) -> Vec<OwnedMutexGuard<()>> {
        let mut guards = Vec::new();
        for i in keys {
            guards.push(locks.lock(format!("k{i}")).await);
        }
        guards
    }

    #[tokio::test]
    async fn keyed_locks_serialise_one_key_only() {
        let locks = KeyedLocks::default();
        let a = locks.lock("cus_1\0m".into()).await;
        // Another key is free while the first is held.
        let _b = tokio::time::timeout(Duration::from_millis(100), locks.lock("cus_2\0m".into()))
            .await
            .expect("other key not blocked");
        // The same key waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), locks.lock("cus_1\0m".into()))
                .await
                .is_err()
        );
        drop(a);
        let _a2 = tokio::time::timeout(Duration::from_millis(100), locks.lock("cus_1\0m".into()))
            .await
            .expect("released");
    }
}
