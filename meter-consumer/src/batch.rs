//! Per-partition batches and the rollups computed from them.
//!
//! In: rows of one Kafka partition, in offset order. Out: [`Batch`]es, each a contiguous
//! offset range inside one UTC month (so its insert lands in one ClickHouse partition, as one
//! part, atomically), sealed when full, when old enough, or when the month changes; and, for
//! any tail of a batch, the rollup rows summing it per tenant × meter × minute, hour, day and
//! tenant × route × day, and the minutes it touched.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::rows::{MeterDayRow, MeterHourRow, MeterMinuteRow, MinuteTouchedRow, RouteDayRow, UsageRow};

/// Rows of one partition, ascending by offset, all in one month.
#[derive(Debug)]
pub struct Batch {
    pub rows: Vec<UsageRow>,
    pub month: u32,
    pub opened: Instant,
}

impl Batch {
    pub fn last_offset(&self) -> i64 {
        self.rows.last().map_or(-1, UsageRow::offset)
    }
}

/// Collects rows into batches bounded by size, age and month.
pub struct BatchBuilder {
    max_rows: usize,
    max_wait: Duration,
    open: Option<Batch>,
}

impl BatchBuilder {
    pub fn new(max_rows: usize, max_wait: Duration) -> Self {
        Self {
            max_rows,
            max_wait,
            open: None,
        }
    }

    /// Adds a row. Returns the previous batch, sealed, when the row's month differs from it:
    /// one insert must not span two ClickHouse partitions.
    pub fn push(&mut self, row: UsageRow) -> Option<Batch> {
        let month = row.month();
        let sealed = match &self.open {
            Some(open) if open.month != month => self.open.take(),
            _ => None,
        };
        let open = self.open.get_or_insert_with(|| Batch {
            rows: Vec::with_capacity(self.max_rows.min(4096)),
            month,
            opened: Instant::now(),
        });
        open.rows.push(row);
        sealed
    }

    pub fn is_full(&self) -> bool {
        self.open.as_ref().is_some_and(|b| b.rows.len() >= self.max_rows)
    }

    /// When the open batch must be written, however small it is.
    pub fn deadline(&self) -> Option<Instant> {
        self.open.as_ref().map(|b| b.opened + self.max_wait)
    }

    pub fn take(&mut self) -> Option<Batch> {
        self.open.take()
    }
}

/// Per (tenant, meter, bucket): events, billable events, units, billable units. The keys
/// borrow from the rows: text is copied once per rollup row, not once per event.
type MeterSums<'a> = BTreeMap<(&'a str, &'a str, u32), [i64; 4]>;

fn meter_sums(rows: &[UsageRow], bucket: impl Fn(u32) -> u32) -> MeterSums<'_> {
    let mut sums = MeterSums::new();
    for row in rows {
        let billable = i64::from(row.billable);
        for (meter, value) in row.units_meter.iter().zip(&row.units_value) {
            let entry = sums
                .entry((row.tenant_id.as_str(), meter.as_str(), bucket(row.time)))
                .or_default();
            entry[0] += 1;
            entry[1] += billable;
            entry[2] += value;
            entry[3] += billable * value;
        }
    }
    sums
}

/// The batch-level columns every rollup row carries: its own watermark.
struct Stamp<'a> {
    topic: &'a str,
    partition: u32,
    last_offset: u64,
}

fn stamp<'a>(topic: &'a str, rows: &[UsageRow]) -> Option<Stamp<'a>> {
    let last = rows.last()?;
    Some(Stamp {
        topic,
        partition: last.kafka_partition,
        last_offset: last.kafka_offset,
    })
}

macro_rules! meter_rollup_fn {
    ($(#[$doc:meta])* $fn_name:ident, $row:ident, $bucket:ident, $to_bucket:expr, $convert:expr) => {
        $(#[$doc])*
        pub fn $fn_name(topic: &str, rows: &[UsageRow]) -> Vec<$row> {
            let Some(stamp) = stamp(topic, rows) else { return Vec::new() };
            meter_sums(rows, $to_bucket)
                .into_iter()
                .map(|((tenant_id, meter, bucket), [events, billable_events, units, billable_units])| $row {
                    tenant_id: tenant_id.to_owned(),
                    meter: meter.to_owned(),
                    $bucket: $convert(bucket),
                    events: events as u64,
                    billable_events: billable_events as u64,
                    units,
                    billable_units,
                    kafka_topic: stamp.topic.to_owned(),
                    kafka_partition: stamp.partition,
                    kafka_offset: stamp.last_offset,
                })
                .collect()
        }
    };
}

meter_rollup_fn!(
    /// Rows for `usage_meter_minute` summing `rows` (a contiguous tail of one batch).
    meter_minute, MeterMinuteRow, minute, |t: u32| t - t % 60, |b: u32| b
);
meter_rollup_fn!(
    /// Rows for `usage_meter_hour`.
    meter_hour, MeterHourRow, hour, |t: u32| t - t % 3600, |b: u32| b
);
meter_rollup_fn!(
    /// Rows for `usage_meter_day` (`day`: days since the epoch, a ClickHouse `Date`).
    meter_day, MeterDayRow, day, |t: u32| t / 86_400, |b: u32| b as u16
);

/// Rows for `usage_minutes_touched`: each distinct minute of `rows`, once.
pub fn minutes_touched(topic: &str, rows: &[UsageRow]) -> Vec<MinuteTouchedRow> {
    let Some(stamp) = stamp(topic, rows) else {
        return Vec::new();
    };
    let minutes: std::collections::BTreeSet<u32> = rows.iter().map(|r| r.time - r.time % 60).collect();
    minutes
        .into_iter()
        .map(|minute| MinuteTouchedRow {
            minute,
            kafka_topic: stamp.topic.to_owned(),
            kafka_partition: stamp.partition,
            kafka_offset: stamp.last_offset,
        })
        .collect()
}

/// Rows for `usage_route_day` summing `rows`.
pub fn route_day(topic: &str, rows: &[UsageRow]) -> Vec<RouteDayRow> {
    let Some(stamp) = stamp(topic, rows) else {
        return Vec::new();
    };
    let mut sums: BTreeMap<(&str, &str, u16), [i64; 7]> = BTreeMap::new();
    for row in rows {
        let day = (row.time / 86_400) as u16;
        let entry = sums
            .entry((row.tenant_id.as_str(), row.route.as_str(), day))
            .or_default();
        entry[0] += 1;
        entry[1] += i64::from(row.billable);
        entry[2] += i64::from(row.status >= 500);
        entry[3] += i64::from(row.rate_limited());
        entry[4] += row.request_bytes;
        entry[5] += row.response_bytes;
        entry[6] += row.latency_ms;
    }
    sums.into_iter()
        .map(|((tenant_id, route, day), s)| RouteDayRow {
            tenant_id: tenant_id.to_owned(),
            route: route.to_owned(),
            day,
            events: s[0] as u64,
            billable_events: s[1] as u64,
            server_errors: s[2] as u64,
            rate_limited: s[3] as u64,
            request_bytes: s[4],
            response_bytes: s[5],
            latency_ms_sum: s[6],
            kafka_topic: stamp.topic.to_owned(),
            kafka_partition: stamp.partition,
            kafka_offset: stamp.last_offset,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn row(offset: i64, time: u32, tenant: &str, units: &[(&str, i64)], billable: bool) -> UsageRow {
        UsageRow {
            event_id: format!("e{offset}"),
            time,
            time_ms: 0,
            tenant_id: tenant.to_owned(),
            consumer: String::new(),
            key_id: String::new(),
            plan: String::new(),
            route: format!("r{}", offset % 3),
            method: "GET".to_owned(),
            status: 200,
            outcome: "ALLOWED",
            billable: u8::from(billable),
            units_meter: units.iter().map(|(m, _)| (*m).to_owned()).collect(),
            units_value: units.iter().map(|(_, v)| *v).collect(),
            request_bytes: 1,
            response_bytes: 2,
            latency_ms: 3,
            upstream_latency_ms: -1,
            gateway_id: String::new(),
            request_id: String::new(),
            kafka_partition: 1,
            kafka_offset: offset as u64,
            kafka_topic: "t".into(),
        }
    }

    /// 2026-11-30T23:59:00Z: a minute before a month boundary.
    const NEAR_MONTH_END: u32 = 1_796_083_140;

    #[test]
    fn a_month_change_seals_the_batch() {
        let mut builder = BatchBuilder::new(100, Duration::from_secs(1));
        assert!(builder.push(row(0, NEAR_MONTH_END, "a", &[], true)).is_none());
        assert!(builder.push(row(1, NEAR_MONTH_END + 59, "a", &[], true)).is_none());
        let sealed = builder
            .push(row(2, NEAR_MONTH_END + 60, "a", &[], true))
            .expect("sealed");
        assert_eq!(sealed.rows.len(), 2);
        assert_eq!(sealed.month, 202611);
        assert_eq!(builder.take().unwrap().month, 202612);
    }

    #[test]
    fn full_at_max_rows() {
        let mut builder = BatchBuilder::new(2, Duration::from_secs(1));
        builder.push(row(0, 0, "a", &[], true));
        assert!(!builder.is_full());
        builder.push(row(1, 0, "a", &[], true));
        assert!(builder.is_full());
        assert_eq!(builder.take().unwrap().last_offset(), 1);
        assert!(builder.deadline().is_none());
    }

    #[test]
    fn rollup_rows_carry_the_last_offset_and_split_billable() {
        let rows = vec![
            row(7, 120, "a", &[("requests", 1), ("cu", 5)], true),
            row(8, 150, "a", &[("requests", 1)], false),
            row(9, 3600, "b", &[("requests", 1)], true),
        ];
        let minute = meter_minute("t", &rows);
        assert!(minute.iter().all(|r| r.kafka_offset == 9 && r.kafka_partition == 1));
        let a_requests = minute
            .iter()
            .find(|r| r.tenant_id == "a" && r.meter == "requests")
            .unwrap();
        assert_eq!(
            (
                a_requests.minute,
                a_requests.events,
                a_requests.units,
                a_requests.billable_units
            ),
            (120, 2, 2, 1)
        );
        assert_eq!(meter_hour("t", &rows).len(), 3);
        assert_eq!(meter_day("t", &rows).len(), 3);
        let routes = route_day("t", &rows);
        assert_eq!(routes.iter().map(|r| r.events).sum::<u64>(), 3);
        assert!(meter_minute("t", &[]).is_empty());
        let touched = minutes_touched("t", &rows);
        assert_eq!(touched.iter().map(|r| r.minute).collect::<Vec<_>>(), [120, 3600]);
        assert!(touched.iter().all(|r| r.kafka_offset == 9));
    }

    fn arb_rows() -> impl Strategy<Value = Vec<UsageRow>> {
        prop::collection::vec(
            (
                0u32..4_000_000_000,
                0usize..3,
                prop::collection::vec((0usize..3, -1_000i64..1_000_000), 0..4),
                any::<bool>(),
            ),
            0..200,
        )
        .prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (time, tenant, units, billable))| {
                    let units: Vec<(&str, i64)> = units
                        .into_iter()
                        .map(|(m, v)| (["requests", "cu", "bytes"][m], v))
                        .collect();
                    row(i as i64, time, ["a", "b", ""][tenant], &units, billable)
                })
                .collect()
        })
    }

    fn raw_totals(rows: &[UsageRow]) -> HashMap<(String, String), (i64, i64)> {
        let mut totals = HashMap::new();
        for r in rows {
            for (m, v) in r.units_meter.iter().zip(&r.units_value) {
                let t: &mut (i64, i64) = totals.entry((r.tenant_id.clone(), m.clone())).or_default();
                t.0 += v;
                t.1 += i64::from(r.billable) * v;
            }
        }
        totals
    }

    proptest! {
        /// Sums in equal sums out, per tenant and meter, in every rollup, however the rows
        /// are split into batches.
        #[test]
        fn rollups_preserve_totals(rows in arb_rows(), cut in 0usize..200) {
            let cut = cut.min(rows.len());
            let (head, tail) = rows.split_at(cut);
            let expected = raw_totals(&rows);
            let mut minute = HashMap::<(String, String), (i64, i64)>::new();
            let mut day = HashMap::<(String, String), (i64, i64)>::new();
            for part in [head, tail] {
                for r in meter_minute("t", part) {
                    let t = minute.entry((r.tenant_id, r.meter)).or_default();
                    t.0 += r.units;
                    t.1 += r.billable_units;
                }
                for r in meter_day("t", part) {
                    let t = day.entry((r.tenant_id, r.meter)).or_default();
                    t.0 += r.units;
                    t.1 += r.billable_units;
                }
            }
            prop_assert_eq!(&minute, &expected);
            prop_assert_eq!(&day, &expected);
            let hour_units: i64 = meter_hour("t", &rows).iter().map(|r| r.units).sum();
            prop_assert_eq!(hour_units, expected.values().map(|t| t.0).sum::<i64>());
            let route_events: u64 = route_day("t", &rows).iter().map(|r| r.events).sum();
            prop_assert_eq!(route_events, rows.len() as u64);
        }

        /// Batches keep every row, in order, and never mix months.
        #[test]
        fn batches_keep_order_and_months(rows in arb_rows(), max_rows in 1usize..50) {
            let mut builder = BatchBuilder::new(max_rows, Duration::from_secs(60));
            let mut batches = Vec::new();
            for r in rows.clone() {
                batches.extend(builder.push(r));
                if builder.is_full() {
                    batches.extend(builder.take());
                }
            }
            batches.extend(builder.take());
            let mut seen = Vec::new();
            for b in &batches {
                prop_assert!(!b.rows.is_empty() && b.rows.len() <= max_rows);
                prop_assert!(b.rows.iter().all(|r| r.month() == b.month));
                seen.extend(b.rows.iter().map(UsageRow::offset));
            }
            prop_assert_eq!(seen, rows.iter().map(UsageRow::offset).collect::<Vec<_>>());
        }
    }
}
