//! What every Tollgate service process shares.
//!
//! In: a TOML settings file, `TOLLGATE_*` environment variables, OS signals.
//! Out: validated settings structs, the log subscriber (text or JSON lines), a Kafka client
//! configuration and reachability check, a ClickHouse client, the ops HTTP listener (health,
//! readiness, Prometheus metrics) and a shutdown signal the service's tasks can wait on.
#![forbid(unsafe_code)]

pub mod admin_api;
pub mod backoff;
pub mod catalogue;
pub mod clickhouse;
pub mod kafka;
pub mod logging;
pub mod meters;
pub mod ops;
pub mod settings;
pub mod shutdown;
pub mod topics;

pub use settings::{load, load_with_log, Invalid, SettingsError};

/// The exit of a service binary: success, or the refusal on one line, `<service>: <error>`,
/// with the error's context chain (`{:#}`) (see [`logging::report_stop`]), and a failure code.
pub fn exit_code<E: std::fmt::Display>(service: &str, result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            logging::report_stop(service, &err);
            std::process::ExitCode::FAILURE
        }
    }
}
