//! The segment store: the readings on disk, oldest first, in append-only segment files.
//!
//! `<first seq, 20 digits>.seg` files of [frames](super::frame), in `seq` order across files.
//! Only the last segment is written. Bytes written since its last `fdatasync` are kept in memory
//! until a sync succeeds, so a failed sync (after which Linux may have dropped the dirty pages)
//! writes them again instead of trusting the page cache.
//!
//! Recovery reads every segment once, streaming: the acknowledged prefix is skipped, damage in
//! the middle of a segment becomes a *hole* that reads jump over (the frames after it are
//! kept, what it covered is counted as lost), and damage at the end of the last segment (most
//! often a write torn by a power cut) is cut off and counted the same way.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::warn;

use super::frame::{self, Decoded};
use super::storage::Storage;
use crate::payload::Telemetry;

const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug)]
struct Segment {
    /// The `seq` of its first record, which is also its file name.
    id: u64,
    len: u64,
    records: u64,
    /// Damaged ranges found at recovery, skipped by reads.
    holes: Vec<(u64, u64)>,
}

/// Written to the last segment and not yet synced.
struct Unsynced {
    at: u64,
    bytes: Vec<u8>,
    since: Instant,
}

/// A window into one segment file, so drain reads are large and few.
struct Reader<F> {
    seg: u64,
    file: F,
    start: u64,
    buf: Vec<u8>,
}

/// What recovery found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// The highest `seq` in any segment (0 if none), and an upper bound for unreadable ones.
    pub max_seq: u64,
    /// Readings lost to damage (an upper bound where the damage hides how many).
    pub lost: u64,
    /// Segments that could not be opened or read: left on disk, unsent, counted.
    pub unreadable: u64,
}

/// See the module docs.
pub struct Segments<S: Storage> {
    dir: PathBuf,
    segment_bytes: u64,
    list: VecDeque<Segment>,
    /// Write handle of the last segment.
    active: Option<S::File>,
    unsynced: Option<Unsynced>,
    /// Offset in the first segment of the first record not yet acknowledged, and how many
    /// records lie before it.
    head: (u64, u64),
    reader: Option<Reader<S::File>>,
    /// Records after `head`, across all segments.
    records: u64,
}

impl<S: Storage> Segments<S> {
    pub fn new(dir: &Path, segment_bytes: u64) -> Self {
        Segments {
            dir: dir.to_path_buf(),
            segment_bytes,
            list: VecDeque::new(),
            active: None,
            unsynced: None,
            head: (0, 0),
            reader: None,
            records: 0,
        }
    }

    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes;
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.seg"))
    }

    /// Records on disk not yet acknowledged.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes of segment files.
    pub fn bytes(&self) -> u64 {
        self.list.iter().map(|s| s.len).sum()
    }

    /// Bytes the next append can take without going past the segment size (a new segment's
    /// worth when the last one is full).
    pub fn room(&self) -> u64 {
        match self.list.back() {
            Some(s) if s.len < self.segment_bytes => self.segment_bytes - s.len,
            _ => self.segment_bytes,
        }
    }

    /// When the unsynced bytes were first written, if there are any.
    pub fn unsynced_since(&self) -> Option<Instant> {
        self.unsynced.as_ref().map(|u| u.since)
    }

    /// Scans the segments in `dir`. Records up to `acked_through` are skipped. A segment that
    /// cannot be opened or read (a bad block, a file not ours, a symlink) is left alone,
    /// counted in [`Recovered::unreadable`], and its first seq still counts for `max_seq`.
    ///
    /// # Errors
    /// The directory cannot be listed: the caller goes on without segments.
    pub fn recover(&mut self, st: &S, acked_through: u64) -> io::Result<Recovered> {
        let mut ids: Vec<u64> =
            st.list(&self.dir)?.iter().filter_map(|n| n.strip_suffix(".seg")?.parse().ok()).collect();
        ids.sort_unstable();
        let mut found = Recovered::default();
        for (i, &id) in ids.iter().enumerate() {
            let last = i + 1 == ids.len();
            let next_id = ids.get(i + 1).copied();
            let path = self.path(id);
            let scanned = st.open(&path).and_then(|file| {
                let file_len = st.len(&file)?;
                // A run killed before its sync left bytes only in the page cache: make them
                // durable (best effort: a read-only segment is still read).
                let _ = st.sync(&file);
                let scan = scan(st, &file, file_len, acked_through, found.max_seq)?;
                Ok((file, file_len, scan))
            });
            let (file, file_len, scan) = match scanned {
                Ok(s) => s,
                Err(e) => {
                    warn!(segment = %path.display(), error = %e,
                        "queue: cannot read a segment; left as it is, its readings unsent (health: queue_errors)");
                    found.unreadable += 1;
                    found.max_seq = found.max_seq.max(id);
                    continue;
                }
            };
            found.max_seq = found.max_seq.max(scan.last_seq);
            let mut lost = scan.lost_in_holes;
            let mut len = file_len;
            if scan.valid_end < file_len {
                let bytes = file_len - scan.valid_end;
                let bound = (bytes as usize).div_ceil(scan.frame_len) as u64;
                let gap = next_id.map_or(bound, |n| n.saturating_sub(scan.last_seq.max(acked_through) + 1));
                lost += bound.min(gap);
                if last {
                    warn!(segment = %path.display(), offset = scan.valid_end, lost_bytes = bytes,
                        "queue: cut a torn record off the end of the last segment");
                    // Best effort: appends write at `len` anyway, over whatever is there.
                    let _ = st.set_len(&file, scan.valid_end).and_then(|()| st.sync(&file));
                }
                len = scan.valid_end;
            }
            if lost > 0 {
                warn!(segment = %path.display(), lost, holes = scan.holes.len(),
                    "queue: damaged records skipped; the readings after them are kept");
            }
            found.lost += lost;
            if scan.acked_records == scan.records {
                // Best effort: a segment that cannot be removed now is removed at a later start.
                let _ = st.remove(&path).and_then(|()| st.sync_dir(&self.dir));
                continue;
            }
            if self.list.is_empty() {
                self.head = (scan.acked_end, scan.acked_records);
                self.records += scan.records - scan.acked_records;
            } else {
                self.records += scan.records;
            }
            self.list.push_back(Segment { id, len, records: scan.records, holes: scan.holes });
            if last {
                self.active = Some(file);
            }
        }
        if !self.list.is_empty() {
            // A segment made by a run that died before its directory sync may be here only in
            // the page cache: make every name found durable before appending to it.
            if let Err(e) = st.sync_dir(&self.dir) {
                warn!(dir = %self.dir.display(), error = %e, "queue: cannot sync the directory");
            }
        }
        Ok(found)
    }

    /// Appends frames (`records` of them, the first with `first_seq`) to the last segment,
    /// starting a new one when it is full. Not synced: see [`sync`](Self::sync). Returns the
    /// segment and the offset the frames start at.
    ///
    /// # Errors
    /// Nothing was appended (a partial write is overwritten by the next one).
    pub fn append(&mut self, st: &S, first_seq: u64, buf: &[u8], records: u64, now: Instant) -> io::Result<(u64, u64)> {
        if self.list.back().is_none_or(|s| s.len >= self.segment_bytes) {
            // The full segment's bytes are synced before the next segment exists.
            self.sync(st)?;
            let path = self.path(first_seq);
            let file = match st.create(&path) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => st.open(&path)?,
                r => r?,
            };
            st.set_len(&file, 0)?;
            st.sync_dir(&self.dir)?;
            self.list.push_back(Segment { id: first_seq, len: 0, records: 0, holes: vec![] });
            self.active = Some(file);
        } else if self.active.is_none() {
            let id = self.list.back().expect("not empty").id;
            self.active = Some(st.open(&self.path(id))?);
        }
        let seg = self.list.back_mut().expect("a segment exists");
        let at = seg.len;
        let file = self.active.as_ref().expect("open");
        if let Err(e) = st.write_at(file, buf, at) {
            // Cut what part of it was written (best effort: the next append overwrites it, and
            // recovery skips a leftover copy).
            let _ = st.set_len(file, at);
            return Err(e);
        }
        seg.len += buf.len() as u64;
        seg.records += records;
        self.records += records;
        match &mut self.unsynced {
            Some(u) => u.bytes.extend_from_slice(buf),
            None => self.unsynced = Some(Unsynced { at, bytes: buf.to_vec(), since: now }),
        }
        Ok((seg.id, at))
    }

    /// Makes every appended byte durable. After a failed sync the bytes are written again
    /// before the next attempt.
    ///
    /// # Errors
    /// The bytes are not known to be durable; they stay pending.
    pub fn sync(&mut self, st: &S) -> io::Result<()> {
        let (Some(u), Some(file)) = (&self.unsynced, &self.active) else { return Ok(()) };
        st.sync(file).or_else(|e| {
            // Linux may have dropped the pages whose write-back failed: write them again.
            st.write_at(file, &u.bytes, u.at)?;
            st.sync(file).map_err(|_| e)
        })?;
        self.unsynced = None;
        Ok(())
    }

    /// The first record not yet acknowledged, as (segment, offset).
    pub fn front(&self) -> Option<(u64, u64)> {
        let s = self.list.front()?;
        let at = skip_holes(&s.holes, self.head.0);
        if at < s.len {
            Some((s.id, at))
        } else {
            self.after(s.id)
        }
    }

    /// The start of the first segment after `seg`.
    pub fn after(&self, seg: u64) -> Option<(u64, u64)> {
        self.list.iter().find(|s| s.id > seg).map(|s| (s.id, skip_holes(&s.holes, 0)))
    }

    /// Reads the record at `off` of `seg`: the record and where the next one starts (past any
    /// hole), or `None` at the segment's end.
    ///
    /// # Errors
    /// `InvalidData` if the bytes there no longer form a frame; other errors are I/O.
    pub fn read(&mut self, st: &S, seg: u64, off: u64) -> io::Result<Option<(Telemetry, u64)>> {
        let Some(s) = self.list.iter().find(|s| s.id == seg) else { return Ok(None) };
        let mut len = s.len;
        if off >= len {
            return Ok(None);
        }
        let last = self.list.back().is_some_and(|l| l.id == seg);
        if let (true, Some(u)) = (last, &self.unsynced) {
            if off >= u.at {
                // Not yet synced: read what was written, not the file, whose pages a failed
                // write-back may have replaced with whatever the card held.
                let holes = &s.holes;
                return match frame::decode(&u.bytes[(off - u.at) as usize..]) {
                    Decoded::Frame(rec, n) => Ok(Some((rec, skip_holes(holes, off + n as u64)))),
                    _ => Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad frame at offset {off}"))),
                };
            }
            len = u.at;
        }
        let cached = self.reader.as_ref().is_some_and(|r| {
            let end = r.start + r.buf.len() as u64;
            r.seg == seg && off >= r.start && (end >= off + frame::MAX_LEN as u64 || end == len)
        });
        if !cached {
            let file = match self.reader.take() {
                Some(r) if r.seg == seg => r.file,
                _ => st.open(&self.path(seg))?,
            };
            let want = READ_CHUNK.min((len - off) as usize);
            let mut buf = vec![0u8; want];
            let mut got = 0;
            while got < want {
                match st.read_at(&file, &mut buf[got..], off + got as u64)? {
                    0 => break,
                    n => got += n,
                }
            }
            buf.truncate(got);
            self.reader = Some(Reader { seg, file, start: off, buf });
        }
        let r = self.reader.as_ref().expect("filled above");
        match frame::decode(&r.buf[(off - r.start) as usize..]) {
            Decoded::Frame(rec, n) => {
                let holes = &self.list.iter().find(|s| s.id == seg).expect("found above").holes;
                Ok(Some((rec, skip_holes(holes, off + n as u64))))
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad frame at offset {off}"))),
        }
    }

    /// The damage found at `off` of `seg` while reading: the rest of the segment is skipped.
    /// Returns an upper bound of the records lost.
    pub fn skip_rest(&mut self, seg: u64, off: u64) -> u64 {
        let Some(s) = self.list.iter_mut().find(|s| s.id == seg) else { return 0 };
        let lost = ((s.len - off.min(s.len)) as usize).div_ceil(frame::MIN_LEN) as u64;
        s.holes.push((off, s.len));
        self.records = self.records.saturating_sub(lost);
        lost
    }

    /// The acknowledged record ending at `end` of `seg` was the oldest: forget it, and remove
    /// the segment once nothing in it is left.
    pub fn forget_front(&mut self, st: &S, seg: u64, end: u64) {
        let Some(front) = self.list.front() else { return };
        if front.id != seg {
            return; // that segment was dropped at the cap
        }
        self.head = (end, self.head.1 + 1);
        self.records = self.records.saturating_sub(1);
        if end >= front.len {
            self.remove_front(st);
        }
    }

    /// Removes the oldest segment: returns the unacknowledged records it held.
    pub fn remove_front(&mut self, st: &S) -> u64 {
        let Some(s) = self.list.pop_front() else { return 0 };
        let lost = s.records.saturating_sub(self.head.1);
        self.records = self.records.saturating_sub(lost);
        self.head = (0, 0);
        if self.list.is_empty() {
            self.active = None;
            self.unsynced = None;
        }
        if self.reader.as_ref().is_some_and(|r| r.seg == s.id) {
            self.reader = None;
        }
        // A segment that comes back after a power cut only holds acknowledged or dropped
        // readings again; the directory sync keeps that rare.
        if st.remove(&self.path(s.id)).is_ok() {
            let _ = st.sync_dir(&self.dir);
        }
        lost
    }

    /// The oldest segment's id and whether it is the only one.
    pub fn oldest(&self) -> Option<(u64, bool)> {
        self.list.front().map(|s| (s.id, self.list.len() == 1))
    }
}

fn skip_holes(holes: &[(u64, u64)], mut at: u64) -> u64 {
    while let Some(&(_, end)) = holes.iter().find(|(start, _)| *start == at) {
        at = end;
    }
    at
}

#[derive(Default)]
struct Scan {
    /// Offset just past the last valid frame.
    valid_end: u64,
    records: u64,
    acked_records: u64,
    acked_end: u64,
    last_seq: u64,
    holes: Vec<(u64, u64)>,
    lost_in_holes: u64,
    /// The length of the frames seen (they are all alike unless the sensor changed): how many
    /// frames a damaged stretch held.
    frame_len: usize,
}

/// Streams one segment through a small buffer (a 1M-reading backlog must not cost its size
/// in memory at start), resynchronising on the next valid frame after damage.
fn scan<S: Storage>(st: &S, file: &S::File, file_len: u64, acked_through: u64, after: u64) -> io::Result<Scan> {
    let mut out = Scan { frame_len: frame::MIN_LEN, ..Scan::default() };
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK + frame::MAX_LEN);
    let mut base = 0u64; // file offset of buf[0]
    let mut pos = 0usize;
    let mut eof = false;
    let mut damage: Option<u64> = None;
    // Seqs rise through the segments: a frame at or below one already seen is a leftover copy.
    let mut prev_seq: Option<u64> = (after > 0).then_some(after);
    loop {
        if pos == buf.len() && eof {
            break;
        }
        match frame::decode(&buf[pos..]) {
            Decoded::Frame(rec, n) if prev_seq.is_none_or(|p| rec.seq > p) => {
                let at = base + pos as u64;
                out.frame_len = n;
                if let Some(start) = damage.take() {
                    let bound = ((at - start) as usize).div_ceil(n) as u64;
                    let gap = rec.seq.saturating_sub(prev_seq.unwrap_or(0).max(acked_through) + 1);
                    out.lost_in_holes += bound.min(gap);
                    out.holes.push((start, at));
                }
                pos += n;
                out.records += 1;
                out.valid_end = at + n as u64;
                if rec.seq <= acked_through {
                    out.acked_records += 1;
                    out.acked_end = out.valid_end;
                }
                out.last_seq = rec.seq;
                prev_seq = Some(rec.seq);
            }
            // A copy of a record already seen (a failed write that was retried left it behind):
            // skipped whole, and not lost. Inside damage it is part of the damage.
            Decoded::Frame(_, n) if damage.is_none() => {
                let at = base + pos as u64;
                out.holes.push((at, at + n as u64));
                pos += n;
                out.valid_end = at + n as u64;
            }
            Decoded::Short if !eof => {
                buf.drain(..pos);
                base += pos as u64;
                pos = 0;
                let have = buf.len();
                buf.resize(have + READ_CHUNK, 0);
                let n = st.read_at(file, &mut buf[have..], base + have as u64)?;
                buf.truncate(have + n);
                eof = n == 0 || base + buf.len() as u64 >= file_len;
            }
            // Damage (or, at the end of the file, bytes too few for a frame): look for the
            // next valid frame one byte further on.
            _ => {
                damage.get_or_insert(base + pos as u64);
                pos += 1;
            }
        }
    }
    // Damage still open here runs to the end of the file: the caller treats it as a tail.
    Ok(out)
}
