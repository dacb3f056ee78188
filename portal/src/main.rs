//! `tollgate-portal --config portal.toml`: loads the settings and serves the tenant portal
//! until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tollgate_portal::PortalSettings;
use tollgate_runtime::shutdown::Shutdown;

#[derive(Parser)]
#[command(
    name = "tollgate-portal",
    about = "Tollgate portal: tenants' keys, usage, limits and API docs"
)]
struct Args {
    /// Settings file (TOML); every field can be overridden by `TOLLGATE_<SECTION>__<FIELD>`.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tollgate_runtime::exit_code("tollgate-portal", run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let loaded = tollgate_runtime::load_with_log::<PortalSettings>(&args.config)?;
    tollgate_runtime::logging::init(&loaded.log);
    tollgate_portal::run(loaded.settings, Shutdown::on_signals())
        .await
        .context("portal")
}
