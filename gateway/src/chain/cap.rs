//! Chain step: the tenant's monthly spend cap.
//!
//! In: the authenticated identity, the route's upfront cost, the tenant's budget from the
//! directory and the [`SpendLedger`](crate::spend::SpendLedger). Out: a reservation in the
//! context (settled with the billed units when the response ends, given back if a later step
//! refuses), or 429 `spend-cap-exceeded` naming the cap and when it starts over, or 503
//! `spend-unknown` before ClickHouse has been read for the tenant.
//!
//! Runs after the spool check and before the limits: a request refused here has taken no limit
//! units, and its usage event is not billable. In-process only (the ledger's lock, no network
//! call): ClickHouse is read by `spend::refresh`, off the request path.

use chrono::{DateTime, SecondsFormat, Utc};
use hyper::StatusCode;
use serde_json::json;

use super::{Proxy, RequestContext};
use crate::directory::Identity;
use crate::problem::Problem;
use crate::routes::Route;
use crate::spend::{CapRefusal, Units};

impl Proxy {
    pub(super) fn check_spend_cap(
        &self,
        identity: &Identity,
        route: &Route,
        ctx: &mut RequestContext,
    ) -> Result<(), Problem> {
        let Some(ledger) = &self.spend else {
            return Ok(());
        };
        let consumer = &identity.consumer;
        let Some(budget) = self
            .directory
            .read()
            .expect("directory lock")
            .budget(&consumer.tenant_id)
        else {
            return Ok(());
        };
        let plan = self.plan_of(identity);
        // What the usage event will bill if the upstream reports nothing else.
        let mut units = Units::from([("requests".to_owned(), 1)]);
        for (meter, cost) in &route.settings.cost {
            units.insert(meter.clone(), i64::try_from(*cost).unwrap_or(i64::MAX));
        }
        let now_ms = Utc::now().timestamp_millis();
        match ledger.reserve(&consumer.tenant_id, plan, budget.monthly_cap_minor, units, now_ms) {
            Ok(reservation) => {
                ctx.spend = Some(reservation);
                Ok(())
            }
            Err(refusal) => Err(refusal_problem(refusal, now_ms)),
        }
    }
}

fn refusal_problem(refusal: CapRefusal, now_ms: i64) -> Problem {
    match refusal {
        CapRefusal::Exceeded {
            cap_minor,
            spent_minor,
            currency,
            period_end_ms,
        } => {
            let period_end = DateTime::<Utc>::from_timestamp_millis(period_end_ms)
                .unwrap_or_default()
                .to_rfc3339_opts(SecondsFormat::Secs, true);
            let retry_after = ((period_end_ms - now_ms) / 1000).max(1);
            Problem::from_json(json!({
                "type": "https://tollgate.dev/problems/spend-cap-exceeded",
                "title": "Too Many Requests",
                "status": 429,
                "detail": format!(
                    "this request would take the month's spend past its cap of {cap_minor} {currency} minor units; the cap starts over at {period_end}"
                ),
                "monthlyCap": cap_minor,
                "spent": spent_minor,
                "currency": currency,
                "periodEnd": period_end,
            }))
            .with_header("retry-after", retry_after.to_string())
        }
        CapRefusal::Unknown => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "spend-unknown", "Service Unavailable")
            .with_detail("this tenant's month-to-date spend is not known yet; retry shortly")
            .with_header("retry-after", "1"),
    }
}
