//! Every call the queue makes to its filesystem, behind one small trait.
//!
//! [`OsStorage`] is the real filesystem. [`SimFs`](super::sim::SimFs) is a simulated one for tests:
//! it loses unsynced writes at a power cut and can fail any call. The queue never touches
//! `std::fs` itself, so everything it does to the disk can be cut, failed and checked.
//!
//! The calls are those whose failure or reordering matters for durability: data writes and
//! `fdatasync` per file, and the directory's namespace (create, rename, remove) made durable by
//! [`Storage::sync_dir`].

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The filesystem under the queue. Paths are always inside the queue directory.
pub trait Storage {
    /// An open file.
    type File;
    /// Held while the process owns the queue directory.
    type Lock;

    /// Creates the directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Takes the directory for this process, or fails with `WouldBlock` if another one has it.
    fn lock(&self, dir: &Path) -> io::Result<Self::Lock>;
    /// The names of the entries in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Self::File>;
    /// Creates a new, empty file; fails if it exists.
    fn create(&self, path: &Path) -> io::Result<Self::File>;
    /// The file's length in bytes.
    fn len(&self, file: &Self::File) -> io::Result<u64>;
    /// Reads at `offset`; returns how many bytes were read (0 at the end).
    fn read_at(&self, file: &Self::File, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset` (a failure may leave part of it written).
    fn write_at(&self, file: &Self::File, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Cuts or extends the file to `len`.
    fn set_len(&self, file: &Self::File, len: u64) -> io::Result<()>;
    /// `fdatasync`: the file's data (and its length) survive a power cut once this returns.
    fn sync(&self, file: &Self::File) -> io::Result<()>;
    /// Renames a file inside the directory.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creates, renames, removes) survive a power cut.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsStorage;

/// A storage that counts what the queue asks of it: bytes written and syncs issued (files and
/// the directory), for metrics. Counting, not measuring: what the filesystem itself adds
/// (metadata, journal) is not in it.
#[derive(Debug, Default)]
pub struct Metered<S> {
    inner: S,
    written: Cell<u64>,
    syncs: Cell<u64>,
}

impl<S> Metered<S> {
    pub fn new(inner: S) -> Self {
        Metered { inner, written: Cell::new(0), syncs: Cell::new(0) }
    }

    /// Bytes handed to `write_at` that it took, and syncs that were issued (failed ones too:
    /// they cost the card as much).
    pub fn counts(&self) -> (u64, u64) {
        (self.written.get(), self.syncs.get())
    }
}

impl<S: Storage> Storage for Metered<S> {
    type File = S::File;
    type Lock = S::Lock;

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn lock(&self, dir: &Path) -> io::Result<Self::Lock> {
        self.inner.lock(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn open(&self, path: &Path) -> io::Result<Self::File> {
        self.inner.open(path)
    }
    fn create(&self, path: &Path) -> io::Result<Self::File> {
        self.inner.create(path)
    }
    fn len(&self, file: &Self::File) -> io::Result<u64> {
        self.inner.len(file)
    }
    fn read_at(&self, file: &Self::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(file, buf, offset)
    }
    fn write_at(&self, file: &Self::File, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.inner.write_at(file, buf, offset);
        if r.is_ok() {
            self.written.set(self.written.get() + buf.len() as u64);
        }
        r
    }
    fn set_len(&self, file: &Self::File, len: u64) -> io::Result<()> {
        self.inner.set_len(file, len)
    }
    fn sync(&self, file: &Self::File) -> io::Result<()> {
        self.syncs.set(self.syncs.get() + 1);
        self.inner.sync(file)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.syncs.set(self.syncs.get() + 1);
        self.inner.sync_dir(dir)
    }
}

/// An `flock` on `<dir>/lock`, released when the process exits (also on `kill -9`).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Opens a regular file with `options`, or read-only where writing is refused (a read-only
/// filesystem, a file not ours).
fn open_or_read_only(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    crate::statefile::open_regular(path, options).or_else(|e| match e.raw_os_error() {
        Some(libc::EROFS | libc::EACCES | libc::EPERM) => {
            crate::statefile::open_regular(path, OpenOptions::new().read(true))
        }
        _ => Err(e),
    })
}

impl Storage for OsStorage {
    type File = File;
    type Lock = DirLock;

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn lock(&self, dir: &Path) -> io::Result<DirLock> {
        // A read-only directory (a failing SD card remounted): a lock needs no write.
        let file = open_or_read_only(
            &dir.join("lock"),
            OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600),
        )?;
        // SAFETY: flock only reads the descriptor, which `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DirLock { _file: file })
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = vec![];
        for e in fs::read_dir(dir)? {
            if let Some(n) = e?.file_name().to_str() {
                names.push(n.to_string());
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path) -> io::Result<File> {
        // Read-only (a failing SD card remounted, a file not ours): what it holds is still sent;
        // writes fail, and are retried like any failing write.
        open_or_read_only(path, OpenOptions::new().read(true).write(true))
    }

    fn create(&self, path: &Path) -> io::Result<File> {
        crate::statefile::open_regular(path, OpenOptions::new().read(true).write(true).create_new(true).mode(0o600))
    }

    fn len(&self, file: &File) -> io::Result<u64> {
        Ok(file.metadata()?.len())
    }

    fn read_at(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        loop {
            match file.read_at(buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        file.write_all_at(buf, offset)
    }

    fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        file.set_len(len)
    }

    fn sync(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}
