//! billing-sync: billable usage from ClickHouse to Stripe meter events.
//!
//! In: usage rollups in ClickHouse, the Stripe secret key. Out: Stripe billing meter events,
//! ledger rows in ClickHouse, health and metrics on the ops listener.
#![forbid(unsafe_code)]

pub mod settings;
pub mod stripe;

use tokio::net::TcpListener;
use tollgate_runtime::ops::Ops;
use tollgate_runtime::shutdown::Shutdown;

pub use settings::BillingSettings;

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error("ops listener: cannot bind {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error(transparent)]
    Clickhouse(#[from] tollgate_runtime::clickhouse::ClickhouseCheckError),
    #[error(transparent)]
    Stripe(#[from] stripe::StripeCheckError),
}

/// Checks every dependency, then serves until `shutdown` fires.
pub async fn run(settings: BillingSettings, api_key: String, shutdown: Shutdown) -> Result<(), BillingError> {
    let listener = TcpListener::bind(&settings.admin.listen)
        .await
        .map_err(|source| BillingError::Bind {
            addr: settings.admin.listen.clone(),
            source,
        })?;
    settings.clickhouse.connect().await?;
    let client = stripe::client(&settings.stripe, &api_key)?;
    stripe::check_reachable(&settings.stripe, &client).await?;
    let (ops, _recorder) = Ops::new();
    ops.set_ready();
    tracing::info!(admin = %settings.admin.listen, "billing-sync ready");
    tollgate_runtime::ops::serve(listener, ops, shutdown).await;
    Ok(())
}
