//! `tollgate-gateway --config gateway.toml`: loads the settings and runs the gateway until
//! SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tollgate_gateway::GatewaySettings;
use tollgate_runtime::shutdown::Shutdown;

#[derive(Parser)]
#[command(name = "tollgate-gateway", about = "Tollgate API gateway")]
struct Args {
    /// Settings file (TOML); every field can be overridden by `TOLLGATE_<SECTION>__<FIELD>`.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tollgate_runtime::exit_code("tollgate-gateway", run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let loaded = tollgate_runtime::load_with_log::<GatewaySettings>(&args.config)?;
    // After the settings: `[log]` says how to log. A refusal to load them is one plain line.
    tollgate_runtime::logging::init(&loaded.log);
    let settings = loaded.settings;
    let token = std::env::var(tollgate_gateway::settings::ADMIN_TOKEN_ENV).ok();
    let signing_secret = std::env::var(tollgate_gateway::settings::SIGNING_SECRET_ENV).ok();
    tollgate_gateway::run(settings, token, signing_secret, Shutdown::on_signals())
        .await
        .context("gateway")
}
