//! Admin API: a tenant's monthly spend cap, set through any of its consumers.
//!
//! In: `PUT /v1/consumers/{name}/budget` with `{"monthlyCap": <minor units>, "alertAt": [50, 80,
//! 100]}`, `GET` and `DELETE` on the same path. Out: a [`BudgetRecord`] (or tombstone) on the
//! keys topic under `budget/<tenant id>`, answered once applied locally; the budget with this
//! gateway's month-to-date spend; problem+json for a bad body, an unknown consumer or none set.
//!
//! The cap is the tenant's, not the consumer's: its invoice covers every consumer, so every
//! consumer of a tenant reads and writes the same budget.

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use tollgate_runtime::admin_api as api;
use tollgate_schemas::{encode, BudgetRecord, EntityKey};

use super::{bad_request, empty, from_json, json_response, not_found, now_ms, Admin, Reply, ACTOR};
use crate::spend::Month;

/// Most thresholds one budget may have.
const MAX_ALERTS: usize = 10;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct BudgetBody {
    /// Minor units of the plan's currency; signed here so a negative cap gets its own message.
    monthly_cap: i64,
    #[serde(default)]
    alert_at: Vec<i64>,
}

impl Admin {
    pub(super) async fn put_budget(&self, name: &str, body: Value) -> Reply {
        let consumer = self.consumer(name)?;
        let body: BudgetBody = from_json(body)?;
        let alert_at = check_budget(&body)?;
        let current = self.budget_of(&consumer.tenant_id);
        let record = BudgetRecord {
            tenant_id: consumer.tenant_id.clone(),
            monthly_cap_minor: body.monthly_cap,
            alert_at,
            updated_at_ms: now_ms(),
            version: current.map_or(1, |b| b.version + 1),
            updated_by: ACTOR.to_owned(),
        };
        self.write(&EntityKey::Budget(&record.tenant_id).to_string(), Some(encode(&record)))
            .await?;
        Ok(json_response(
            StatusCode::OK,
            self.budget_json(&record, self.tenant_plan(&consumer.tenant_id).as_deref()),
        ))
    }

    pub(super) fn get_budget(&self, name: &str) -> Reply {
        let consumer = self.consumer(name)?;
        let budget = self.budget_of(&consumer.tenant_id).ok_or_else(|| {
            not_found(format!(
                "tenant {:?} of consumer {name:?} has no budget",
                consumer.tenant_id
            ))
        })?;
        Ok(json_response(
            StatusCode::OK,
            self.budget_json(&budget, self.tenant_plan(&consumer.tenant_id).as_deref()),
        ))
    }

    pub(super) async fn delete_budget(&self, name: &str) -> Reply {
        let consumer = self.consumer(name)?;
        if self.budget_of(&consumer.tenant_id).is_some() {
            self.write(&EntityKey::Budget(&consumer.tenant_id).to_string(), None)
                .await?;
        }
        Ok(empty(StatusCode::NO_CONTENT))
    }

    fn budget_of(&self, tenant: &str) -> Option<std::sync::Arc<BudgetRecord>> {
        self.store.directory().read().expect("directory lock").budget(tenant)
    }

    fn budget_json(&self, budget: &BudgetRecord, plan: Option<&str>) -> Value {
        let now = now_ms();
        let month = Month::of(now);
        let status = self
            .spend
            .as_ref()
            .map(|ledger| ledger.status(&budget.tenant_id, plan, now));
        json!(api::Budget {
            tenant_id: budget.tenant_id.clone(),
            monthly_cap: budget.monthly_cap_minor,
            alert_at: budget.alert_at.clone(),
            updated_on: api::time(budget.updated_at_ms),
            // Without `[budgets]` the cap is stored but not enforced by this gateway.
            enforced: status.is_some(),
            currency: status.as_ref().and_then(|s| s.currency.clone()),
            month_to_date: api::MonthToDate {
                spent: status.as_ref().and_then(|s| s.spent_minor),
                period_start: api::time(month.start_ms()),
                period_end: api::time(month.end_ms()),
            },
        })
    }
}

/// The thresholds, ascending; a negative cap, a threshold outside 1..=100, a repeated one or
/// too many are refused.
fn check_budget(body: &BudgetBody) -> Result<Vec<i32>, crate::problem::Problem> {
    if body.monthly_cap < 0 {
        return Err(bad_request(format!(
            "monthlyCap must be a whole number of minor units, 0 or more (found {})",
            body.monthly_cap
        )));
    }
    if body.alert_at.len() > MAX_ALERTS {
        return Err(bad_request(format!("alertAt holds at most {MAX_ALERTS} percentages")));
    }
    let mut alert_at = Vec::with_capacity(body.alert_at.len());
    for &percent in &body.alert_at {
        let percent = i32::try_from(percent)
            .ok()
            .filter(|p| (1..=100).contains(p))
            .ok_or_else(|| {
                bad_request(format!(
                    "alertAt: {percent} is not a percentage of the cap from 1 to 100"
                ))
            })?;
        alert_at.push(percent);
    }
    alert_at.sort_unstable();
    if alert_at.windows(2).any(|w| w[0] == w[1]) {
        return Err(bad_request("alertAt: each percentage at most once"));
    }
    Ok(alert_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: Value) -> Result<Vec<i32>, String> {
        let body: BudgetBody = from_json(body).map_err(|p| p.detail.unwrap_or_default())?;
        check_budget(&body).map_err(|p| p.detail.unwrap_or_default())
    }

    #[test]
    fn budgets_are_checked_with_a_message_naming_the_field() {
        assert_eq!(
            check(json!({"monthlyCap": 5000, "alertAt": [100, 50, 80]})),
            Ok(vec![50, 80, 100])
        );
        assert_eq!(check(json!({"monthlyCap": 0})), Ok(vec![]));
        for (body, message) in [
            (json!({"monthlyCap": -1}), "monthlyCap must be a whole number"),
            (json!({"monthlyCap": 1.5}), "invalid type: floating point"),
            (json!({"alertAt": [50]}), "missing field `monthlyCap`"),
            (
                json!({"monthlyCap": 1, "alertAt": [0]}),
                "alertAt: 0 is not a percentage",
            ),
            (
                json!({"monthlyCap": 1, "alertAt": [101]}),
                "alertAt: 101 is not a percentage",
            ),
            (
                json!({"monthlyCap": 1, "alertAt": [5_000_000_000i64]}),
                "is not a percentage",
            ),
            (
                json!({"monthlyCap": 1, "alertAt": [50, 50]}),
                "each percentage at most once",
            ),
            (
                json!({"monthlyCap": 1, "alertAt": (1..=11).collect::<Vec<_>>()}),
                "at most 10",
            ),
            (json!({"monthlyCap": 1, "cap": 2}), "unknown field `cap`"),
        ] {
            let err = check(body.clone()).unwrap_err();
            assert!(err.contains(message), "{body}: {err}");
        }
    }
}
