//! `billing-sync reconcile --period YYYY-MM`: ClickHouse against the ledger for one month.
//!
//! In: `usage_events` and `billing_ledger` for the month's closed windows. Out: per tenant and
//! meter, billable units in ClickHouse, units pushed to Stripe, units recorded unbillable,
//! and the difference (ClickHouse − pushed − unbillable); any difference fails the command.
//! Pending, failed and adjustment units are differences: they have not reached Stripe.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{Datelike, NaiveDate};
use clickhouse::Client;

use crate::ledger::{self, status, LedgerError};
use crate::settings::BillingSettings;
use crate::usage::{self, UsageError};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("--period {0:?}: expected a month like 2026-11")]
    Period(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error(transparent)]
    Schedule(#[from] crate::schedule::ScheduleError),
}

/// A calendar month in UTC, `[start, end)` in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start: i64,
    pub end: i64,
}

impl std::str::FromStr for Period {
    type Err = ReconcileError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ReconcileError::Period(s.to_owned());
        let (year, month) = s.split_once('-').ok_or_else(bad)?;
        let (year, month): (i32, u32) = (year.parse().map_err(|_| bad())?, month.parse().map_err(|_| bad())?);
        let first = NaiveDate::from_ymd_opt(year, month, 1).ok_or_else(bad)?;
        let next = if month == 12 {
            NaiveDate::from_ymd_opt(year + 1, 1, 1)
        } else {
            NaiveDate::from_ymd_opt(first.year(), month + 1, 1)
        }
        .ok_or_else(bad)?;
        let secs = |d: NaiveDate| d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc().timestamp();
        Ok(Self {
            start: secs(first),
            end: secs(next),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Line {
    pub clickhouse: i64,
    pub pushed: i64,
    pub unbillable: i64,
    /// Pending, failed or adjustment units: accounted in the ledger, not in Stripe.
    pub other: i64,
}

impl Line {
    pub fn difference(&self) -> i64 {
        self.clickhouse - self.pushed - self.unbillable
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub period: Period,
    /// End of the last closed window compared (windows after it are still open).
    pub closed_until: i64,
    pub lines: BTreeMap<(String, String), Line>,
}

impl Report {
    pub fn differs(&self) -> bool {
        self.lines.values().any(|l| l.difference() != 0)
    }
}

/// Compares the closed windows of `period` at `now`.
pub async fn reconcile(
    client: &Client,
    settings: &BillingSettings,
    period: Period,
    now: i64,
) -> Result<Report, ReconcileError> {
    let schedule = crate::schedule::load(client, settings.billing.window_secs).await?;
    let closed_to = schedule.closed_until(now, settings.billing.lateness_secs);
    let from = period.start.max(0) as u32;
    let to = period.end.min(i64::from(closed_to)).max(period.start) as u32;
    let meters: Vec<String> = settings.meters.iter().map(|m| m.meter.clone()).collect();
    let mut lines: BTreeMap<(String, String), Line> = BTreeMap::new();
    if from < to {
        for u in usage::per_tenant(client, usage::Source::Raw, from, to, &meters).await? {
            lines.entry((u.tenant_id, u.meter)).or_default().clickhouse += u.units;
        }
        for t in ledger::status_totals(client, from, to).await? {
            let line = lines.entry((t.tenant_id, t.meter)).or_default();
            match t.status.as_str() {
                status::PUSHED => line.pushed += t.units,
                status::UNBILLABLE => line.unbillable += t.units,
                _ => line.other += t.units,
            }
        }
    }
    Ok(Report {
        period,
        closed_until: i64::from(to),
        lines,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let when = |t: i64| {
            chrono::DateTime::from_timestamp(t, 0)
                .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_else(|| t.to_string())
        };
        writeln!(
            f,
            "# closed windows from {} to {}",
            when(self.period.start),
            when(self.closed_until.max(self.period.start))
        )?;
        writeln!(
            f,
            "tenant\tmeter\tclickhouse\tpushed\tunbillable\tnot_pushed\tdifference"
        )?;
        for ((tenant, meter), l) in &self.lines {
            writeln!(
                f,
                "{tenant}\t{meter}\t{}\t{}\t{}\t{}\t{}",
                l.clickhouse,
                l.pushed,
                l.unbillable,
                l.other,
                l.difference()
            )?;
        }
        let differing = self.lines.values().filter(|l| l.difference() != 0).count();
        write!(f, "# {} tenant-meter pairs, {differing} differ", self.lines.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_months() {
        let nov: Period = "2026-11".parse().unwrap();
        assert_eq!(nov.end - nov.start, 30 * 86_400);
        assert_eq!(nov.start, 1_793_491_200); // 2026-11-01T00:00:00Z
        let dec: Period = "2026-12".parse().unwrap();
        assert_eq!(dec.start, nov.end);
        assert_eq!(dec.end - dec.start, 31 * 86_400);
        for bad in ["2026", "2026-13", "26-xx", ""] {
            assert!(bad.parse::<Period>().is_err(), "{bad}");
        }
    }

    #[test]
    fn difference_ignores_unbillable_but_not_failed() {
        let line = Line {
            clickhouse: 10,
            pushed: 6,
            unbillable: 3,
            other: 1,
        };
        assert_eq!(line.difference(), 1);
    }
}
