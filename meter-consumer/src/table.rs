//! The tables the consumer writes, each with its own watermark, and a map keyed by them.
//!
//! In: nothing (pure types). Out: [`Table`], [`PerTable`] (one value per table, indexed by
//! the table, not by an integer cast) and [`Watermarks`], used by the sink, the partition
//! workers, the Kafka thread and the metrics, none of which then depends on another for them.

use std::ops::{Index, IndexMut};

/// The tables a batch is written to, each with its own watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Raw,
    MeterMinute,
    MeterHour,
    MeterDay,
    RouteDay,
    /// The minutes each batch touched, for billing-sync to find changed windows.
    MinutesTouched,
}

impl Table {
    pub const COUNT: usize = 6;
    pub const ALL: [Table; Table::COUNT] = [
        Table::Raw,
        Table::MeterMinute,
        Table::MeterHour,
        Table::MeterDay,
        Table::RouteDay,
        Table::MinutesTouched,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Table::Raw => "usage_events",
            Table::MeterMinute => "usage_meter_minute",
            Table::MeterHour => "usage_meter_hour",
            Table::MeterDay => "usage_meter_day",
            Table::RouteDay => "usage_route_day",
            Table::MinutesTouched => "usage_minutes_touched",
        }
    }

    /// Position in [`Table::ALL`]; also the tag a watermark query returns for the table.
    pub const fn position(self) -> usize {
        match self {
            Table::Raw => 0,
            Table::MeterMinute => 1,
            Table::MeterHour => 2,
            Table::MeterDay => 3,
            Table::RouteDay => 4,
            Table::MinutesTouched => 5,
        }
    }
}

/// One `T` per table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerTable<T>([T; Table::COUNT]);

impl<T> PerTable<T> {
    pub fn from_fn(mut f: impl FnMut(Table) -> T) -> Self {
        Self(Table::ALL.map(&mut f))
    }

    pub fn iter(&self) -> impl Iterator<Item = (Table, &T)> {
        Table::ALL.into_iter().zip(self.0.iter())
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.0.iter_mut()
    }
}

impl<T> Index<Table> for PerTable<T> {
    type Output = T;
    fn index(&self, table: Table) -> &T {
        &self.0[table.position()]
    }
}

impl<T> IndexMut<Table> for PerTable<T> {
    fn index_mut(&mut self, table: Table) -> &mut T {
        &mut self.0[table.position()]
    }
}

/// Per table: the highest offset of the partition stored, `None` when no row of it is.
pub type Watermarks = PerTable<Option<i64>>;

impl Watermarks {
    pub fn empty() -> Self {
        Self::from_fn(|_| None)
    }

    /// The first offset some table of the partition lacks; `None` when a table holds nothing
    /// of it yet (start from the beginning of the partition).
    pub fn resume_offset(&self) -> Option<i64> {
        self.iter()
            .map(|(_, mark)| mark.map(|o| o + 1))
            .collect::<Option<Vec<i64>>>()
            .and_then(|next| next.into_iter().min())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_all() {
        for (i, t) in Table::ALL.iter().enumerate() {
            assert_eq!(t.position(), i);
        }
    }

    #[test]
    fn resumes_after_the_lowest_watermark_or_from_the_beginning() {
        let mut w = Watermarks::from_fn(|_| Some(10));
        w[Table::MeterMinute] = Some(7);
        w[Table::RouteDay] = Some(9);
        assert_eq!(w.resume_offset(), Some(8));
        w[Table::RouteDay] = None;
        assert_eq!(w.resume_offset(), None);
        assert_eq!(Watermarks::empty().resume_offset(), None);
    }
}
