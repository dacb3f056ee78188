//! `tollgate-meter-consumer --config meter-consumer.toml`: loads the settings and runs the meter-consumer until
//! SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tollgate_meter_consumer::MeterSettings;
use tollgate_runtime::shutdown::Shutdown;

/// mimalloc rather than glibc's allocator: every event becomes a row of a dozen small strings
/// that live until its batch is written, and glibc's malloc, free and consolidation were a
/// sixth of the consumer's CPU in the throughput benchmark (`perf record`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate-meter-consumer",
    about = "Tollgate meter-consumer: usage events into ClickHouse"
)]
struct Args {
    /// Settings file (TOML); every field can be overridden by `TOLLGATE_<SECTION>__<FIELD>`.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tollgate_runtime::exit_code("tollgate-meter-consumer", run(args).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let loaded = tollgate_runtime::load_with_log::<MeterSettings>(&args.config)?;
    // After the settings: `[log]` says how to log. A refusal to load them is one plain line.
    tollgate_runtime::logging::init(&loaded.log);
    tollgate_meter_consumer::run(loaded.settings, Shutdown::on_signals())
        .await
        .context("meter-consumer")
}
