//! The event spool: an append-only, checksummed log of encoded usage events on local disk.
//!
//! In: encoded events from the writer task ([`SpoolWriter::append`]). Out: the same events, in
//! order, to the shipper ([`SpoolReader::read_batch`]), which marks how far Kafka has them
//! ([`SpoolReader::commit`]); fully shipped segments are deleted.
//!
//! Every event passes through the spool (a write-ahead log) rather than only during an
//! outage: the shipper never gives an event up, so there is no moment when an event is
//! neither in Kafka nor on disk, and replay after an outage or a restart is the normal path.
//!
//! On disk: segments `<dir>/<20-digit number>.spool`, each a run of records
//! `MAGIC (4) | len (u32 LE) | crc32 of payload (u32 LE) | payload`, and `<dir>/position`
//! (segment and byte offset of the first record Kafka does not have yet), replaced
//! atomically. A crash mid-write leaves a short last record: it is cut off at open, with one
//! log line. A damaged record elsewhere is skipped (the reader scans for the next magic whose
//! checksum holds) and counted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const MAGIC: [u8; 4] = *b"TGe1";
const HEADER: usize = 12;
/// A record larger than this is damage, not an event (events are a few hundred bytes).
const MAX_RECORD: u32 = 1 << 20;

/// Where a record starts: segment number and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

/// What the writer has made durable so far, shared with the reader.
#[derive(Debug, Default)]
pub struct Watermark {
    segment: AtomicU64,
    offset: AtomicU64,
    /// Bytes written and not yet shipped, for the size cap.
    pub pending_bytes: AtomicU64,
}

impl Watermark {
    fn get(&self) -> Position {
        // Offset first: a reader seeing a new segment with an old offset only reads less.
        let offset = self.offset.load(Ordering::Acquire);
        Position {
            segment: self.segment.load(Ordering::Acquire),
            offset,
        }
    }

    fn set(&self, p: Position) {
        self.segment.store(p.segment, Ordering::Release);
        self.offset.store(p.offset, Ordering::Release);
    }
}

/// This spool's identity: a random id written when the spool is first used, so a position
/// recorded elsewhere (in Kafka) is applied only to the spool it was recorded for, never to a
/// new spool in a wiped directory whose segment numbers start again.
pub fn epoch(dir: &Path) -> io::Result<String> {
    fs::create_dir_all(dir)?;
    let path = dir.join("epoch");
    match fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(e.to_string()))?;
    let epoch: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join("epoch.tmp");
    fs::write(&tmp, format!("{epoch}\n"))?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, &path)?;
    Ok(epoch)
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:020}.spool"))
}

fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut found: Vec<u64> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".spool")?.parse().ok())
        .collect();
    found.sort_unstable();
    Ok(found)
}

fn read_position(dir: &Path) -> Position {
    fs::read_to_string(dir.join("position"))
        .ok()
        .and_then(|s| {
            let (seg, off) = s.trim().split_once(' ')?;
            Some(Position {
                segment: seg.parse().ok()?,
                offset: off.parse().ok()?,
            })
        })
        .unwrap_or_default()
}

/// Scans `bytes` for whole, intact records from the start; returns the records' payload
/// ranges, the end of the last intact record, and how many damaged stretches lay between
/// intact records (damage after the last one is a cut-short tail, not counted here).
fn scan(bytes: &[u8]) -> (Vec<std::ops::Range<usize>>, usize, u64) {
    let mut records = Vec::new();
    let (mut at, mut end, mut skipped, mut in_damage) = (0, 0, 0, false);
    while at + HEADER <= bytes.len() {
        let field = |from: usize| u32::from_le_bytes(bytes[from..from + 4].try_into().expect("4 bytes"));
        let len = field(at + 4) as usize;
        let intact = bytes[at..at + 4] == MAGIC
            && len <= MAX_RECORD as usize
            && at + HEADER + len <= bytes.len()
            && crc32fast::hash(&bytes[at + HEADER..at + HEADER + len]) == field(at + 8);
        if intact {
            if in_damage {
                skipped += 1;
                in_damage = false;
            }
            records.push(at + HEADER..at + HEADER + len);
            at += HEADER + len;
            end = at;
        } else {
            in_damage = true;
            at += 1;
        }
    }
    (records, end, skipped)
}

pub struct SpoolWriter {
    dir: PathBuf,
    segment: u64,
    offset: u64,
    file: BufWriter<File>,
    segment_bytes: u64,
    watermark: Arc<Watermark>,
}

/// What opening a spool found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes cut off the end of the last segment (a record cut short by a crash).
    pub truncated_bytes: u64,
    /// Records waiting to be shipped.
    pub pending_records: u64,
}

/// Opens (or creates) the spool in `dir`, repairing a cut-short tail.
pub fn open(dir: &Path, segment_bytes: u64) -> io::Result<(SpoolWriter, SpoolReader, Recovery)> {
    fs::create_dir_all(dir)?;
    let position = read_position(dir);
    let existing = segments(dir)?;
    let mut recovery = Recovery::default();
    let mut pending_bytes = 0;
    for segment in &existing {
        if *segment < position.segment {
            // Shipped but not yet deleted when the process stopped.
            let _ = fs::remove_file(segment_path(dir, *segment));
            continue;
        }
        let bytes = fs::read(segment_path(dir, *segment))?;
        let (records, end, _) = scan(&bytes);
        let from = if *segment == position.segment {
            position.offset as usize
        } else {
            0
        };
        recovery.pending_records += records.iter().filter(|r| r.start >= from + HEADER).count() as u64;
        pending_bytes += (end.saturating_sub(from)) as u64;
        if Some(segment) == existing.last() && end < bytes.len() {
            recovery.truncated_bytes = (bytes.len() - end) as u64;
            OpenOptions::new()
                .write(true)
                .open(segment_path(dir, *segment))?
                .set_len(end as u64)?;
        }
    }
    // Appends always start a fresh segment: the previous run's last one is never reopened for
    // writing, so a damaged tail can only ever be at the end of a file.
    let segment = existing
        .last()
        .map_or(position.segment.max(1), |s| s + 1)
        .max(position.segment);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, segment))?;
    let watermark = Arc::new(Watermark::default());
    watermark.set(Position { segment, offset: 0 });
    watermark.pending_bytes.store(pending_bytes, Ordering::Release);
    let writer = SpoolWriter {
        dir: dir.to_owned(),
        segment,
        offset: 0,
        file: BufWriter::with_capacity(256 * 1024, file),
        segment_bytes,
        watermark: Arc::clone(&watermark),
    };
    let start = if existing.iter().any(|s| *s >= position.segment) {
        position
    } else {
        Position { segment, offset: 0 }
    };
    let reader = SpoolReader {
        dir: dir.to_owned(),
        position: start,
        watermark,
        skipped: 0,
    };
    Ok((writer, reader, recovery))
}

impl SpoolWriter {
    /// Appends one record (buffered; durable after [`SpoolWriter::flush`]).
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        if self.offset >= self.segment_bytes {
            self.rotate()?;
        }
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_RECORD)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))?;
        self.file.write_all(&MAGIC)?;
        self.file.write_all(&len.to_le_bytes())?;
        self.file.write_all(&crc32fast::hash(payload).to_le_bytes())?;
        self.file.write_all(payload)?;
        self.offset += (HEADER + payload.len()) as u64;
        self.watermark
            .pending_bytes
            .fetch_add((HEADER + payload.len()) as u64, Ordering::AcqRel);
        Ok(())
    }

    /// Writes buffered records out (and to stable storage with `sync`), then lets the reader
    /// see them.
    pub fn flush(&mut self, sync: bool) -> io::Result<()> {
        self.file.flush()?;
        if sync {
            self.file.get_ref().sync_data()?;
        }
        self.watermark.set(Position {
            segment: self.segment,
            offset: self.offset,
        });
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.flush(true)?;
        self.segment += 1;
        self.offset = 0;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(&self.dir, self.segment))?;
        self.file = BufWriter::with_capacity(256 * 1024, file);
        self.watermark.set(Position {
            segment: self.segment,
            offset: 0,
        });
        Ok(())
    }

    pub fn watermark(&self) -> &Arc<Watermark> {
        &self.watermark
    }
}

pub struct SpoolReader {
    dir: PathBuf,
    position: Position,
    watermark: Arc<Watermark>,
    skipped: u64,
}

/// Records read from the spool, and where the next read starts once they are shipped.
pub struct Batch {
    pub records: Vec<Vec<u8>>,
    pub next: Position,
    /// Damaged stretches skipped while reading this batch.
    pub skipped: u64,
}

impl SpoolReader {
    /// Reads up to `max` records the writer has made visible, starting at the committed
    /// position. Does not move the position: [`SpoolReader::commit`] does, after shipping.
    pub fn read_batch(&mut self, max: usize) -> io::Result<Batch> {
        self.read_from(self.position, max)
    }

    fn read_from(&mut self, from: Position, max: usize) -> io::Result<Batch> {
        let end = self.watermark.get();
        let mut at = from;
        let mut records = Vec::new();
        let mut skipped = 0;
        while records.len() < max && at < end {
            let finished = at.segment < end.segment;
            let limit = if finished { u64::MAX } else { end.offset };
            let bytes = match File::open(segment_path(&self.dir, at.segment)) {
                Ok(mut file) => {
                    file.seek(SeekFrom::Start(at.offset))?;
                    let mut buf = Vec::new();
                    file.take(limit.saturating_sub(at.offset)).read_to_end(&mut buf)?;
                    buf
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            };
            let (ranges, scanned_end, damaged) = scan(&bytes);
            skipped += damaged;
            let mut next_offset = at.offset + scanned_end as u64;
            let mut full = false;
            for range in ranges {
                if records.len() == max {
                    next_offset = at.offset + (range.start - HEADER) as u64;
                    full = true;
                    break;
                }
                records.push(bytes[range].to_vec());
            }
            if full || !finished {
                at.offset = next_offset;
                break;
            }
            at = Position {
                segment: at.segment + 1,
                offset: 0,
            };
        }
        self.skipped += skipped;
        Ok(Batch {
            records,
            next: at,
            skipped,
        })
    }

    /// Records that everything before `next` is in Kafka: persists the position and deletes
    /// segments wholly before it.
    pub fn commit(&mut self, next: Position, shipped_bytes: u64) -> io::Result<()> {
        let tmp = self.dir.join("position.tmp");
        fs::write(&tmp, format!("{} {}\n", next.segment, next.offset))?;
        fs::rename(&tmp, self.dir.join("position"))?;
        for segment in segments(&self.dir)?.into_iter().filter(|s| *s < next.segment) {
            let _ = fs::remove_file(segment_path(&self.dir, segment));
        }
        self.position = next;
        let _ = self
            .watermark
            .pending_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(shipped_bytes))
            });
        Ok(())
    }

    /// The position of the first record Kafka does not have yet.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Moves the position forward to `target` (a record boundary that an earlier run shipped
    /// but did not get to record in the position file), as if those records had been shipped
    /// now. Returns how many records it passed over; a target at or behind the position
    /// changes nothing.
    pub fn skip_to(&mut self, target: Position) -> io::Result<u64> {
        let (mut passed, mut bytes) = (0u64, 0u64);
        let mut at = self.position;
        while at < target {
            let batch = self.read_from(at, 1)?;
            if batch.records.is_empty() {
                break;
            }
            passed += 1;
            bytes += batch.records.iter().map(|r| record_bytes(r.len())).sum::<u64>();
            at = batch.next;
        }
        if passed > 0 {
            self.commit(at, bytes)?;
        }
        Ok(passed)
    }

    /// Whether records are waiting to be shipped.
    pub fn has_pending(&self) -> bool {
        self.position < self.watermark.get()
    }

    pub fn skipped(&self) -> u64 {
        self.skipped
    }
}

/// Bytes a record occupies on disk, for pending-size accounting.
pub fn record_bytes(payload_len: usize) -> u64 {
    (HEADER + payload_len) as u64
}

#[cfg(test)]
mod tests;
