//! The durable offline queue: owns every reading from the moment it is taken until the broker
//! acknowledges it.
//!
//! It knows no MQTT and no hardware: the device pushes readings, asks for the next one to send,
//! reports acknowledgements and disconnects, and calls [`DiskQueue::tick`] at the deadline the
//! queue names. See the README section "Offline queue" for the figures.
//!
//! # Layout on disk (`queue.dir`)
//! - `<first seq, 20 digits>.seg`: append-only segments of framed records, oldest first.
//!   A frame is `[len: u8][crc32(body): u32 LE][body]`, the body `seq u64, ts u64, light u16,
//!   flags u8[, lux f32]`, all little-endian: 24 bytes a reading (28 with lux).
//! - `meta`: two 512-byte slots written alternately (`magic, generation, next_seq reserved,
//!   acked_through, crc32`), so a torn write of one slot leaves the other.
//!
//! # Design
//! - Records live in memory first (`mem`). A record goes to disk when it has not been
//!   acknowledged within `spill_after` (online), within [`OFFLINE_BATCH`] (offline: group commit),
//!   or at [`DiskQueue::close`]. While the broker acknowledges promptly nothing is written.
//! - Every spill is one `write` and one `fdatasync`; a new segment also syncs the directory.
//! - Everything on disk is older than everything in `mem`, and records are sent strictly in `seq`
//!   order: a prefix of the unacknowledged records is in flight at any time.
//! - Acknowledged records at the front are forgotten; a segment is deleted once every record in it
//!   is acknowledged; `acked_through` is written lazily (a crash can only cause duplicates).
//! - `seq` values are reserved in blocks of [`SEQ_BLOCK`] with a synced meta write, so `seq` is
//!   never reused after a crash (it jumps forward instead) and costs one small write per block.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::payload::Telemetry;

/// While offline, readings are synced to disk in batches at most this old.
pub const OFFLINE_BATCH: Duration = Duration::from_millis(100);
/// How many `seq` values one synced meta write reserves.
pub const SEQ_BLOCK: u64 = 4096;
/// Readings kept in memory when the disk cannot be written (full, read-only).
pub const MEM_CAP: usize = 20_000;
/// How often the acknowledged position is written while draining.
const META_FLUSH: Duration = Duration::from_secs(1);
const META_SLOT: u64 = 512;
const META_MAGIC: &[u8; 4] = b"NLQ1";
const FRAME_HEAD: usize = 5;
const BODY_LEN: usize = 19;
const BODY_LEN_LUX: usize = 23;
const READ_CHUNK: usize = 64 * 1024;

/// A queue that cannot be opened; the device cannot start.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue directory or a file in it cannot be created, read or written: check the path
    /// and its permissions (`queue.dir`).
    #[error("queue directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Counters for logs and health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Readings not yet acknowledged, on disk and in memory.
    pub readings: u64,
    /// Bytes of segment files on disk.
    pub bytes: u64,
    /// Readings dropped because of `queue.max_bytes` or a failing disk.
    pub dropped: u64,
}

#[derive(Debug)]
struct Segment {
    /// The `seq` of its first record, which is also its file name.
    id: u64,
    len: u64,
    records: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Loc {
    Mem,
    Disk { seg: u64, end: u64 },
}

#[derive(Debug)]
struct InFlight {
    seq: u64,
    acked: bool,
    loc: Loc,
}

#[derive(Debug)]
struct Entry {
    rec: Telemetry,
    taken: Instant,
}

/// A window into one segment file, so drain reads are large and few.
struct Reader {
    seg: u64,
    file: File,
    start: u64,
    buf: Vec<u8>,
}

/// The queue. See the module docs for the design.
pub struct DiskQueue {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    spill_after: Duration,
    segments: VecDeque<Segment>,
    /// Append handle for the last segment.
    active: Option<File>,
    /// Offset in `segments[0]` of the first record not yet acknowledged.
    head: u64,
    /// Records of `segments[0]` before `head`.
    head_records: u64,
    /// The next disk record to send; `None` when every disk record has been sent.
    read: Option<(u64, u64)>,
    reader: Option<Reader>,
    mem: VecDeque<Entry>,
    /// How many records at the front of `mem` are in flight.
    mem_sent: usize,
    inflight: VecDeque<InFlight>,
    /// Acknowledged while an older reading was not, then rewound: not sent again.
    done: BTreeSet<u64>,
    next_seq: u64,
    reserved: u64,
    acked_through: u64,
    meta: File,
    meta_gen: u64,
    meta_dirty_since: Option<Instant>,
    disk_records: u64,
    dropped: u64,
    /// Set while the disk refuses writes; cleared (and logged) when it takes them again.
    disk_failed: bool,
    /// Set while the byte cap is dropping readings, so it is logged once per episode.
    capping: bool,
}

impl DiskQueue {
    /// Opens (or creates) the queue in `dir`, recovering whatever a previous run left.
    ///
    /// A torn record at the end of the last segment is cut off; a segment that fails its checks
    /// elsewhere is renamed to `*.corrupt` and skipped.
    ///
    /// # Errors
    /// The directory or the meta file cannot be created or opened.
    pub fn open(dir: &Path, max_bytes: u64, spill_after: Duration) -> Result<Self, QueueError> {
        let io_err = |source| QueueError::Io { path: dir.to_path_buf(), source };
        fs::create_dir_all(dir).map_err(io_err)?;
        let meta_path = dir.join("meta");
        let meta = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&meta_path)
            .map_err(|source| QueueError::Io { path: meta_path.clone(), source })?;
        let (meta_gen, meta_next, acked_through) = read_meta(&meta);
        let segment_bytes = (max_bytes / 8).clamp(4096, 4 * 1024 * 1024);
        let mut q = DiskQueue {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            spill_after,
            segments: VecDeque::new(),
            active: None,
            head: 0,
            head_records: 0,
            read: None,
            reader: None,
            mem: VecDeque::new(),
            mem_sent: 0,
            inflight: VecDeque::new(),
            done: BTreeSet::new(),
            next_seq: meta_next.max(1),
            reserved: 0,
            acked_through,
            meta,
            meta_gen,
            meta_dirty_since: None,
            disk_records: 0,
            dropped: 0,
            disk_failed: false,
            capping: false,
        };
        q.recover().map_err(io_err)?;
        q.reserved = q.next_seq;
        q.rewind();
        Ok(q)
    }

    /// Uses segments of `bytes` instead of the default (an eighth of `max_bytes`, at most 4 MiB):
    /// small segments make rotation, caps and corruption cheap to exercise in tests.
    pub fn with_segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes.max(64);
        self
    }

    /// Scans the segments: validates every frame, finds the acknowledged prefix and `next_seq`.
    fn recover(&mut self) -> io::Result<()> {
        let mut ids: Vec<u64> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".seg")?.parse().ok()))
            .collect();
        ids.sort_unstable();
        let count = ids.len();
        for (i, id) in ids.into_iter().enumerate() {
            let path = self.seg_path(id);
            // Stream the segment through a small buffer: a 1M-reading backlog must not cost
            // its size in memory at start.
            let mut file = File::open(&path)?;
            let file_len = file.metadata()?.len() as usize;
            let mut buf = Vec::with_capacity(READ_CHUNK);
            let mut chunk = vec![0u8; READ_CHUNK];
            let mut off = 0usize;
            let (mut records, mut acked_records, mut acked_end) = (0u64, 0u64, 0u64);
            let mut last_seq = None;
            let mut eof = false;
            let mut pos = 0usize;
            loop {
                match decode(&buf[pos..]) {
                    Some((rec, n)) => {
                        pos += n;
                        off += n;
                        records += 1;
                        if rec.seq <= self.acked_through {
                            acked_records += 1;
                            acked_end = off as u64;
                        }
                        last_seq = Some(rec.seq);
                    }
                    None if eof => break,
                    None if buf.len() - pos >= FRAME_HEAD + BODY_LEN_LUX => break, // a bad frame
                    None => {
                        buf.drain(..pos);
                        pos = 0;
                        let n = file.read(&mut chunk)?;
                        eof = n == 0;
                        buf.extend_from_slice(&chunk[..n]);
                    }
                }
            }
            if off < file_len {
                if i + 1 == count {
                    warn!(segment = %path.display(), offset = off, lost_bytes = file_len - off,
                        "queue: cut a torn record off the end of the last segment");
                    let f = OpenOptions::new().write(true).open(&path)?;
                    f.set_len(off as u64)?;
                    f.sync_all()?;
                } else {
                    self.move_aside(id, &format!("bad frame at offset {off}"));
                    continue;
                }
            }
            if let Some(s) = last_seq {
                self.next_seq = self.next_seq.max(s + 1);
            }
            if records > 0 && acked_records == records && i + 1 < count {
                let _ = fs::remove_file(&path);
                continue;
            }
            if self.segments.is_empty() {
                self.head = acked_end;
                self.head_records = acked_records;
            }
            self.disk_records += records - if self.segments.is_empty() { acked_records } else { 0 };
            self.segments.push_back(Segment { id, len: off as u64, records });
        }
        Ok(())
    }

    fn seg_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.seg"))
    }

    fn move_aside(&mut self, id: u64, why: &str) {
        let from = self.seg_path(id);
        let to = from.with_extension("seg.corrupt");
        warn!(segment = %from.display(), moved_to = %to.display(), reason = why,
            "queue: segment failed its checks; moved aside, carrying on with the next");
        if fs::rename(&from, &to).is_err() {
            let _ = fs::remove_file(&from);
        }
    }

    /// Takes ownership of a reading and gives it the next `seq`.
    pub fn push(&mut self, light: u16, ts: u64, lux: Option<f32>) -> u64 {
        if self.next_seq >= self.reserved {
            self.reserved = self.next_seq + SEQ_BLOCK;
            self.write_meta(self.reserved, true);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.mem.push_back(Entry { rec: Telemetry { light, ts, seq, lux }, taken: Instant::now() });
        if self.disk_failed && self.mem.len() > MEM_CAP {
            self.drop_oldest_in_memory();
        }
        seq
    }

    /// The next reading to send, oldest first, or `None` when everything is in flight.
    pub fn peek_unsent(&mut self) -> Option<Telemetry> {
        loop {
            let next = match self.read {
                None => self.mem.get(self.mem_sent).map(|e| e.rec),
                Some((seg, off)) => match self.read_record(seg, off) {
                    Ok(Some((rec, _))) => Some(rec),
                    Ok(None) => {
                        self.advance_read(seg);
                        continue;
                    }
                    Err(e) => {
                        self.drop_segment(seg, Some(&e.to_string()));
                        continue;
                    }
                },
            };
            match next {
                // Acknowledged before a reconnect: count it as sent and acknowledged.
                Some(rec) if self.done.remove(&rec.seq) => {
                    self.mark_sent();
                    if let Some(f) = self.inflight.back_mut() {
                        f.acked = true;
                    }
                    self.forget_acked_front();
                }
                other => return other,
            }
        }
    }

    /// Marks the reading last returned by [`peek_unsent`](Self::peek_unsent) as in flight.
    pub fn mark_sent(&mut self) {
        if let Some((seg, off)) = self.read {
            if let Ok(Some((rec, end))) = self.read_record(seg, off) {
                self.inflight.push_back(InFlight { seq: rec.seq, acked: false, loc: Loc::Disk { seg, end } });
                self.read = Some((seg, end));
                if end >= self.seg_len(seg) {
                    self.advance_read(seg);
                }
            }
        } else if let Some(e) = self.mem.get(self.mem_sent) {
            self.inflight.push_back(InFlight { seq: e.rec.seq, acked: false, loc: Loc::Mem });
            self.mem_sent += 1;
        }
    }

    /// How many readings are in flight (sent, not yet acknowledged).
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// The broker acknowledged `seq`: forget it (and everything acknowledged before it).
    pub fn ack(&mut self, seq: u64) {
        let Some(f) = self.inflight.iter_mut().find(|f| f.seq == seq) else { return };
        f.acked = true;
        self.forget_acked_front();
    }

    /// Forgets the acknowledged readings at the front of the in-flight window.
    fn forget_acked_front(&mut self) {
        while self.inflight.front().is_some_and(|f| f.acked) {
            let f = self.inflight.pop_front().expect("front exists");
            self.acked_through = self.acked_through.max(f.seq);
            match f.loc {
                Loc::Mem => {
                    self.mem.pop_front();
                    self.mem_sent -= 1;
                }
                Loc::Disk { seg, end } => self.forget_disk_front(seg, end),
            }
        }
    }

    fn forget_disk_front(&mut self, seg: u64, end: u64) {
        let Some(front) = self.segments.front() else { return };
        if front.id != seg {
            return; // that segment was dropped at the cap or moved aside
        }
        self.head = end;
        self.head_records += 1;
        self.disk_records = self.disk_records.saturating_sub(1);
        self.meta_dirty_since.get_or_insert_with(Instant::now);
        if self.head >= front.len {
            self.remove_front_segment();
        }
    }

    fn remove_front_segment(&mut self) {
        if let Some(s) = self.segments.pop_front() {
            let _ = fs::remove_file(self.seg_path(s.id));
            if self.segments.is_empty() {
                self.active = None;
            }
            if self.reader.as_ref().is_some_and(|r| r.seg == s.id) {
                self.reader = None;
            }
        }
        self.head = 0;
        self.head_records = 0;
    }

    /// The connection is gone: whatever was in flight will be sent again, oldest first.
    pub fn rewind(&mut self) {
        self.done.extend(self.inflight.iter().filter(|f| f.acked).map(|f| f.seq));
        self.inflight.clear();
        self.mem_sent = 0;
        self.read = self.segments.front().map(|s| (s.id, self.head));
        if let Some((seg, off)) = self.read {
            if off >= self.seg_len(seg) {
                self.advance_read(seg);
            }
        }
    }

    /// When [`tick`](Self::tick) should next run, if anything is waiting.
    pub fn next_deadline(&self, offline: bool) -> Option<Instant> {
        let spill = self.mem.front().map(|e| e.taken + if offline { OFFLINE_BATCH } else { self.spill_after });
        let meta = self.meta_dirty_since.map(|t| t + META_FLUSH);
        match (spill, meta) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Writes due readings to disk in one synced batch, and the acknowledged position.
    pub fn tick(&mut self, now: Instant, offline: bool) {
        let wait = if offline { OFFLINE_BATCH } else { self.spill_after };
        let due = self.mem.iter().take_while(|e| e.taken + wait <= now).count();
        self.spill(due);
        if self.meta_dirty_since.is_some_and(|t| t + META_FLUSH <= now) {
            self.write_meta(self.reserved, false);
        }
    }

    /// Everything still unacknowledged goes to disk, and `next_seq` is recorded exactly, so a
    /// clean stop neither loses a reading nor skips a `seq`.
    pub fn close(&mut self) {
        self.spill(self.mem.len());
        self.reserved = self.next_seq;
        self.write_meta(self.next_seq, true);
    }

    /// Counters for logs and health.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            readings: self.disk_records + self.mem.len() as u64
                - (self.inflight.iter().filter(|f| f.acked).count() + self.done.len()) as u64,
            bytes: self.segments.iter().map(|s| s.len).sum(),
            dropped: self.dropped,
        }
    }

    /// Writes the first `n` in-memory readings to disk: one write and one sync per segment
    /// touched (normally one), so a segment never grows much past its size.
    fn spill(&mut self, mut n: usize) {
        while n > 0 {
            // `append` starts a new segment when the last one is full.
            let room = match self.segments.back() {
                Some(s) if s.len < self.segment_bytes => self.segment_bytes - s.len,
                _ => self.segment_bytes,
            };
            let mut buf = Vec::with_capacity(n.min(4096) * (FRAME_HEAD + BODY_LEN_LUX));
            let mut take = 0;
            for e in self.mem.iter().take(n) {
                if take > 0 && (buf.len() + frame_len(&e.rec)) as u64 > room {
                    break;
                }
                encode(&e.rec, &mut buf);
                take += 1;
            }
            if !self.spill_chunk(take, &buf) {
                return;
            }
            n -= take;
        }
        self.enforce_cap();
    }

    /// Writes the first `take` in-memory readings, already encoded in `buf`; false on failure.
    fn spill_chunk(&mut self, take: usize, buf: &[u8]) -> bool {
        let first_seq = self.mem[0].rec.seq;
        let start = match self.append(first_seq, buf, take as u64) {
            Ok(start) => start,
            Err(e) => {
                if !self.disk_failed {
                    warn!(dir = %self.dir.display(), error = %e,
                        "queue: cannot write to disk; keeping up to {MEM_CAP} readings in memory until it can");
                    self.disk_failed = true;
                }
                while self.mem.len() > MEM_CAP {
                    self.drop_oldest_in_memory();
                }
                return false;
            }
        };
        if self.disk_failed {
            info!(dir = %self.dir.display(), "queue: writing to disk again");
            self.disk_failed = false;
        }
        let seg = self.segments.back().expect("append created a segment").id;
        let mut end = start;
        let mut first_unsent = None;
        for i in 0..take {
            let e = self.mem.pop_front().expect("take <= mem.len()");
            let begin = end;
            end += frame_len(&e.rec) as u64;
            if i < self.mem_sent {
                // In flight: its acknowledgement now frees disk space instead of memory.
                if let Some(f) = self.inflight.iter_mut().find(|f| f.seq == e.rec.seq) {
                    f.loc = Loc::Disk { seg, end };
                }
            } else if first_unsent.is_none() {
                first_unsent = Some(begin);
            }
        }
        self.mem_sent -= take.min(self.mem_sent);
        self.disk_records += take as u64;
        if self.read.is_none() {
            self.read = first_unsent.map(|off| (seg, off));
        }
        true
    }

    /// Appends `buf` to the active segment (rotating when full) and syncs it; returns its offset.
    fn append(&mut self, first_seq: u64, buf: &[u8], records: u64) -> io::Result<u64> {
        let rotate = self.segments.back().is_none_or(|s| s.len >= self.segment_bytes);
        if rotate || self.active.is_none() {
            if rotate {
                let f = OpenOptions::new().create_new(true).append(true).open(self.seg_path(first_seq))?;
                File::open(&self.dir)?.sync_all()?;
                self.segments.push_back(Segment { id: first_seq, len: 0, records: 0 });
                self.active = Some(f);
            } else {
                let id = self.segments.back().expect("not rotating").id;
                self.active = Some(OpenOptions::new().append(true).open(self.seg_path(id))?);
            }
        }
        let seg = self.segments.back_mut().expect("segment exists");
        let file = self.active.as_mut().expect("active segment open");
        let start = seg.len;
        let res = file.write_all(buf).and_then(|_| file.sync_data());
        if let Err(e) = res {
            // Leave no partial frame behind; the readings stay in memory.
            let _ = file.set_len(start);
            self.active = None;
            return Err(e);
        }
        seg.len += buf.len() as u64;
        seg.records += records;
        Ok(start)
    }

    fn enforce_cap(&mut self) {
        let mut bytes: u64 = self.segments.iter().map(|s| s.len).sum();
        if bytes <= self.max_bytes {
            self.capping = false;
            return;
        }
        while bytes > self.max_bytes && self.segments.len() > 1 {
            let id = self.segments[0].id;
            bytes -= self.segments[0].len;
            self.drop_segment(id, None);
        }
    }

    /// Drops a whole segment: at the cap, or (with the reason) because it cannot be read.
    fn drop_segment(&mut self, id: u64, corrupt: Option<&str>) {
        let Some(pos) = self.segments.iter().position(|s| s.id == id) else { return };
        let lost = self.segments[pos].records - if pos == 0 { self.head_records } else { 0 };
        self.dropped += lost;
        self.disk_records = self.disk_records.saturating_sub(lost);
        if let Some(why) = corrupt {
            self.move_aside(id, why);
        } else if !self.capping {
            warn!(
                lost,
                max_bytes = self.max_bytes,
                "queue: over queue.max_bytes; dropping the oldest readings (logged once until it recovers)"
            );
            self.capping = true;
        }
        if self.read.is_some_and(|(s, _)| s == id) {
            self.advance_read(id);
        }
        self.inflight.retain(|f| !matches!(f.loc, Loc::Disk { seg, .. } if seg == id));
        if pos == 0 {
            self.remove_front_segment();
        } else {
            let s = self.segments.remove(pos).expect("position is valid");
            let _ = fs::remove_file(self.seg_path(s.id));
            if pos == self.segments.len() {
                self.active = None;
            }
        }
    }

    fn drop_oldest_in_memory(&mut self) {
        if self.mem_sent < self.mem.len() {
            self.mem.remove(self.mem_sent);
            self.dropped += 1;
        }
    }

    fn seg_len(&self, id: u64) -> u64 {
        self.segments.iter().find(|s| s.id == id).map_or(0, |s| s.len)
    }

    /// Moves the read position to the start of the segment after `seg`, or to memory.
    fn advance_read(&mut self, seg: u64) {
        self.read = self.segments.iter().find(|s| s.id > seg).map(|s| (s.id, 0));
    }

    /// Reads the record at `off` of segment `seg`; `Ok(None)` at the segment's end.
    fn read_record(&mut self, seg: u64, off: u64) -> io::Result<Option<(Telemetry, u64)>> {
        let len = self.seg_len(seg);
        if off >= len {
            return Ok(None);
        }
        // The buffer serves `off` if it holds a whole frame there, or everything up to the end.
        let cached = self.reader.as_ref().is_some_and(|r| {
            let end = r.start + r.buf.len() as u64;
            r.seg == seg && off >= r.start && (end >= off + (FRAME_HEAD + BODY_LEN_LUX) as u64 || end == len)
        });
        if !cached {
            let file = match self.reader.take() {
                Some(r) if r.seg == seg => r.file,
                _ => File::open(self.seg_path(seg))?,
            };
            let want = READ_CHUNK.min((len - off) as usize);
            let mut buf = vec![0u8; want];
            file.read_exact_at(&mut buf, off)?;
            self.reader = Some(Reader { seg, file, start: off, buf });
        }
        let r = self.reader.as_ref().expect("reader filled above");
        let at = (off - r.start) as usize;
        match decode(&r.buf[at..]) {
            Some((rec, n)) => Ok(Some((rec, off + n as u64))),
            None => Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad frame at offset {off}"))),
        }
    }

    fn write_meta(&mut self, next_seq: u64, sync: bool) {
        self.meta_gen += 1;
        let mut slot = Vec::with_capacity(32);
        slot.extend_from_slice(META_MAGIC);
        slot.extend_from_slice(&self.meta_gen.to_le_bytes());
        slot.extend_from_slice(&next_seq.to_le_bytes());
        slot.extend_from_slice(&self.acked_through.to_le_bytes());
        let crc = crc32fast::hash(&slot);
        slot.extend_from_slice(&crc.to_le_bytes());
        let at = (self.meta_gen % 2) * META_SLOT;
        let res = self.meta.write_all_at(&slot, at).and_then(|_| if sync { self.meta.sync_data() } else { Ok(()) });
        match res {
            Ok(()) => self.meta_dirty_since = None,
            Err(e) => warn!(dir = %self.dir.display(), error = %e, "queue: cannot write the meta file"),
        }
    }
}

/// Reads the newer valid meta slot: (generation, next_seq, acked_through).
fn read_meta(f: &File) -> (u64, u64, u64) {
    let mut best = (0, 1, 0);
    for slot in 0..2 {
        let mut b = [0u8; 32];
        if f.read_exact_at(&mut b, slot * META_SLOT).is_err() || &b[..4] != META_MAGIC {
            continue;
        }
        let crc = u32::from_le_bytes(b[28..32].try_into().expect("4 bytes"));
        if crc != crc32fast::hash(&b[..28]) {
            continue;
        }
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if word(4) >= best.0 {
            best = (word(4), word(12), word(20));
        }
    }
    best
}

fn frame_len(rec: &Telemetry) -> usize {
    FRAME_HEAD + if rec.lux.is_some() { BODY_LEN_LUX } else { BODY_LEN }
}

/// Appends one framed record.
fn encode(rec: &Telemetry, out: &mut Vec<u8>) {
    let mut body = [0u8; BODY_LEN_LUX];
    body[0..8].copy_from_slice(&rec.seq.to_le_bytes());
    body[8..16].copy_from_slice(&rec.ts.to_le_bytes());
    body[16..18].copy_from_slice(&rec.light.to_le_bytes());
    let len = if let Some(lux) = rec.lux {
        body[18] = 1;
        body[19..23].copy_from_slice(&lux.to_le_bytes());
        BODY_LEN_LUX
    } else {
        BODY_LEN
    };
    out.push(len as u8);
    out.extend_from_slice(&crc32fast::hash(&body[..len]).to_le_bytes());
    out.extend_from_slice(&body[..len]);
}

/// Decodes the frame at the start of `buf`: the record and the frame's length, or `None` when
/// the frame is incomplete or fails its checks.
fn decode(buf: &[u8]) -> Option<(Telemetry, usize)> {
    let len = *buf.first()? as usize;
    if len != BODY_LEN && len != BODY_LEN_LUX {
        return None;
    }
    let body = buf.get(FRAME_HEAD..FRAME_HEAD + len)?;
    let crc = u32::from_le_bytes(buf[1..5].try_into().ok()?);
    if crc != crc32fast::hash(body) || (body[18] == 1) != (len == BODY_LEN_LUX) {
        return None;
    }
    let rec = Telemetry {
        seq: u64::from_le_bytes(body[0..8].try_into().ok()?),
        ts: u64::from_le_bytes(body[8..16].try_into().ok()?),
        light: u16::from_le_bytes(body[16..18].try_into().ok()?),
        lux: (len == BODY_LEN_LUX).then(|| f32::from_le_bytes(body[19..23].try_into().expect("4 bytes"))),
    };
    Some((rec, FRAME_HEAD + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> DiskQueue {
        DiskQueue::open(dir, 1 << 20, Duration::from_millis(1000)).unwrap()
    }

    /// Sends everything unsent and returns the seqs, acking none.
    fn send_all(q: &mut DiskQueue) -> Vec<u64> {
        let mut out = vec![];
        while let Some(r) = q.peek_unsent() {
            q.mark_sent();
            out.push(r.seq);
        }
        out
    }

    #[test]
    fn frame_round_trips_and_detects_corruption() {
        let rec = Telemetry { light: 999, ts: 1_763_776_000_123, seq: 42, lux: Some(3.5) };
        let mut buf = vec![];
        encode(&rec, &mut buf);
        assert_eq!(decode(&buf), Some((rec, 28)));
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert_ne!(decode(&bad).map(|r| r.0), Some(rec), "flip at byte {i} went unnoticed");
        }
        assert_eq!(decode(&buf[..27]), None);
    }

    #[test]
    fn promptly_acked_readings_never_touch_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path());
        for i in 0..100 {
            let seq = q.push(i, 1000 + i as u64, None);
            assert_eq!(send_all(&mut q), vec![seq]);
            q.ack(seq);
            q.tick(Instant::now(), false);
        }
        assert_eq!(q.stats().readings, 0);
        assert_eq!(q.stats().bytes, 0);
        assert!(!fs::read_dir(dir.path()).unwrap().any(|e| e.unwrap().path().extension().is_some_and(|x| x == "seg")));
    }

    #[test]
    fn offline_readings_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path());
        let seqs: Vec<u64> = (0..10).map(|i| q.push(i, i as u64, None)).collect();
        q.tick(Instant::now() + OFFLINE_BATCH, true);
        drop(q); // a crash: no close()
        let mut q = open(dir.path());
        assert_eq!(send_all(&mut q), seqs);
        assert!(q.push(1, 1, None) > *seqs.last().unwrap());
    }

    #[test]
    fn seq_is_not_reused_after_a_crash_and_not_skipped_after_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path());
        let a = q.push(1, 1, None);
        send_all(&mut q);
        q.ack(a);
        drop(q); // crash with nothing on disk
        let mut q = open(dir.path());
        let b = q.push(1, 1, None);
        assert!(b > a);
        send_all(&mut q);
        q.ack(b);
        q.close();
        drop(q);
        let mut q = open(dir.path());
        assert_eq!(q.push(1, 1, None), b + 1);
    }

    #[test]
    fn rewind_resends_unacked_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path());
        let seqs: Vec<u64> = (0..5).map(|i| q.push(i, 0, None)).collect();
        assert_eq!(send_all(&mut q), seqs);
        q.ack(seqs[0]);
        q.rewind();
        assert_eq!(send_all(&mut q), seqs[1..]);
    }

    #[test]
    fn in_flight_reading_spilled_to_disk_is_forgotten_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path());
        let a = q.push(1, 0, None);
        send_all(&mut q);
        q.tick(Instant::now() + Duration::from_secs(2), false); // no ack within spill_ms
        assert_eq!(q.stats().readings, 1);
        assert!(q.stats().bytes > 0);
        q.ack(a);
        assert_eq!(q.stats().readings, 0);
        q.close();
        let mut q = open(dir.path());
        assert_eq!(q.peek_unsent(), None, "an acknowledged reading came back");
    }

    #[test]
    fn torn_tail_loses_only_the_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = open(dir.path());
        let seqs: Vec<u64> = (0..20).map(|i| q.push(i, 0, None)).collect();
        q.close();
        drop(q);
        let seg = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "seg"))
            .unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 3).unwrap();
        let mut q = open(dir.path());
        assert_eq!(send_all(&mut q), seqs[..19]);
    }

    #[test]
    fn cap_drops_oldest_segments_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = DiskQueue::open(dir.path(), 64 * 1024, Duration::from_millis(1000)).unwrap();
        for i in 0..10_000u32 {
            q.push((i % 1000) as u16, 0, None);
            if i % 100 == 99 {
                q.tick(Instant::now() + OFFLINE_BATCH, true);
            }
        }
        let st = q.stats();
        assert!(st.bytes <= 64 * 1024, "{st:?}");
        assert!(st.dropped > 0);
        assert_eq!(st.readings + st.dropped, 10_000);
        let sent = send_all(&mut q);
        assert!(sent.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(*sent.last().unwrap(), 10_000);
    }
}
