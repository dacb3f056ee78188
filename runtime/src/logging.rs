//! Logging: the process-wide `tracing` subscriber every service installs at start.
//!
//! In: the `[log]` settings section (shared by every service, split off by
//! [`crate::settings`] before the service's own struct is read) and `RUST_LOG`. Out: one line
//! per event on stderr, either
//! - `text`: `<timestamp> <LEVEL> <span>{fields}: <message> <fields>`, for people, or
//! - `json`: one JSON object per line, for log pipelines (Loki, Elasticsearch, Datadog):
//!   `timestamp` (RFC 3339, UTC), `level`, `target` (the module), `fields` (`message` and the
//!   event's own fields), `span` (the innermost span's name and fields) and `spans` (every
//!   open span, outermost first).
//!
//! What reaches a log line is what the services put in their events: ids, counts, addresses,
//! error texts; never a key, token or password (those are read from the environment and
//! not passed to any event; `tests/tests/gateway_no_secrets.rs` and `billing_json_logs.rs`
//! check the output).

use std::sync::OnceLock;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// The settings section every service reads its [`LogSettings`] from.
pub const SECTION: &str = "log";

/// `[log]`: how the service writes its log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `text` (default) or `json` (one object per line). What is logged is filtered by
    /// `RUST_LOG` (default `info`).
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The format of the subscriber this process installed, once [`init`] has.
static INSTALLED: OnceLock<LogFormat> = OnceLock::new();

/// Installs the subscriber. A second call (tests building several services in one process)
/// keeps the first.
pub fn init(settings: &LogSettings) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    let installed = match settings.format {
        LogFormat::Text => builder.with_env_filter(filter()).with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .with_env_filter(filter())
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
    if installed.is_ok() {
        let _ = INSTALLED.set(settings.format);
    }
}

/// Reports why a service stopped: the refusal on one line, `<service>: <error>` with the
/// error's context chain (`{:#}`), on stderr; as a JSON `ERROR` event when the JSON
/// subscriber is installed (a log pipeline then sees one format to the end), as the plain
/// line otherwise (also before logging is set up, when the settings themselves failed).
pub fn report_stop(service: &str, err: &dyn std::fmt::Display) {
    let line = format!("{service}: {err:#}");
    match INSTALLED.get() {
        Some(LogFormat::Json) => tracing::error!("{line}"),
        _ => eprintln!("{line}"),
    }
}
