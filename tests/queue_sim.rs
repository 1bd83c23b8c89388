//! A deterministic simulation of the durable queue on a simulated filesystem that loses
//! unsynced writes at a power cut and fails calls on demand (`nightlight::queue::sim`).
//!
//! Each case is a random sequence of pushes, sends, acknowledgements, reconnects, passing time,
//! injected faults (a full disk, failed writes, syncs and reads, short writes), clean stops,
//! `kill -9`s, power cuts at any storage call (inside an operation too) and corruption of the
//! files at rest. It is checked against a ground truth kept here, from what was taken and what
//! the broker acknowledged, never from what the queue reports:
//!
//! - no `seq` is handed out twice, across any number of restarts; within a run it rises by one;
//!   `run` rises at every start;
//! - every reading taken and not acknowledged is delivered after a restart, unless it was
//!   younger than the stated window at the cut (online: `spill_ms`; offline: 100 ms; a
//!   `kill -9` keeps what was written; a clean stop keeps everything), or a fault was injected
//!   near it, or corruption touched its frame;
//! - what is delivered is what was taken (same `ts` and `light`), in `seq` order;
//! - the queue always opens; damage is confined to the frames it touched and counted in
//!   `dropped`; no deadline the queue names stays in the past (no busy loop).
//!
//! `NIGHTLIGHT_SIM_SEED=N` replays one case; `NIGHTLIGHT_SIM_CASES=N` sets how many run.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nightlight::queue::sim::{Call, SimFs};
use nightlight::queue::{DiskQueue, OFFLINE_BATCH, RETRY_MAX};

const SPILL: Duration = Duration::from_millis(1000);
const WALL0: u64 = 1_764_576_000_000;
/// What a Pi without a real-time clock reads at every boot before NTP: the same old time.
const WALL_AT_BOOT: u64 = 1_700_000_000_000;
const STEPS: usize = 250;
/// Far more than a case writes, so the byte cap never drops anything (it has its own test).
const MAX_BYTES: u64 = 1 << 20;
/// A fault this close to a reading excuses its loss (the queue may still be backing off).
const FAULT_SHADOW: Duration = Duration::from_secs(12);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// The frame layout, declared again from `src/queue/frame.rs`, so the test can tell which
/// records a corruption touched without asking the queue: `[len u8][crc32 u32][body]`, the
/// body starting with `seq` u64.
fn frames(bytes: &[u8]) -> Vec<(u64, usize, usize)> {
    let mut out = vec![];
    let mut at = 0;
    while at + 5 <= bytes.len() {
        let n = bytes[at] as usize;
        let ok = [19, 23, 27, 31].contains(&n)
            && at + 5 + n <= bytes.len()
            && u32::from_le_bytes(bytes[at + 1..at + 5].try_into().unwrap())
                == crc32fast::hash(&bytes[at + 5..at + 5 + n]);
        if ok {
            out.push((u64::from_le_bytes(bytes[at + 5..at + 13].try_into().unwrap()), at, at + 5 + n));
            at += 5 + n;
        } else {
            at += 1; // damage from an earlier corruption: look further on
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Taken {
    ts: u64,
    light: u16,
    at: Duration,
    /// From then on the queue promised it would survive a power cut.
    durable_by: Duration,
    /// Taken while offline: written at push, so it survives a `kill -9` at once.
    offline: bool,
    /// Written by a run that was killed before syncing it: durable only once the next start
    /// has synced what it found.
    pending: bool,
    /// The queue reported its seq covered by a synced reservation (`seq_durable`).
    claimed: bool,
}

/// How a run ended, for what must survive it.
#[derive(Clone, Copy)]
enum End {
    Clean,
    Kill,
    Cut,
}

struct Sim {
    rng: fastrand::Rng,
    fs: SimFs,
    dir: PathBuf,
    t0: Instant,
    now: Duration,
    q: Option<DiskQueue<SimFs>>,
    online: bool,
    taken: BTreeMap<u64, Taken>,
    acked: BTreeSet<u64>,
    /// Readings whose loss is excused (faults, corruption, the window): not checked again.
    excused: BTreeSet<u64>,
    /// Seqs handed out twice where that was not promised against (see `clockless`).
    ambiguous: BTreeSet<u64>,
    in_flight: Vec<u64>,
    last_sent: Option<u64>,
    last_fault: Option<Duration>,
    full: bool,
    /// No clock to lean on: every start reads [`WALL_AT_BOOT`], so `seq` and `run` rest on the
    /// meta file and the disk alone. With the meta unwritable too nothing can keep them unique,
    /// and the queue says so (`seq_durable` false): such cases check uniqueness only for what
    /// the queue reported durable. They corrupt no meta.
    clockless: bool,
    /// When the current run started (for the clockless wall clock).
    boot: Duration,
    /// The last push: (run, seq).
    last: Option<(u64, u64)>,
    max_run: u64,
    /// Whether the meta recorded that run (else, without a clock, it may come again).
    max_run_durable: bool,
    /// The highest seq handed out so far.
    max_seq: u64,
    trace: Vec<String>,
    /// `NIGHTLIGHT_SIM_DEBUG` is set: every step, send and file goes to stderr as well.
    debug: bool,
}

type Check = Result<(), String>;

impl Sim {
    fn new(seed: u64) -> Self {
        let mut s = Sim {
            rng: fastrand::Rng::with_seed(seed),
            fs: SimFs::new(),
            dir: PathBuf::from("/var/lib/nightlight"),
            t0: Instant::now(),
            now: Duration::ZERO,
            q: None,
            online: false,
            taken: BTreeMap::new(),
            acked: BTreeSet::new(),
            excused: BTreeSet::new(),
            ambiguous: BTreeSet::new(),
            in_flight: vec![],
            last_sent: None,
            last_fault: None,
            full: false,
            clockless: false,
            boot: Duration::ZERO,
            last: None,
            max_run: 0,
            max_run_durable: true,
            max_seq: 0,
            trace: vec![],
            debug: std::env::var_os("NIGHTLIGHT_SIM_DEBUG").is_some(),
        };
        if s.rng.u8(0..4) == 0 {
            s.clockless = true;
        } else if s.rng.u8(0..10) == 0 {
            // A disk that is full from the very first start.
            s.fs.set_full(true);
            s.full = true;
            s.last_fault = Some(Duration::ZERO);
        }
        s
    }

    fn q(&mut self) -> &mut DiskQueue<SimFs> {
        self.q.as_mut().expect("open")
    }

    fn instant(&self) -> Instant {
        self.t0 + self.now
    }

    /// The wall clock the device reads, in Unix ms.
    fn wall(&self) -> u64 {
        if self.clockless {
            WALL_AT_BOOT + (self.now - self.boot).as_millis() as u64
        } else {
            WALL0 + self.now.as_millis() as u64
        }
    }

    /// With `NIGHTLIGHT_SIM_DEBUG`: each file and the seqs of the frames in it.
    fn dump(&self, when: &str) {
        if self.debug {
            for f in self.fs.files() {
                let b = self.fs.read_file(&f).unwrap_or_default();
                let seqs: Vec<u64> = frames(&b).iter().map(|x| x.0).collect();
                eprintln!("{when}: {} {} bytes {seqs:?}", name(&f), b.len());
            }
        }
    }

    fn note(&mut self, what: String) {
        if self.debug {
            eprintln!("{:>8.3}s {what}", self.now.as_secs_f64());
        }
        self.trace.push(format!("{:>8.3}s {what}", self.now.as_secs_f64()));
    }

    /// Starts the device (after systemd's 2 s, or a boot). Sometimes the power is cut inside
    /// the start too; then it starts again. Returns when such a cut happened.
    fn open(&mut self) -> Result<Option<Duration>, String> {
        let mut cut_at = None;
        loop {
            self.now += ms(2000 + self.rng.u64(0..2000));
            if self.rng.bool() {
                self.fs.clear_faults(); // else the faults injected last stay for the start
            }
            self.boot = self.now;
            if cut_at.is_none() && self.rng.u8(0..5) == 0 {
                self.fs.cut_after(self.rng.u64(0..30));
            }
            let segment = 256 + self.rng.u64(0..4096);
            let faulty = self.fs.has_faults();
            let res = DiskQueue::open_in(
                self.fs.clone(),
                &self.dir,
                MAX_BYTES,
                SPILL,
                self.instant(),
                (self.wall(), !self.clockless),
            );
            if self.fs.is_dead() {
                drop(res);
                cut_at = Some(self.now);
                self.note("power cut while starting".into());
                let mut rng = self.rng.fork();
                self.fs.power_cut(&mut || rng.bool());
                continue;
            }
            self.fs.cancel_cut();
            let q = match res {
                Ok(q) => q.with_segment_bytes(segment).with_seq_block(1 + self.rng.u64(0..50)),
                // An injected fault (an I/O error reading the directory) may stop a start:
                // systemd starts it again.
                Err(e) if faulty => {
                    self.note(format!("the start failed: {e}"));
                    self.fs.clear_faults();
                    continue;
                }
                Err(e) => return Err(format!("the queue did not open: {e}")),
            };
            let run = q.run();
            if run <= self.max_run && (!self.clockless || self.max_run_durable) {
                return Err(format!("run {run} after run {}: not rising", self.max_run));
            }
            self.max_run = self.max_run.max(run);
            self.max_run_durable = q.stats().seq_durable;
            self.q = Some(q);
            self.online = false;
            self.in_flight.clear();
            self.last = None;
            self.note(format!("open (run {run}, segments of {segment} bytes)"));
            return Ok(cut_at);
        }
    }

    /// Lets time pass to `now + d`, ticking at every deadline the queue names on the way.
    fn advance(&mut self, d: Duration) -> Check {
        let target = self.now + d;
        let mut at_same_time = 0;
        while let Some(deadline) = self.q().next_deadline() {
            let deadline = deadline.saturating_duration_since(self.t0);
            if deadline > target || self.fs.is_dead() {
                break;
            }
            if deadline <= self.now {
                at_same_time += 1;
                if at_same_time > 2 {
                    return Err(format!("deadline {deadline:?} stays in the past at {:?}: a busy loop", self.now));
                }
            } else {
                at_same_time = 0;
            }
            self.now = self.now.max(deadline);
            let now = self.instant();
            self.q().tick(now);
        }
        if self.fs.is_dead() {
            return Ok(()); // the power went: time stops for the device here
        }
        self.now = target;
        if self.full {
            self.last_fault = Some(self.now);
        }
        Ok(())
    }

    fn push(&mut self) -> Check {
        let d = ms(1 + self.rng.u64(0..40));
        self.advance(d)?;
        if self.fs.is_dead() {
            return Ok(());
        }
        let ts = self.wall();
        let light = self.rng.u16(0..=1000);
        let now = self.instant();
        let seq = self.q().push(now, light, ts, None);
        if self.fs.is_dead() {
            return Ok(()); // the power went during the push: the reading never existed
        }
        let run = self.q().run();
        let claimed = self.q().stats().seq_durable;
        if let Some(earlier) = self.taken.get(&seq) {
            if !self.clockless || earlier.claimed {
                return Err(format!("seq {seq} handed out twice (durable: {})", earlier.claimed));
            }
            // Without a clock and without a writable meta: said, and not promised.
            self.excused.insert(seq);
            self.ambiguous.insert(seq);
        }
        // With a clock that never goes back and restarts that take 2 s, seq always rises.
        if !self.clockless && seq <= self.max_seq {
            return Err(format!("seq {seq} after {}: seq went back", self.max_seq));
        }
        self.max_seq = self.max_seq.max(seq);
        if let Some((r, s)) = self.last {
            if r == run && seq != s + 1 {
                return Err(format!("within run {run} seq went from {s} to {seq}"));
            }
            if run < r {
                return Err(format!("run went down from {r} to {run} within a process"));
            }
        }
        if self.last.is_none_or(|(r, _)| r != run) {
            self.note(format!("push: run {run} starts at seq {seq}"));
        }
        self.last = Some((run, seq));
        let window = if self.online { SPILL } else { OFFLINE_BATCH };
        let t = Taken {
            ts,
            light,
            at: self.now,
            durable_by: self.now + window,
            offline: !self.online,
            pending: false,
            claimed,
        };
        self.taken.insert(seq, t);
        Ok(())
    }

    fn send(&mut self, n: usize) -> Check {
        if !self.online {
            return Ok(());
        }
        for _ in 0..n {
            let Some(r) = self.q().peek_unsent() else { break };
            self.q().mark_sent();
            self.delivered(r.seq, r.ts, r.light)?;
            self.in_flight.push(r.seq);
        }
        Ok(())
    }

    /// Checks one delivered reading against what was taken, and the order of the connection.
    fn delivered(&mut self, seq: u64, ts: u64, light: u16) -> Check {
        if self.debug {
            eprintln!("{:>8.3}s sent {seq}", self.now.as_secs_f64());
        }
        match self.taken.get(&seq) {
            Some(_) if self.ambiguous.contains(&seq) => {}
            Some(t) if t.ts == ts && t.light == light => {}
            Some(t) => return Err(format!("seq {seq} delivered as ({ts}, {light}), taken as ({}, {})", t.ts, t.light)),
            None => return Err(format!("seq {seq} delivered but never taken")),
        }
        if self.last_sent.is_some_and(|l| seq <= l) {
            return Err(format!("seq {seq} sent after {:?} in one connection", self.last_sent));
        }
        self.last_sent = Some(seq);
        Ok(())
    }

    fn ack_some(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        if self.rng.u8(0..5) == 0 {
            // Out of order: a broker may acknowledge a later publish first.
            let i = self.rng.usize(0..self.in_flight.len());
            let seq = self.in_flight.remove(i);
            self.acked.insert(seq);
            self.q().ack(seq);
        } else {
            let n = self.rng.usize(1..=self.in_flight.len());
            for seq in self.in_flight.drain(..n).collect::<Vec<_>>() {
                self.acked.insert(seq);
                self.q().ack(seq);
            }
        }
    }

    fn toggle_connection(&mut self) {
        let now = self.instant();
        if self.online {
            self.q().disconnected(now);
            self.online = false;
            self.in_flight.clear();
            // Losing the connection writes and syncs what was in memory at once.
            let at = self.now;
            for t in self.taken.values_mut() {
                t.durable_by = t.durable_by.min(at);
            }
            self.note("disconnected".into());
        } else {
            self.q().connected();
            self.online = true;
            self.last_sent = None;
            self.note("connected".into());
        }
    }

    fn fault(&mut self) {
        self.last_fault = Some(self.now);
        let kinds = [ErrorKind::StorageFull, ErrorKind::Other];
        let kind = kinds[self.rng.usize(0..2)];
        match self.rng.u8(0..6) {
            0 => {
                self.full = !self.full;
                self.fs.set_full(self.full);
                self.note(format!("disk full: {}", self.full));
            }
            n => {
                let call = [Call::Write, Call::Sync, Call::Read, Call::Any, Call::Namespace][n as usize - 1];
                let times = self.rng.u32(1..4);
                self.fs.fail(call, kind, times);
                self.note(format!("fail the next {times} {call:?} calls with {kind:?}"));
            }
        }
    }

    /// A random step of a running device (no restart).
    fn run_step(&mut self) -> Check {
        match self.rng.u8(0..100) {
            0..=34 => self.push(),
            35..=54 => {
                let d = ms(1 + self.rng.u64(0..400));
                self.advance(d)
            }
            55..=69 => {
                let n = 1 + self.rng.usize(0..30);
                self.send(n)
            }
            70..=84 => {
                self.ack_some();
                Ok(())
            }
            85..=91 => {
                self.toggle_connection();
                Ok(())
            }
            _ => {
                self.fault();
                Ok(())
            }
        }
    }

    fn step(&mut self) -> Check {
        match self.rng.u8(0..100) {
            0..=2 => self.clean_stop(),
            3..=5 => self.restart(End::Kill, None),
            6..=9 => self.power_cut(),
            _ => self.run_step(),
        }
    }

    fn clean_stop(&mut self) -> Check {
        let now = self.instant();
        let res = self.q().close(now);
        self.note(format!("clean stop: {res:?}"));
        let healthy = self.last_fault.is_none_or(|f| self.now >= f + FAULT_SHADOW);
        if let (Err(e), true) = (&res, healthy) {
            return Err(format!("a clean stop on a healthy disk lost readings: {e}"));
        }
        let end = if res.is_ok() { End::Clean } else { End::Kill };
        self.restart(end, None)
    }

    fn power_cut(&mut self) -> Check {
        let after = self.rng.u64(0..40);
        self.fs.cut_after(after);
        self.note(format!("power cut in {after} calls"));
        for _ in 0..60 {
            if self.fs.is_dead() {
                break;
            }
            self.run_step()?;
        }
        let cut = self.now;
        self.note("power off".into());
        self.dump("before the cut");
        let mut rng = self.rng.fork();
        self.q = None;
        self.fs.power_cut(&mut || rng.bool());
        self.dump("after the cut");
        self.restart(End::Cut, Some(cut))
    }

    /// Ends the run (`cut`: when the power went), maybe corrupts a file at rest, opens the
    /// queue again and checks what it delivers.
    fn restart(&mut self, end: End, cut: Option<Duration>) -> Check {
        let gone = self.now;
        if matches!(end, End::Kill) {
            self.note("kill -9".into());
        }
        self.q = None;
        self.fs.kill();
        if matches!(end, End::Kill) {
            for t in self.taken.values_mut().filter(|t| t.durable_by >= gone) {
                t.pending = true;
            }
        }
        let touched = if self.rng.u8(0..8) == 0 { self.corrupt() } else { BTreeSet::new() };
        // A cut while starting can only lose what a killed run had not synced.
        let cut_while_starting = self.open()?.is_some();
        let shadow =
            |t: &Taken, last_fault: Option<Duration>| last_fault.is_some_and(|f| f + FAULT_SHADOW >= t.at && f <= gone);
        let last_fault = self.last_fault;
        let required = |t: &Taken| -> bool {
            if shadow(t, last_fault) || (cut_while_starting && t.pending) {
                return false;
            }
            match end {
                End::Clean => true,
                End::Kill => t.offline || t.durable_by < gone,
                End::Cut => t.durable_by < cut.expect("a cut has a time"),
            }
        };
        let must: BTreeSet<u64> = self
            .taken
            .iter()
            .filter(|(s, t)| !self.acked.contains(s) && !self.excused.contains(s) && required(t))
            .map(|(s, _)| *s)
            .collect();
        self.excused.extend(touched.iter().copied());
        // Everything the reopened queue holds, sent once (and not acknowledged).
        self.q().connected();
        self.online = true;
        self.last_sent = None;
        let mut got = BTreeSet::new();
        while let Some(r) = self.q().peek_unsent() {
            self.q().mark_sent();
            self.delivered(r.seq, r.ts, r.light)?;
            got.insert(r.seq);
        }
        let missing: Vec<u64> = must.iter().filter(|s| !got.contains(s) && !touched.contains(s)).copied().collect();
        if !missing.is_empty() {
            let details: Vec<String> = missing.iter().take(5).map(|s| format!("{s} {:?}", self.taken[s])).collect();
            return Err(format!("{} readings lost beyond the window: {}", missing.len(), details.join("; ")));
        }
        // Readings the corruption destroyed: touched, owed, and not delivered (a touched frame
        // may have been a leftover copy of one that is intact elsewhere).
        let touched_required = touched.iter().filter(|s| must.contains(s) && !got.contains(s)).count() as u64;
        let dropped = self.q().stats().dropped.total();
        // (A start cut short may have counted the damage and cut it away before it died.)
        if dropped < touched_required && !cut_while_starting {
            return Err(format!("corruption destroyed {touched_required} readings, dropped says {dropped}"));
        }
        // The start synced what a killed run left.
        let started = self.now;
        for t in self.taken.values_mut().filter(|t| t.pending) {
            t.pending = false;
            t.durable_by = t.durable_by.min(started);
        }
        // What was not required and did not come back is gone for good.
        let unacked: Vec<u64> = self.taken.keys().filter(|s| !self.acked.contains(s)).copied().collect();
        for s in unacked {
            if !got.contains(&s) {
                self.excused.insert(s);
            }
        }
        let now = self.instant();
        self.q().disconnected(now);
        self.online = false;
        Ok(())
    }

    /// Corrupts a stretch of a segment (or the meta file) at rest; returns the seqs whose
    /// frames it touched.
    fn corrupt(&mut self) -> BTreeSet<u64> {
        let files: Vec<PathBuf> = self
            .fs
            .files()
            .into_iter()
            .filter(|p| {
                p.extension().is_some_and(|x| x == "seg")
                    || (!self.clockless && p.file_name().is_some_and(|n| n == "meta"))
            })
            .collect();
        if files.is_empty() {
            return BTreeSet::new();
        }
        let path = files[self.rng.usize(0..files.len())].clone();
        let bytes = self.fs.read_file(&path).unwrap_or_default();
        if bytes.is_empty() {
            return BTreeSet::new();
        }
        let at = self.rng.usize(0..bytes.len());
        let len = (1 + self.rng.usize(0..40)).min(bytes.len() - at);
        let junk: Vec<u8> = (0..len).map(|_| self.rng.u8(..)).collect();
        self.fs.corrupt(&path, at, &junk);
        self.note(format!("corrupt {} bytes at {at} of {}", len, name(&path)));
        if path.extension().is_none_or(|x| x != "seg") {
            return BTreeSet::new();
        }
        frames(&bytes).into_iter().filter(|&(_, s, e)| s < at + len && at < e).map(|(seq, _, _)| seq).collect()
    }
}

fn name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn run_case(seed: u64) -> Result<(), (String, Vec<String>)> {
    let mut sim = Sim::new(seed);
    // A panic inside the queue (a broken internal assertion) is a failure of this seed too.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sim.open()?;
        for _ in 0..STEPS {
            sim.step()?;
        }
        sim.clean_stop()
    }))
    .unwrap_or_else(|p| {
        let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
        Err(format!("the queue panicked: {}", msg.unwrap_or_default()))
    });
    result.map_err(|e| (e, sim.trace.split_off(sim.trace.len().saturating_sub(40))))
}

#[test]
fn the_queue_keeps_its_promises_under_random_faults_crashes_and_power_cuts() {
    let seeds: Vec<u64> = match std::env::var("NIGHTLIGHT_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("NIGHTLIGHT_SIM_SEED is a number")],
        Err(_) => {
            let cases: u64 = std::env::var("NIGHTLIGHT_SIM_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000);
            let base = std::env::var("NIGHTLIGHT_SIM_BASE").ok().and_then(|c| c.parse().ok()).unwrap_or(0);
            (base..base + cases).collect()
        }
    };
    let _ = RETRY_MAX; // the fault shadow is more than twice the longest backoff
    assert!(FAULT_SHADOW > 2 * RETRY_MAX);
    for seed in seeds {
        if let Err((msg, trace)) = run_case(seed) {
            panic!(
                "seed {seed}: {msg}\nreplay: NIGHTLIGHT_SIM_SEED={seed} cargo test --test queue_sim\nlast steps:\n{}",
                trace.join("\n")
            );
        }
    }
}
