//! The queue's own cases, each a rule from the module docs. The randomized search for broken
//! rules is `tests/queue_sim.rs`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::sim::{Call, SimFs};
use super::*;

const WALL: u64 = 1_764_576_000_000;

fn open(dir: &Path) -> DiskQueue {
    DiskQueue::open(dir, 1 << 20, Duration::from_millis(1000)).unwrap()
}

fn sim_dir() -> PathBuf {
    PathBuf::from("/var/lib/nightlight")
}

fn open_sim(fs: &SimFs, now: Instant) -> DiskQueue<SimFs> {
    open_sim_at(fs, now, (WALL, true)).unwrap()
}

/// Opens the simulated queue with the wall clock at `wall` (Unix ms, trusted or not).
fn open_sim_at(fs: &SimFs, now: Instant, wall: (u64, bool)) -> Result<DiskQueue<SimFs>, QueueError> {
    DiskQueue::open_in(fs.clone(), &sim_dir(), 1 << 20, Duration::from_millis(1000), now, wall)
}

/// Sends everything unsent and returns the seqs, acking none.
fn send_all<S: Storage>(q: &mut DiskQueue<S>) -> Vec<u64> {
    let mut out = vec![];
    while let Some(r) = q.peek_unsent() {
        q.mark_sent();
        out.push(r.seq);
    }
    out
}

/// Pushes one reading and has the broker acknowledge it; returns its seq.
fn deliver_one<S: Storage>(q: &mut DiskQueue<S>, t: Instant) -> u64 {
    let seq = q.push(t, 1, 1, None);
    assert_eq!(send_all(q), vec![seq]);
    q.ack(seq);
    seq
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn promptly_acked_readings_never_touch_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = open(dir.path());
    q.connected();
    let t = Instant::now();
    for i in 0..100 {
        let seq = q.push(t, i, 1000 + i as u64, None);
        assert_eq!(send_all(&mut q), vec![seq]);
        q.ack(seq);
        q.tick(t + Duration::from_millis(10));
    }
    assert_eq!(q.stats().readings, 0);
    assert_eq!(q.stats().bytes, 0);
    assert!(segment_files(dir.path()).is_empty());
}

#[test]
fn offline_readings_are_written_at_push_and_survive_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = open(dir.path());
    let t = Instant::now();
    let seqs: Vec<u64> = (0..10).map(|i| q.push(t, i, i as u64, None)).collect();
    assert!(q.stats().bytes > 0, "written at push, before any tick");
    drop(q); // kill -9: no tick, no close
    let mut q = open(dir.path());
    assert_eq!(send_all(&mut q), seqs);
}

#[test]
fn offline_readings_are_synced_within_the_batch_window() {
    let fs = SimFs::new();
    let t = Instant::now();
    let mut q = open_sim(&fs, t);
    q.push(t, 1, 1, None);
    let deadline = q.next_deadline().expect("a sync is due");
    assert!(deadline <= t + OFFLINE_BATCH);
    q.tick(deadline);
    q.push(deadline, 2, 2, None);
    drop(q);
    fs.power_cut(&mut || false);
    let mut q = open_sim(&fs, t + Duration::from_secs(1));
    let got: Vec<u16> = std::iter::from_fn(|| q.peek_unsent().inspect(|_| q.mark_sent())).map(|r| r.light).collect();
    assert_eq!(got, vec![1], "the synced reading survives the cut; the one after it was not promised");
}

#[test]
fn seq_and_run_rise_across_a_crash_and_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut q = open(dir.path());
    q.connected();
    let a = deliver_one(&mut q, t);
    let run_a = q.run();
    drop(q); // crash with nothing on disk
    let mut q = open(dir.path());
    q.connected();
    assert!(q.run() > run_a, "run rises at every start");
    let b = deliver_one(&mut q, t);
    assert!(b > a);
    let c = deliver_one(&mut q, t);
    assert_eq!(c, b + 1, "within a run seq rises by one");
    let run_b = q.run();
    q.close(t).unwrap();
    drop(q);
    let mut q = open(dir.path());
    assert!(q.run() > run_b);
    assert!(q.push(t, 1, 1, None) > c);
}

#[test]
fn a_start_with_the_clock_behind_still_goes_on_above_the_reservation() {
    let fs = SimFs::new();
    let t = Instant::now();
    let mut q = open_sim(&fs, t);
    let a = q.push(t, 1, 1, None);
    drop(q);
    fs.kill();
    // The clock went back an hour (a Pi without a real-time clock, before NTP).
    let mut q = open_sim_at(&fs, t, (WALL - 3_600_000, false)).unwrap();
    assert!(q.push(t, 1, 1, None) > a);
}

#[test]
fn a_disk_full_from_the_first_start_never_repeats_a_seq_or_a_run() {
    let fs = SimFs::new();
    fs.set_full(true);
    let t = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    let mut runs = vec![];
    for start in 0..3u64 {
        let wall = WALL + start * 3_000;
        let mut q = open_sim_at(&fs, t, (wall, true)).unwrap();
        assert!(!q.stats().seq_durable, "health says seq is not from a synced reservation");
        q.connected();
        runs.push(q.run());
        for i in 0..50 {
            let seq = q.push(t, 1, wall + i * 10, None);
            assert!(seen.insert(seq), "seq {seq} handed out twice (start {start})");
            send_all(&mut q);
            q.ack(seq);
        }
        drop(q);
        fs.kill();
    }
    assert!(runs.windows(2).all(|w| w[1] > w[0]), "{runs:?}");
}

#[test]
fn a_failing_disk_is_retried_with_backoff_never_in_a_busy_loop() {
    let fs = SimFs::new();
    let t = Instant::now();
    let mut q = open_sim(&fs, t);
    q.connected();
    fs.set_full(true);
    q.push(t, 1, 1, None);
    let mut now = t;
    let mut ticks = 0;
    // Ten simulated seconds: a spin would tick thousands of times.
    while let Some(d) = q.next_deadline() {
        if d > t + Duration::from_secs(10) {
            break;
        }
        assert!(d > now || ticks == 0, "deadline {:?} is not after the last tick", d - t);
        now = d;
        q.tick(now);
        ticks += 1;
    }
    assert!(ticks < 20, "{ticks} ticks in 10 s");
    assert!(q.stats().errors > 0);
    fs.set_full(false);
    q.tick(now + RETRY_MAX);
    assert_eq!(q.stats().readings, 1);
    assert!(q.stats().bytes > 0, "written once the disk has room");
}

#[test]
fn a_clean_stop_on_a_full_disk_uses_the_spare_and_loses_nothing() {
    let fs = SimFs::new();
    let t = Instant::now();
    let mut q = open_sim(&fs, t);
    q.connected();
    fs.set_full(true);
    let seqs: Vec<u64> = (0..60).map(|i| q.push(t, i, i as u64, None)).collect();
    q.tick(t + Duration::from_secs(2)); // the disk refuses the spill
    assert_eq!(q.stats().bytes, 0);
    q.close(t + Duration::from_secs(3)).expect("nothing lost");
    assert_eq!(fs.read_file(&sim_dir().join("spare")), None, "the spare made the room");
    drop(q);
    let mut q = open_sim(&fs, t + Duration::from_secs(4));
    assert_eq!(send_all(&mut q), seqs);
}

#[test]
fn a_clean_stop_that_cannot_write_says_how_many_readings_were_lost() {
    let fs = SimFs::new();
    fs.set_full(true); // from the first start: no room for a spare either
    let t = Instant::now();
    let mut q = open_sim(&fs, t);
    q.connected();
    fs.set_full(true);
    for i in 0..60 {
        q.push(t, i, i as u64, None);
    }
    let err = q.close(t).unwrap_err();
    assert_eq!(err.lost, 60);
    assert_eq!(q.stats().dropped.total(), 60);
    assert_eq!(q.stats().dropped, Dropped { stop: 60, ..Dropped::default() }, "lost at the stop");
}

#[test]
fn a_second_process_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _q = open(dir.path());
    match DiskQueue::open(dir.path(), 1 << 20, Duration::from_secs(1)) {
        Err(QueueError::Locked { path }) => assert_eq!(path, dir.path()),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("two owners of one queue directory"),
    }
}

#[test]
fn rewind_resends_unacked_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut q = open(dir.path());
    q.connected();
    let seqs: Vec<u64> = (0..5).map(|i| q.push(t, i, 0, None)).collect();
    assert_eq!(send_all(&mut q), seqs);
    q.ack(seqs[0]);
    q.disconnected(t);
    q.connected();
    assert_eq!(send_all(&mut q), seqs[1..]);
}

#[test]
fn in_flight_reading_spilled_to_disk_is_forgotten_on_ack() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut q = open(dir.path());
    q.connected();
    let a = q.push(t, 1, 0, None);
    send_all(&mut q);
    q.tick(t + Duration::from_secs(2)); // no ack within spill_ms
    assert_eq!(q.stats().readings, 1);
    assert!(q.stats().bytes > 0);
    q.ack(a);
    assert_eq!(q.stats().readings, 0);
    q.close(t).unwrap();
    drop(q);
    let mut q = open(dir.path());
    assert_eq!(q.peek_unsent(), None, "an acknowledged reading came back");
}

#[test]
fn a_torn_tail_loses_only_the_torn_record() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut q = open(dir.path());
    let seqs: Vec<u64> = (0..20).map(|i| q.push(t, i, 0, None)).collect();
    q.close(t).unwrap();
    drop(q);
    let seg = &segment_files(dir.path())[0];
    let len = fs::metadata(seg).unwrap().len();
    fs::OpenOptions::new().write(true).open(seg).unwrap().set_len(len - 3).unwrap();
    let mut q = open(dir.path());
    assert_eq!(send_all(&mut q), seqs[..19]);
    assert_eq!(q.stats().dropped.total(), 1, "the torn record is counted");
}

#[test]
fn a_bad_frame_in_the_middle_costs_that_frame_not_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut q = open(dir.path()).with_segment_bytes(32 * 10);
    let seqs: Vec<u64> = (0..30).map(|i| q.push(t, i, 0, None)).collect();
    q.close(t).unwrap();
    drop(q);
    let segs = segment_files(dir.path());
    assert_eq!(segs.len(), 3);
    // The fifth frame of the middle segment: flip a byte of its body.
    let mut bytes = fs::read(&segs[1]).unwrap();
    bytes[4 * 32 + 10] ^= 0x55;
    fs::write(&segs[1], &bytes).unwrap();
    let mut q = open(dir.path());
    let want: Vec<u64> = seqs.iter().copied().filter(|s| *s != seqs[14]).collect();
    assert_eq!(send_all(&mut q), want);
    assert_eq!(q.stats().dropped.total(), 1);
    assert_eq!(q.stats().dropped.damage, 1, "counted as damage");
}

#[test]
fn an_unreadable_meta_is_not_a_reset_to_seq_1() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut q = open(dir.path());
    q.connected();
    let a = deliver_one(&mut q, t);
    q.close(t).unwrap();
    drop(q);
    fs::write(dir.path().join("meta"), vec![0xAAu8; 8192]).unwrap();
    let open_at =
        |wall: (u64, bool)| DiskQueue::open_in(OsStorage, dir.path(), 1 << 20, Duration::from_millis(1000), t, wall);
    // A clock an hour behind, not synchronized: no seq can be trusted to be new, so no start.
    let behind = open_at((crate::clock::unix_ms() - 3_600_000, false));
    assert!(matches!(behind, Err(QueueError::MetaUnreadable { .. })), "seq from a clock behind");
    assert!(!dir.path().join("meta.corrupt").exists(), "kept for the next start");
    let mut q = open_at((crate::clock::unix_ms(), true)).unwrap();
    assert!(q.push(t, 1, 1, None) > a, "seq went back after the meta was destroyed");
    assert!(dir.path().join("meta.corrupt").exists());
}

#[test]
fn a_torn_meta_page_leaves_the_other_slot() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut q = open(dir.path());
    let a = q.push(t, 1, 1, None);
    q.close(t).unwrap();
    drop(q);
    // Destroy whichever 4 KiB block holds the newest slot: the other must do.
    let meta = dir.path().join("meta");
    let bytes = fs::read(&meta).unwrap();
    for block in 0..2 {
        let mut b = bytes.clone();
        b[block * 4096..(block + 1) * 4096].fill(0);
        fs::write(&meta, &b).unwrap();
        let mut q = open(dir.path());
        assert!(q.push(t, 1, 1, None) > a, "block {block} torn: seq went back");
        drop(q);
        fs::write(&meta, &bytes).unwrap();
    }
}

#[test]
fn the_cap_drops_the_oldest_segments_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let mut q = DiskQueue::open(dir.path(), 64 * 1024, Duration::from_millis(1000)).unwrap();
    for i in 0..10_000u32 {
        q.push(t, (i % 1000) as u16, 0, None);
    }
    let st = q.stats();
    assert!(st.bytes <= 64 * 1024, "{st:?}");
    assert!(st.dropped.total() > 0);
    assert_eq!(st.dropped, Dropped { cap: st.dropped.total(), ..Dropped::default() }, "dropped at the cap");
    assert_eq!(st.readings + st.dropped.total(), 10_000);
    let sent = send_all(&mut q);
    assert!(sent.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(sent.len() as u64, st.readings);
}

#[test]
fn a_read_error_while_draining_is_retried_not_dropped() {
    let fs = SimFs::new();
    let t = Instant::now();
    let mut q = open_sim(&fs, t);
    let seqs: Vec<u64> = (0..5).map(|i| q.push(t, i, 0, None)).collect();
    q.close(t).unwrap();
    drop(q);
    let mut q = open_sim(&fs, t);
    q.connected();
    fs.fail(Call::Read, io::ErrorKind::Other, 1);
    assert_eq!(q.peek_unsent(), None, "the read failed");
    let retry = q.next_deadline().expect("a retry is scheduled");
    q.tick(retry);
    assert_eq!(send_all(&mut q), seqs);
    assert_eq!(q.stats().dropped.total(), 0);
}

#[test]
fn a_meta_file_that_cannot_be_read_waits_for_a_synchronized_clock_and_then_goes_on_above_it() {
    let fs = SimFs::new();
    let t = Instant::now();
    let mut q = open_sim(&fs, t);
    let a = q.push(t, 1, 1, None);
    let run = q.run();
    drop(q);
    fs.kill();
    // The meta file cannot be read now (a bad block), and the clock is an hour behind.
    fs.fail(Call::Read, io::ErrorKind::Other, 1);
    let behind = open_sim_at(&fs, t, (WALL - 3_600_000, false));
    assert!(matches!(behind, Err(QueueError::MetaUnreadable { .. })), "no seq from a clock behind");
    // Once the clock is synchronized, the start goes on: above everything before.
    fs.fail(Call::Read, io::ErrorKind::Other, 1);
    let later = WALL + 60_000;
    let mut q = open_sim_at(&fs, t, (later, true)).unwrap();
    assert!(q.run() > run);
    assert!(q.push(t, 1, 1, None) > a);
}

#[test]
fn the_oldest_unacknowledged_reading_is_found_on_disk_and_in_memory() {
    let fs = SimFs::new();
    let t = Instant::now();
    let mut q = open_sim(&fs, t);
    assert_eq!(q.oldest_ts(), None, "nothing queued");
    // Offline: straight to disk.
    let first = q.push(t, 1, WALL + 10, None);
    q.push(t, 2, WALL + 20, None);
    assert_eq!(q.oldest_ts(), Some(WALL + 10));
    q.connected();
    assert_eq!(send_all(&mut q).len(), 2);
    q.ack(first);
    assert_eq!(q.oldest_ts(), Some(WALL + 20), "the next one once the first is acknowledged");
    q.ack(first + 1);
    assert_eq!(q.oldest_ts(), None);
    // Online: in memory until the spill.
    q.push(t, 3, WALL + 30, None);
    assert_eq!(q.oldest_ts(), Some(WALL + 30));
}

#[test]
fn bytes_written_and_syncs_are_counted_as_the_storage_sees_them() {
    let fs = SimFs::new();
    let t = Instant::now();
    let mut q = open_sim(&fs, t);
    let at_open = q.stats();
    assert!(at_open.written_bytes > 0 && at_open.syncs > 0, "the meta and the spare: {at_open:?}");
    q.connected();
    deliver_one(&mut q, t);
    assert_eq!(q.stats().written_bytes, at_open.written_bytes, "a reading acknowledged in time is never written");
    q.disconnected(t);
    q.push(t, 1, WALL, None);
    q.tick(t + Duration::from_secs(2));
    let offline = q.stats();
    let frame = frame::len(&Telemetry { light: 1, ts: WALL, seq: 0, run: 0, lux: None, ts_ok: true }) as u64;
    assert!(offline.written_bytes - at_open.written_bytes >= frame, "the offline reading's frame: {offline:?}");
    assert!(offline.syncs > at_open.syncs, "an offline reading is synced");
}
