//! One active billing-sync among several started: every instance joins one Kafka consumer
//! group on a topic of one partition, and the member the group assigns that partition to is
//! the active one; the others stand by, healthy, until a rebalance gives it to them.
//!
//! In: `[lease]` (brokers, topic, group). Out: [`Lease::is_active`], read before each pass,
//! and the `billing_sync_active` gauge.
//!
//! Why a consumer group: the services already run on Kafka, its coordinator hands one
//! partition to exactly one live member, and it notices a dead one within the session
//! timeout (10 s here) without clocks of ours; ClickHouse has no compare-and-set to build a
//! lease on. Exactly-once does not rest on it: a paused ex-leader that still pushes repeats a
//! ledger identifier, which Stripe takes once, and its ledger rows are the same rows. The
//! lease keeps two instances from doing the same work and from racing on the ledger.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use tollgate_runtime::shutdown::Shutdown;

use crate::settings::LeaseSettings;

#[derive(Debug, thiserror::Error)]
#[error("lease topic {topic}: {reason}")]
pub struct LeaseError {
    topic: String,
    reason: String,
}

/// Whether this instance holds the lease now.
#[derive(Clone)]
pub struct Lease {
    active: Arc<AtomicBool>,
}

impl Lease {
    /// An instance without `[lease]`: always active (one billing-sync per deployment).
    pub fn sole() -> Self {
        Self {
            active: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Joins the group and follows its assignments until `shutdown`.
    pub fn join(settings: &LeaseSettings, gauge: metrics::Gauge, shutdown: Shutdown) -> Result<Self, LeaseError> {
        let active = Arc::new(AtomicBool::new(false));
        gauge.set(0.0);
        let context = LeaseContext {
            active: active.clone(),
            gauge,
        };
        let failed = |e: rdkafka::error::KafkaError| LeaseError {
            topic: settings.topic.clone(),
            reason: e.to_string(),
        };
        let consumer: StreamConsumer<LeaseContext> = settings
            .kafka
            .client_config()
            .set("group.id", &settings.group)
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // Sticky and incremental: a member joining or rejoining the group does not move
            // the lease from the instance holding it.
            .set("partition.assignment.strategy", "cooperative-sticky")
            .create_with_context(context)
            .map_err(failed)?;
        consumer.subscribe(&[&settings.topic]).map_err(failed)?;
        tokio::spawn(async move {
            // The topic carries nothing: receiving only drives the group's callbacks.
            loop {
                tokio::select! {
                    message = consumer.recv() => {
                        if let Err(error) = message {
                            tracing::warn!(%error, "lease consumer");
                        }
                    }
                    _ = shutdown.wait() => break,
                }
            }
            // Leaving the group hands the partition to a standby at once, not after the
            // session timeout.
            consumer.unsubscribe();
        });
        Ok(Self { active })
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }
}

struct LeaseContext {
    active: Arc<AtomicBool>,
    gauge: metrics::Gauge,
}

impl LeaseContext {
    fn set(&self, active: bool) {
        if self.active.swap(active, Ordering::SeqCst) != active {
            if active {
                tracing::info!("billing lease taken: this instance runs the billing passes");
            } else {
                tracing::info!("billing lease given up: this instance stands by");
            }
        }
        self.gauge.set(if active { 1.0 } else { 0.0 });
    }
}

impl ClientContext for LeaseContext {}

// Rebalances are incremental: an assignment or revocation lists only what changes, so an
// empty one leaves the lease as it is.
impl ConsumerContext for LeaseContext {
    // Given up before the group moves the partition: a pass that starts after this point
    // sees the lease gone.
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) if partitions.count() > 0 => self.set(false),
            Rebalance::Error(_) => self.set(false),
            _ => {}
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            if partitions.count() > 0 {
                self.set(true);
            }
        }
    }
}
