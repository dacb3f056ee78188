//! The rows meter-consumer inserts into ClickHouse, and how a usage event becomes one.
//!
//! In: usage events read in place ([`UsageEventRef`]) with the Kafka partition and offset they
//! came from. Out:
//! [`UsageRow`]s for `usage_events` and rollup rows for `usage_meter_*` and
//! `usage_route_day`, field for field the columns `crate::schema` creates.

use std::sync::Arc;

use serde::Serialize;
use tollgate_schemas::{Outcome, UsageEventRef};

/// Where a record came from: the topic, partition and offset stored with the data it produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub partition: i32,
    pub offset: i64,
}

/// One `usage_events` row.
#[derive(Debug, Clone, PartialEq, Serialize, clickhouse::Row)]
pub struct UsageRow {
    pub event_id: String,
    /// Seconds since the epoch (UTC); the millisecond part is in `time_ms`.
    pub time: u32,
    pub time_ms: u16,
    /// Empty for an unauthenticated request.
    pub tenant_id: String,
    pub consumer: String,
    pub key_id: String,
    pub plan: String,
    pub route: String,
    pub method: String,
    pub status: u16,
    pub outcome: &'static str,
    pub billable: u8,
    #[serde(rename = "units.meter")]
    pub units_meter: Vec<String>,
    #[serde(rename = "units.value")]
    pub units_value: Vec<i64>,
    pub request_bytes: i64,
    pub response_bytes: i64,
    pub latency_ms: i64,
    /// -1 when the request never reached the upstream.
    pub upstream_latency_ms: i64,
    pub gateway_id: String,
    pub request_id: String,
    pub kafka_partition: u32,
    pub kafka_offset: u64,
    /// Shared by every row of the consumer's topic: one allocation, not one per row.
    pub kafka_topic: Arc<str>,
}

/// Why a decoded event cannot become a row (it is dead-lettered instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("timestamp_ms {0} is outside ClickHouse DateTime's range (1970 to 2106)")]
    TimeOutOfRange(i64),
}

impl UsageRow {
    pub fn from_event(event: &UsageEventRef<'_>, topic: &Arc<str>, origin: Origin) -> Result<Self, RowError> {
        let secs = event.timestamp_ms.div_euclid(1000);
        let time = u32::try_from(secs).map_err(|_| RowError::TimeOutOfRange(event.timestamp_ms))?;
        let text = |s: Option<&str>| s.unwrap_or_default().to_owned();
        Ok(Self {
            event_id: event.event_id.hyphenated().to_string(),
            time,
            time_ms: event.timestamp_ms.rem_euclid(1000) as u16,
            tenant_id: text(event.tenant_id),
            consumer: text(event.consumer),
            key_id: text(event.key_id),
            plan: text(event.plan),
            route: event.route.to_owned(),
            method: event.method.to_owned(),
            status: event.status,
            outcome: event.outcome.as_str(),
            billable: u8::from(event.billable),
            units_meter: event.units.iter().map(|(meter, _)| (*meter).to_owned()).collect(),
            units_value: event.units.iter().map(|(_, value)| *value).collect(),
            request_bytes: event.request_bytes,
            response_bytes: event.response_bytes,
            latency_ms: event.latency_ms,
            upstream_latency_ms: event.upstream_latency_ms.unwrap_or(-1),
            gateway_id: event.gateway_id.to_owned(),
            request_id: text(event.request_id),
            kafka_partition: origin.partition as u32,
            kafka_offset: origin.offset as u64,
            kafka_topic: topic.clone(),
        })
    }

    pub fn offset(&self) -> i64 {
        self.kafka_offset as i64
    }

    /// The ClickHouse partition this row lands in: `toYYYYMM(time)` in UTC.
    pub fn month(&self) -> u32 {
        month_of(self.time)
    }

    /// Event time in milliseconds since the epoch.
    pub fn time_millis(&self) -> i64 {
        i64::from(self.time) * 1000 + i64::from(self.time_ms)
    }

    pub fn rate_limited(&self) -> bool {
        self.outcome == Outcome::RateLimited.as_str()
    }
}

/// `toYYYYMM` of a UTC timestamp in seconds.
pub fn month_of(secs: u32) -> u32 {
    use chrono::Datelike;
    let date = chrono::DateTime::from_timestamp(i64::from(secs), 0)
        .expect("every u32 second count is a valid date")
        .date_naive();
    date.year() as u32 * 100 + date.month()
}

macro_rules! meter_rollup_row {
    ($(#[$doc:meta])* $name:ident, $bucket:ident, $bucket_ty:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, clickhouse::Row)]
        pub struct $name {
            pub tenant_id: String,
            pub meter: String,
            pub $bucket: $bucket_ty,
            pub events: u64,
            pub billable_events: u64,
            pub units: i64,
            pub billable_units: i64,
            pub kafka_topic: String,
            pub kafka_partition: u32,
            /// The last offset of the batch range this row sums.
            pub kafka_offset: u64,
        }
    };
}

meter_rollup_row!(
    /// One `usage_meter_minute` row: a tenant's units of one meter in one minute, from one batch.
    MeterMinuteRow, minute, u32
);
meter_rollup_row!(
    /// One `usage_meter_hour` row.
    MeterHourRow, hour, u32
);
meter_rollup_row!(
    /// One `usage_meter_day` row (`day` is a ClickHouse `Date`: days since the epoch).
    MeterDayRow, day, u16
);

/// One `usage_minutes_touched` row: a minute some event of one batch fell in, stamped with
/// the batch's partition and last offset (`inserted_at` is the server's default).
#[derive(Debug, Clone, PartialEq, Serialize, clickhouse::Row)]
pub struct MinuteTouchedRow {
    pub minute: u32,
    pub kafka_topic: String,
    pub kafka_partition: u32,
    pub kafka_offset: u64,
}

/// One `usage_route_day` row: a tenant's traffic on one route in one day, from one batch.
#[derive(Debug, Clone, PartialEq, Serialize, clickhouse::Row)]
pub struct RouteDayRow {
    pub tenant_id: String,
    pub route: String,
    pub day: u16,
    pub events: u64,
    pub billable_events: u64,
    pub server_errors: u64,
    pub rate_limited: u64,
    pub request_bytes: i64,
    pub response_bytes: i64,
    pub latency_ms_sum: i64,
    pub kafka_topic: String,
    pub kafka_partition: u32,
    pub kafka_offset: u64,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tollgate_schemas::UsageEvent;

    use super::*;

    fn event(timestamp_ms: i64) -> UsageEvent {
        UsageEvent {
            event_id: uuid::Uuid::now_v7(),
            timestamp_ms,
            tenant_id: None,
            consumer: None,
            key_id: None,
            plan: None,
            route: String::new(),
            method: "GET".to_owned(),
            status: 401,
            outcome: Outcome::Unauthenticated,
            billable: false,
            units: BTreeMap::from([("requests".to_owned(), 1)]),
            request_bytes: 0,
            response_bytes: 10,
            latency_ms: 1,
            upstream_latency_ms: None,
            gateway_id: "gw".to_owned(),
            request_id: None,
        }
    }

    #[test]
    fn unauthenticated_event_becomes_a_row_with_empty_identity() {
        let row = UsageRow::from_event(
            &(&event(1_795_000_000_123)).into(),
            &"t".into(),
            Origin {
                partition: 2,
                offset: 9,
            },
        )
        .unwrap();
        assert_eq!((row.time, row.time_ms), (1_795_000_000, 123));
        assert_eq!(row.tenant_id, "");
        assert_eq!(row.upstream_latency_ms, -1);
        assert_eq!(row.outcome, "UNAUTHENTICATED");
        assert_eq!((row.kafka_partition, row.kafka_offset), (2, 9));
        assert_eq!(row.time_millis(), 1_795_000_000_123);
    }

    #[test]
    fn times_outside_datetime_are_refused() {
        let origin = Origin {
            partition: 0,
            offset: 0,
        };
        assert_eq!(
            UsageRow::from_event(&(&event(-1)).into(), &"t".into(), origin).unwrap_err(),
            RowError::TimeOutOfRange(-1)
        );
        assert!(UsageRow::from_event(&(&event(5_000_000_000_000)).into(), &"t".into(), origin).is_err());
    }

    #[test]
    fn month_is_utc_yyyymm() {
        assert_eq!(month_of(0), 197001);
        // 2026-11-30T23:59:59Z and one second later.
        assert_eq!(month_of(1_796_083_199), 202611);
        assert_eq!(month_of(1_796_083_200), 202612);
    }
}
