//! Usage of the session's tenant, from the meter-consumer's ClickHouse rollups.
//!
//! In: `granularity` (`hour` | `day`), optional RFC 3339 `from` / `to`, and the session's
//! tenant (never a parameter). Out: one series per meter with a point per bucket (empty
//! buckets as zeros, so charts and CSV show every hour or day), and this billing period's
//! totals (the UTC calendar month, as `usage_by_period` and the invoices count it).
//!
//! Tables: `usage_meter_hour` and `usage_meter_day` hold one row per bucket per batch, so
//! they are read with `sum()` (`meter-consumer/src/schema.rs`). The SQL runs on ClickHouse
//! 18.16: values are bound client-side, dates travel as numbers or `YYYY-MM-DD`.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State as AxumState};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::api::Authed;
use crate::problem::Problem;
use crate::State;

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Hour,
    Day,
}

impl Granularity {
    fn secs(self) -> i64 {
        match self {
            Granularity::Hour => HOUR,
            Granularity::Day => DAY,
        }
    }

    /// Buckets shown when no range is given: the last 48 hours, the last 30 days.
    fn default_buckets(self) -> i64 {
        match self {
            Granularity::Hour => 48,
            Granularity::Day => 30,
        }
    }

    /// The longest range one request may ask for.
    fn max_buckets(self) -> i64 {
        match self {
            Granularity::Hour => 31 * 24,
            Granularity::Day => 400,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// `hour` (default) or `day`.
    pub granularity: Option<Granularity>,
    /// RFC 3339 start of the range (default: 48 hours or 30 days back).
    pub from: Option<String>,
    /// RFC 3339 end of the range (default: now).
    pub to: Option<String>,
}

/// The buckets asked for: `[from, to)` in epoch seconds, aligned to the granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub granularity: Granularity,
    pub from: i64,
    pub to: i64,
}

impl Range {
    /// Checks and aligns a query at `now` (epoch seconds): `from` rounds down, `to` up.
    pub fn of(query: &UsageQuery, now: i64) -> Result<Range, Problem> {
        let granularity = query.granularity.unwrap_or(Granularity::Hour);
        let step = granularity.secs();
        let time = |name: &str, value: &Option<String>| -> Result<Option<i64>, Problem> {
            value
                .as_deref()
                .map(|v| {
                    DateTime::parse_from_rfc3339(v).map(|t| t.timestamp()).map_err(|_| {
                        Problem::bad_request(format!(
                            "{name}: {v:?} is not an RFC 3339 time like 2026-12-01T00:00:00Z"
                        ))
                    })
                })
                .transpose()
        };
        let to = match time("to", &query.to)? {
            Some(t) => (t + step - 1).div_euclid(step) * step,
            None => now.div_euclid(step) * step + step,
        };
        let from = match time("from", &query.from)? {
            Some(t) => t.div_euclid(step) * step,
            None => to - granularity.default_buckets() * step,
        };
        if from >= to {
            return Err(Problem::bad_request("from must be before to"));
        }
        if (to - from) / step > granularity.max_buckets() {
            return Err(Problem::bad_request(format!(
                "at most {} buckets of one {:?} per request",
                granularity.max_buckets(),
                granularity
            )));
        }
        if from < 0 || to > 4_102_444_800 {
            return Err(Problem::bad_request("from and to must lie between 1970 and 2100"));
        }
        Ok(Range { granularity, from, to })
    }

    pub fn buckets(&self) -> impl Iterator<Item = i64> + '_ {
        (self.from..self.to).step_by(self.granularity.secs() as usize)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    pub start: String,
    pub events: u64,
    pub units: i64,
    pub billable_units: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Series {
    pub meter: String,
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Total {
    pub meter: String,
    pub events: u64,
    pub units: i64,
    pub billable_units: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Period {
    pub start: String,
    pub end: String,
    pub meters: Vec<Total>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    pub tenant_id: String,
    pub granularity: Granularity,
    pub from: String,
    pub to: String,
    pub meters: Vec<Series>,
    /// This billing period (UTC calendar month) so far.
    pub period: Period,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct BucketRow {
    meter: String,
    /// Bucket start: epoch seconds (hours) or days since 1970 (days).
    at: u32,
    events: u64,
    units: i64,
    billable_units: i64,
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct TotalRow {
    meter: String,
    events: u64,
    units: i64,
    billable_units: i64,
}

fn rfc3339(secs: i64) -> String {
    crate::api::time_text(secs * 1000)
}

fn date(secs: i64) -> String {
    Utc.timestamp_opt(secs, 0)
        .single()
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

/// `[start, end)` of the UTC calendar month holding `now` (epoch seconds).
pub fn month_of(now: i64) -> (i64, i64) {
    let today = Utc.timestamp_opt(now, 0).single().unwrap_or_default().date_naive();
    let start = NaiveDate::from_ymd_opt(today.year(), today.month(), 1).unwrap_or(today);
    let next = if today.month() == 12 {
        NaiveDate::from_ymd_opt(today.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(today.year(), today.month() + 1, 1)
    }
    .unwrap_or(start);
    let secs = |d: NaiveDate| d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc().timestamp();
    (secs(start), secs(next))
}

/// Reads a tenant's usage for `range` and the billing period holding `now`.
pub async fn read(
    client: &clickhouse::Client,
    tenant: &str,
    range: Range,
    now: i64,
) -> Result<Usage, clickhouse::error::Error> {
    let rows: Vec<BucketRow> = match range.granularity {
        Granularity::Hour => {
            client
                .query(
                    "SELECT meter, toUInt32(hour) AS at, sum(events) AS events, sum(units) AS units,
                            sum(billable_units) AS billable_units
                     FROM usage_meter_hour
                     WHERE tenant_id = ? AND hour >= toDateTime(?) AND hour < toDateTime(?)
                     GROUP BY meter, at ORDER BY meter, at",
                )
                .bind(tenant)
                .bind(range.from as u32)
                .bind(range.to as u32)
                .fetch_all()
                .await?
        }
        Granularity::Day => {
            client
                .query(
                    "SELECT meter, toUInt32(toUInt16(day)) AS at, sum(events) AS events, sum(units) AS units,
                            sum(billable_units) AS billable_units
                     FROM usage_meter_day
                     WHERE tenant_id = ? AND day >= toDate(?) AND day < toDate(?)
                     GROUP BY meter, at ORDER BY meter, at",
                )
                .bind(tenant)
                .bind(date(range.from))
                .bind(date(range.to))
                .fetch_all()
                .await?
        }
    };
    let (period_start, period_end) = month_of(now);
    let totals: Vec<TotalRow> = client
        .query(
            "SELECT meter, sum(events) AS events, sum(units) AS units, sum(billable_units) AS billable_units
             FROM usage_meter_day
             WHERE tenant_id = ? AND day >= toDate(?) AND day < toDate(?)
             GROUP BY meter ORDER BY meter",
        )
        .bind(tenant)
        .bind(date(period_start))
        .bind(date(period_end))
        .fetch_all()
        .await?;
    Ok(Usage {
        tenant_id: tenant.to_owned(),
        granularity: range.granularity,
        from: rfc3339(range.from),
        to: rfc3339(range.to),
        meters: series(range, rows),
        period: Period {
            start: rfc3339(period_start),
            end: rfc3339(period_end),
            meters: totals
                .into_iter()
                .map(|t| Total {
                    meter: t.meter,
                    events: t.events,
                    units: t.units,
                    billable_units: t.billable_units,
                })
                .collect(),
        },
    })
}

/// One series per meter, with every bucket of the range (zeros where nothing was counted).
fn series(range: Range, rows: Vec<BucketRow>) -> Vec<Series> {
    let mut by_meter: BTreeMap<String, BTreeMap<i64, BucketRow>> = BTreeMap::new();
    for row in rows {
        let at = match range.granularity {
            Granularity::Hour => row.at as i64,
            Granularity::Day => row.at as i64 * DAY,
        };
        by_meter.entry(row.meter.clone()).or_default().insert(at, row);
    }
    by_meter
        .into_iter()
        .map(|(meter, rows)| Series {
            meter,
            points: range
                .buckets()
                .map(|at| {
                    let row = rows.get(&at);
                    Point {
                        start: rfc3339(at),
                        events: row.map_or(0, |r| r.events),
                        units: row.map_or(0, |r| r.units),
                        billable_units: row.map_or(0, |r| r.billable_units),
                    }
                })
                .collect(),
        })
        .collect()
}

/// The usage a request asks for, for the session's tenant.
pub async fn for_request(
    state: &State,
    authed: &Authed,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Usage, Problem> {
    let Query(query) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    let now = crate::now_ms() / 1000;
    let range = Range::of(&query, now)?;
    read(&state.clickhouse, &authed.session.tenant_id, range, now)
        .await
        .map_err(|e| Problem::unavailable("usage", &e))
}

/// `GET /api/usage`.
#[utoipa::path(
    get,
    path = "/api/usage",
    summary = "The tenant's usage per meter and bucket, and this billing period's totals",
    params(UsageQuery),
    responses(
        (status = 200, description = "the usage", body = Usage),
        (status = 400, description = "a query parameter is not acceptable", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 401, description = "no live portal session", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 503, description = "the usage store is unavailable", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json")
    )
)]
pub async fn usage_json(
    AxumState(state): AxumState<State>,
    authed: Authed,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<Usage>, Problem> {
    Ok(Json(for_request(&state, &authed, query).await?))
}

/// `GET /api/usage.csv`: the same series, one line per meter and bucket.
#[utoipa::path(
    get,
    path = "/api/usage.csv",
    summary = "The same series as CSV: meter,start,events,units,billable_units",
    params(UsageQuery),
    responses(
        (status = 200, description = "the usage as CSV, as an attachment", body = String, content_type = "text/csv"),
        (status = 400, description = "a query parameter is not acceptable", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 401, description = "no live portal session", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json"),
        (status = 503, description = "the usage store is unavailable", body = tollgate_runtime::admin_api::Problem, content_type = "application/problem+json")
    )
)]
pub async fn usage_csv(
    AxumState(state): AxumState<State>,
    authed: Authed,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let usage = for_request(&state, &authed, query).await?;
    let granularity = match usage.granularity {
        Granularity::Hour => "hour",
        Granularity::Day => "day",
    };
    let filename = format!("usage-{}-{granularity}.csv", usage.tenant_id);
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        csv(&usage),
    )
        .into_response())
}

/// The CSV text: a header line, then `meter,start,events,units,billable_units` per bucket.
pub fn csv(usage: &Usage) -> String {
    let mut out = String::from("meter,start,events,units,billable_units\n");
    for series in &usage.meters {
        for p in &series.points {
            // Meter names are identifiers (letters, digits, `_`): nothing to quote.
            out.push_str(&format!(
                "{},{},{},{},{}\n",
                series.meter, p.start, p.events, p.units, p.billable_units
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn q(granularity: Option<Granularity>, from: Option<&str>, to: Option<&str>) -> UsageQuery {
        UsageQuery {
            granularity,
            from: from.map(str::to_owned),
            to: to.map(str::to_owned),
        }
    }

    #[test]
    fn default_ranges_are_the_last_48_hours_and_30_days() {
        let now = 1_764_600_000; // 2025-12-01T14:40:00Z
        let h = Range::of(&q(None, None, None), now).unwrap();
        assert_eq!(h.buckets().count(), 48);
        assert_eq!(h.to, 1_764_601_200, "the current hour is the last bucket");
        let d = Range::of(&q(Some(Granularity::Day), None, None), now).unwrap();
        assert_eq!(d.buckets().count(), 30);
        assert_eq!(date(d.to), "2025-12-02");
    }

    #[test]
    fn bad_ranges_are_refused() {
        let now = 1_764_600_000;
        let err = |query| Range::of(&query, now).unwrap_err().detail;
        assert!(err(q(None, Some("yesterday"), None)).contains("from"));
        assert!(err(q(None, Some("2025-12-02T00:00:00Z"), Some("2025-12-01T00:00:00Z"))).contains("before"));
        assert!(err(q(None, Some("2025-01-01T00:00:00Z"), Some("2025-12-01T00:00:00Z"))).contains("at most"));
    }

    #[test]
    fn the_billing_period_is_the_utc_month() {
        let (start, end) = month_of(1_764_600_000);
        assert_eq!(
            (rfc3339(start).as_str(), rfc3339(end).as_str()),
            ("2025-12-01T00:00:00Z", "2026-01-01T00:00:00Z")
        );
    }

    proptest! {
        /// Every row lands in its bucket once, and every bucket of the range is there: the
        /// series' sums are the rows' sums.
        #[test]
        fn series_keep_every_unit_once(
            rows in prop::collection::vec((0usize..2, 0i64..48, 0u64..100, 0i64..1000), 0..60),
        ) {
            let range = Range { granularity: Granularity::Hour, from: 36_000, to: 36_000 + 48 * HOUR };
            let meters = ["compute_units", "requests"];
            let rows: Vec<BucketRow> = rows
                .iter()
                .map(|&(m, h, events, units)| BucketRow {
                    meter: meters[m].to_owned(),
                    at: (range.from + h * HOUR) as u32,
                    events,
                    units,
                    billable_units: units,
                })
                .collect();
            // ClickHouse groups by meter and bucket: one row each.
            let mut grouped: BTreeMap<(String, u32), BucketRow> = BTreeMap::new();
            for r in rows {
                let slot = grouped.entry((r.meter.clone(), r.at)).or_insert(BucketRow { meter: r.meter.clone(), at: r.at, events: 0, units: 0, billable_units: 0 });
                slot.events += r.events;
                slot.units += r.units;
                slot.billable_units += r.billable_units;
            }
            let expected: i64 = grouped.values().map(|r| r.units).sum();
            let out = series(range, grouped.into_values().collect());
            for s in &out {
                prop_assert_eq!(s.points.len(), 48);
            }
            prop_assert_eq!(out.iter().flat_map(|s| &s.points).map(|p| p.units).sum::<i64>(), expected);
        }
    }
}
