//! A simulated filesystem for testing the queue, in the manner of SQLite's crash-test VFS.
//!
//! It keeps what a file holds now (the page cache) apart from what is durable (on the card):
//! a write is only in the page cache until `sync` of that file; a create, rename or remove is
//! only in the directory's cache until `sync_dir`. [`SimFs::power_cut`] throws the caches away
//! but keeps an arbitrary subset of the unsynced writes, 512-byte sector by sector (so a
//! record can tear), and an arbitrary prefix of the unsynced directory operations (a journal
//! commits them in order). [`SimFs::kill`] is a crash of the process only: the page cache
//! survives it.
//!
//! Faults: any call can be made to fail ([`SimFs::fail`]), a full disk refuses what would need
//! new blocks ([`SimFs::set_full`]), a failed write may have written part of its bytes, and
//! [`SimFs::cut_after`] cuts the power *inside* whatever operation makes that call: the call
//! and every later one fail without effect until [`SimFs::power_cut`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::storage::Storage;

const SECTOR: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Write { at: u64, len: usize, seq: usize },
    SetLen(u64),
}

#[derive(Debug, Default, Clone)]
struct Inode {
    /// What reads see.
    now: Vec<u8>,
    /// What survives a power cut.
    durable: Vec<u8>,
    /// Unsynced operations, oldest first; write data is kept in `data` by `seq`.
    pending: Vec<Pending>,
    data: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
enum DirOp {
    Link(PathBuf, u64),
    Unlink(PathBuf),
}

/// Which calls a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Any,
    Write,
    Sync,
    Read,
    Namespace,
}

#[derive(Debug, Default)]
struct State {
    inodes: BTreeMap<u64, Inode>,
    names: BTreeMap<PathBuf, u64>,
    durable_names: BTreeMap<PathBuf, u64>,
    dir_log: Vec<DirOp>,
    next_inode: u64,
    calls: u64,
    /// Power is lost at this call.
    cut_at: Option<u64>,
    dead: bool,
    /// Bytes the disk holds at most (all named files' lengths); `None`: unbounded.
    capacity: Option<u64>,
    faults: Vec<(Call, io::ErrorKind, u32)>,
    locked: bool,
}

/// A shared handle on one simulated filesystem; clones see the same files.
#[derive(Debug, Clone, Default)]
pub struct SimFs(Rc<RefCell<State>>);

/// An open simulated file.
#[derive(Debug, Clone, Copy)]
pub struct SimFile(u64);

/// The simulated directory lock.
#[derive(Debug)]
pub struct SimLock(SimFs);

impl Drop for SimLock {
    fn drop(&mut self) {
        self.0 .0.borrow_mut().locked = false;
    }
}

fn err(kind: io::ErrorKind) -> io::Error {
    io::Error::new(kind, format!("simulated {kind:?}"))
}

impl SimFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cuts the power at the `n`th call from now (0: the next one).
    pub fn cut_after(&self, n: u64) {
        let mut s = self.0.borrow_mut();
        s.cut_at = Some(s.calls + n);
    }

    /// Calls off a cut scheduled by [`cut_after`](Self::cut_after) that has not happened.
    pub fn cancel_cut(&self) {
        self.0.borrow_mut().cut_at = None;
    }

    /// Whether the power is off (a cut happened and [`power_cut`](Self::power_cut) is due).
    pub fn is_dead(&self) -> bool {
        self.0.borrow().dead
    }

    /// Fails the next `times` calls of kind `call` with `kind`.
    pub fn fail(&self, call: Call, kind: io::ErrorKind, times: u32) {
        self.0.borrow_mut().faults.push((call, kind, times));
    }

    /// A full disk: from now on nothing may grow past what is used now (removing a file makes
    /// room again); `false` lifts the limit.
    pub fn set_full(&self, full: bool) {
        let mut s = self.0.borrow_mut();
        s.capacity = full.then(|| s.used());
    }

    /// Whether injected faults are still waiting to happen.
    pub fn has_faults(&self) -> bool {
        !self.0.borrow().faults.is_empty()
    }

    /// Clears injected faults (not a full disk).
    pub fn clear_faults(&self) {
        self.0.borrow_mut().faults.clear();
    }

    /// The power comes back: only durable state and a random part of the rest is left.
    /// `keep` is asked for each unsynced piece, in order, whether it reached the card.
    pub fn power_cut(&self, keep: &mut dyn FnMut() -> bool) {
        let mut s = self.0.borrow_mut();
        let ops = std::mem::take(&mut s.dir_log);
        let mut names = s.durable_names.clone();
        // Directory operations reach the card as a prefix of the order they were made in.
        let prefix = ops.iter().take_while(|_| keep()).count();
        for op in &ops[..prefix] {
            match op {
                DirOp::Link(p, ino) => {
                    names.insert(p.clone(), *ino);
                }
                DirOp::Unlink(p) => {
                    names.remove(p);
                }
            }
        }
        for ino in s.inodes.values_mut() {
            let mut content = ino.durable.clone();
            for op in std::mem::take(&mut ino.pending) {
                match op {
                    Pending::SetLen(len) => {
                        if keep() {
                            content.resize(len as usize, 0);
                        }
                    }
                    Pending::Write { at, len, seq } => {
                        let data = &ino.data[seq];
                        let mut off = 0;
                        while off < len {
                            let abs = at as usize + off;
                            let end = ((abs / SECTOR + 1) * SECTOR).min(at as usize + len);
                            if keep() {
                                if content.len() < end {
                                    content.resize(end, 0);
                                }
                                content[abs..end].copy_from_slice(&data[off..off + (end - abs)]);
                            }
                            off += end - abs;
                        }
                    }
                }
            }
            ino.data.clear();
            ino.now = content.clone();
            ino.durable = content;
        }
        let live: std::collections::BTreeSet<u64> = names.values().copied().collect();
        s.inodes.retain(|k, _| live.contains(k));
        s.names = names.clone();
        s.durable_names = names;
        s.dead = false;
        s.cut_at = None;
        s.locked = false;
    }

    /// The process dies; the kernel (page cache) does not.
    pub fn kill(&self) {
        self.0.borrow_mut().locked = false;
    }

    /// The names of the files (for tests that corrupt them).
    pub fn files(&self) -> Vec<PathBuf> {
        self.0.borrow().names.keys().cloned().collect()
    }

    /// A file's bytes as reads see them.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let s = self.0.borrow();
        s.names.get(path).map(|i| s.inodes[i].now.clone())
    }

    /// Changes bytes of a file at rest, durably (bit rot, a bad card): no call is counted.
    pub fn corrupt(&self, path: &Path, at: usize, bytes: &[u8]) {
        let mut s = self.0.borrow_mut();
        let Some(&i) = s.names.get(path) else { return };
        let ino = s.inodes.get_mut(&i).expect("named inode");
        for (k, b) in bytes.iter().enumerate() {
            if let Some(x) = ino.now.get_mut(at + k) {
                *x = *b;
            }
            if let Some(x) = ino.durable.get_mut(at + k) {
                *x = *b;
            }
        }
    }

    /// Counts a call; fails it if the power is off or a fault applies.
    fn enter(&self, call: Call) -> io::Result<()> {
        let mut s = self.0.borrow_mut();
        let n = s.calls;
        s.calls += 1;
        if s.dead || s.cut_at == Some(n) {
            s.dead = true;
            return Err(err(io::ErrorKind::Other));
        }
        if let Some(f) = s.faults.iter_mut().find(|f| f.2 > 0 && (f.0 == Call::Any || f.0 == call)) {
            f.2 -= 1;
            let kind = f.1;
            s.faults.retain(|f| f.2 > 0);
            return Err(err(kind));
        }
        Ok(())
    }

    fn room_for(&self, file: u64, new_len: usize) -> io::Result<()> {
        let s = self.0.borrow();
        let old = s.inodes.get(&file).map_or(0, |i| i.now.len());
        match s.capacity {
            Some(cap) if new_len > old && s.used() + (new_len - old) as u64 > cap => {
                Err(err(io::ErrorKind::StorageFull))
            }
            _ => Ok(()),
        }
    }

    fn link(&self, path: &Path, ino: u64) {
        let mut s = self.0.borrow_mut();
        s.names.insert(path.to_path_buf(), ino);
        s.dir_log.push(DirOp::Link(path.to_path_buf(), ino));
    }
}

impl State {
    fn used(&self) -> u64 {
        let named: std::collections::BTreeSet<u64> = self.names.values().copied().collect();
        named.iter().map(|i| self.inodes[i].now.len() as u64).sum()
    }
}

impl Storage for SimFs {
    type File = SimFile;
    type Lock = SimLock;

    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        self.enter(Call::Namespace)
    }

    fn lock(&self, _dir: &Path) -> io::Result<SimLock> {
        let mut s = self.0.borrow_mut();
        if s.locked {
            return Err(err(io::ErrorKind::WouldBlock));
        }
        s.locked = true;
        Ok(SimLock(self.clone()))
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.enter(Call::Read)?;
        let s = self.0.borrow();
        Ok(s.names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| Some(p.file_name()?.to_str()?.to_string()))
            .collect())
    }

    fn open(&self, path: &Path) -> io::Result<SimFile> {
        self.enter(Call::Read)?;
        let s = self.0.borrow();
        s.names.get(path).map(|&i| SimFile(i)).ok_or_else(|| err(io::ErrorKind::NotFound))
    }

    fn create(&self, path: &Path) -> io::Result<SimFile> {
        self.enter(Call::Namespace)?;
        let ino = {
            let mut s = self.0.borrow_mut();
            if s.names.contains_key(path) {
                return Err(err(io::ErrorKind::AlreadyExists));
            }
            if s.capacity.is_some_and(|c| s.used() >= c) {
                return Err(err(io::ErrorKind::StorageFull));
            }
            s.next_inode += 1;
            let ino = s.next_inode;
            s.inodes.insert(ino, Inode::default());
            ino
        };
        self.link(path, ino);
        Ok(SimFile(ino))
    }

    fn len(&self, file: &SimFile) -> io::Result<u64> {
        self.enter(Call::Read)?;
        Ok(self.0.borrow().inodes.get(&file.0).map_or(0, |i| i.now.len() as u64))
    }

    fn read_at(&self, file: &SimFile, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.enter(Call::Read)?;
        let s = self.0.borrow();
        let data = s.inodes.get(&file.0).map(|i| &i.now[..]).unwrap_or(&[]);
        let from = (offset as usize).min(data.len());
        let n = buf.len().min(data.len() - from);
        buf[..n].copy_from_slice(&data[from..from + n]);
        Ok(n)
    }

    fn write_at(&self, file: &SimFile, buf: &[u8], offset: u64) -> io::Result<()> {
        // A failed write may still have written its first half.
        let failure = self.enter(Call::Write).err();
        if self.is_dead() {
            return Err(failure.unwrap_or_else(|| err(io::ErrorKind::Other)));
        }
        let (n, result) = match (failure, self.room_for(file.0, offset as usize + buf.len())) {
            (Some(e), _) => (buf.len() / 2, Err(e)),
            (None, Err(e)) => (0, Err(e)),
            (None, Ok(())) => (buf.len(), Ok(())),
        };
        let mut s = self.0.borrow_mut();
        let Some(ino) = s.inodes.get_mut(&file.0) else { return result };
        if n > 0 {
            let at = offset as usize;
            if ino.now.len() < at + n {
                ino.now.resize(at + n, 0);
            }
            ino.now[at..at + n].copy_from_slice(&buf[..n]);
            let seq = ino.data.len();
            ino.data.push(buf[..n].to_vec());
            ino.pending.push(Pending::Write { at: offset, len: n, seq });
        }
        result
    }

    fn set_len(&self, file: &SimFile, len: u64) -> io::Result<()> {
        self.enter(Call::Write)?;
        self.room_for(file.0, len as usize)?;
        let mut s = self.0.borrow_mut();
        let Some(ino) = s.inodes.get_mut(&file.0) else { return Ok(()) };
        ino.now.resize(len as usize, 0);
        ino.pending.push(Pending::SetLen(len));
        Ok(())
    }

    fn sync(&self, file: &SimFile) -> io::Result<()> {
        if let Err(e) = self.enter(Call::Sync) {
            // As Linux may: the failed write-back's pages are dropped (reads see durable data).
            let mut s = self.0.borrow_mut();
            if !s.dead {
                if let Some(ino) = s.inodes.get_mut(&file.0) {
                    ino.now = ino.durable.clone();
                    ino.pending.clear();
                    ino.data.clear();
                }
            }
            return Err(e);
        }
        let mut s = self.0.borrow_mut();
        if let Some(ino) = s.inodes.get_mut(&file.0) {
            ino.durable = ino.now.clone();
            ino.pending.clear();
            ino.data.clear();
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.enter(Call::Namespace)?;
        let ino = self.0.borrow_mut().names.remove(from).ok_or_else(|| err(io::ErrorKind::NotFound))?;
        self.0.borrow_mut().dir_log.push(DirOp::Unlink(from.to_path_buf()));
        self.link(to, ino);
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        self.enter(Call::Namespace)?;
        let mut s = self.0.borrow_mut();
        s.names.remove(path).ok_or_else(|| err(io::ErrorKind::NotFound))?;
        s.dir_log.push(DirOp::Unlink(path.to_path_buf()));
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        self.enter(Call::Sync)?;
        let mut s = self.0.borrow_mut();
        s.durable_names = s.names.clone();
        s.dir_log.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        PathBuf::from("/q")
    }

    #[test]
    fn unsynced_writes_and_names_are_lost_at_a_power_cut_and_synced_ones_kept() {
        let fs = SimFs::new();
        let a = fs.create(&dir().join("a")).unwrap();
        fs.write_at(&a, b"durable", 0).unwrap();
        fs.sync(&a).unwrap();
        fs.sync_dir(&dir()).unwrap();
        fs.write_at(&a, b"-lost", 7).unwrap();
        let b = fs.create(&dir().join("b")).unwrap();
        fs.write_at(&b, b"synced but unnamed", 0).unwrap();
        fs.sync(&b).unwrap();
        fs.power_cut(&mut || false);
        assert_eq!(fs.read_file(&dir().join("a")).unwrap(), b"durable");
        assert_eq!(fs.read_file(&dir().join("b")), None, "a create is durable only after sync_dir");
    }

    #[test]
    fn a_kill_keeps_the_page_cache() {
        let fs = SimFs::new();
        let a = fs.create(&dir().join("a")).unwrap();
        fs.write_at(&a, b"cached", 0).unwrap();
        fs.kill();
        assert_eq!(fs.read_file(&dir().join("a")).unwrap(), b"cached");
    }

    #[test]
    fn a_cut_write_can_tear_at_a_sector_boundary() {
        let fs = SimFs::new();
        let a = fs.create(&dir().join("a")).unwrap();
        fs.sync_dir(&dir()).unwrap();
        fs.write_at(&a, &[7u8; 1024], 0).unwrap();
        let mut n = 0;
        fs.power_cut(&mut || {
            n += 1;
            n == 1
        });
        assert_eq!(fs.read_file(&dir().join("a")).unwrap(), vec![7u8; 512]);
    }

    #[test]
    fn after_the_cut_point_nothing_takes_effect() {
        let fs = SimFs::new();
        let a = fs.create(&dir().join("a")).unwrap();
        fs.cut_after(0);
        assert!(fs.write_at(&a, b"x", 0).is_err());
        assert!(fs.is_dead());
        assert!(fs.sync(&a).is_err());
        assert_eq!(fs.read_file(&dir().join("a")).unwrap(), b"");
    }
}
