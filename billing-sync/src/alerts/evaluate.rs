//! One check's decisions: which alerts to raise now, as rows ready to record, with the
//! webhook body each will be delivered with.
//!
//! In: the tenants (plan, consumers) and budgets from the keys topic, the catalogue's prices,
//! the quota plans, month-to-date and today's units, the alerts already recorded for these
//! periods, the time. Out: new `pending` [`AlertRow`]s. Pure, so the rules are tested without
//! ClickHouse: spend is priced as the invoice and the gateway's cap price it
//! ([`PlanPrices::amount`]: the monthly fee plus each meter's line); thresholds come from
//! the budget's `alertAt` and from `[alerts].quota_thresholds`.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde_json::json;
use tollgate_runtime::catalogue::Catalogue;
use tollgate_schemas::BudgetRecord;

use super::crossing::{newly_crossed, AlertKey, Kind};
use super::observe::{CalendarWindow, QuotaPlans, TenantUnits};
use super::store::{status_text, AlertRow, Status};
use crate::consumers::Tenant;
use crate::ledger::next_row_version;

/// The subject of every spend alert.
pub const MONTHLY_CAP: &str = "monthly_cap";

/// A UTC calendar period: its name in alert keys and its bounds (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    pub name: String,
    pub start: u32,
    pub end: u32,
}

impl Period {
    pub fn month_of(now: i64) -> Self {
        let at = DateTime::from_timestamp(now, 0).unwrap_or_default();
        let start = Utc
            .with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
            .single()
            .unwrap_or_default();
        let (y, m) = if at.month() == 12 {
            (at.year() + 1, 1)
        } else {
            (at.year(), at.month() + 1)
        };
        let end = Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().unwrap_or_default();
        Self {
            name: at.format("%Y-%m").to_string(),
            start: start.timestamp() as u32,
            end: end.timestamp() as u32,
        }
    }

    pub fn day_of(now: i64) -> Self {
        let start = now - now.rem_euclid(86_400);
        let at = DateTime::from_timestamp(start, 0).unwrap_or_default();
        Self {
            name: at.format("%Y-%m-%d").to_string(),
            start: start as u32,
            end: (start + 86_400) as u32,
        }
    }

    fn end_text(&self) -> String {
        rfc3339(i64::from(self.end))
    }
}

fn rfc3339(secs: i64) -> String {
    DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Everything one check decides on.
pub struct Observed<'a> {
    pub tenants: &'a BTreeMap<String, Tenant>,
    pub budgets: &'a BTreeMap<String, BudgetRecord>,
    pub catalogue: &'a Catalogue,
    pub quota_plans: &'a QuotaPlans,
    pub quota_thresholds: &'a [u32],
    pub month: &'a Period,
    pub day: &'a Period,
    /// Billable units this month.
    pub billable_month: &'a TenantUnits,
    /// Admitted units this month and today.
    pub admitted_month: &'a TenantUnits,
    pub admitted_day: &'a TenantUnits,
    /// Keys of the alerts already recorded for `month` and `day`.
    pub recorded: &'a BTreeSet<AlertKey>,
    pub now: i64,
}

/// The alerts to raise now, each once: keys already recorded are skipped.
pub fn new_alerts(o: &Observed<'_>) -> Vec<AlertRow> {
    let mut rows = Vec::new();
    let recorded_for = |tenant: &str, kind: Kind, subject: &str, period: &str| -> BTreeSet<u32> {
        o.recorded
            .iter()
            .filter(|k| k.tenant_id == tenant && k.kind == kind && k.subject == subject && k.period == period)
            .map(|k| k.threshold)
            .collect()
    };
    let empty = BTreeMap::new();
    for (tenant_id, budget) in o.budgets {
        let Some(prices) = o
            .tenants
            .get(tenant_id)
            .and_then(|t| o.quota_plans.plan_of(t.plan.as_deref()))
            .and_then(|plan| o.catalogue.plans.get(plan))
        else {
            // No live consumer with a priced plan: nothing to price the spend with.
            continue;
        };
        let spent = prices.amount(o.billable_month.get(tenant_id).unwrap_or(&empty));
        let thresholds: Vec<u32> = budget.alert_at.iter().filter_map(|t| u32::try_from(*t).ok()).collect();
        let recorded = recorded_for(tenant_id, Kind::Spend, MONTHLY_CAP, &o.month.name);
        for threshold in newly_crossed(&thresholds, budget.monthly_cap_minor, spent, &recorded) {
            let data = json!({
                "tenantId": tenant_id,
                "period": o.month.name,
                "periodEnd": o.month.end_text(),
                "thresholdPercent": threshold,
                "spentMinor": spent,
                "monthlyCapMinor": budget.monthly_cap_minor,
                "currency": prices.currency,
            });
            rows.push(row(
                o,
                tenant_id,
                Kind::Spend,
                MONTHLY_CAP,
                o.month,
                threshold,
                spent,
                budget.monthly_cap_minor,
                data,
            ));
        }
    }
    for (tenant_id, tenant) in o.tenants {
        let Some(consumer) = tenant.consumers.first() else {
            continue;
        };
        for quota in o.quota_plans.quotas(tenant.plan.as_deref(), &consumer.metadata_json) {
            let (period, units) = match quota.window {
                CalendarWindow::Day => (o.day, o.admitted_day),
                CalendarWindow::Month => (o.month, o.admitted_month),
            };
            let used = units
                .get(tenant_id)
                .and_then(|u| u.get(&quota.meter))
                .copied()
                .unwrap_or(0);
            let limit = i64::try_from(quota.limit).unwrap_or(i64::MAX);
            let recorded = recorded_for(tenant_id, Kind::Quota, &quota.name, &period.name);
            for threshold in newly_crossed(o.quota_thresholds, limit, used, &recorded) {
                let data = json!({
                    "tenantId": tenant_id,
                    "period": period.name,
                    "periodEnd": period.end_text(),
                    "thresholdPercent": threshold,
                    "limitName": quota.name,
                    "meter": quota.meter,
                    "window": quota.window.as_str(),
                    "used": used,
                    "limit": quota.limit,
                });
                rows.push(row(
                    o,
                    tenant_id,
                    Kind::Quota,
                    &quota.name,
                    period,
                    threshold,
                    used,
                    limit,
                    data,
                ));
            }
        }
    }
    rows
}

#[allow(clippy::too_many_arguments)]
fn row(
    o: &Observed<'_>,
    tenant_id: &str,
    kind: Kind,
    subject: &str,
    period: &Period,
    threshold: u32,
    observed: i64,
    limit_value: i64,
    data: serde_json::Value,
) -> AlertRow {
    let key = AlertKey {
        tenant_id: tenant_id.to_owned(),
        kind,
        subject: subject.to_owned(),
        period: period.name.clone(),
        threshold,
    };
    // Standard Webhooks' envelope: a dotted type, when it happened, the event's data.
    let payload = json!({
        "type": format!("{}.threshold_crossed", kind.as_str()),
        "timestamp": rfc3339(o.now),
        "data": data,
    });
    let now = u32::try_from(o.now).unwrap_or(u32::MAX);
    AlertRow {
        tenant_id: key.tenant_id.clone(),
        kind: kind.as_str().to_owned(),
        subject: key.subject.clone(),
        period: key.period.clone(),
        threshold,
        webhook_id: key.webhook_id(),
        observed,
        limit_value,
        payload: payload.to_string(),
        status: status_text(Status::Pending).to_owned(),
        attempts: 0,
        error: String::new(),
        created_at: now,
        updated_at: now,
        row_version: next_row_version(),
    }
}

#[cfg(test)]
mod tests;
