//! The `[budgets]` settings: where spend caps get their prices and month-to-date usage.
//!
//! In: the `[budgets]` section of the gateway's settings. Out: validated settings (no IO); the
//! gateway loads the catalogue and connects to ClickHouse only when it starts serving.

use std::path::PathBuf;

use serde::Deserialize;
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_runtime::settings::{in_range, Invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    /// The billing catalogue (`config/plans.toml`) whose prices spend is reckoned in, the same
    /// file billing-sync prices invoices with; a relative path is read from the directory of
    /// this settings file. Every plan under `[plans]` must be priced there.
    pub catalogue: PathBuf,
    /// The ClickHouse meter-consumer writes: month-to-date usage is read from its
    /// `usage_events`.
    pub clickhouse: ClickhouseSettings,
    /// How often month-to-date usage is re-read; with several gateways, what one admits is seen
    /// by the others within this interval plus the pipeline's lag.
    #[serde(default = "default_refresh_interval_ms")]
    pub refresh_interval_ms: u64,
}

fn default_refresh_interval_ms() -> u64 {
    5_000
}

impl BudgetSettings {
    pub fn validate(&self, section: &str) -> Result<(), Invalid> {
        if self.catalogue.as_os_str().is_empty() {
            return Err(Invalid::new(
                format!("{section}.catalogue"),
                "",
                "the path of the billing catalogue (config/plans.toml)",
            ));
        }
        self.clickhouse.validate(&format!("{section}.clickhouse"))?;
        in_range(
            &format!("{section}.refresh_interval_ms"),
            self.refresh_interval_ms,
            100,
            3_600_000,
        )
        .map(drop)
    }
}
