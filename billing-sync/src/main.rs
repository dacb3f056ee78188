//! `tollgate-billing-sync --config billing-sync.toml`: loads the settings and runs billing-sync
//! until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tollgate_billing_sync::settings::STRIPE_KEY_ENV;
use tollgate_billing_sync::BillingSettings;
use tollgate_runtime::shutdown::Shutdown;

#[derive(Parser)]
#[command(name = "tollgate-billing-sync", about = "Tollgate billing-sync: usage into Stripe")]
struct Args {
    /// Settings file (TOML); every field can be overridden by `TOLLGATE_<SECTION>__<FIELD>`.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    tollgate_runtime::init_logging();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tollgate-billing-sync: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let settings: BillingSettings = tollgate_runtime::load(&args.config)?;
    let api_key = std::env::var(STRIPE_KEY_ENV).unwrap_or_default();
    tollgate_billing_sync::run(settings, api_key, Shutdown::on_signals())
        .await
        .context("billing-sync")
}
