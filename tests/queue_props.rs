//! The durable queue against a simple model, driven by random sequences of pushes, sends, acks,
//! reconnects, spills, crashes, clean stops, torn tails and corrupted segments.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nightlight::DiskQueue;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Push(u16),
    Send(u8),
    Ack(u8),
    Rewind,
    Tick,
    Crash,
    Close,
    TornTail(u8),
    CorruptOldest(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u16..120).prop_map(Op::Push),
        4 => (1u8..80).prop_map(Op::Send),
        5 => any::<u8>().prop_map(Op::Ack),
        1 => Just(Op::Rewind),
        3 => Just(Op::Tick),
        1 => Just(Op::Crash),
        1 => Just(Op::Close),
        1 => (1u8..24).prop_map(Op::TornTail),
        1 => any::<u8>().prop_map(Op::CorruptOldest),
    ]
}

const MAX_BYTES: u64 = 100 << 20;

fn open(dir: &Path) -> DiskQueue {
    DiskQueue::open(dir, MAX_BYTES, Duration::from_millis(1000)).unwrap().with_segment_bytes(2048)
}

fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let id = p.file_name()?.to_str()?.strip_suffix(".seg")?.parse().ok()?;
            Some((id, p))
        })
        .collect();
    v.sort();
    v
}

/// What the model knows.
#[derive(Default)]
struct Model {
    /// Pushed, not acknowledged, not lost: seq -> light.
    unacked: BTreeMap<u64, u16>,
    /// The part of `unacked` known to be on disk.
    durable: BTreeSet<u64>,
    /// Sent in this connection and not acknowledged, in send order.
    inflight: Vec<u64>,
    /// Acknowledged readings; after a crash they may come back (at-least-once).
    acked: BTreeMap<u64, u16>,
    /// The highest seq ever handed out.
    max_issued: u64,
    /// Whether `max_issued` is exact (a crash may move the next seq forward unseen).
    exact_next: bool,
}

/// Reads everything the reopened queue holds (then rewinds) and checks it against the model.
fn reopen_and_check(
    q: &mut DiskQueue,
    m: &mut Model,
    may_lose: &BTreeSet<u64>,
    clean: bool,
) -> Result<(), TestCaseError> {
    let mut got = Vec::new();
    while let Some(r) = q.peek_unsent() {
        q.mark_sent();
        got.push((r.seq, r.light));
    }
    q.rewind();
    prop_assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "FIFO after reopen: {:?}", got);
    let seqs: BTreeSet<u64> = got.iter().map(|g| g.0).collect();
    for s in &m.durable {
        prop_assert!(seqs.contains(s) || may_lose.contains(s), "durable reading {} lost; got {:?}", s, seqs);
    }
    if clean {
        for s in m.unacked.keys() {
            prop_assert!(seqs.contains(s), "a clean stop lost {}", s);
        }
    }
    for (seq, light) in &got {
        let known = m.unacked.get(seq).or_else(|| m.acked.get(seq));
        prop_assert_eq!(known, Some(light), "seq {} came back with the wrong reading or was never pushed", seq);
    }
    m.unacked = got.iter().copied().collect();
    m.durable = seqs;
    m.inflight.clear();
    if !clean {
        m.exact_next = false;
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut q = open(dir);
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Push(n) => {
                for i in 0..n {
                    let light = (m.max_issued % 1001) as u16 ^ (i % 7);
                    let seq = q.push(light, 1_700_000_000_000 + m.max_issued, None);
                    prop_assert!(seq > m.max_issued, "seq {} reused (max so far {})", seq, m.max_issued);
                    m.max_issued = seq;
                    m.exact_next = true;
                    m.unacked.insert(seq, light);
                }
            }
            Op::Send(n) => {
                for _ in 0..n {
                    let Some(r) = q.peek_unsent() else { break };
                    let expected = m.unacked.keys().find(|s| !m.inflight.contains(s)).copied();
                    prop_assert_eq!(Some(r.seq), expected, "not the oldest unsent reading");
                    prop_assert_eq!(Some(&r.light), m.unacked.get(&r.seq));
                    q.mark_sent();
                    m.inflight.push(r.seq);
                }
            }
            Op::Ack(i) => {
                if !m.inflight.is_empty() {
                    let seq = m.inflight.remove(i as usize % m.inflight.len());
                    q.ack(seq);
                    let light = m.unacked.remove(&seq).unwrap();
                    m.durable.remove(&seq);
                    m.acked.insert(seq, light);
                }
            }
            Op::Rewind => {
                q.rewind();
                m.inflight.clear();
            }
            Op::Tick => {
                q.tick(Instant::now() + Duration::from_secs(3600), true);
                m.durable = m.unacked.keys().copied().collect();
            }
            Op::Crash => {
                drop(q);
                q = open(dir);
                reopen_and_check(&mut q, &mut m, &BTreeSet::new(), false)?;
            }
            Op::Close => {
                q.close();
                drop(q);
                q = open(dir);
                m.durable = m.unacked.keys().copied().collect();
                reopen_and_check(&mut q, &mut m, &BTreeSet::new(), true)?;
                let next = q.push(0, 0, None);
                if m.exact_next {
                    prop_assert_eq!(next, m.max_issued + 1, "a clean stop must not skip a seq");
                }
                prop_assert!(next > m.max_issued);
                m.max_issued = next;
                m.unacked.insert(next, 0);
            }
            Op::TornTail(cut) => {
                drop(q);
                if let Some((_, last)) = segments(dir).pop() {
                    let len = fs::metadata(&last).unwrap().len();
                    if len >= u64::from(cut) {
                        fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(len - u64::from(cut)).unwrap();
                    }
                }
                q = open(dir);
                // A cut of fewer bytes than a frame loses at most the last record written.
                let may_lose: BTreeSet<u64> = m.durable.iter().next_back().copied().into_iter().collect();
                reopen_and_check(&mut q, &mut m, &may_lose, false)?;
            }
            Op::CorruptOldest(at) => {
                let segs = segments(dir);
                if segs.len() < 2 {
                    continue;
                }
                drop(q);
                let (first, path) = &segs[0];
                let next_first = segs[1].0;
                let mut bytes = fs::read(path).unwrap();
                if !bytes.is_empty() {
                    let i = at as usize % bytes.len();
                    bytes[i] ^= 0x5A;
                    fs::write(path, &bytes).unwrap();
                }
                q = open(dir);
                let may_lose: BTreeSet<u64> = (*first..next_first).collect();
                reopen_and_check(&mut q, &mut m, &may_lose, false)?;
            }
        }
        let st = q.stats();
        prop_assert_eq!(st.dropped, 0, "nothing is dropped below the cap");
        prop_assert_eq!(st.readings, m.unacked.len() as u64, "queue depth");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn queue_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }

    #[test]
    fn disk_use_stays_within_the_cap_and_the_newest_readings_survive(
        bursts in proptest::collection::vec(1u32..3000, 1..8),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let cap = 64 * 1024;
        let mut q = DiskQueue::open(tmp.path(), cap, Duration::from_millis(1000)).unwrap();
        let mut pushed = 0u64;
        for n in bursts {
            for _ in 0..n {
                pushed = q.push(1, 0, None);
            }
            q.tick(Instant::now() + Duration::from_secs(3600), true);
            let on_disk: u64 = segments(tmp.path()).iter().map(|(_, p)| fs::metadata(p).unwrap().len()).sum();
            prop_assert!(on_disk <= cap, "{} bytes on disk, cap {}", on_disk, cap);
            let st = q.stats();
            prop_assert_eq!(st.readings + st.dropped, pushed);
        }
        drop(q);
        let mut q = DiskQueue::open(tmp.path(), cap, Duration::from_millis(1000)).unwrap();
        let mut got = vec![];
        while let Some(r) = q.peek_unsent() {
            q.mark_sent();
            got.push(r.seq);
        }
        prop_assert_eq!(got.last().copied(), Some(pushed), "the newest reading is kept");
        prop_assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "what survives is a contiguous tail");
    }
}
