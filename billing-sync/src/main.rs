//! `tollgate-billing-sync --config billing-sync.toml [setup | reconcile --period YYYY-MM]`:
//! loads the settings, then runs billing-sync until SIGTERM, or runs one subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tollgate_billing_sync::settings::STRIPE_KEY_ENV;
use tollgate_billing_sync::BillingSettings;
use tollgate_runtime::shutdown::Shutdown;

#[derive(Parser)]
#[command(name = "tollgate-billing-sync", about = "Tollgate billing-sync: usage into Stripe")]
struct Args {
    /// Settings file (TOML); every field can be overridden by `TOLLGATE_<SECTION>__<FIELD>`.
    #[arg(long, env = "TOLLGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Make sure Stripe has a meter per configured meter and, with a catalogue, a product per
    /// plan with its prices (idempotent); prints `object name created|found|changed id`.
    Setup,
    /// Per tenant and meter: billable units in ClickHouse, units pushed to Stripe and the
    /// difference, over the closed windows of one month; for the current month with a
    /// catalogue, also each tenant's amount against Stripe's upcoming invoice; exits 1 if
    /// anything differs.
    Reconcile {
        /// The month, UTC, like 2026-11.
        #[arg(long)]
        period: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(err) => {
            tollgate_runtime::logging::report_stop("tollgate-billing-sync", &err);
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = args.config.context("--config is required")?;
    let loaded = tollgate_runtime::load_with_log::<BillingSettings>(&config)?;
    // After the settings: `[log]` says how to log (stderr; the subcommands' results go to
    // stdout). A refusal to load them is one plain line.
    tollgate_runtime::logging::init(&loaded.log);
    let mut settings = loaded.settings;
    // Paths in the settings are relative to the settings file, wherever the process runs.
    let dir = config.parent().unwrap_or_else(|| std::path::Path::new("."));
    let relative = |path: &mut PathBuf| {
        if path.is_relative() {
            *path = dir.join(&*path);
        }
    };
    if let Some(catalogue) = settings.catalogue.as_mut() {
        relative(&mut catalogue.path);
    }
    settings.gateway_settings.as_mut().map(relative);
    if let Some(alerts) = settings.alerts.as_mut() {
        alerts.webhook_secret_file.as_mut().map(relative);
    }
    if let Some(gateway) = &settings.gateway_settings {
        tollgate_billing_sync::gateway_file::check_meters(gateway, &settings.meters)?;
    }
    let api_key = std::env::var(STRIPE_KEY_ENV).unwrap_or_default();
    match args.command {
        None => {
            tollgate_billing_sync::run(settings, api_key, Shutdown::on_signals())
                .await
                .context("billing-sync")?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Setup) => {
            for line in tollgate_billing_sync::setup(&settings, &api_key)
                .await
                .context("setup")?
            {
                println!("{}\t{}\t{}\t{}", line.object, line.name, line.action.as_str(), line.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Reconcile { period }) => {
            let report = tollgate_billing_sync::reconcile(&settings, &period)
                .await
                .context("reconcile")?;
            println!("{report}");
            let mut differs = report.differs();
            if !api_key.is_empty() {
                let invoices = tollgate_billing_sync::reconcile_invoices(&settings, &api_key, &period)
                    .await
                    .context("reconcile invoices")?;
                if let Some(invoices) = invoices {
                    println!("{invoices}");
                    differs |= invoices.differs();
                }
            }
            Ok(if differs { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
    }
}
