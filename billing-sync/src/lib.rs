//! billing-sync: billable usage from ClickHouse to Stripe meter events, billed exactly once.
//!
//! In: `usage_events` and `consumers` in ClickHouse (written by the meter consumer), the
//! Stripe secret key. Out: Stripe billing meter events, `billing_ledger` rows in ClickHouse,
//! health and metrics on the ops listener. [`run`] is the service loop; [`setup`] and
//! [`reconcile`] are the `setup` and `reconcile` subcommands.
#![forbid(unsafe_code)]

pub mod ledger;
pub mod push;
pub mod reconcile;
pub mod retry;
pub mod settings;
pub mod stripe;
pub mod sync;
pub mod usage;
pub mod window;

use std::time::Duration;

use tokio::net::TcpListener;
use tollgate_runtime::ops::Ops;
use tollgate_runtime::shutdown::Shutdown;

pub use settings::BillingSettings;

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
}

/// Checks every dependency, then closes billing windows as they become due until `shutdown`
/// fires. A failed pass (ClickHouse down, say) is logged and retried at the next interval.
pub async fn run(settings: BillingSettings, api_key: String, shutdown: Shutdown) -> Result<(), BillingError> {
    let listener = TcpListener::bind(&settings.admin.listen)
        .await
        .map_err(|error| BillingError::Bind {
            addr: settings.admin.listen.clone(),
            error,
        })?;
    let client = settings.clickhouse.connect().await?;
    ledger::migrate(&client).await?;
    let api = stripe::client(&settings.stripe, &api_key)?;
    stripe::check_reachable(&settings.stripe, &api).await?;
    let (ops, recorder) = Ops::new();
    let push_metrics = PushMetrics::register(&recorder);
    let (passes_ok, passes_failed) = metrics::with_local_recorder(&recorder, || {
        (
            metrics::counter!("billing_sync_passes_total", "outcome" => "ok"),
            metrics::counter!("billing_sync_passes_total", "outcome" => "error"),
        )
    });
    let pusher = Pusher::new(api, &settings.stripe, push_metrics, shutdown.clone());
    let interval = Duration::from_secs(settings.billing.poll_interval_secs);
    let biller = Biller::new(client, settings.clone(), pusher);
    ops.set_ready();
    tracing::info!(admin = %settings.admin.listen, "billing-sync ready");
    let ops_task = tokio::spawn(tollgate_runtime::ops::serve(listener, ops.clone(), shutdown.clone()));
    while !shutdown.is_triggered() {
        match biller.pass(sync::unix_now()).await {
            Ok(report) => {
                passes_ok.increment(1);
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
                passes_failed.increment(1);
                ops.set_not_ready(format!("last billing pass failed: {err}"));
                tracing::error!(error = %err, "billing pass failed; retrying next interval");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait() => {}
        }
    }
    let _ = ops_task.await;
    Ok(())
}

/// `billing-sync setup`: makes sure a Stripe meter exists for every configured meter.
pub async fn setup(settings: &BillingSettings, api_key: &str) -> Result<Vec<stripe::MeterSetup>, BillingError> {
    let api = stripe::client(&settings.stripe, api_key)?;
    Ok(stripe::setup_meters(&api, &settings.meters).await?)
}

/// `billing-sync reconcile --period YYYY-MM`.
pub async fn reconcile(settings: &BillingSettings, period: &str) -> Result<reconcile::Report, BillingError> {
    let period: reconcile::Period = period.parse()?;
    let client = settings.clickhouse.connect().await?;
    ledger::migrate(&client).await?;
    Ok(reconcile::reconcile(&client, settings, period, sync::unix_now()).await?)
}
