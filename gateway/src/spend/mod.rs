//! Spend caps: what each budgeted tenant has spent this calendar month (UTC), and whether one
//! more request fits under its cap.
//!
//! In: month-to-date billable units per tenant and meter as ClickHouse counted them
//! ([`refresh`], every `budgets.refresh_interval_ms`), leaving out this process's own events;
//! the units this gateway admits (upfront, at the `cap` chain step) and bills (when a request's
//! response ends); each plan's prices from the billing catalogue. Out: a [`Reservation`] for an
//! admitted request, or a [`CapRefusal`]; each tenant's month-to-date spend for the admin API.
//!
//! Spend is priced exactly as the invoice is ([`PlanPrices::amount`]: the monthly fee, then
//! each priced meter's units beyond its included ones, each line rounded), over
//! `counted + own + request`, where `counted` is ClickHouse's total without this process's
//! events and `own` is what this process admitted (in flight) or billed (settled) this month.
//! The two never overlap: the ClickHouse query drops events of this `service.id` timed at or
//! after this process started, and the ledger holds exactly those. The check and the
//! reservation happen under one lock, so one gateway never admits past the cap on what it knows.
//!
//! Overshoot bound (what can be admitted beyond the cap, summed over the month):
//! - a request whose upstream reports a cost (`x-tollgate-cost`) above its route's upfront
//!   cost is billed the reported units; at most the excess of the requests in flight when the
//!   cap is reached;
//! - with several gateways, each sees the others only through ClickHouse: what another gateway
//!   admitted in the last `refresh_interval_ms` plus the pipeline's lag (spool flush, Kafka,
//!   meter-consumer batch) is unseen. Each gateway can therefore add at most the requests it
//!   admits during one such window; a tenant at its cap on every gateway is refused everywhere
//!   from the next refresh on;
//! - after a restart, events the previous process left in its spool count once they reach
//!   ClickHouse: at most what that process admitted in its last pipeline lag.
//!
//! A tenant with no count yet this month (first refresh pending, or its cap just set) is
//! refused with `spend-unknown` (503) rather than admitted blind: a cap that may be broken at
//! every start is no cap.

pub mod refresh;
pub mod settings;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use chrono::{Datelike, TimeZone, Utc};
use tollgate_runtime::catalogue::Catalogue;

/// A calendar month in UTC, the billing period caps apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    pub year: i32,
    /// 1 to 12.
    pub month: u32,
}

impl Month {
    pub fn of(at_ms: i64) -> Self {
        let at = Utc.timestamp_millis_opt(at_ms).single().unwrap_or_default();
        Self {
            year: at.year(),
            month: at.month(),
        }
    }

    fn next(self) -> Self {
        if self.month == 12 {
            Self {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Self {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// First millisecond of the month.
    pub fn start_ms(self) -> i64 {
        Utc.with_ymd_and_hms(self.year, self.month, 1, 0, 0, 0)
            .single()
            .map_or(0, |t| t.timestamp_millis())
    }

    /// First millisecond after the month: when a cap starts over.
    pub fn end_ms(self) -> i64 {
        self.next().start_ms()
    }
}

/// Units per meter (`requests`, `compute_units`, …), as usage events carry them.
pub type Units = BTreeMap<String, i64>;

/// Why a request does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapRefusal {
    /// Admitting it would take the month's spend past the cap.
    Exceeded {
        cap_minor: i64,
        spent_minor: i64,
        currency: String,
        period_end_ms: i64,
    },
    /// ClickHouse has not been read for this tenant this month yet.
    Unknown,
}

/// A tenant's month-to-date spend as this gateway knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendStatus {
    pub month: Month,
    /// `None` until ClickHouse has been read for the tenant this month.
    pub spent_minor: Option<i64>,
    /// The plan's currency; `None` when the plan has no prices.
    pub currency: Option<String>,
}

#[derive(Debug)]
struct TenantSpend {
    month: Month,
    /// ClickHouse's count without this process's events; `None` until read this month.
    counted: Option<Units>,
    /// What this process admitted (in flight) or billed (settled) this month.
    own: Units,
}

impl TenantSpend {
    fn new(month: Month) -> Self {
        Self {
            month,
            counted: None,
            own: Units::new(),
        }
    }
}

pub struct SpendLedger {
    catalogue: Catalogue,
    tenants: Mutex<HashMap<String, TenantSpend>>,
}

impl SpendLedger {
    pub fn new(catalogue: Catalogue) -> Arc<Self> {
        Arc::new(Self {
            catalogue,
            tenants: Mutex::default(),
        })
    }

    /// Admits `units` for `tenant` on `plan` under `cap_minor` at `now_ms`, or says why not.
    /// A plan without prices costs nothing: its requests are admitted (and still counted).
    pub fn reserve(
        self: &Arc<Self>,
        tenant: &str,
        plan: Option<&str>,
        cap_minor: i64,
        units: Units,
        now_ms: i64,
    ) -> Result<Reservation, CapRefusal> {
        let month = Month::of(now_ms);
        let mut tenants = self.tenants.lock().expect("spend ledger lock");
        let spend = entry(&mut tenants, tenant, month);
        // A request timed before a month change another thread already saw: no count of its
        // own month is kept any more.
        if spend.month != month {
            return Err(CapRefusal::Unknown);
        }
        let counted = spend.counted.as_ref().ok_or(CapRefusal::Unknown)?;
        if let Some(prices) = plan.and_then(|p| self.catalogue.plans.get(p)) {
            let mut after = sum(counted, &spend.own);
            add(&mut after, &units, 1);
            if prices.amount(&after) > cap_minor {
                return Err(CapRefusal::Exceeded {
                    cap_minor,
                    spent_minor: prices.amount(&sum(counted, &spend.own)),
                    currency: prices.currency.clone(),
                    period_end_ms: month.end_ms(),
                });
            }
        }
        add(&mut spend.own, &units, 1);
        Ok(Reservation {
            ledger: Arc::clone(self),
            tenant: tenant.to_owned(),
            month,
            units,
            settled: false,
        })
    }

    /// Takes ClickHouse's month-to-date count for `month`: `rows` for the tenants `asked`
    /// (one that has no row has spent nothing). A count for a month already over is dropped.
    pub fn apply_counted(&self, month: Month, asked: &[String], rows: &[(String, String, i64)]) {
        let mut counted: HashMap<&str, Units> = asked.iter().map(|t| (t.as_str(), Units::new())).collect();
        for (tenant, meter, units) in rows {
            if let Some(units_of) = counted.get_mut(tenant.as_str()) {
                *units_of.entry(meter.clone()).or_default() += units;
            }
        }
        let mut tenants = self.tenants.lock().expect("spend ledger lock");
        for (tenant, units) in counted {
            let spend = entry(&mut tenants, tenant, month);
            if spend.month == month {
                spend.counted = Some(units);
            }
        }
    }

    /// Whether any of `tenants` has no count for the month of `now_ms` yet (the refresh reads
    /// ClickHouse at once rather than at the next interval).
    pub fn any_unknown(&self, tenants: &[String], now_ms: i64) -> bool {
        let month = Month::of(now_ms);
        let known = self.tenants.lock().expect("spend ledger lock");
        tenants
            .iter()
            .any(|t| known.get(t).is_none_or(|s| s.month != month || s.counted.is_none()))
    }

    /// The tenant's month-to-date spend at `now_ms`.
    pub fn status(&self, tenant: &str, plan: Option<&str>, now_ms: i64) -> SpendStatus {
        let month = Month::of(now_ms);
        let tenants = self.tenants.lock().expect("spend ledger lock");
        let prices = plan.and_then(|p| self.catalogue.plans.get(p));
        let spent_minor = tenants
            .get(tenant)
            .filter(|s| s.month == month)
            .and_then(|s| Some(sum(s.counted.as_ref()?, &s.own)))
            .map(|units| prices.map_or(0, |p| p.amount(&units)));
        SpendStatus {
            month,
            spent_minor,
            currency: prices.map(|p| p.currency.clone()),
        }
    }

    fn settle(&self, tenant: &str, month: Month, reserved: &Units, billed: Option<&Units>) {
        let mut tenants = self.tenants.lock().expect("spend ledger lock");
        // A request that straddled the month's end was counted in the month it started in,
        // which is over: nothing left to correct.
        let Some(spend) = tenants.get_mut(tenant).filter(|s| s.month == month) else {
            return;
        };
        add(&mut spend.own, reserved, -1);
        if let Some(billed) = billed {
            add(&mut spend.own, billed, 1);
        }
    }
}

/// The tenant's entry for `month`, started over when the month has changed.
fn entry<'a>(tenants: &'a mut HashMap<String, TenantSpend>, tenant: &str, month: Month) -> &'a mut TenantSpend {
    let spend = tenants
        .entry(tenant.to_owned())
        .or_insert_with(|| TenantSpend::new(month));
    if spend.month < month {
        *spend = TenantSpend::new(month);
    }
    spend
}

fn add(into: &mut Units, units: &Units, sign: i64) {
    for (meter, n) in units {
        let total = into.entry(meter.clone()).or_default();
        *total = total.saturating_add(n.saturating_mul(sign));
    }
}

fn sum(a: &Units, b: &Units) -> Units {
    let mut total = a.clone();
    add(&mut total, b, 1);
    total
}

/// What an admitted request holds against its tenant's cap until its response ends: given back
/// when dropped unsettled (a later step refused it), replaced by the billed units when settled.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<SpendLedger>,
    tenant: String,
    month: Month,
    units: Units,
    settled: bool,
}

impl std::fmt::Debug for SpendLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpendLedger").finish_non_exhaustive()
    }
}

impl Reservation {
    /// The request ended: `billed` is its usage event's units when the event is billable.
    pub fn settle(mut self, billed: Option<&Units>) {
        self.settled = true;
        self.ledger.settle(&self.tenant, self.month, &self.units, billed);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.ledger.settle(&self.tenant, self.month, &self.units, None);
        }
    }
}

#[cfg(test)]
mod tests;
