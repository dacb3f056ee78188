//! The limits' domain types: what a limit counts ([`Meter`], among the [`Meters`] the settings
//! declare), whose counter it uses ([`KeyBy`]), how long it counts ([`Window`], UTC
//! [`calendar_period`]s) and the checked [`LimitSpec`] the limiters work from.
//!
//! In: values already checked by `settings`, and the settings' `[meters]` table (read here
//! because [`Meters`] interns each declaration into the [`Declared`] a [`Meter`] points at).
//! Out: types shared by the counters, the backends, the headers and the request chain. No IO.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use chrono::{Datelike, TimeZone, Utc};
use serde::Deserialize;
use tollgate_runtime::settings::Invalid;

/// Shortest and longest sliding window, in seconds (`1s` … `30d`).
const MIN_WINDOW_SECS: u64 = 1;
const MAX_WINDOW_SECS: u64 = 30 * 86_400;
const DAY_MS: i64 = 86_400_000;

/// What a limit counts: a built-in meter, or one the operator declared (`[meters.<name>]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Meter {
    Requests,
    ComputeUnits,
    RequestBytes,
    ResponseBytes,
    /// Requests in flight at once; the window does not apply.
    Concurrent,
    /// Declared in the settings; what upstreams report and routes charge by name.
    Custom(&'static Declared),
}

/// A declared meter: its name (in events, limits, route costs and `x-tollgate-cost`) and the
/// unit people read in headers and refusals. Interned once per process ([`Declared::intern`])
/// so that [`Meter`] stays `Copy` and names it for as long as any counter may.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Declared {
    pub name: String,
    pub unit: String,
}

impl Declared {
    /// The one `'static` copy of this declaration. A reload that declares the same meter again
    /// gets the same copy, so memory grows only with distinct declarations, never with reloads.
    pub fn intern(name: &str, unit: &str) -> &'static Declared {
        static INTERNED: Mutex<BTreeSet<&'static Declared>> = Mutex::new(BTreeSet::new());
        let wanted = Declared {
            name: name.to_owned(),
            unit: unit.to_owned(),
        };
        let mut interned = INTERNED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(found) = interned.get(&wanted) {
            return found;
        }
        let leaked: &'static Declared = Box::leak(Box::new(wanted));
        interned.insert(leaked);
        leaked
    }
}

impl Meter {
    pub const BUILT_IN: [Meter; 5] = [
        Meter::Requests,
        Meter::ComputeUnits,
        Meter::RequestBytes,
        Meter::ResponseBytes,
        Meter::Concurrent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Requests => "requests",
            Meter::ComputeUnits => "compute_units",
            Meter::RequestBytes => "request_bytes",
            Meter::ResponseBytes => "response_bytes",
            Meter::Concurrent => "concurrent",
            Meter::Custom(declared) => &declared.name,
        }
    }

    /// The built-in meter of this name; declared meters are found through [`Meters`].
    pub fn built_in(name: &str) -> Option<Meter> {
        Meter::BUILT_IN.into_iter().find(|m| m.as_str() == name)
    }
}

/// Every meter the gateway counts: the built-in ones and those declared in the settings'
/// `[meters.<name>]` tables. A name that is neither is refused at load (in a limit or a
/// route's cost) and ignored with a metric at run time (in `x-tollgate-cost`): it is never
/// counted, limited or billed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meters {
    declared: BTreeMap<String, &'static Declared>,
}

impl Meters {
    /// Meters declared as `name → unit`; names and units are checked by [`Meters::validate`].
    pub fn declare<'a>(declared: impl IntoIterator<Item = (&'a str, &'a str)>) -> Meters {
        Meters {
            declared: declared
                .into_iter()
                .map(|(name, unit)| (name.to_owned(), Declared::intern(name, unit)))
                .collect(),
        }
    }

    /// Checks every declaration; `field` is the table's dotted path (`meters`).
    pub fn validate(&self, field: &str) -> Result<(), Invalid> {
        for (name, declared) in &self.declared {
            let at = format!("{field}.{name}");
            if Meter::built_in(name).is_some() {
                return Err(Invalid::new(at, name, "a name other than a built-in meter's"));
            }
            if !tollgate_runtime::meters::valid_name(name) {
                return Err(Invalid::new(at, name, tollgate_runtime::meters::NAME_RULE));
            }
            let unit = &declared.unit;
            if unit.is_empty()
                || unit.len() > 64
                || !unit.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
                || unit.contains('"')
            {
                return Err(Invalid::new(
                    format!("{at}.unit"),
                    unit,
                    "1 to 64 printable ASCII characters without a double quote",
                ));
            }
        }
        Ok(())
    }

    /// The meter of this name, built-in or declared.
    pub fn get(&self, name: &str) -> Option<Meter> {
        Meter::built_in(name).or_else(|| self.declared.get(name).map(|d| Meter::Custom(d)))
    }

    /// The meter of this name if a request can be charged units of it (not `concurrent`).
    pub fn countable(&self, name: &str) -> Option<Meter> {
        self.get(name).filter(|m| *m != Meter::Concurrent)
    }

    /// Every countable meter's name, for messages that say what is allowed.
    pub fn countable_names(&self) -> String {
        let built_in = Meter::BUILT_IN.into_iter().filter(|m| *m != Meter::Concurrent);
        built_in
            .map(|m| m.as_str())
            .chain(self.declared.keys().map(String::as_str))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The settings' `[meters]` table: `[meters.tokens]` with `unit = "tokens"`.
impl<'de> Deserialize<'de> for Meters {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Declaration {
            /// What one unit is called in headers and refusals (`tokens`).
            unit: String,
        }
        let table = BTreeMap::<String, Declaration>::deserialize(deserializer)?;
        Ok(Meters::declare(
            table.iter().map(|(name, d)| (name.as_str(), d.unit.as_str())),
        ))
    }
}

/// Whose counter a limit uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyBy {
    /// One counter per tenant (consumer), shared by all its keys.
    #[default]
    Tenant,
    /// One counter per API key.
    Key,
    /// One counter per client IP address (for unauthenticated routes).
    Ip,
}

impl KeyBy {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyBy::Tenant => "tenant",
            KeyBy::Key => "key",
            KeyBy::Ip => "ip",
        }
    }
}

/// How long a limit's counting lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// Any interval of this many seconds (sliding).
    Sliding { secs: u64 },
    /// The UTC calendar day.
    Day,
    /// The UTC calendar month.
    Month,
    /// No window: in-flight count (`concurrent`).
    InFlight,
}

impl Window {
    /// Parses `<n><s|m|h|d>` (1 s … 30 d), `day` or `month`; the message says what is allowed.
    pub fn parse(text: &str) -> Result<Window, &'static str> {
        const EXPECTED: &str = "a window from 1s to 30d as <n><s|m|h|d>, or `day` or `month`";
        match text {
            "day" => return Ok(Window::Day),
            "month" => return Ok(Window::Month),
            _ => {}
        }
        let split = text
            .len()
            .checked_sub(1)
            .filter(|&i| text.is_char_boundary(i))
            .ok_or(EXPECTED)?;
        let (digits, unit) = text.split_at(split);
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => return Err(EXPECTED),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(EXPECTED);
        }
        let n: u64 = digits.parse().map_err(|_| EXPECTED)?;
        let secs = n.checked_mul(unit_secs).ok_or(EXPECTED)?;
        if !(MIN_WINDOW_SECS..=MAX_WINDOW_SECS).contains(&secs) {
            return Err(EXPECTED);
        }
        Ok(Window::Sliding { secs })
    }

    /// Stable text for counter keys: `60s`, `day`, `month`, `inflight`.
    pub fn code(&self) -> String {
        match self {
            Window::Sliding { secs } => format!("{secs}s"),
            Window::Day => "day".to_owned(),
            Window::Month => "month".to_owned(),
            Window::InFlight => "inflight".to_owned(),
        }
    }
}

/// UTC calendar period `[start, end)` in epoch milliseconds holding `now_ms` (day or month).
pub fn calendar_period(window: Window, now_ms: i64) -> (i64, i64) {
    let day = now_ms.div_euclid(DAY_MS);
    match window {
        Window::Month => {
            let date = Utc
                .timestamp_millis_opt(day * DAY_MS)
                .single()
                .unwrap_or_default()
                .date_naive();
            let start = date.with_day(1).unwrap_or(date);
            let next = if start.month() == 12 {
                start.with_year(start.year() + 1).and_then(|d| d.with_month(1))
            } else {
                start.with_month(start.month() + 1)
            }
            .unwrap_or(start);
            let ms = |d: chrono::NaiveDate| d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc().timestamp_millis();
            (ms(start), ms(next))
        }
        _ => (day * DAY_MS, (day + 1) * DAY_MS),
    }
}

/// One checked limit, shared by the decisions that charge it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LimitSpec {
    /// Policy name (unique within the plan).
    pub name: String,
    pub meter: Meter,
    pub window: Window,
    /// Allowance per window, or in flight for `concurrent`.
    pub limit: u64,
    pub by: KeyBy,
}

impl LimitSpec {
    /// The counter's identity below the backend's prefix: name, meter, window and subject key.
    /// Changing a limit's allowance keeps its counter; changing its window or meter does not.
    pub fn counter_id(&self, key: &str) -> String {
        format!("{}:{}:{}:{}", self.name, self.meter.as_str(), self.window.code(), key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_reject() {
        assert_eq!(Window::parse("1s"), Ok(Window::Sliding { secs: 1 }));
        assert_eq!(Window::parse("60s"), Ok(Window::Sliding { secs: 60 }));
        assert_eq!(Window::parse("1m"), Ok(Window::Sliding { secs: 60 }));
        assert_eq!(Window::parse("30d"), Ok(Window::Sliding { secs: 30 * 86_400 }));
        assert_eq!(Window::parse("day"), Ok(Window::Day));
        assert_eq!(Window::parse("month"), Ok(Window::Month));
        for bad in [
            "",
            "0s",
            "31d",
            "1w",
            "m",
            "-1s",
            "1.5m",
            "1 m",
            "99999999999999999999d",
            "é",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn calendar_periods_are_utc_days_and_months() {
        let ms = |y, m, d, h| Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap().timestamp_millis();
        assert_eq!(
            calendar_period(Window::Day, ms(2026, 11, 27, 23)),
            (ms(2026, 11, 27, 0), ms(2026, 11, 28, 0))
        );
        assert_eq!(
            calendar_period(Window::Month, ms(2026, 12, 31, 23)),
            (ms(2026, 12, 1, 0), ms(2027, 1, 1, 0))
        );
        assert_eq!(
            calendar_period(Window::Month, ms(2028, 2, 29, 5)),
            (ms(2028, 2, 1, 0), ms(2028, 3, 1, 0))
        );
        assert_eq!(
            calendar_period(Window::Month, ms(2026, 3, 1, 0)),
            (ms(2026, 3, 1, 0), ms(2026, 4, 1, 0))
        );
    }
}
