//! `tollgate-gateway --config gateway.toml`: loads the settings and runs the gateway until
//! SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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

/// How long the exit waits for Kafka calls still running on blocking threads. A
/// transactional call can block past its own timeout while the broker is down; by then the
/// spool holds every event and the position moves only after a commit, so leaving the call
/// behind loses nothing (the next start aborts the open transaction).
const BLOCKING_CALLS_AT_EXIT: Duration = Duration::from_secs(2);

/// mimalloc rather than glibc's allocator: a request allocates and frees a few dozen small
/// buffers (header maps, ids, the usage event) on whichever worker thread polls it, and
/// glibc's malloc, free and consolidation were a seventh of the gateway's CPU under load
/// (`bench/peer --perf`); mimalloc's thread-local free lists serve the same for less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return tollgate_runtime::exit_code("tollgate-gateway", Err(err)),
    };
    let result = runtime.block_on(run(args));
    runtime.shutdown_timeout(BLOCKING_CALLS_AT_EXIT);
    tollgate_runtime::exit_code("tollgate-gateway", result)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let loaded = tollgate_runtime::load_with_log::<GatewaySettings>(&args.config)?;
    // After the settings: `[log]` says how to log. A refusal to load them is one plain line.
    tollgate_runtime::logging::init(&loaded.log);
    let mut settings = loaded.settings;
    // The catalogue path is relative to the settings file, wherever the process runs.
    if let Some(budgets) = settings.budgets.as_mut() {
        if budgets.catalogue.is_relative() {
            let dir = args.config.parent().unwrap_or_else(|| std::path::Path::new("."));
            budgets.catalogue = dir.join(&budgets.catalogue);
        }
    }
    let token = std::env::var(tollgate_gateway::settings::ADMIN_TOKEN_ENV).ok();
    let signing_secret = std::env::var(tollgate_gateway::settings::SIGNING_SECRET_ENV).ok();
    tollgate_gateway::run(settings, token, signing_secret, Shutdown::on_signals())
        .await
        .context("gateway")
}
