use std::io::Write;

use proptest::prelude::*;

use super::*;

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-spool-{name}-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_all(reader: &mut SpoolReader) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let batch = reader.read_batch(7).unwrap();
        if batch.records.is_empty() {
            return out;
        }
        let bytes: u64 = batch.records.iter().map(|r| record_bytes(r.len())).sum();
        out.extend(batch.records);
        reader.commit(batch.next, bytes).unwrap();
    }
}

#[test]
fn records_come_back_in_order_across_segments_and_shipped_segments_go() {
    let dir = tempdir("order");
    let (mut w, mut r, rec) = open(&dir, 100).unwrap();
    assert_eq!(rec, Recovery::default());
    let sent: Vec<Vec<u8>> = (0..50u32).map(|i| format!("event-{i}").into_bytes()).collect();
    for s in &sent {
        w.append(s).unwrap();
    }
    w.flush(true).unwrap();
    assert!(r.has_pending());
    assert_eq!(read_all(&mut r), sent);
    assert!(!r.has_pending());
    assert!(segments(&dir).unwrap().len() <= 2, "shipped segments are deleted");
    assert_eq!(w.watermark().pending_bytes.load(Ordering::Acquire), 0);
}

#[test]
fn unshipped_records_survive_a_restart_and_shipped_ones_do_not_return() {
    let dir = tempdir("restart");
    let (mut w, mut r, _) = open(&dir, 1 << 20).unwrap();
    for i in 0..10u8 {
        w.append(&[i; 20]).unwrap();
    }
    assert!(!r.has_pending(), "nothing is visible before a flush");
    w.flush(true).unwrap();
    let batch = r.read_batch(4).unwrap();
    r.commit(batch.next, 0).unwrap();
    drop((w, r));
    let (mut w, mut r, rec) = open(&dir, 1 << 20).unwrap();
    assert_eq!(rec.pending_records, 6);
    w.append(&[99; 3]).unwrap();
    w.flush(false).unwrap();
    let got = read_all(&mut r);
    let expected: Vec<Vec<u8>> = (4..10u8).map(|i| vec![i; 20]).chain([vec![99; 3]]).collect();
    assert_eq!(got, expected);
}

#[test]
fn a_record_cut_short_by_a_crash_is_dropped_at_open_and_whole_ones_recovered() {
    let dir = tempdir("torn");
    let (mut w, _, _) = open(&dir, 1 << 20).unwrap();
    for i in 0..5u8 {
        w.append(&[i; 30]).unwrap();
    }
    w.flush(true).unwrap();
    let segment = segments(&dir).unwrap()[0];
    drop(w);
    // A crash mid-write: half of a sixth record.
    let mut file = OpenOptions::new()
        .append(true)
        .open(segment_path(&dir, segment))
        .unwrap();
    file.write_all(&MAGIC).unwrap();
    file.write_all(&30u32.to_le_bytes()).unwrap();
    file.write_all(&[1, 2, 3]).unwrap();
    drop(file);
    let (_, mut r, rec) = open(&dir, 1 << 20).unwrap();
    assert_eq!(rec.truncated_bytes, 11);
    assert_eq!(rec.pending_records, 5);
    assert_eq!(read_all(&mut r), (0..5u8).map(|i| vec![i; 30]).collect::<Vec<_>>());
}

#[test]
fn a_damaged_record_in_the_middle_is_skipped_and_counted() {
    let dir = tempdir("corrupt");
    let (mut w, _, _) = open(&dir, 1 << 20).unwrap();
    for i in 0..5u8 {
        w.append(&[i; 30]).unwrap();
    }
    w.flush(true).unwrap();
    drop(w);
    let path = segment_path(&dir, segments(&dir).unwrap()[0]);
    let mut bytes = fs::read(&path).unwrap();
    // Flip a payload byte of the third record: its checksum no longer holds.
    bytes[2 * (HEADER + 30) + HEADER + 5] ^= 0xff;
    fs::write(&path, bytes).unwrap();
    let (_, mut r, _) = open(&dir, 1 << 20).unwrap();
    let got = read_all(&mut r);
    assert_eq!(got, [0u8, 1, 3, 4].iter().map(|i| vec![*i; 30]).collect::<Vec<_>>());
    assert_eq!(r.skipped(), 1);
}

proptest! {
    // Whatever bytes a spool file holds, reading never panics and returns only records whose
    // checksum holds.
    #[test]
    fn arbitrary_damage_never_panics(garbage in proptest::collection::vec(any::<u8>(), 0..400), keep in 0usize..5) {
        let dir = tempdir("fuzz");
        let (mut w, _, _) = open(&dir, 1 << 20).unwrap();
        for i in 0..keep {
            w.append(&[i as u8; 10]).unwrap();
        }
        w.flush(false).unwrap();
        drop(w);
        let path = segment_path(&dir, segments(&dir).unwrap()[0]);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&garbage).unwrap();
        drop(file);
        let (mut w, mut r, _) = open(&dir, 1 << 20).unwrap();
        w.append(b"after").unwrap();
        w.flush(false).unwrap();
        let got = read_all(&mut r);
        prop_assert_eq!(got.last().map(Vec::as_slice), Some(&b"after"[..]));
        prop_assert!(got.len() > keep);
        for (i, record) in got.iter().take(keep).enumerate() {
            prop_assert_eq!(record, &vec![i as u8; 10]);
        }
        let _ = fs::remove_dir_all(dir);
    }
}
