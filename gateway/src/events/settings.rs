//! Usage-event settings: the `[events]` table (spool, fsync policy, what to do when full,
//! which statuses are billable), parsed and validated without IO.

use serde::Deserialize;
use tollgate_runtime::settings::{in_range, Invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// Emit usage events (off only for benchmarks and gateways that bill nothing).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Directory of the spool (relative paths from the working directory); one per replica.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: String,
    /// Size at which the spool starts a new segment file.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// Most bytes the spool may hold unshipped; beyond it `when_full` applies. Under
    /// `refuse_billable` it can be passed by the events of requests already in flight when
    /// the spool filled: they were admitted, so they are spooled, not dropped.
    #[serde(default = "default_max_spool_bytes")]
    pub max_spool_bytes: u64,
    /// `always` (fsync every write batch), `interval` (every `fsync_interval_ms`), `never`.
    #[serde(default)]
    pub fsync: FsyncPolicy,
    #[serde(default = "default_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
    /// With the spool full: `refuse_billable` (503, nothing served unbilled) or
    /// `serve_unbilled` (serve, count the lost events as dropped).
    #[serde(default)]
    pub when_full: FullPolicy,
    /// Requests whose status is below this, answered by the upstream, are billable; gateway
    /// refusals never are.
    #[serde(default = "default_billable_below_status")]
    pub billable_below_status: u16,
    /// How long SIGTERM waits for Kafka to take the spool before leaving the rest for the next
    /// start.
    #[serde(default = "default_shutdown_flush_ms")]
    pub shutdown_flush_ms: u64,
    /// Least time between the starts of two Kafka transactions while the spool holds less
    /// than a full batch: each transaction costs the broker as much as thousands of events,
    /// so under steady traffic a few large ones are cheaper than many small ones. Events wait
    /// in the (durable) spool meanwhile; 0 ships each batch as soon as the last one is in.
    #[serde(default = "default_ship_interval_ms")]
    pub ship_interval_ms: u64,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            spool_dir: default_spool_dir(),
            segment_bytes: default_segment_bytes(),
            max_spool_bytes: default_max_spool_bytes(),
            fsync: FsyncPolicy::default(),
            fsync_interval_ms: default_fsync_interval_ms(),
            when_full: FullPolicy::default(),
            billable_below_status: default_billable_below_status(),
            shutdown_flush_ms: default_shutdown_flush_ms(),
            ship_interval_ms: default_ship_interval_ms(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_spool_dir() -> String {
    "spool".to_owned()
}
fn default_segment_bytes() -> u64 {
    64 << 20
}
fn default_max_spool_bytes() -> u64 {
    1 << 30
}
fn default_fsync_interval_ms() -> u64 {
    200
}
fn default_billable_below_status() -> u16 {
    500
}
fn default_shutdown_flush_ms() -> u64 {
    10_000
}
fn default_ship_interval_ms() -> u64 {
    100
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    Always,
    #[default]
    Interval,
    Never,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    #[default]
    RefuseBillable,
    ServeUnbilled,
}

impl EventSettings {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.spool_dir.trim().is_empty() {
            return Err(Invalid::new("events.spool_dir", &self.spool_dir, "a directory path"));
        }
        in_range("events.segment_bytes", self.segment_bytes, 4096, 1 << 30)?;
        in_range(
            "events.max_spool_bytes",
            self.max_spool_bytes,
            self.segment_bytes,
            1 << 40,
        )?;
        in_range("events.fsync_interval_ms", self.fsync_interval_ms, 1, 60_000)?;
        in_range(
            "events.billable_below_status",
            u64::from(self.billable_below_status),
            100,
            600,
        )?;
        in_range("events.shutdown_flush_ms", self.shutdown_flush_ms, 0, 600_000)?;
        in_range("events.ship_interval_ms", self.ship_interval_ms, 0, 10_000)?;
        Ok(())
    }
}
