//! One billing pass: find closed windows whose usage is not fully accounted for in the
//! ledger, and account for it (push to Stripe, or record why not).
//!
//! In: the consumer's rollups, `usage_minutes_touched` and `consumers` (ClickHouse, read
//! through [`crate::usage`]), the ledger. Out: Stripe meter events and ledger rows. A window
//! is visited when its billable units differ from what the ledger accounts for, or when a
//! revision is still pending (after a process's first pass: when it closed, was touched by a
//! consumer batch, or was left unresolved since the previous pass); per tenant and meter it then
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
use crate::schedule::Schedule;
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

/// How far back, before the previous pass began, touched minutes are read again: a consumer
/// insert stamped just before that instant may become visible just after it (an insert runs
/// at most the consumer's `batch.insert_timeout_ms`, 30 s by default, before it is killed).
/// Re-reading costs a few thousand small rows; missing one would leave late units unbilled
/// until the next start.
const TOUCHED_OVERLAP_SECS: u32 = 600;

/// Where the previous complete pass left off.
#[derive(Debug, Clone)]
struct Cursor {
    /// Server time when it began: every usage change after it is in a minute touched since.
    since: u32,
    /// Windows ending at or before this were closed then, and visited if due.
    closed_until: u32,
    /// Windows it left with a push unresolved (pending in the ledger).
    retry: BTreeSet<u32>,
}

pub struct Biller {
    client: Client,
    settings: BillingSettings,
    pusher: Pusher,
    /// Window lengths over time ([`crate::schedule`]); one length unless it was changed.
    schedule: Schedule,
    /// `None` until a pass completes: the next pass compares the whole lookback.
    cursor: std::sync::Mutex<Option<Cursor>>,
}

impl Biller {
    pub fn new(client: Client, settings: BillingSettings, pusher: Pusher) -> Self {
        let schedule = Schedule::fixed(settings.billing.window_secs);
        Self {
            client,
            settings,
            pusher,
            schedule,
            cursor: std::sync::Mutex::new(None),
        }
    }

    /// Cuts windows as `schedule` says (what [`crate::schedule::establish`] returned).
    pub fn with_schedule(mut self, schedule: Schedule) -> Self {
        self.schedule = schedule;
        self
    }

    fn meters(&self) -> Vec<String> {
        self.settings.meters.iter().map(|m| m.meter.clone()).collect()
    }

    /// Accounts for every closed window in the lookback whose usage is not yet accounted for.
    ///
    /// The first pass of a process compares every window of the lookback (per-window sums
    /// from the rollups, against the ledger). Each later pass visits only the windows that
    /// can have changed since the previous complete pass ([`Cursor`]): those that closed
    /// since, those a consumer batch touched since (`usage_minutes_touched`), and those the
    /// previous pass left with a push unresolved. Its cost follows new work, not history.
    pub async fn pass(&self, now: i64) -> Result<PassReport, SyncError> {
        let billing = &self.settings.billing;
        let to = self.schedule.closed_until(now, billing.lateness_secs);
        let lookback_start = (now - billing.lookback_days as i64 * 86_400).max(0) as u32;
        let from = self.schedule.window_at(lookback_start).start;
        let mut report = PassReport::default();
        if from >= to {
            return Ok(report);
        }
        // Read before any usage: whatever lands after this instant is stamped later.
        let started = usage::server_now(&self.client).await?;
        let previous = self.cursor.lock().expect("cursor lock").clone();
        let due = match &previous {
            None => self.due_in_lookback(from, to).await?,
            Some(cursor) => self.due_since(cursor, from, to).await?,
        };
        let mut retry = BTreeSet::new();
        let mut complete = true;
        if !due.is_empty() {
            let customers = usage::customers(&self.client).await?;
            // Oldest first: they are the closest to Stripe's 35-day limit.
            for start in due {
                if self.pusher_shutdown() {
                    complete = false;
                    break;
                }
                let window = self.schedule.window_at(start);
                let span = tracing::info_span!("window", start = window.start, end = window.end);
                let done = self.close_window(window, &customers, now).instrument(span).await?;
                if done.unresolved > 0 {
                    retry.insert(start);
                }
                report.add(done);
            }
        }
        if complete {
            *self.cursor.lock().expect("cursor lock") = Some(Cursor {
                since: started,
                closed_until: to,
                retry,
            });
        }
        Ok(report)
    }

    /// Every window in `[from, to)` whose units differ from what the ledger accounts for, or
    /// with a pending revision.
    async fn due_in_lookback(&self, from: u32, to: u32) -> Result<BTreeSet<u32>, SyncError> {
        self.unbalanced(&self.schedule.spans(from, to)).await
    }

    /// The windows of `spans` (`(from, to, window length)`, each cut into whole windows)
    /// whose units differ from what the ledger accounts for, or with a pending revision.
    async fn unbalanced(&self, spans: &[(u32, u32, u32)]) -> Result<BTreeSet<u32>, SyncError> {
        let meters = self.meters();
        let mut balance: HashMap<(u32, String), (i64, i64, u64)> = HashMap::new();
        for &(a, b, len) in spans {
            for u in usage::per_window(&self.client, u64::from(len), a, b, &meters).await? {
                balance.entry((u.window_start, u.meter)).or_default().0 += u.units;
            }
            // Meters no longer configured are not billed any more: their ledger rows are history.
            for w in ledger::window_accounts(&self.client, a, b).await? {
                if meters.contains(&w.meter) {
                    let entry = balance.entry((w.window_start, w.meter)).or_default();
                    entry.1 += w.accounted;
                    entry.2 += w.pending;
                }
            }
        }
        Ok(balance
            .iter()
            .filter(|(_, (units, accounted, pending))| units != accounted || *pending > 0)
            .map(|((start, _), _)| *start)
            .collect())
    }

    /// The windows of `[from, to)` that may have changed since `cursor`'s pass (see
    /// [`Biller::pass`]) and, compared, are due; a candidate that did not change costs a
    /// comparison of its window sums, never a visit or a push.
    async fn due_since(&self, cursor: &Cursor, from: u32, to: u32) -> Result<BTreeSet<u32>, SyncError> {
        let mut due: BTreeSet<u32> = cursor.retry.iter().copied().filter(|s| *s >= from).collect();
        for (a, b, len) in self.schedule.spans(cursor.closed_until.max(from), to) {
            due.extend((a..b).step_by(len as usize));
        }
        let since = cursor.since.saturating_sub(TOUCHED_OVERLAP_SECS);
        for minute in usage::minutes_touched(&self.client, since, from, to).await? {
            // A window length that is not a whole number of minutes may cut a minute in two.
            for t in [minute, minute + 59] {
                let window = self.schedule.window_at(t);
                if window.start >= from && window.end <= to {
                    due.insert(window.start);
                }
            }
        }
        // Adjacent candidates are compared in one range.
        let mut spans: Vec<(u32, u32, u32)> = Vec::new();
        for start in due {
            let window = self.schedule.window_at(start);
            let len = window.end - window.start;
            match spans.last_mut() {
                Some(last) if last.1 == window.start && last.2 == len => last.1 = window.end,
                _ => spans.push((window.start, window.end, len)),
            }
        }
        self.unbalanced(&spans).await
    }

    fn pusher_shutdown(&self) -> bool {
        self.pusher.is_shutting_down()
    }

    async fn close_window(
        &self,
        window: Window,
        customers: &HashMap<String, String>,
        now: i64,
    ) -> Result<PassReport, SyncError> {
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
        let source = usage::Source::for_range(u64::from(window.end - window.start), window.start, window.end);
        for u in usage::per_tenant(&self.client, source, window.start, window.end, &self.meters()).await? {
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
            let Some(&event_name) = event_names.get(meter.as_str()) else {
                continue;
            };
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
            let latest = account.map(|a| Latest {
                revision: a.last_revision(),
                pending: a.last_status() == status::PENDING,
                accounted: a.accounted,
            });
            let decision = decide(
                latest,
                total,
                customers.contains_key(&tenant),
                window.stripe_accepts(now),
            );
            match decision {
                Decision::Nothing => continue,
                Decision::Resend | Decision::ResendTooLate => {
                    // Interrupted: the same event again, whatever the usage says now; the
                    // difference, if any, becomes the next revision once this one is settled.
                    let account = account.expect("a pending revision has an account");
                    let (revision, _, value, identifier, customer, attempts, window_total) = account.last.clone();
                    row.revision = revision;
                    row.window_total = window_total;
                    row.value = value;
                    row.identifier = identifier;
                    row.stripe_customer_id = customer;
                    row.attempts = attempts;
                    if decision == Decision::Resend {
                        let event = meter_event(&row, window);
                        pushes.push((row, event));
                        continue;
                    }
                    row.status = status::ADJUSTMENT.to_owned();
                    row.error = "pending when Stripe stopped accepting the window's timestamp (35 days); may or may not have been billed".to_owned();
                    tracing::warn!(tenant = %tenant, meter = %meter, value, "pending revision too old for Stripe: recorded as adjustment");
                    report.adjustments += 1;
                }
                Decision::New {
                    revision,
                    value,
                    status: new_status,
                } => {
                    row.revision = revision;
                    row.value = value;
                    row.identifier = window::identifier(&tenant, &meter, window, revision);
                    row.status = new_status.to_owned();
                    match new_status {
                        status::PENDING => {
                            row.stripe_customer_id = customers.get(&tenant).cloned().unwrap_or_default();
                            let event = meter_event(&row, window);
                            direct.push(versioned(row.clone()));
                            pushes.push((row, event));
                            continue;
                        }
                        status::UNBILLABLE => {
                            report.unbillable += 1;
                            unbillable_units += value;
                        }
                        _ if value < 0 => {
                            row.error = "ClickHouse holds fewer units than already accounted for".to_owned();
                            tracing::warn!(tenant = %tenant, meter = %meter, value, "negative difference: recorded as adjustment");
                            report.adjustments += 1;
                        }
                        _ => {
                            row.error = "late units in a window older than Stripe accepts (35 days)".to_owned();
                            report.adjustments += 1;
                        }
                    }
                }
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
            tracing::warn!(
                revisions = report.adjustments,
                "late or negative units recorded as adjustments, not pushed"
            );
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
            tracing::warn!(
                revisions = report.unresolved,
                "meter events still failing: left pending, retried next pass"
            );
        }
        Ok(report)
    }
}

/// The ledger's latest revision of one tenant and meter in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latest {
    pub revision: u32,
    pub pending: bool,
    /// Units of every settled revision (all statuses but pending).
    pub accounted: i64,
}

/// What to do for one tenant and meter of a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Already accounted for.
    Nothing,
    /// The latest revision is pending: send it again exactly as recorded.
    Resend,
    /// The latest revision is pending but Stripe no longer accepts the window: record it as
    /// an adjustment (it may or may not have reached Stripe).
    ResendTooLate,
    /// A new revision for the difference, written with `status`: pending (then pushed),
    /// unbillable, or adjustment (negative, or too old for Stripe).
    New {
        revision: u32,
        value: i64,
        status: &'static str,
    },
}

/// Decides, from the ledger's latest revision and ClickHouse's `total`, what one tenant and
/// meter of a window needs. Pure: the property tests below check that settling every decision
/// accounts for exactly the units in ClickHouse, however late they arrive.
pub fn decide(latest: Option<Latest>, total: i64, has_customer: bool, stripe_accepts: bool) -> Decision {
    if latest.is_some_and(|l| l.pending) {
        return if stripe_accepts {
            Decision::Resend
        } else {
            Decision::ResendTooLate
        };
    }
    let value = total - latest.map_or(0, |l| l.accounted);
    if value == 0 {
        return Decision::Nothing;
    }
    let revision = latest.map_or(0, |l| l.revision + 1);
    let status = if value < 0 || (has_customer && !stripe_accepts) {
        status::ADJUSTMENT
    } else if !has_customer {
        status::UNBILLABLE
    } else {
        status::PENDING
    };
    Decision::New {
        revision,
        value,
        status,
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn decisions() {
        assert_eq!(decide(None, 0, true, true), Decision::Nothing);
        assert_eq!(
            decide(None, 7, true, true),
            Decision::New {
                revision: 0,
                value: 7,
                status: status::PENDING
            }
        );
        let settled = Latest {
            revision: 0,
            pending: false,
            accounted: 7,
        };
        assert_eq!(decide(Some(settled), 7, true, true), Decision::Nothing);
        assert_eq!(
            decide(Some(settled), 10, true, true),
            Decision::New {
                revision: 1,
                value: 3,
                status: status::PENDING
            }
        );
        assert_eq!(
            decide(Some(settled), 10, false, true),
            Decision::New {
                revision: 1,
                value: 3,
                status: status::UNBILLABLE
            }
        );
        assert_eq!(
            decide(Some(settled), 10, true, false),
            Decision::New {
                revision: 1,
                value: 3,
                status: status::ADJUSTMENT
            }
        );
        assert_eq!(
            decide(Some(settled), 5, true, true),
            Decision::New {
                revision: 1,
                value: -2,
                status: status::ADJUSTMENT
            }
        );
        let pending = Latest {
            revision: 2,
            pending: true,
            accounted: 7,
        };
        assert_eq!(decide(Some(pending), 100, true, true), Decision::Resend);
        assert_eq!(decide(Some(pending), 100, true, false), Decision::ResendTooLate);
    }

    /// One step of the world between two passes: late units arrive (or a correction takes
    /// some back), the push of a pending revision either settles or is interrupted (crash,
    /// outage), and Stripe may stop accepting the window for good (it aged out).
    #[derive(Debug, Clone)]
    struct Step {
        late_units: i64,
        push_settles: bool,
        stripe_closes: bool,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            (-20i64..50, any::<bool>(), prop::bool::weighted(0.1)).prop_map(
                |(late_units, push_settles, stripe_closes)| Step {
                    late_units,
                    push_settles,
                    stripe_closes,
                },
            ),
            1..30,
        )
    }

    fn latest(ledger: &[(u32, i64, &'static str)]) -> Option<Latest> {
        ledger.last().map(|&(revision, _, status)| Latest {
            revision,
            pending: status == status::PENDING,
            accounted: ledger.iter().filter(|r| r.2 != status::PENDING).map(|r| r.1).sum(),
        })
    }

    proptest! {
        /// Sums in, sums out: once pushes go through, the revisions account for exactly the
        /// units in ClickHouse, however they grow or shrink; revisions are consecutive; only
        /// positive pending revisions go to Stripe, and only while it accepts the window; a
        /// re-send never changes a revision's value.
        #[test]
        fn revisions_account_for_every_unit(initial in 0i64..1_000, steps in steps(), has_customer: bool) {
            let mut total = initial;
            let mut accepts = true;
            let mut ledger: Vec<(u32, i64, &'static str)> = Vec::new();
            let mut sent: std::collections::HashMap<u32, i64> = Default::default();
            let settle = Step { late_units: 0, push_settles: true, stripe_closes: false };
            for step in steps.iter().chain([settle.clone(), settle].iter()) {
                match decide(latest(&ledger), total, has_customer, accepts) {
                    Decision::Nothing => {}
                    Decision::Resend => {
                        prop_assert!(accepts, "nothing is sent once Stripe refuses the window");
                        let (revision, value, _) = *ledger.last().unwrap();
                        prop_assert_eq!(sent.insert(revision, value).unwrap_or(value), value);
                        if step.push_settles {
                            ledger.last_mut().unwrap().2 = status::PUSHED;
                        }
                    }
                    Decision::ResendTooLate => {
                        prop_assert!(!accepts);
                        ledger.last_mut().unwrap().2 = status::ADJUSTMENT;
                    }
                    Decision::New { revision, value, status } => {
                        prop_assert_eq!(revision as usize, ledger.len());
                        prop_assert_ne!(value, 0);
                        if status == status::PENDING {
                            prop_assert!(has_customer && accepts && value > 0);
                            sent.insert(revision, value);
                            let settled = if step.push_settles { status::PUSHED } else { status::PENDING };
                            ledger.push((revision, value, settled));
                        } else if status == status::UNBILLABLE {
                            prop_assert!(!has_customer && value > 0);
                            ledger.push((revision, value, status));
                        } else {
                            prop_assert_eq!(status, status::ADJUSTMENT);
                            prop_assert!(value < 0 || (has_customer && !accepts));
                            ledger.push((revision, value, status));
                        }
                    }
                }
                total = (total + step.late_units).max(0);
                accepts &= !step.stripe_closes;
            }
            // Two settling passes after the last change: everything is accounted for.
            prop_assert_eq!(decide(latest(&ledger), total, has_customer, accepts), Decision::Nothing);
            prop_assert_eq!(ledger.iter().map(|r| r.1).sum::<i64>(), total);
            prop_assert!(ledger.iter().all(|r| r.2 != status::PENDING));
            let pushed: i64 = ledger.iter().filter(|r| r.2 == status::PUSHED).map(|r| r.1).sum();
            prop_assert!(sent.values().all(|v| *v > 0));
            prop_assert!(ledger.iter().filter(|r| r.2 == status::PUSHED).all(|r| sent.get(&r.0) == Some(&r.1)));
            prop_assert!(pushed <= sent.values().sum::<i64>());
        }
    }
}
