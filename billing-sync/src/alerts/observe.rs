//! What the alerts compare with their thresholds: the quota limits of each plan, and the
//! units each tenant used this month and today, from ClickHouse.
//!
//! In: the gateway's settings file (only its `[plans.*]` limits are read, so the two services
//! cannot disagree on a plan's quotas); meter-consumer's `usage_events`. Out: [`QuotaPlans`],
//! and units per tenant and meter over a period: billable ones for spend (what the invoice
//! charges, [`billable_units`]), admitted ones for quotas (what the gateway's limiter counts,
//! [`admitted_units`]).
//!
//! Admitted means the request reached the upstream or was refused by it with a 5xx
//! (`ALLOWED`, `UPSTREAM_ERROR`): the limiter charges those and gives back refusals. A
//! gateway's own 502/504 is also `UPSTREAM_ERROR` but is refunded by the limiter, so a quota
//! alert can come slightly early after gateway-side upstream failures, never late. SQL kept to
//! what ClickHouse 18.16 and current releases both run (as the gateway's spend refresh).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// Units per tenant, then per meter.
pub type TenantUnits = BTreeMap<String, BTreeMap<String, i64>>;

#[derive(Debug, thiserror::Error)]
pub enum PlansError {
    #[error("gateway_settings {path}: cannot read: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("gateway_settings {path}: {message}")]
    Parse { path: String, message: String },
}

/// A calendar quota alerts watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub name: String,
    pub meter: String,
    pub window: CalendarWindow,
    pub limit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarWindow {
    Day,
    Month,
}

impl CalendarWindow {
    pub fn as_str(self) -> &'static str {
        match self {
            CalendarWindow::Day => "day",
            CalendarWindow::Month => "month",
        }
    }
}

/// Each plan's calendar `day` / `month` quotas counted per tenant: sliding windows reset
/// continuously (no period to alert once in), and per-key or per-IP counters are not the
/// tenant's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaPlans {
    pub plans: BTreeMap<String, Vec<Quota>>,
    /// The gateway's `identity.default_plan`: the plan of a tenant naming none, or one the
    /// gateway does not define.
    pub default_plan: Option<String>,
}

/// The part of the gateway's settings read here; every other table is the gateway's.
#[derive(Deserialize)]
struct GatewayFile {
    #[serde(default)]
    plans: BTreeMap<String, PlanLimits>,
    #[serde(default)]
    identity: IdentityPart,
}

#[derive(Deserialize, Default)]
struct IdentityPart {
    #[serde(default)]
    default_plan: Option<String>,
}

#[derive(Deserialize)]
struct PlanLimits {
    #[serde(default)]
    limits: Vec<LimitEntry>,
}

#[derive(Deserialize)]
struct LimitEntry {
    name: String,
    meter: String,
    #[serde(default)]
    window: String,
    limit: u64,
    #[serde(default)]
    by: Option<String>,
}

impl QuotaPlans {
    pub fn load(path: &Path) -> Result<Self, PlansError> {
        let text = std::fs::read_to_string(path).map_err(|error| PlansError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&text).map_err(|message| PlansError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let file: GatewayFile =
            toml::from_str(text).map_err(|e| e.to_string().lines().map(str::trim).collect::<Vec<_>>().join(" "))?;
        let plans = file
            .plans
            .into_iter()
            .map(|(plan, limits)| {
                let quotas = limits
                    .limits
                    .into_iter()
                    .filter(|l| l.by.as_deref().is_none_or(|by| by == "tenant") && l.meter != "concurrent")
                    .filter_map(|l| {
                        let window = match l.window.as_str() {
                            "day" => CalendarWindow::Day,
                            "month" => CalendarWindow::Month,
                            _ => return None,
                        };
                        Some(Quota {
                            name: l.name,
                            meter: l.meter,
                            window,
                            limit: l.limit,
                        })
                    })
                    .collect();
                (plan, quotas)
            })
            .collect();
        Ok(Self {
            plans,
            default_plan: file.identity.default_plan,
        })
    }

    /// The plan the gateway limits and prices a tenant by: the one named when the gateway
    /// defines it, else the default plan (as `tollgate_gateway`'s chain does).
    pub fn plan_of<'a>(&'a self, named: Option<&'a str>) -> Option<&'a str> {
        named
            .filter(|plan| self.plans.contains_key(*plan))
            .or(self.default_plan.as_deref())
    }

    /// The quotas of the plan that applies to a tenant naming `named`, with its ruling
    /// consumer's `metadata.limits` overrides applied as the gateway applies them
    /// (`{"limits": {"compute_units_per_day": 500}}`): an override the gateway would refuse
    /// is left out here too, and on the default plan's fallback none apply.
    pub fn quotas(&self, named: Option<&str>, metadata_json: &str) -> Vec<Quota> {
        let Some(plan) = self.plan_of(named) else {
            return Vec::new();
        };
        let mut quotas = self.plans.get(plan).cloned().unwrap_or_default();
        if named != Some(plan) {
            return quotas;
        }
        let metadata: serde_json::Value = serde_json::from_str(metadata_json).unwrap_or_default();
        if let Some(overrides) = metadata.get("limits").and_then(|l| l.as_object()) {
            for quota in &mut quotas {
                if let Some(limit) = overrides.get(&quota.name).and_then(|v| v.as_u64()) {
                    quota.limit = limit;
                }
            }
        }
        quotas
    }
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct UnitsRow {
    tenant_id: String,
    meter: String,
    total: i64,
}

fn by_tenant(rows: Vec<UnitsRow>) -> TenantUnits {
    let mut out = TenantUnits::new();
    for r in rows {
        *out.entry(r.tenant_id).or_default().entry(r.meter).or_default() += r.total;
    }
    out
}

/// Billable units per tenant and meter with `from ≤ time < to` (Unix seconds).
pub async fn billable_units(
    client: &clickhouse::Client,
    tenants: &[String],
    (from, to): (u32, u32),
) -> Result<TenantUnits, clickhouse::error::Error> {
    let rows = client
        .query(
            "SELECT tenant_id, units.meter AS meter, toInt64(sum(units.value)) AS total \
             FROM usage_events ARRAY JOIN units \
             WHERE billable = 1 AND has(?, tenant_id) \
               AND time >= toDateTime(?) AND time < toDateTime(?) \
             GROUP BY tenant_id, meter",
        )
        .bind(tenants)
        .bind(from)
        .bind(to)
        .fetch_all()
        .await?;
    Ok(by_tenant(rows))
}

/// Units the gateway's limiter charged per tenant and meter with `from ≤ time < to`.
pub async fn admitted_units(
    client: &clickhouse::Client,
    tenants: &[String],
    (from, to): (u32, u32),
) -> Result<TenantUnits, clickhouse::error::Error> {
    let rows = client
        .query(
            "SELECT tenant_id, units.meter AS meter, toInt64(sum(units.value)) AS total \
             FROM usage_events ARRAY JOIN units \
             WHERE outcome IN ('ALLOWED', 'UPSTREAM_ERROR') AND has(?, tenant_id) \
               AND time >= toDateTime(?) AND time < toDateTime(?) \
             GROUP BY tenant_id, meter",
        )
        .bind(tenants)
        .bind(from)
        .bind(to)
        .fetch_all()
        .await?;
    Ok(by_tenant(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../config/gateway.toml");

    #[test]
    fn the_example_gateway_plans_have_a_daily_compute_quota_each() {
        let plans = QuotaPlans::parse(EXAMPLE).unwrap();
        assert_eq!(plans.plans.len(), 4);
        let free = &plans.plans["free"];
        assert_eq!(
            free,
            &vec![Quota {
                name: "compute_units_per_day".into(),
                meter: "compute_units".into(),
                window: CalendarWindow::Day,
                limit: 10_000,
            }],
            "the sliding requests_per_minute is no calendar quota"
        );
    }

    #[test]
    fn per_key_concurrent_and_sliding_limits_are_not_watched() {
        let plans = QuotaPlans::parse(
            r#"
[service]
id = "x"
[plans.p]
limits = [
  { name = "a", meter = "requests", window = "month", limit = 5, by = "key" },
  { name = "b", meter = "concurrent", limit = 5 },
  { name = "c", meter = "requests", window = "1h", limit = 5 },
  { name = "d", meter = "requests", window = "month", limit = 5, by = "tenant" },
]
"#,
        )
        .unwrap();
        let names: Vec<&str> = plans.plans["p"].iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["d"]);
    }

    #[test]
    fn consumer_overrides_change_the_allowance() {
        let plans = QuotaPlans::parse(EXAMPLE).unwrap();
        let quotas = plans.quotas(Some("free"), r#"{"limits": {"compute_units_per_day": 10}}"#);
        assert_eq!(quotas[0].limit, 10);
        let quotas = plans.quotas(Some("free"), r#"{"limits": {"compute_units_per_day": "ten"}}"#);
        assert_eq!(quotas[0].limit, 10_000);
        // No plan, or one the gateway does not define: the default plan's, without overrides.
        for named in [None, Some("nope")] {
            let quotas = plans.quotas(named, r#"{"limits": {"compute_units_per_day": 10}}"#);
            assert_eq!(quotas[0].limit, 10_000, "{named:?}");
        }
    }

    #[test]
    fn a_malformed_file_is_an_error() {
        assert!(QuotaPlans::parse("[plans.free]\nlimits = 3").is_err());
    }
}
