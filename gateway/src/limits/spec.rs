//! The limits' domain types: what a limit counts ([`Meter`]), whose counter it uses
//! ([`KeyBy`]), how long it counts ([`Window`], UTC [`calendar_period`]s) and the checked
//! [`LimitSpec`] the limiters work from.
//!
//! In: values already checked by `settings`. Out: types shared by the counters, the backends,
//! the headers and the request chain. No serde settings and no IO here.

use chrono::{Datelike, TimeZone, Utc};
use serde::Deserialize;

/// Shortest and longest sliding window, in seconds (`1s` … `30d`).
const MIN_WINDOW_SECS: u64 = 1;
const MAX_WINDOW_SECS: u64 = 30 * 86_400;
const DAY_MS: i64 = 86_400_000;

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Meter {
    Requests,
    ComputeUnits,
    RequestBytes,
    ResponseBytes,
    /// Requests in flight at once; the window does not apply.
    Concurrent,
}

impl Meter {
    pub const ALL: [Meter; 5] = [
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
        }
    }

    pub fn parse(name: &str) -> Option<Meter> {
        Meter::ALL.into_iter().find(|m| m.as_str() == name)
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
