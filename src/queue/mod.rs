//! The durable offline queue: owns every reading from the moment it is taken until the broker
//! acknowledges it.
//!
//! It knows no MQTT and no hardware: the device pushes readings, asks for the next one to send,
//! reports acknowledgements, connects and disconnects, and calls [`DiskQueue::tick`] at the
//! deadline the queue names ([`DiskQueue::next_deadline`]). Time is passed in; the queue never
//! reads a clock. Every call to the filesystem goes through [`Storage`], so tests can cut the
//! power inside any operation ([`sim::SimFs`]).
//!
//! # Parts
//! - [`frame`]: one reading as a checksummed frame.
//! - [`meta`]: the meta file (run, seq reservation, acknowledged position), two slots.
//! - [`store`]: the segment files: append, sync, read, recover and salvage.
//! - [`window`]: the readings in flight (pure, no storage).
//! - [`medium`]: whether `queue.dir` is on storage at all, or in memory (tmpfs, overlayroot).
//! - [`storage`]: the filesystem trait and the real filesystem; [`sim`]: the simulated one.
//!
//! # Layout on disk (`queue.dir`)
//! - `<first seq, 20 digits>.seg`: append-only segments of frames, oldest first ([`frame`]).
//! - `meta`: 8 KiB, two slots in separate 4 KiB blocks ([`meta`]).
//! - `spare`: [`SPARE_BYTES`] of zeros, removed to make room when a clean stop finds the disk
//!   full, and made again at the next start.
//! - `lock`: held with `flock` by the process that owns the directory.
//!
//! # Durability rules
//! - **Online** (connected), a reading stays in memory while the broker acknowledges it within
//!   `spill_after`; one that is not is written and synced then. While acknowledgements are
//!   prompt, nothing is written (SD cards wear out).
//! - **Offline**, a reading is written at push (it survives `kill -9`: the page cache outlives
//!   the process) and synced within [`OFFLINE_BATCH`] (it survives a power cut). Losing the
//!   connection writes and syncs whatever is in memory at once.
//! - A **clean stop** writes and syncs everything; on a full disk it removes `spare` first. If
//!   that still fails, [`DiskQueue::close`] says how many readings were lost.
//! - A failed write or sync is retried with backoff ([`RETRY_MIN`] doubling to [`RETRY_MAX`]);
//!   meanwhile readings wait in memory (at most [`MEM_CAP`], the oldest dropped and counted).
//!   No deadline the queue names is ever in the past twice in a row.
//!
//! # Invariants
//! - Everything on disk is older than everything in memory; readings are sent strictly in
//!   `seq` order, so the readings in flight are a prefix of those queued.
//! - `seq` is never handed out twice. Every start begins above everything it can know: the
//!   reservation last synced to `meta` ([`SEQ_BLOCK`] at a time), every seq on disk, and the
//!   wall clock in ms. Readings come at most one per 10 ms, so a run's seqs stay below the clock
//!   and the next start (systemd waits 2 s: a block's worth of ms, so the clock has passed every
//!   reservation too) is above them even when nothing could be made durable; the synced
//!   reservation covers a clock that is behind.
//!   Within a run seq rises by one; between runs it jumps (`run` tells a restart from a loss).
//! - `run` rises at every start: the wall clock in ms, or one more than the last run if the
//!   clock is behind that.
//! - Damage is confined: a bad frame costs the frames it covers (counted in `dropped`), not
//!   the segment; an unreadable `meta` is logged, moved aside and replaced, and `seq` goes on
//!   above everything on disk and above the wall clock.

pub mod frame;
pub mod medium;
pub mod meta;
pub mod sim;
pub mod storage;
pub mod store;
pub mod window;

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::payload::Telemetry;
use meta::{Found, Meta, MetaFile};
pub use storage::{Metered, OsStorage, Storage};
use store::Segments;
use window::Window;

/// How long after boot a start waits for a synchronized clock when the meta file cannot be read
/// ([`QueueError::MetaUnreadable`]); after that the clock is taken as it is.
pub const CLOCK_WAIT: Duration = Duration::from_secs(600);
/// While offline, written readings are synced at most this long after the first unsynced one.
pub const OFFLINE_BATCH: Duration = Duration::from_millis(100);
/// How many `seq` values one synced meta write reserves: no more than the milliseconds systemd
/// waits before a restart (`RestartSec=2`), so at the next start the clock has passed every
/// reservation a crashed run made, and the clock alone keeps seq unique if the meta cannot be
/// written then. About 9 synced meta writes a day at the 5 s interval.
pub const SEQ_BLOCK: u64 = 2000;
/// Readings kept in memory while the disk refuses writes.
pub const MEM_CAP: usize = 20_000;
/// The first retry after a failed write or read; it doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(5);
/// Room kept for a clean stop on a full disk: more than [`MEM_CAP`] frames.
pub const SPARE_BYTES: u64 = 1 << 20;
/// How often the acknowledged position is written (unsynced) while draining.
const META_FLUSH: Duration = Duration::from_secs(1);

/// A queue that cannot be opened; the device cannot start.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The meta file (the last run and seq) cannot be read and the clock is not synchronized:
    /// a start now could hand out seqs an earlier run used. The start is retried.
    #[error(
        "cannot read {path} ({source}) and the clock is not synchronized: seq and run could repeat an earlier \
         run's, so the queue waits for the clock (a start after NTP answers, or 10 minutes after boot, goes on \
         without the file)"
    )]
    MetaUnreadable { path: PathBuf, source: io::Error },
    /// Another process (a second `nightlight run`?) has the directory.
    #[error(
        "queue directory {path} is in use by another nightlight process (stop it, or give this one its own queue.dir)"
    )]
    Locked { path: PathBuf },
}

/// A clean stop could not make everything durable.
#[derive(Debug, thiserror::Error)]
#[error("{lost} readings could not be written to {dir} and are lost: {reason}")]
pub struct CloseError {
    pub lost: u64,
    pub dir: PathBuf,
    pub reason: String,
}

/// Counters for logs and health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Readings not yet acknowledged, on disk and in memory.
    pub readings: u64,
    /// Bytes of segment files on disk.
    pub bytes: u64,
    /// Readings dropped: past `queue.max_bytes`, past [`MEM_CAP`] on a failing disk, lost to
    /// damage, or lost at a clean stop, by cause ([`Dropped::total`]: all of them).
    pub dropped: Dropped,
    /// Bytes written and syncs issued to the queue's storage since it was opened.
    pub written_bytes: u64,
    pub syncs: u64,
    /// Failed storage calls (full disk, I/O errors), each retried.
    pub errors: u64,
    /// Whether this run and the seqs handed out are covered by a synced reservation; while
    /// false, only the wall clock keeps the next start above them.
    pub seq_durable: bool,
}

/// Readings dropped, by cause.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// The oldest segments, past `queue.max_bytes`.
    pub cap: u64,
    /// Damaged records (found at start or while sending).
    pub damage: u64,
    /// Past [`MEM_CAP`] in memory while the disk fails.
    pub memory: u64,
    /// Not written at a clean stop (a full or failing disk).
    pub stop: u64,
}

impl Dropped {
    pub fn total(&self) -> u64 {
        self.cap + self.damage + self.memory + self.stop
    }
}

/// Where a reading in flight is kept.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Loc {
    Mem,
    Disk { seg: u64, end: u64 },
}

#[derive(Debug)]
struct Entry {
    rec: Telemetry,
    taken: Instant,
}

/// Retries after a failure, with a growing delay.
#[derive(Debug)]
struct Retry {
    at: Option<Instant>,
    delay: Duration,
}

impl Retry {
    fn new() -> Self {
        Retry { at: None, delay: RETRY_MIN }
    }

    fn waiting(&self, now: Instant) -> bool {
        self.at.is_some_and(|t| t > now)
    }

    fn failed(&mut self, now: Instant) {
        self.at = Some(now + self.delay);
        self.delay = (self.delay * 2).min(RETRY_MAX);
    }

    fn succeeded(&mut self) {
        *self = Retry::new();
    }
}

/// Where `seq` and `run` come from.
struct Seqs {
    run: u64,
    next: u64,
    /// Every seq below this is covered by a synced reservation.
    reserved: u64,
    /// How many seqs a reservation covers ([`SEQ_BLOCK`]).
    block: u64,
}

/// The meta file and what it last made durable.
struct MetaState<F> {
    file: Option<MetaFile<F>>,
    acked_through: u64,
    /// The acknowledged position moved since it was last written.
    dirty_since: Option<Instant>,
}

/// Failure bookkeeping: backoff for writes and for reads, and what has been said.
struct Faults {
    write: Retry,
    read: Retry,
    /// Set while writes fail, so the failure is logged once per episode.
    failing: bool,
    /// The same for the meta file.
    meta_failing: bool,
    /// Set while the byte cap drops readings, so it is logged once per episode.
    capping: bool,
    dropped: Dropped,
    errors: u64,
}

/// The queue. See the module docs for the design.
pub struct DiskQueue<S: Storage = OsStorage> {
    /// Every filesystem call goes through this, counted.
    st: Metered<S>,
    /// `queue.dir`.
    dir: PathBuf,
    /// Held while this process owns `dir` (`None` when it cannot be taken: a read-only or
    /// unusable directory).
    _lock: Option<S::Lock>,
    /// `queue.max_bytes`: the oldest segments go past it.
    max_bytes: u64,
    /// The readings on disk.
    segments: Segments<Metered<S>>,
    /// The meta file and the acknowledged position.
    meta: MetaState<S::File>,
    /// `run`, the next `seq` and the reservation.
    seqs: Seqs,
    /// Readings not on disk, oldest first; the first `.1` of them are in flight.
    mem: (VecDeque<Entry>, usize),
    /// The readings in flight, and where each is kept.
    window: Window<Loc>,
    /// Where sending stands.
    send: SendPos,
    /// Online or not, and the time.
    link: Link,
    /// Retries, counters and what has been logged.
    faults: Faults,
    /// Where the oldest unacknowledged record on disk was, and its `ts` ([`DiskQueue::oldest_ts`]).
    oldest: Option<((u64, u64), u64)>,
}

/// Where sending stands.
struct SendPos {
    /// The next disk record to send; `None` when every disk record has been sent.
    next: Option<(u64, u64)>,
    /// What [`DiskQueue::peek_unsent`] returned, and for a disk record where the next starts,
    /// so [`DiskQueue::mark_sent`] needs no second read (which could fail).
    peeked: Option<(Telemetry, Option<(u64, u64)>)>,
}

/// The connection, as the device reported it, and the policy that depends on it.
struct Link {
    online: bool,
    /// The last time the queue was told.
    now: Instant,
    spill_after: Duration,
}

impl DiskQueue<OsStorage> {
    /// Opens (or creates) the queue in `dir` on the real filesystem, recovering whatever a
    /// previous run left.
    ///
    /// # Errors
    /// The directory cannot be created or read, or another process holds it.
    pub fn open(dir: &Path, max_bytes: u64, spill_after: Duration) -> Result<Self, QueueError> {
        // Trusted once synchronized, or once NTP had ten minutes since boot to answer and did
        // not (a Pi that is never online): waiting longer would keep the nightlight dark for good.
        let trusted = crate::clock::trusted(CLOCK_WAIT);
        Self::open_in(OsStorage, dir, max_bytes, spill_after, Instant::now(), (crate::clock::unix_ms(), trusted))
    }
}

impl<S: Storage> DiskQueue<S> {
    /// Opens the queue in `dir` on `st`; `wall` is the wall clock (Unix ms) and whether it can be
    /// trusted (synchronized, or [`CLOCK_WAIT`] after boot), for `run` and for `seq` when nothing
    /// can be made durable.
    ///
    /// # Errors
    /// Another process holds the directory; or the meta file cannot be read while the clock is
    /// not synchronized: without either, `seq` and `run` could repeat an earlier run's (a start
    /// once the clock is synchronized goes on).
    pub fn open_in(
        st: S,
        dir: &Path,
        max_bytes: u64,
        spill_after: Duration,
        now: Instant,
        wall: (u64, bool),
    ) -> Result<Self, QueueError> {
        let (wall_ms, wall_synced) = wall;
        let st = Metered::new(st);
        // Only another process holding the directory stops a start. Anything else the directory
        // does wrong (read-only, unreadable entries, not there at all) is logged and counted, and
        // the queue runs on what it can use: in memory when nothing, with seq from the clock.
        let mut errors = 0;
        let mut trouble = |what: &str, e: &io::Error| {
            errors += 1;
            error!(dir = %dir.display(), error = %e,
                "queue: {what}; running on what can be used (health: queue_errors, queue_durable false)");
        };
        if let Err(e) = st.create_dir_all(dir) {
            trouble("cannot create the directory", &e);
        }
        let lock = match st.lock(dir) {
            Ok(l) => Some(l),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(QueueError::Locked { path: dir.to_path_buf() })
            }
            Err(e) => {
                trouble("cannot lock the directory (make sure one device uses it)", &e);
                None
            }
        };
        let (file, prior) = match MetaFile::open(&st, dir) {
            Ok(Found::Valid(f, m)) => (Some(f), m),
            Ok(Found::Missing) => (None, Meta::default()),
            Ok(Found::Unreadable) if !wall_synced => {
                return Err(QueueError::MetaUnreadable {
                    path: dir.join("meta"),
                    source: io::Error::new(io::ErrorKind::InvalidData, "neither slot is valid"),
                });
            }
            Ok(Found::Unreadable) => {
                error!(dir = %dir.display(),
                    "queue: the meta file is unreadable; moved aside as meta.corrupt, seq goes on above the disk and the clock");
                let _ = st.rename(&dir.join("meta"), &dir.join("meta.corrupt"));
                (None, Meta::default())
            }
            Err(e) if !wall_synced => {
                return Err(QueueError::MetaUnreadable { path: dir.join("meta"), source: e });
            }
            Err(e) => {
                trouble("cannot read the meta file; seq goes on above the disk and the synchronized clock", &e);
                (None, Meta::default())
            }
        };
        let segment_bytes = (max_bytes / 8).clamp(4096, 4 * 1024 * 1024);
        let mut segments = Segments::new(dir, segment_bytes);
        let found = match segments.recover(&st, prior.acked_through) {
            Ok(found) => found,
            Err(e) => {
                trouble("cannot list the segments; what they hold stays on disk, unsent", &e);
                segments = Segments::new(dir, segment_bytes);
                store::Recovered::default()
            }
        };
        errors += found.unreadable;
        let next = prior.reserved.max(found.max_seq + 1).max(prior.acked_through + 1).max(wall_ms).max(1);
        let run = (prior.run + 1).max(wall_ms);
        let mut q = DiskQueue {
            st,
            dir: dir.to_path_buf(),
            _lock: lock,
            max_bytes,
            segments,
            meta: MetaState { file, acked_through: prior.acked_through, dirty_since: None },
            // What `meta` holds (synced when it was opened) until this run reserves more: the
            // lazy writes of the acknowledged position carry it, so they never lower it.
            seqs: Seqs { run, next, reserved: prior.reserved, block: SEQ_BLOCK },
            mem: (VecDeque::new(), 0),
            window: Window::default(),
            send: SendPos { next: None, peeked: None },
            link: Link { online: false, now, spill_after },
            faults: Faults {
                write: Retry::new(),
                read: Retry::new(),
                failing: false,
                meta_failing: false,
                capping: false,
                dropped: Dropped { damage: found.lost, ..Dropped::default() },
                errors,
            },
            oldest: None,
        };
        q.reserve(next + SEQ_BLOCK);
        q.make_spare();
        q.send.next = q.segments.front();
        Ok(q)
    }

    /// Uses segments of `bytes` instead of the default (an eighth of `max_bytes`, at most 4 MiB):
    /// small segments make rotation, caps and corruption cheap to exercise in tests.
    pub fn with_segment_bytes(mut self, bytes: u64) -> Self {
        self.segments.set_segment_bytes(bytes.max(64));
        self
    }

    /// Reserves `n` seqs at a time instead of [`SEQ_BLOCK`] (from the next reservation on):
    /// small blocks make reservations, and their failures, frequent in tests.
    pub fn with_seq_block(mut self, n: u64) -> Self {
        self.seqs.block = n.max(1);
        self
    }

    /// This run's number (telemetry `run`).
    pub fn run(&self) -> u64 {
        self.seqs.run
    }

    /// Writes a synced meta with `reserved`; true on success. A failure is logged once per
    /// episode; seq goes on without the reservation (see the module docs).
    fn reserve(&mut self, reserved: u64) -> bool {
        let m = Meta { run: self.seqs.run, reserved, acked_through: self.meta.acked_through };
        let res = match &mut self.meta.file {
            Some(f) if !f.is_old_layout() => f.write(&self.st, &m, true),
            _ => MetaFile::create(&self.st, &self.dir, &m).map(|f| self.meta.file = Some(f)),
        };
        match res {
            Ok(()) => {
                self.seqs.reserved = reserved;
                if std::mem::take(&mut self.faults.meta_failing) {
                    info!(dir = %self.dir.display(), "queue: the meta file is written again");
                }
                true
            }
            Err(e) => {
                if !std::mem::replace(&mut self.faults.meta_failing, true) {
                    warn!(dir = %self.dir.display(), error = %e,
                        "queue: cannot write the meta file; seq goes on, kept unique by the wall clock (health: seq_durable false)");
                }
                self.faults.errors += 1;
                false
            }
        }
    }

    /// Makes `spare` if it is missing; a disk without room for it goes without.
    fn make_spare(&mut self) {
        let path = self.dir.join("spare");
        let Ok(f) = self.st.create(&path) else { return }; // exists (or cannot be made)
        let zeros = vec![0u8; 64 * 1024];
        let bytes = SPARE_BYTES.min(self.max_bytes / 16).max(zeros.len() as u64);
        let mut at = 0;
        let mut res = Ok(());
        while at < bytes && res.is_ok() {
            res = self.st.write_at(&f, &zeros, at);
            at += zeros.len() as u64;
        }
        if res.and_then(|()| self.st.sync(&f)).and_then(|()| self.st.sync_dir(&self.dir)).is_err() {
            let _ = self.st.remove(&path);
            info!(dir = %self.dir.display(), "queue: no room for the spare; a clean stop on a full disk may lose readings");
        }
    }

    /// Takes ownership of a reading taken at `now` (wall clock `ts`) and gives it the next `seq`.
    pub fn push(&mut self, now: Instant, light: u16, ts: u64, lux: Option<f32>) -> u64 {
        self.push_stamped(now, light, ts, true, lux)
    }

    /// As [`DiskQueue::push`], saying whether `ts` came from a clock known to be synchronized.
    pub fn push_stamped(&mut self, now: Instant, light: u16, ts: u64, ts_ok: bool, lux: Option<f32>) -> u64 {
        self.link.now = now;
        if self.seqs.next >= self.seqs.reserved
            && !self.faults.write.waiting(now)
            && !self.reserve(self.seqs.next + self.seqs.block)
        {
            self.faults.write.failed(now);
        }
        let seq = self.seqs.next;
        self.seqs.next += 1;
        let rec = Telemetry { light, ts, seq, run: self.seqs.run, lux, ts_ok };
        if !self.link.online && self.mem.0.is_empty() && !self.faults.write.waiting(now) {
            let mut buf = Vec::with_capacity(frame::MAX_LEN);
            frame::encode(&rec, &mut buf);
            match self.segments.append(&self.st, seq, &buf, 1, now) {
                Ok((seg, at)) => {
                    self.wrote();
                    self.send.next = self.send.next.or(Some((seg, at)));
                    self.enforce_cap();
                    return seq;
                }
                Err(e) => self.write_failed(&e, now),
            }
        }
        self.mem.0.push_back(Entry { rec, taken: now });
        if self.faults.failing && self.mem.0.len() > MEM_CAP {
            self.drop_oldest_in_memory();
        }
        seq
    }

    /// The next reading to send, oldest first, or `None` when everything is in flight (or the
    /// disk cannot be read just now: it is retried at [`next_deadline`](Self::next_deadline)).
    pub fn peek_unsent(&mut self) -> Option<Telemetry> {
        loop {
            let next = match self.send.next {
                None => self.mem.0.get(self.mem.1).map(|e| (e.rec, None)),
                Some(_) if self.faults.read.waiting(self.link.now) => return None,
                Some((seg, off)) => match self.segments.read(&self.st, seg, off) {
                    Ok(Some((rec, end))) => {
                        self.faults.read.succeeded();
                        Some((rec, Some((seg, end))))
                    }
                    Ok(None) => {
                        self.send.next = self.segments.after(seg);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        let lost = self.segments.skip_rest(seg, off);
                        warn!(segment = seg, offset = off, lost, error = %e, "queue: damaged records skipped");
                        self.faults.dropped.damage += lost;
                        self.send.next = self.segments.after(seg);
                        continue;
                    }
                    Err(e) => {
                        warn!(dir = %self.dir.display(), error = %e, "queue: cannot read the backlog; retrying");
                        self.faults.errors += 1;
                        self.faults.read.failed(self.link.now);
                        return None;
                    }
                },
            };
            self.send.peeked = next;
            match next {
                // Acknowledged before a reconnect: count it as sent and acknowledged.
                Some((rec, _)) if self.window.take_done(rec.seq) => {
                    self.mark_sent();
                    self.window.ack(rec.seq);
                    self.forget_acked_front();
                }
                other => return other.map(|(rec, _)| rec),
            }
        }
    }

    /// Marks the reading last returned by [`peek_unsent`](Self::peek_unsent) as in flight.
    pub fn mark_sent(&mut self) {
        match self.send.peeked.take() {
            Some((rec, Some((seg, end)))) => {
                self.window.sent(rec.seq, Loc::Disk { seg, end });
                self.send.next = Some((seg, end));
            }
            Some((rec, None)) => {
                self.window.sent(rec.seq, Loc::Mem);
                self.mem.1 += 1;
            }
            None => {}
        }
    }

    /// How many readings are in flight (sent, not yet acknowledged).
    pub fn in_flight(&self) -> usize {
        self.window.len()
    }

    /// The broker acknowledged `seq`: forget it (and everything acknowledged before it).
    pub fn ack(&mut self, seq: u64) {
        self.window.ack(seq);
        self.forget_acked_front();
    }

    fn forget_acked_front(&mut self) {
        while let Some((seq, loc)) = self.window.pop_acked() {
            self.meta.acked_through = self.meta.acked_through.max(seq);
            match loc {
                Loc::Mem => {
                    self.mem.0.pop_front();
                    self.mem.1 -= 1;
                }
                Loc::Disk { seg, end } => {
                    self.segments.forget_front(&self.st, seg, end);
                    self.meta.dirty_since.get_or_insert(self.link.now);
                }
            }
        }
    }

    /// The connection is up: new readings stay in memory while they are acknowledged promptly.
    pub fn connected(&mut self) {
        self.link.online = true;
    }

    /// The connection is gone: whatever was in flight will be sent again, oldest first, and
    /// everything in memory is written and synced now.
    pub fn disconnected(&mut self, now: Instant) {
        self.link.now = now;
        self.link.online = false;
        self.resend();
        if !self.faults.write.waiting(now) {
            self.spill(self.mem.0.len(), now);
        }
    }

    /// Whatever is in flight will be sent again, oldest first (the broker refused a reading);
    /// what was acknowledged meanwhile is not.
    pub fn resend(&mut self) {
        self.window.rewind();
        self.send.peeked = None;
        self.mem.1 = 0;
        self.send.next = self.segments.front();
    }

    /// When [`tick`](Self::tick) should next run, if anything is waiting.
    pub fn next_deadline(&self) -> Option<Instant> {
        let write_pending = !self.mem.0.is_empty() || self.segments.unsynced_since().is_some();
        let mut at: Option<Instant> = None;
        let mut earliest = |t: Option<Instant>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        match self.faults.write.at {
            Some(retry) if write_pending => earliest(Some(retry)),
            _ => {
                let wait = if self.link.online { self.link.spill_after } else { Duration::ZERO };
                earliest(self.mem.0.front().map(|e| e.taken + wait));
                earliest(self.segments.unsynced_since().map(|t| t + OFFLINE_BATCH));
            }
        }
        earliest(self.meta.dirty_since.map(|t| t + META_FLUSH));
        if self.send.next.is_some() {
            earliest(self.faults.read.at);
        }
        at
    }

    /// Does what is due at `now`: writes readings not acknowledged in time, syncs, writes the
    /// acknowledged position.
    pub fn tick(&mut self, now: Instant) {
        self.link.now = now;
        if self.faults.read.at.is_some_and(|t| t <= now) {
            self.faults.read.at = None; // the next peek_unsent tries again
        }
        if !self.faults.write.waiting(now) {
            let due = if self.link.online {
                self.mem.0.iter().take_while(|e| e.taken + self.link.spill_after <= now).count()
            } else {
                self.mem.0.len()
            };
            if due > 0 {
                self.spill(due, now);
            } else if self.segments.unsynced_since().is_some_and(|t| t + OFFLINE_BATCH <= now)
                || self.faults.write.at.is_some()
            {
                self.sync_segments(now);
            }
        }
        if self.meta.dirty_since.is_some_and(|t| t + META_FLUSH <= now) {
            let m = Meta { run: self.seqs.run, reserved: self.seqs.reserved, acked_through: self.meta.acked_through };
            // Unsynced: losing it only costs duplicates after a power cut.
            let res = match &mut self.meta.file {
                Some(f) if !f.is_old_layout() => f.write(&self.st, &m, false),
                _ => Err(io::Error::other("no meta file")),
            };
            // A failure is retried at the next flush, not at once.
            self.meta.dirty_since = res.is_err().then_some(now);
            if res.is_err() {
                self.faults.errors += 1;
            }
        }
    }

    /// A clean stop: everything still unacknowledged goes to disk and is synced, and the
    /// reservation ends exactly at the next `seq` (the next start still begins above the clock).
    ///
    /// # Errors
    /// Readings that could not be written even after removing the spare: they are lost (and
    /// counted in `dropped`).
    pub fn close(&mut self, now: Instant) -> Result<(), CloseError> {
        self.link.now = now;
        let mut result = self.flush_all(now);
        if result.is_err() && self.st.remove(&self.dir.join("spare")).is_ok() {
            let _ = self.st.sync_dir(&self.dir);
            info!(dir = %self.dir.display(), "queue: the disk is full; removed the spare to write what is left");
            result = self.flush_all(now);
        }
        if let Err(e) = result {
            let lost = self.mem.0.len() as u64;
            self.faults.dropped.stop += lost;
            self.mem.0.clear();
            self.mem.1 = 0;
            return Err(CloseError { lost, dir: self.dir.clone(), reason: e.to_string() });
        }
        self.reserve(self.seqs.next);
        Ok(())
    }

    fn flush_all(&mut self, now: Instant) -> io::Result<()> {
        self.faults.write.succeeded(); // no backoff at a stop
        self.spill(self.mem.0.len(), now);
        if !self.mem.0.is_empty() {
            return Err(io::Error::other("the disk refused the write"));
        }
        self.segments.sync(&self.st)
    }

    /// Counters for logs and health.
    pub fn stats(&self) -> QueueStats {
        let (written_bytes, syncs) = self.st.counts();
        QueueStats {
            // Saturating: acknowledged readings held to be skipped after a reconnect can outlive
            // the segment that held them (dropped at the cap, or damaged); the simulator's seed
            // 4863 (of 8000) finds it. A count for health, not the data.
            readings: (self.segments.records() + self.mem.0.len() as u64)
                .saturating_sub(self.window.acked_held() as u64),
            bytes: self.segments.bytes(),
            dropped: self.faults.dropped,
            written_bytes,
            syncs,
            errors: self.faults.errors,
            // This run's own reservation (which records `run` too) is synced and covers them.
            seq_durable: !self.faults.meta_failing && self.seqs.next <= self.seqs.reserved,
        }
    }

    /// The wall-clock `ts` (Unix ms) of the oldest reading not yet acknowledged, or `None` when
    /// nothing is queued (or the oldest cannot be read just now). Reads one record from disk
    /// when the oldest changed since the last call: for metrics and health, not per reading.
    pub fn oldest_ts(&mut self) -> Option<u64> {
        let Some(mut at) = self.segments.front() else {
            return self.mem.0.front().map(|e| e.rec.ts);
        };
        if let Some((cached, ts)) = self.oldest {
            if cached == at {
                return Some(ts);
            }
        }
        loop {
            match self.segments.read(&self.st, at.0, at.1) {
                Ok(Some((rec, _))) => {
                    self.oldest = Some((at, rec.ts));
                    return Some(rec.ts);
                }
                Ok(None) => at = self.segments.after(at.0)?,
                Err(_) => return None, // counted where the sender meets it
            }
        }
    }

    /// Syncs what was written, and notes the outcome.
    fn sync_segments(&mut self, now: Instant) {
        match self.segments.sync(&self.st) {
            Ok(()) => self.wrote(),
            Err(e) => self.write_failed(&e, now),
        }
    }

    fn wrote(&mut self) {
        if self.faults.failing {
            info!(dir = %self.dir.display(), "queue: writing to disk again");
            self.faults.failing = false;
        }
        self.faults.write.succeeded();
    }

    fn write_failed(&mut self, e: &io::Error, now: Instant) {
        self.faults.errors += 1;
        if !self.faults.failing {
            warn!(dir = %self.dir.display(), error = %e,
                "queue: cannot write to disk; keeping up to {MEM_CAP} readings in memory and retrying with backoff");
            self.faults.failing = true;
        }
        self.faults.write.failed(now);
        while self.mem.0.len() > MEM_CAP {
            self.drop_oldest_in_memory();
        }
    }

    /// Writes and syncs the first `n` in-memory readings: one write per segment touched.
    fn spill(&mut self, mut n: usize, now: Instant) {
        self.send.peeked = None; // what it described may move
        while n > 0 {
            // One segment's room at most, so a segment never grows much past its size.
            let room = self.segments.room() as usize;
            let mut buf = Vec::with_capacity(n.min(4096) * frame::MAX_LEN);
            let mut take = 0;
            for e in self.mem.0.iter().take(n) {
                if take > 0 && buf.len() + frame::len(&e.rec) > room {
                    break;
                }
                frame::encode(&e.rec, &mut buf);
                take += 1;
            }
            let first = self.mem.0[0].rec.seq;
            let (seg, start) = match self.segments.append(&self.st, first, &buf, take as u64, now) {
                Ok(at) => at,
                Err(e) => return self.write_failed(&e, now),
            };
            let mut end = start;
            let mut first_unsent = None;
            for i in 0..take {
                let e = self.mem.0.pop_front().expect("take <= len");
                let begin = end;
                end += frame::len(&e.rec) as u64;
                if i < self.mem.1 {
                    // In flight: its acknowledgement now frees disk instead of memory.
                    self.window.relocate(e.rec.seq, Loc::Disk { seg, end });
                } else if first_unsent.is_none() {
                    first_unsent = Some(begin);
                }
            }
            self.mem.1 -= take.min(self.mem.1);
            if self.send.next.is_none() {
                self.send.next = first_unsent.map(|off| (seg, off));
            }
            n -= take;
        }
        self.sync_segments(now);
        self.enforce_cap();
    }

    fn enforce_cap(&mut self) {
        if self.segments.bytes() <= self.max_bytes {
            self.faults.capping = false;
            return;
        }
        while self.segments.bytes() > self.max_bytes {
            let Some((id, false)) = self.segments.oldest() else { break };
            let lost = self.segments.remove_front(&self.st);
            self.send.peeked = None;
            self.faults.dropped.cap += lost;
            self.window.forget_where(|l| matches!(l, Loc::Disk { seg, .. } if *seg == id));
            if self.send.next.is_some_and(|(s, _)| s == id) {
                self.send.next = self.segments.front();
            }
            if !self.faults.capping {
                warn!(
                    lost,
                    max_bytes = self.max_bytes,
                    "queue: over queue.max_bytes; dropping the oldest readings (logged once until it recovers)"
                );
                self.faults.capping = true;
            }
        }
    }

    fn drop_oldest_in_memory(&mut self) {
        if self.mem.1 < self.mem.0.len() {
            self.mem.0.remove(self.mem.1);
            self.faults.dropped.memory += 1;
        }
    }
}

#[cfg(test)]
mod tests;
