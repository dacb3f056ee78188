//! Which window length applies when: a changed `billing.window_secs` never re-bills.
//!
//! In: `billing.window_secs`, the `billing_window_lengths` table (each length and the time
//! it applies from) and the ledger's windows. Out: a [`Schedule`] the pass and `reconcile`
//! cut time into windows with, or a refusal to start that names the ledger's lengths and the
//! setting.
//!
//! Why: the ledger accounts for usage per window. Read with another length, its windows no
//! longer line up with the new ones, and usage it already pushed looks unaccounted for (an
//! hour pushed whole would be pushed again as its second half hour). So a length applies
//! only from a time: a new setting from the first boundary of the new length at or after the
//! end of the last closed window (and of the ledger's last window); windows before it keep
//! the length they were billed with. The window that straddles the switch, if the lengths do
//! not divide each other, ends at the switch.

use clickhouse::Client;
use serde::{Deserialize, Serialize};

use crate::ledger::next_row_version;
use crate::window::Window;

pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS billing_window_lengths (
        effective_from DateTime,
        window_secs UInt32,
        recorded_at DateTime,
        row_version UInt64
    ) ENGINE = MergeTree ORDER BY row_version";

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("billing window lengths: {0}")]
    Query(clickhouse::error::Error),
    #[error(
        "billing_ledger holds windows of {found} s with no record of when the length changed; \
         billing.window_secs = {setting} cannot be reconciled with it"
    )]
    MixedLegacyLedger { found: String, setting: u64 },
    #[error(
        "billing_ledger window {start}..{end} ({len} s) is not a window of the recorded lengths \
         (billing.window_secs = {setting}, recorded: {recorded}); refusing to bill it again"
    )]
    Inconsistent {
        start: u32,
        end: u32,
        len: u32,
        setting: u64,
        recorded: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, clickhouse::Row)]
struct LengthRow {
    effective_from: u32,
    window_secs: u32,
    recorded_at: u32,
    row_version: u64,
}

/// One length, from `from` until the next segment's `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub from: u32,
    pub window_secs: u32,
}

/// The window lengths over time; the first segment starts at 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    segments: Vec<Segment>,
}

impl Schedule {
    /// One length for all time (a ledger that never changed length).
    pub fn fixed(window_secs: u64) -> Self {
        Self {
            segments: vec![Segment {
                from: 0,
                window_secs: window_secs as u32,
            }],
        }
    }

    /// Applies recorded changes in the order they were recorded: each replaces whatever was
    /// scheduled from its time on (a change still pending when the setting changed again).
    pub fn from_changes(changes: impl IntoIterator<Item = Segment>) -> Self {
        let mut segments: Vec<Segment> = Vec::new();
        for change in changes {
            segments.retain(|s| s.from < change.from);
            segments.push(change);
        }
        if segments.first().is_none_or(|s| s.from != 0) {
            // Before the first recorded time, the first length.
            let first = segments.first().map_or(3_600, |s| s.window_secs);
            segments.insert(
                0,
                Segment {
                    from: 0,
                    window_secs: first,
                },
            );
        }
        Self { segments }
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The length in force from the last change on.
    pub fn current_secs(&self) -> u32 {
        self.segments.last().map_or(0, |s| s.window_secs)
    }

    fn segment_index(&self, t: u32) -> usize {
        self.segments.iter().rposition(|s| s.from <= t).unwrap_or(0)
    }

    /// The window holding `t`.
    pub fn window_at(&self, t: u32) -> Window {
        let i = self.segment_index(t);
        let seg = self.segments[i];
        let len = seg.window_secs;
        let start = (t / len * len).max(seg.from);
        let mut end = start + len;
        if let Some(next) = self.segments.get(i + 1) {
            end = end.min(next.from);
        }
        Window { start, end }
    }

    /// End of the last window closed at `now` (its end plus `lateness` has passed): the
    /// start of the window holding `now - lateness`.
    pub fn closed_until(&self, now: i64, lateness_secs: u64) -> u32 {
        let t = (now - lateness_secs as i64).max(0) as u32;
        self.window_at(t).start
    }

    /// The spans of `[from, to)` with one length each, for per-window queries.
    pub fn spans(&self, from: u32, to: u32) -> Vec<(u32, u32, u32)> {
        let mut out = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            let seg_end = self.segments.get(i + 1).map_or(u32::MAX, |n| n.from);
            let (a, b) = (from.max(seg.from), to.min(seg_end));
            if a < b {
                out.push((a, b, seg.window_secs));
            }
        }
        out
    }

    fn describe(&self) -> String {
        self.segments
            .iter()
            .map(|s| format!("{} s from {}", s.window_secs, s.from))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The first multiple of `len` at or after `t`.
fn align_up(t: u32, len: u32) -> u32 {
    t.div_ceil(len) * len
}

/// The recorded lengths, read only (`reconcile`); `window_secs` when none is recorded.
pub async fn load(client: &Client, window_secs: u64) -> Result<Schedule, ScheduleError> {
    let rows: Vec<LengthRow> = client
        .query("SELECT ?fields FROM billing_window_lengths ORDER BY row_version")
        .fetch_all()
        .await
        .map_err(ScheduleError::Query)?;
    if rows.is_empty() {
        return Ok(Schedule::fixed(window_secs));
    }
    Ok(Schedule::from_changes(rows.iter().map(|r| Segment {
        from: r.effective_from,
        window_secs: r.window_secs,
    })))
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct LedgerWindow {
    window_start: u32,
    window_end: u32,
}

/// Reads the recorded lengths, checks the ledger against them, and records the setting when
/// it changed (see the module docs). Runs at start, before any pass.
pub async fn establish(
    client: &Client,
    window_secs: u64,
    lateness_secs: u64,
    now: i64,
) -> Result<Schedule, ScheduleError> {
    let rows: Vec<LengthRow> = client
        .query("SELECT ?fields FROM billing_window_lengths ORDER BY row_version")
        .fetch_all()
        .await
        .map_err(ScheduleError::Query)?;
    let windows: Vec<LedgerWindow> = client
        .query(
            "SELECT toUInt32(window_start) AS s, toUInt32(window_end) AS e FROM billing_ledger \
             GROUP BY s, e ORDER BY s",
        )
        .fetch_all()
        .await
        .map_err(ScheduleError::Query)?;
    let mut schedule = if rows.is_empty() {
        let mut lengths: Vec<u32> = windows.iter().map(|w| w.window_end - w.window_start).collect();
        lengths.sort_unstable();
        lengths.dedup();
        let len = match lengths.as_slice() {
            [] => window_secs as u32,
            [one] => *one,
            many => {
                return Err(ScheduleError::MixedLegacyLedger {
                    found: many.iter().map(u32::to_string).collect::<Vec<_>>().join(" s and "),
                    setting: window_secs,
                })
            }
        };
        Schedule::fixed(u64::from(len))
    } else {
        Schedule::from_changes(rows.iter().map(|r| Segment {
            from: r.effective_from,
            window_secs: r.window_secs,
        }))
    };
    for w in &windows {
        if schedule.window_at(w.window_start)
            != (Window {
                start: w.window_start,
                end: w.window_end,
            })
        {
            return Err(ScheduleError::Inconsistent {
                start: w.window_start,
                end: w.window_end,
                len: w.window_end - w.window_start,
                setting: window_secs,
                recorded: schedule.describe(),
            });
        }
    }
    let mut record = Vec::new();
    if rows.is_empty() {
        record.push(schedule.segments()[0]);
    }
    if u64::from(schedule.current_secs()) != window_secs {
        let last_ledger_end = windows.iter().map(|w| w.window_end).max().unwrap_or(0);
        let closed = schedule.closed_until(now, lateness_secs);
        let switch = Segment {
            from: align_up(closed.max(last_ledger_end), window_secs as u32),
            window_secs: window_secs as u32,
        };
        tracing::info!(
            from_secs = schedule.current_secs(),
            to_secs = window_secs,
            at = switch.from,
            "billing window length changes at the first boundary after the last closed window"
        );
        let mut changes: Vec<Segment> = schedule.segments().to_vec();
        changes.push(switch);
        schedule = Schedule::from_changes(changes);
        record.push(switch);
    }
    if !record.is_empty() {
        let mut insert = client
            .insert::<LengthRow>("billing_window_lengths")
            .await
            .map_err(ScheduleError::Query)?;
        for seg in record {
            insert
                .write(&LengthRow {
                    effective_from: seg.from,
                    window_secs: seg.window_secs,
                    recorded_at: now as u32,
                    row_version: next_row_version(),
                })
                .await
                .map_err(ScheduleError::Query)?;
        }
        insert.end().await.map_err(ScheduleError::Query)?;
    }
    Ok(schedule)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u32 = 3_600;

    #[test]
    fn windows_keep_their_length_before_a_change_and_the_straddling_one_ends_at_it() {
        let s = Schedule::from_changes([
            Segment {
                from: 0,
                window_secs: 1_200,
            },
            Segment {
                from: 100 * H + 1_800,
                window_secs: 900,
            },
        ]);
        assert_eq!(
            s.window_at(100 * H + 100),
            Window {
                start: 100 * H,
                end: 100 * H + 1_200
            }
        );
        // 1200 does not divide the switch: the window holding it ends there.
        assert_eq!(
            s.window_at(100 * H + 1_300),
            Window {
                start: 100 * H + 1_200,
                end: 100 * H + 1_800
            }
        );
        assert_eq!(
            s.window_at(100 * H + 1_800),
            Window {
                start: 100 * H + 1_800,
                end: 100 * H + 2_700
            }
        );
        assert_eq!(
            s.spans(99 * H, 101 * H),
            vec![(99 * H, 100 * H + 1_800, 1_200), (100 * H + 1_800, 101 * H, 900)]
        );
    }

    #[test]
    fn a_later_change_replaces_one_still_pending() {
        let s = Schedule::from_changes([
            Segment {
                from: 0,
                window_secs: H,
            },
            Segment {
                from: 10 * H,
                window_secs: 1_800,
            },
            Segment {
                from: 9 * H,
                window_secs: 900,
            },
        ]);
        assert_eq!(s.segments().len(), 2);
        assert_eq!(s.current_secs(), 900);
    }

    #[test]
    fn closed_until_is_the_start_of_the_window_still_open() {
        let s = Schedule::fixed(3_600);
        let hour = 500_000 * H;
        assert_eq!(s.closed_until(i64::from(hour) + 299, 300), hour - H);
        assert_eq!(s.closed_until(i64::from(hour) + 300, 300), hour);
        assert_eq!(align_up(hour + 1, 1_800), hour + 1_800);
        assert_eq!(align_up(hour, 1_800), hour);
    }
}
