//! billing-sync: billable usage from ClickHouse to Stripe meter events, billed exactly once,
//! and each tenant a Stripe customer subscribed to its plan's prices.
//!
//! In: `usage_events` and `consumers` in ClickHouse (written by the meter consumer), the
//! consumers on the keys topic, the plan catalogue, the Stripe secret key. Out: Stripe
//! customers, subscriptions and billing meter events, the customer id written back to the
//! consumers, `billing_ledger` and `billing_customers` rows and the catalogue's prices
//! (`plan_prices`, for finance's invoice views) in ClickHouse, spend and quota alerts
//! (`billing_alerts` and a signed webhook), health and metrics on the ops listener. [`run`] is
//! the service loop; [`setup`] and [`reconcile`] are the
//! `setup` and `reconcile` subcommands.
#![forbid(unsafe_code)]

// Settings and the Stripe transport.
pub mod calls;
pub mod retry;
pub mod settings;
pub mod stripe;
// The catalogue in Stripe, and customers and subscriptions kept in step with the consumers.
pub mod consumers;
pub mod customers;
pub mod prices;
pub mod products;
pub mod provision;
// Usage into meter events: windows, usage, pushes, the ledger, and checking it all
// (ledger against ClickHouse, invoices against Stripe).
pub mod invoice;
pub mod ledger;
pub mod push;
pub mod reconcile;
pub mod schedule;
pub mod sync;
pub mod usage;
pub mod window;
// Spend and quota alerts: the same prices and usage, compared with budgets and quotas.
pub mod alerts;
pub mod gateway_file;
pub mod lease;

use std::time::Duration;

use tokio::net::TcpListener;
use tollgate_runtime::catalogue::Catalogue;
use tollgate_runtime::ops::Ops;
use tollgate_runtime::shutdown::Shutdown;

pub use settings::BillingSettings;

use crate::calls::Caller;
use crate::products::SetupAction;
use crate::provision::{ProvisionMetrics, Provisioner};
use crate::push::{PushMetrics, Pusher};
use crate::sync::Biller;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    // Not `source`: the message says it already, and `{:#}` would say it twice.
    #[error("ops listener: cannot bind {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error(transparent)]
    Clickhouse(#[from] tollgate_runtime::clickhouse::ClickhouseCheckError),
    #[error(transparent)]
    Stripe(#[from] stripe::StripeCheckError),
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Setup(#[from] stripe::StripeCallError),
    #[error(transparent)]
    Reconcile(#[from] reconcile::ReconcileError),
    #[error(transparent)]
    Catalogue(#[from] tollgate_runtime::catalogue::CatalogueError),
    #[error(
        "catalogue plans.{plan}.meters.{meter}: billing-sync does not push meter {meter:?} (its [[meters]]: {pushed})"
    )]
    UnpushedMeter {
        plan: String,
        meter: String,
        pushed: String,
    },
    #[error(transparent)]
    Schedule(#[from] schedule::ScheduleError),
    #[error(transparent)]
    Consumers(#[from] consumers::ConsumersError),
    #[error(transparent)]
    Products(#[from] products::ProductsError),
    #[error(transparent)]
    Provision(#[from] provision::ProvisionError),
    #[error(transparent)]
    Invoice(#[from] invoice::InvoiceError),
    #[error(transparent)]
    AlertSecret(#[from] alerts::settings::SecretError),
    #[error(transparent)]
    QuotaPlans(#[from] alerts::observe::PlansError),
    #[error(transparent)]
    Lease(#[from] lease::LeaseError),
    #[error(transparent)]
    LeaseTopic(#[from] tollgate_runtime::kafka::KafkaCheckError),
}

/// Reads `[catalogue].path` and checks that every priced meter is one billing-sync pushes.
pub fn load_catalogue(settings: &BillingSettings) -> Result<Option<Catalogue>, BillingError> {
    let Some(c) = &settings.catalogue else {
        return Ok(None);
    };
    let catalogue = Catalogue::load(&c.path)?;
    for (plan, prices) in &catalogue.plans {
        for meter in prices.meters.keys() {
            if !settings.meters.iter().any(|m| &m.meter == meter) {
                return Err(BillingError::UnpushedMeter {
                    plan: plan.clone(),
                    meter: meter.clone(),
                    pushed: settings
                        .meters
                        .iter()
                        .map(|m| m.meter.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
    }
    Ok(Some(catalogue))
}

/// Checks every dependency, then closes billing windows as they become due until `shutdown`
/// fires. A failed pass (ClickHouse down, say) is logged and retried at the next interval.
pub async fn run(settings: BillingSettings, api_key: String, shutdown: Shutdown) -> Result<(), BillingError> {
    let catalogue = load_catalogue(&settings)?;
    // Before connecting to anything: a missing or malformed secret is a settings mistake.
    let alert_secret = settings.alerts.as_ref().map(|a| a.secret()).transpose()?;
    let listener = TcpListener::bind(&settings.admin.listen)
        .await
        .map_err(|error| BillingError::Bind {
            addr: settings.admin.listen.clone(),
            error,
        })?;
    let client = settings.clickhouse.connect().await?;
    ledger::migrate_on(&client, settings.clickhouse.on_cluster()).await?;
    let api = stripe::client(&settings.stripe, &api_key)?;
    stripe::check_reachable(&settings.stripe, &api).await?;
    let (ops, recorder) = Ops::new();
    let push_metrics = PushMetrics::register(&recorder);
    let service_metrics = ServiceMetrics::register(&recorder);
    let lease = match &settings.lease {
        Some(lease) => {
            tollgate_runtime::kafka::check_topics(&lease.kafka, std::slice::from_ref(&lease.topic)).await?;
            lease::Lease::join(lease, service_metrics.active.clone(), shutdown.clone())?
        }
        None => {
            service_metrics.active.set(1.0);
            lease::Lease::sole()
        }
    };
    let schedule = schedule::establish(
        &client,
        settings.billing.window_secs,
        settings.billing.lateness_secs,
        sync::unix_now(),
    )
    .await?;
    let attempts = push_metrics.attempts.clone();
    let pusher = Pusher::new(api.clone(), &settings.stripe, push_metrics, shutdown.clone());
    let interval = Duration::from_secs(settings.billing.poll_interval_secs);
    // Written once per start; until meter-consumer has made the table, tried again each pass.
    let mut unpublished = catalogue.clone();
    let provisioner = match (&settings.provisioning, catalogue) {
        (Some(provisioning), Some(catalogue)) => Some(Provisioner {
            client: client.clone(),
            caller: Caller::new(api, &settings.stripe, pusher.rate_limiter(), shutdown.clone()).counting(attempts),
            consumers: consumers::Consumers::start(provisioning, shutdown.clone()).await?,
            settings: provisioning.clone(),
            catalogue,
            meters: settings.meters.clone(),
            metrics: ProvisionMetrics::register(&recorder),
        }),
        _ => None,
    };
    // Settings validation guarantees a provisioner (catalogue and keys follower) with alerts.
    let alerts_task = match (&settings.alerts, &provisioner, alert_secret) {
        (Some(alerts), Some(provisioner), Some(secret)) => {
            let quota_plans = match &settings.gateway_settings {
                Some(path) => alerts::observe::QuotaPlans::load(path)?,
                None => alerts::observe::QuotaPlans::default(),
            };
            let alerter = alerts::Alerter {
                client: client.clone(),
                consumers: provisioner.consumers.clone(),
                catalogue: provisioner.catalogue.clone(),
                quota_plans,
                settings: alerts.clone(),
                sender: alerts::webhook::WebhookSender::new(alerts, secret, shutdown.clone()),
                metrics: alerts::AlertMetrics::register(&recorder),
            };
            Some(tokio::spawn(alerter.run(lease.clone(), shutdown.clone())))
        }
        _ => None,
    };
    let biller = Biller::new(client.clone(), settings.clone(), pusher).with_schedule(schedule);
    let mut reconciled_at: Option<std::time::Instant> = None;
    ops.set_ready();
    tracing::info!(admin = %settings.admin.listen, "billing-sync ready");
    let ops_task = tokio::spawn(tollgate_runtime::ops::serve(listener, ops.clone(), shutdown.clone()));
    while !shutdown.is_triggered() {
        // A standby looks again every second, so a lease handed over is used at once.
        if !lease.is_active() {
            tokio::select! {
                _ = tokio::time::sleep(STANDBY_CHECK) => {}
                _ = shutdown.wait() => {}
            }
            continue;
        }
        if let Some(catalogue) = &unpublished {
            match prices::publish(&client, catalogue).await {
                Ok(()) => {
                    tracing::info!(
                        plans = catalogue.plans.len(),
                        "plan prices written for the invoice views"
                    );
                    unpublished = None;
                }
                Err(err) => tracing::warn!(error = %err, "cannot write the plan prices; retrying next interval"),
            }
        }
        if let Some(provisioner) = &provisioner {
            match provisioner.pass(sync::unix_now() as u32).await {
                Ok(report) if report.steps > 0 => tracing::info!(
                    steps = report.steps,
                    failed = report.failed,
                    unresolved = report.unresolved,
                    "provisioning pass done"
                ),
                Ok(_) => {}
                Err(err) => tracing::error!(error = %err, "provisioning pass failed; retrying next interval"),
            }
        }
        match biller.pass(sync::unix_now()).await {
            Ok(report) => {
                service_metrics.passes_ok.increment(1);
                ops.set_ready();
                if report.windows > 0 {
                    tracing::info!(
                        windows = report.windows,
                        pushed = report.pushed,
                        failed = report.failed,
                        unresolved = report.unresolved,
                        unbillable = report.unbillable,
                        adjustments = report.adjustments,
                        "billing pass done"
                    );
                }
            }
            Err(err) => {
                service_metrics.passes_failed.increment(1);
                ops.set_not_ready(format!("last billing pass failed: {err}"));
                tracing::error!(error = %err, "billing pass failed; retrying next interval");
            }
        }
        if reconciled_at.is_none_or(|at| at.elapsed() >= RECONCILE_EVERY) {
            reconciled_at = Some(std::time::Instant::now());
            reconcile_gauges(&client, &settings, &service_metrics).await;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait() => {}
        }
    }
    if let Some(task) = alerts_task {
        let _ = task.await;
    }
    let _ = ops_task.await;
    Ok(())
}

const STANDBY_CHECK: Duration = Duration::from_secs(1);

/// How often the service reconciles the current month for its gauges: the comparison reads
/// the month's raw events, so not on every pass.
const RECONCILE_EVERY: Duration = Duration::from_secs(600);

/// The service loop's own metrics (the pushes' are [`PushMetrics`]).
pub struct ServiceMetrics {
    pub passes_ok: metrics::Counter,
    pub passes_failed: metrics::Counter,
    /// Sum over tenants and meters of |ClickHouse − pushed − unbillable| in the current
    /// month's closed windows, as of the last reconcile.
    pub reconcile_difference_units: metrics::Gauge,
    /// Tenant × meter lines that differ, as of the last reconcile.
    pub reconcile_differing_lines: metrics::Gauge,
    /// 1 while this instance holds the billing lease (always, without `[lease]`).
    pub active: metrics::Gauge,
}

impl ServiceMetrics {
    pub fn register(recorder: &impl metrics::Recorder) -> Self {
        metrics::with_local_recorder(recorder, || {
            metrics::describe_gauge!(
                "billing_sync_reconcile_difference_units",
                "Units in closed windows of the current month not accounted for in Stripe (ClickHouse - pushed - unbillable), summed as absolute values."
            );
            metrics::describe_gauge!(
                "billing_sync_active",
                "1 while this instance holds the billing lease and runs the passes; 0 while it stands by."
            );
            metrics::describe_gauge!(
                "billing_sync_reconcile_differing_lines",
                "Tenant and meter pairs whose closed windows of the current month differ from the ledger."
            );
            Self {
                passes_ok: metrics::counter!("billing_sync_passes_total", "outcome" => "ok"),
                passes_failed: metrics::counter!("billing_sync_passes_total", "outcome" => "error"),
                reconcile_difference_units: metrics::gauge!("billing_sync_reconcile_difference_units"),
                reconcile_differing_lines: metrics::gauge!("billing_sync_reconcile_differing_lines"),
                active: metrics::gauge!("billing_sync_active"),
            }
        })
    }
}

/// Reconciles the current month and sets the gauges; a failure is logged and leaves them.
async fn reconcile_gauges(client: &clickhouse::Client, settings: &BillingSettings, metrics: &ServiceMetrics) {
    let now = sync::unix_now();
    let month = chrono::DateTime::from_timestamp(now, 0).map(|t| t.format("%Y-%m").to_string());
    let Some(Ok(period)) = month.map(|m| m.parse::<reconcile::Period>()) else {
        return;
    };
    match reconcile::reconcile(client, settings, period, now).await {
        Ok(report) => {
            let differing = report.lines.values().filter(|l| l.difference() != 0);
            let units: i64 = differing.clone().map(|l| l.difference().abs()).sum();
            metrics.reconcile_difference_units.set(units as f64);
            metrics.reconcile_differing_lines.set(differing.count() as f64);
        }
        Err(err) => tracing::warn!(error = %err, "reconcile for the metrics failed; retrying later"),
    }
}

/// `billing-sync setup`: a Stripe meter for every configured meter and, with a catalogue,
/// a product per plan and its prices. Idempotent: a second run creates nothing.
pub async fn setup(settings: &BillingSettings, api_key: &str) -> Result<Vec<products::SetupLine>, BillingError> {
    let catalogue = load_catalogue(settings)?;
    let api = stripe::client(&settings.stripe, api_key)?;
    let mut lines = Vec::new();
    let mut meter_ids = std::collections::HashMap::new();
    for meter in stripe::setup_meters(&api, &settings.meters).await? {
        let (action, event_name, id) = match meter {
            stripe::MeterSetup::Existing { event_name, id } => (SetupAction::Found, event_name, id),
            stripe::MeterSetup::Created { event_name, id } => (SetupAction::Created, event_name, id),
        };
        meter_ids.insert(event_name.clone(), id.clone());
        lines.push(products::SetupLine {
            object: "meter",
            name: event_name,
            action,
            id,
        });
    }
    if let Some(catalogue) = catalogue {
        let limiter = std::sync::Arc::new(retry::RateLimiter::new(settings.stripe.max_requests_per_second));
        let caller = Caller::new(api, &settings.stripe, limiter, Shutdown::default());
        lines.extend(products::setup_catalogue(&caller, &catalogue, &settings.meters, &meter_ids).await?);
    }
    Ok(lines)
}

/// The invoice check of `reconcile` (see [`invoice`]): for the current month only (Stripe
/// previews the upcoming invoice), and only with a catalogue; `None` otherwise.
pub async fn reconcile_invoices(
    settings: &BillingSettings,
    api_key: &str,
    period: &str,
) -> Result<Option<invoice::InvoiceReport>, BillingError> {
    let period: reconcile::Period = period.parse()?;
    let now = sync::unix_now();
    let Some(catalogue) = load_catalogue(settings)? else {
        return Ok(None);
    };
    if !(period.start..period.end).contains(&now) {
        return Ok(None);
    }
    let client = settings.clickhouse.connect().await?;
    ledger::migrate_on(&client, settings.clickhouse.on_cluster()).await?;
    let schedule = schedule::load(&client, settings.billing.window_secs).await?;
    let to = schedule.closed_until(now, settings.billing.lateness_secs);
    let api = stripe::client(&settings.stripe, api_key)?;
    let limiter = std::sync::Arc::new(retry::RateLimiter::new(settings.stripe.max_requests_per_second));
    let caller = Caller::new(api, &settings.stripe, limiter, Shutdown::default());
    let meters: Vec<String> = settings.meters.iter().map(|m| m.meter.clone()).collect();
    Ok(Some(
        invoice::compare(&client, &caller, &catalogue, &meters, period.start as u32, to).await?,
    ))
}

/// `billing-sync reconcile --period YYYY-MM`.
pub async fn reconcile(settings: &BillingSettings, period: &str) -> Result<reconcile::Report, BillingError> {
    let period: reconcile::Period = period.parse()?;
    let client = settings.clickhouse.connect().await?;
    ledger::migrate_on(&client, settings.clickhouse.on_cluster()).await?;
    Ok(reconcile::reconcile(&client, settings, period, sync::unix_now()).await?)
}
