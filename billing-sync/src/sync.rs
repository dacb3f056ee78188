//! One billing pass: find closed windows whose usage is not fully accounted for in the
//! ledger, and account for it (push to Stripe, or record why not).
//!
//! In: `usage_events` and `consumers` (ClickHouse), the ledger. Out: Stripe meter events and
//! ledger rows. A window is visited when its billable units differ from what the ledger
//! accounts for, or when a revision is still pending; per tenant and meter it then
//!   1. re-sends a pending revision exactly as recorded (a crash or outage interrupted it), or
//!   2. makes a new revision for the difference (revision 0 when the window closes, 1, 2, …
//!      for late events) and pushes it, or records it as unbillable (no Stripe customer) or
//!      as an adjustment (Stripe no longer accepts the window's timestamp).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use clickhouse::Client;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::ledger::{self, status, LedgerError, LedgerRow};
use crate::push::{MeterEvent, PushOutcome, Pusher};
use crate::settings::BillingSettings;
use crate::usage::{self, UsageError};
use crate::window::{self, Window};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Usage(#[from] UsageError),
}

/// What one pass did, in revisions.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    pub windows: usize,
    pub pushed: usize,
    pub failed: usize,
    pub unresolved: usize,
    pub unbillable: usize,
    pub adjustments: usize,
}

impl PassReport {
    fn add(&mut self, other: PassReport) {
        self.windows += other.windows;
        self.pushed += other.pushed;
        self.failed += other.failed;
        self.unresolved += other.unresolved;
        self.unbillable += other.unbillable;
        self.adjustments += other.adjustments;
    }
}

/// Outcome rows are written in batches of this many (or when a second has passed).
const LEDGER_BATCH: usize = 1_000;

pub struct Biller {
    client: Client,
    settings: BillingSettings,
    pusher: Pusher,
}

impl Biller {
    pub fn new(client: Client, settings: BillingSettings, pusher: Pusher) -> Self {
        Self {
            client,
            settings,
            pusher,
        }
    }

    fn meters(&self) -> Vec<String> {
        self.settings.meters.iter().map(|m| m.meter.clone()).collect()
    }

    /// Accounts for every closed window in the lookback whose usage is not yet accounted for.
    pub async fn pass(&self, now: i64) -> Result<PassReport, SyncError> {
        let (from, to) = window::closed_range(&self.settings.billing, now);
        let mut report = PassReport::default();
        if from >= to {
            return Ok(report);
        }
        let meters = self.meters();
        let usage = usage::per_window(&self.client, self.settings.billing.window_secs, from, to, &meters).await?;
        let accounts = ledger::window_accounts(&self.client, from, to).await?;
        let mut balance: HashMap<(u32, String), (i64, i64, u64)> = HashMap::new();
        for u in usage {
            balance.entry((u.window_start, u.meter)).or_default().0 += u.units;
        }
        // Meters no longer configured are not billed any more: their ledger rows are history.
        for a in accounts.into_iter().filter(|a| meters.contains(&a.meter)) {
            let entry = balance.entry((a.window_start, a.meter)).or_default();
            entry.1 += a.accounted;
            entry.2 += a.pending;
        }
        let due: BTreeSet<u32> = balance
            .iter()
            .filter(|(_, (units, accounted, pending))| units != accounted || *pending > 0)
            .map(|((start, _), _)| *start)
            .collect();
        if due.is_empty() {
            return Ok(report);
        }
        let customers = usage::customers(&self.client).await?;
        // Oldest first: they are the closest to Stripe's 35-day limit.
        for start in due {
            if self.pusher_shutdown() {
                break;
            }
            let window = Window::from_start(start, self.settings.billing.window_secs);
            let span = tracing::info_span!("window", start = window.start, end = window.end);
            report.add(self.close_window(window, &customers, now).instrument(span).await?);
        }
        Ok(report)
    }

    fn pusher_shutdown(&self) -> bool {
        self.pusher.is_shutting_down()
    }

    async fn close_window(&self, window: Window, customers: &HashMap<String, String>, now: i64) -> Result<PassReport, SyncError> {
        let mut report = PassReport {
            windows: 1,
            ..PassReport::default()
        };
        let event_names: HashMap<&str, &str> = self
            .settings
            .meters
            .iter()
            .map(|m| (m.meter.as_str(), m.event_name.as_str()))
            .collect();
        let mut totals: BTreeMap<(String, String), i64> = BTreeMap::new();
        for u in usage::per_tenant(&self.client, window.start, window.end, &self.meters()).await? {
            *totals.entry((u.tenant_id, u.meter)).or_default() += u.units;
        }
        let mut accounts = HashMap::new();
        for a in ledger::tenant_accounts(&self.client, window.start, window.end).await? {
            totals.entry((a.tenant_id.clone(), a.meter.clone())).or_default();
            accounts.insert((a.tenant_id.clone(), a.meter.clone()), a);
        }
        let stamp = now as u32;
        let mut direct = Vec::new();
        let mut pushes: Vec<(LedgerRow, MeterEvent)> = Vec::new();
        let mut unbillable_units = 0;
        for ((tenant, meter), total) in totals {
            let Some(&event_name) = event_names.get(meter.as_str()) else { continue };
            let account = accounts.get(&(tenant.clone(), meter.clone()));
            let mut row = LedgerRow {
                tenant_id: tenant.clone(),
                stripe_customer_id: String::new(),
                meter: meter.clone(),
                event_name: event_name.to_owned(),
                window_start: window.start,
                window_end: window.end,
                revision: 0,
                value: 0,
                window_total: total,
                identifier: String::new(),
                status: status::PENDING.to_owned(),
                stripe_ref: String::new(),
                error: String::new(),
                attempts: 0,
                created_at: stamp,
                updated_at: stamp,
                row_version: 0,
            };
            if let Some(account) = account.filter(|a| a.last_status() == status::PENDING) {
                // Interrupted: send the same event again, whatever the usage says now; the
                // difference, if any, becomes the next revision once this one is settled.
                let (revision, _, value, identifier, customer, attempts) = account.last.clone();
                row.revision = revision;
                row.value = value;
                row.identifier = identifier;
                row.stripe_customer_id = customer;
                row.attempts = attempts;
                if window.stripe_accepts(now) {
                    let event = meter_event(&row, window);
                    pushes.push((row, event));
                } else {
                    row.status = status::ADJUSTMENT.to_owned();
                    row.error = "pending when Stripe stopped accepting the window's timestamp (35 days); may or may not have been billed".to_owned();
                    tracing::warn!(tenant = %tenant, meter = %meter, value, "pending revision too old for Stripe: recorded as adjustment");
                    report.adjustments += 1;
                    direct.push(versioned(row));
                }
                continue;
            }
            let delta = total - account.map_or(0, |a| a.accounted);
            if delta == 0 {
                continue;
            }
            row.revision = account.map_or(0, |a| a.last_revision() + 1);
            row.value = delta;
            row.identifier = window::identifier(&tenant, &meter, window, row.revision);
            let customer = customers.get(&tenant);
            if delta < 0 {
                row.status = status::ADJUSTMENT.to_owned();
                row.error = "ClickHouse holds fewer units than already accounted for".to_owned();
                tracing::warn!(tenant = %tenant, meter = %meter, delta, "negative difference: recorded as adjustment");
                report.adjustments += 1;
            } else if customer.is_none() {
                row.status = status::UNBILLABLE.to_owned();
                report.unbillable += 1;
                unbillable_units += delta;
            } else if !window.stripe_accepts(now) {
                row.status = status::ADJUSTMENT.to_owned();
                row.error = "late units in a window older than Stripe accepts (35 days)".to_owned();
                report.adjustments += 1;
            } else {
                row.stripe_customer_id = customer.cloned().unwrap_or_default();
                let event = meter_event(&row, window);
                direct.push(versioned(row.clone()));
                pushes.push((row, event));
                continue;
            }
            direct.push(versioned(row));
        }
        if report.unbillable > 0 {
            // One line per window, however many tenants.
            tracing::warn!(
                revisions = report.unbillable,
                units = unbillable_units,
                "usage of tenants without a Stripe customer id recorded as unbillable"
            );
        }
        if report.adjustments > 0 {
            tracing::warn!(revisions = report.adjustments, "late or negative units recorded as adjustments, not pushed");
        }
        // Pending rows first: from here a crash leaves them to be re-sent as recorded.
        ledger::write(&self.client, &direct).await?;
        let pushed = self.push_all(pushes, stamp).await?;
        report.pushed += pushed.pushed;
        report.failed += pushed.failed;
        report.unresolved += pushed.unresolved;
        Ok(report)
    }

    async fn push_all(&self, pushes: Vec<(LedgerRow, MeterEvent)>, stamp: u32) -> Result<PassReport, SyncError> {
        let mut report = PassReport::default();
        let mut tasks = JoinSet::new();
        for (row, event) in pushes {
            let pusher = self.pusher.clone();
            tasks.spawn(async move {
                let outcome = pusher.push(&event).await;
                (row, outcome)
            });
        }
        let mut batch = Vec::new();
        let mut last_write = std::time::Instant::now();
        while let Some(joined) = tasks.join_next().await {
            let (mut row, outcome) = joined.expect("push task panicked");
            row.updated_at = stamp.max(unix_now() as u32);
            match outcome {
                PushOutcome::Pushed { stripe_ref, attempts } => {
                    row.status = status::PUSHED.to_owned();
                    row.stripe_ref = stripe_ref;
                    row.error.clear();
                    row.attempts += attempts;
                    report.pushed += 1;
                }
                PushOutcome::Failed { reason, attempts } => {
                    tracing::warn!(tenant = %row.tenant_id, meter = %row.meter, identifier = %row.identifier, %reason, "stripe refused a meter event: recorded as failed");
                    row.status = status::FAILED.to_owned();
                    row.error = reason;
                    row.attempts += attempts;
                    report.failed += 1;
                }
                PushOutcome::Unresolved { reason, attempts } => {
                    row.error = reason;
                    row.attempts += attempts;
                    report.unresolved += 1;
                }
            }
            batch.push(versioned(row));
            if batch.len() >= LEDGER_BATCH || last_write.elapsed() >= std::time::Duration::from_secs(1) {
                ledger::write(&self.client, &batch).await?;
                batch.clear();
                last_write = std::time::Instant::now();
            }
        }
        ledger::write(&self.client, &batch).await?;
        if report.unresolved > 0 {
            tracing::warn!(revisions = report.unresolved, "meter events still failing: left pending, retried next pass");
        }
        Ok(report)
    }
}

fn versioned(mut row: LedgerRow) -> LedgerRow {
    row.row_version = ledger::next_row_version();
    row
}

fn meter_event(row: &LedgerRow, window: Window) -> MeterEvent {
    MeterEvent {
        event_name: row.event_name.clone(),
        stripe_customer_id: row.stripe_customer_id.clone(),
        value: row.value,
        identifier: row.identifier.clone(),
        timestamp: window.event_timestamp(),
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
