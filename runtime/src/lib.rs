//! What every Tollgate service process shares.
//!
//! In: a TOML settings file, `TOLLGATE_*` environment variables, OS signals.
//! Out: validated settings structs, a Kafka client configuration and reachability check,
//! a ClickHouse client, the ops HTTP listener (health, readiness, Prometheus metrics) and a
//! shutdown signal the service's tasks can wait on.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod catalogue;
pub mod clickhouse;
pub mod kafka;
pub mod ops;
pub mod settings;
pub mod shutdown;
pub mod topics;

pub use settings::{load, Invalid, SettingsError};

/// The exit of a service binary: success, or the refusal on one line, `<service>: <error>`,
/// with the error's context chain (`{:#}`), and a failure code.
pub fn exit_code<E: std::fmt::Display>(service: &str, result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{service}: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Installs the process-wide `tracing` subscriber: plain lines on stderr, filtered by
/// `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second call (tests building several services in one process) keeps the first.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
