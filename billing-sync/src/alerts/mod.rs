//! Usage and spend alerts: a tenant's month-to-date spend crossing its budget's `alertAt`
//! thresholds, and its calendar quotas crossing `[alerts].quota_thresholds`, each raised once
//! per tenant, threshold and period, recorded in ClickHouse and delivered as a signed
//! webhook until the receiver answers 2xx.
//!
//! In: budgets and consumers from the keys topic ([`crate::consumers`]), the catalogue's
//! prices, the gateway's plan quotas ([`observe::QuotaPlans`]), usage from `usage_events`.
//! Out: `billing_alerts` rows ([`store`]), POSTs to `webhook_url` ([`webhook`]), metrics.
//!
//! Why billing-sync owns alerts: it already prices month-to-date billable usage with the
//! catalogue the invoice uses, it runs once per deployment (so an alert is raised by one
//! process, not by each gateway), and it already follows the keys topic for consumers. Its
//! ledger discipline carries over: each check records its new alerts as `pending`, with a
//! stable `webhook-id` and the exact body, before any delivery; deliveries then go out from
//! the table, so a crash between record and 2xx re-sends the same id and body, never a new
//! alert. Delivery is at least once: the receiver dedupes on `webhook-id`.

pub mod crossing;
pub mod evaluate;
pub mod observe;
pub mod settings;
pub mod store;
pub mod webhook;

use std::collections::BTreeSet;
use std::time::Duration;

use tollgate_runtime::catalogue::Catalogue;
use tollgate_runtime::shutdown::Shutdown;

use self::evaluate::{Observed, Period};
use self::observe::QuotaPlans;
use self::settings::AlertsSettings;
use self::store::Status;
use self::webhook::{Delivery, WebhookSender};
use crate::consumers::Consumers;
use crate::ledger::LedgerError;

#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    #[error(transparent)]
    Store(#[from] LedgerError),
    #[error("alerts: usage read: {0}")]
    Usage(#[from] clickhouse::error::Error),
}

/// The alerts' metrics on billing-sync's ops listener.
#[derive(Clone)]
pub struct AlertMetrics {
    pub spend_emitted: metrics::Counter,
    pub quota_emitted: metrics::Counter,
    pub delivered: metrics::Counter,
    pub failed_attempts: metrics::Counter,
    pub pending: metrics::Gauge,
    pub checks: metrics::Counter,
}

impl AlertMetrics {
    pub fn register(recorder: &impl metrics::Recorder) -> Self {
        metrics::with_local_recorder(recorder, || {
            metrics::describe_counter!(
                "billing_sync_alerts_emitted_total",
                "Alerts raised (recorded for delivery), by kind: spend or quota."
            );
            metrics::describe_counter!(
                "billing_sync_alert_deliveries_total",
                "Alerts the webhook receiver acknowledged with a 2xx."
            );
            metrics::describe_counter!(
                "billing_sync_alert_delivery_failures_total",
                "Webhook attempts that got no 2xx (each is retried)."
            );
            metrics::describe_counter!(
                "billing_sync_alert_checks_total",
                "Checks that compared spend and quotas with their thresholds (only once the keys topic has been read to its end)."
            );
            metrics::describe_gauge!(
                "billing_sync_alerts_pending",
                "Alerts recorded but not yet acknowledged by the receiver, as of the last check."
            );
            Self {
                spend_emitted: metrics::counter!("billing_sync_alerts_emitted_total", "kind" => "spend"),
                quota_emitted: metrics::counter!("billing_sync_alerts_emitted_total", "kind" => "quota"),
                delivered: metrics::counter!("billing_sync_alert_deliveries_total"),
                failed_attempts: metrics::counter!("billing_sync_alert_delivery_failures_total"),
                pending: metrics::gauge!("billing_sync_alerts_pending"),
                checks: metrics::counter!("billing_sync_alert_checks_total"),
            }
        })
    }
}

/// What one check did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub raised: usize,
    pub delivered: usize,
    pub undelivered: usize,
}

pub struct Alerter {
    pub client: clickhouse::Client,
    pub consumers: Consumers,
    pub catalogue: Catalogue,
    pub quota_plans: QuotaPlans,
    pub settings: AlertsSettings,
    pub sender: WebhookSender,
    pub metrics: AlertMetrics,
}

impl Alerter {
    /// Raises the alerts due at `now` (once the keys topic has been read to its end, so a
    /// budget not read yet is not mistaken for none), then delivers every pending alert.
    pub async fn check(&self, now: i64) -> Result<CheckReport, AlertsError> {
        let mut report = CheckReport::default();
        if self.consumers.is_caught_up() {
            let raised = self.raise(now).await?;
            self.metrics.checks.increment(1);
            report.raised = raised.len();
            for row in &raised {
                match row.kind.as_str() {
                    "spend" => self.metrics.spend_emitted.increment(1),
                    _ => self.metrics.quota_emitted.increment(1),
                }
                tracing::info!(
                    tenant = %row.tenant_id,
                    kind = %row.kind,
                    subject = %row.subject,
                    period = %row.period,
                    threshold = row.threshold,
                    webhook_id = %row.webhook_id,
                    "alert raised"
                );
            }
        }
        let pending = store::pending(&self.client).await?;
        let mut outcomes = Vec::new();
        for row in &pending {
            let failed = || self.metrics.failed_attempts.increment(1);
            let outcome = match self.sender.deliver(&row.webhook_id, &row.payload, failed).await {
                Delivery::Delivered { attempts } => {
                    self.metrics.delivered.increment(1);
                    report.delivered += 1;
                    row.after(Status::Delivered, attempts, "", unix_now() as u32)
                }
                Delivery::Undelivered { attempts, error } => {
                    report.undelivered += 1;
                    row.after(Status::Pending, attempts, &error, unix_now() as u32)
                }
            };
            outcomes.push(outcome);
        }
        store::write(&self.client, &outcomes).await?;
        self.metrics.pending.set(report.undelivered as f64);
        Ok(report)
    }

    /// Decides and records (as `pending`) the alerts not raised yet this period.
    async fn raise(&self, now: i64) -> Result<Vec<store::AlertRow>, AlertsError> {
        let tenants = self.consumers.tenants();
        let budgets = self.consumers.budgets();
        let (month, day) = (Period::month_of(now), Period::day_of(now));
        let ids: Vec<String> = tenants.keys().cloned().collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let recorded: BTreeSet<_> = store::recorded(&self.client, &[month.name.clone(), day.name.clone()])
            .await?
            .iter()
            .filter_map(store::AlertRow::key)
            .collect();
        let billable_month = observe::billable_units(&self.client, &ids, (month.start, month.end)).await?;
        let admitted_month = observe::admitted_units(&self.client, &ids, (month.start, month.end)).await?;
        let admitted_day = observe::admitted_units(&self.client, &ids, (day.start, day.end)).await?;
        let rows = evaluate::new_alerts(&Observed {
            tenants: &tenants,
            budgets: &budgets,
            catalogue: &self.catalogue,
            quota_plans: &self.quota_plans,
            quota_thresholds: &self.settings.quota_thresholds,
            month: &month,
            day: &day,
            billable_month: &billable_month,
            admitted_month: &admitted_month,
            admitted_day: &admitted_day,
            recorded: &recorded,
            now,
        });
        // The intent: recorded before any delivery, so a crash re-sends these ids.
        store::write(&self.client, &rows).await?;
        Ok(rows)
    }

    /// Checks every `check_interval_secs` until `shutdown`; a failed check is logged and
    /// retried at the next interval (what it recorded stays pending).
    /// Checks every interval while `lease` is held (a standby instance sends nothing).
    pub async fn run(self, lease: crate::lease::Lease, shutdown: Shutdown) {
        let interval = Duration::from_secs(self.settings.check_interval_secs);
        while !shutdown.is_triggered() {
            let checked = if lease.is_active() {
                self.check(unix_now()).await
            } else {
                Ok(CheckReport::default())
            };
            match checked {
                Ok(report) if report != CheckReport::default() => tracing::info!(
                    raised = report.raised,
                    delivered = report.delivered,
                    undelivered = report.undelivered,
                    "alerts check done"
                ),
                Ok(_) => {}
                Err(err) => tracing::error!(error = %err, "alerts check failed; retrying next interval"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait() => {}
            }
        }
    }
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}
