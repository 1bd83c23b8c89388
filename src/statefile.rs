//! The state directory (`queue.dir`): what a device keeps across restarts, opened once at start
//! as a [`StateDir`] and handed to each part that keeps a file there.
//!
//! | file | kept by | written |
//! | --- | --- | --- |
//! | `*.seg`, `meta`, `lock` | the queue ([`crate::queue::storage`]) | its own crash-tested way |
//! | `config.json` | live configuration ([`crate::remote::Saver`]) | [`StateDir::keep`] |
//! | `ha-migrated` | Home Assistant's migration (the device loop) | [`StateDir::keep`] |
//! | `led` | the LED's state ([`crate::led::power_on::Memory`]) | four bytes in place |
//! | `update/` | the update agent ([`crate::update::agent`]) | its own thread, [`write_atomic`] |
//!
//! Rules:
//! - **The lock.** The queue takes `lock` (`flock`) when it opens, before anything else is read
//!   or written, and holds it for the run: it covers every file here, one device per directory.
//!   A second device on the same directory fails at start.
//! - **One way to make a small file durable**: [`StateDir::keep`] hands it to the directory's
//!   writer thread, which replaces it atomically ([`write_atomic`]: `<name>.new`, fdatasync,
//!   rename, directory fsync; a cut leaves the old content or the new, never a mix), in the
//!   order handed, never on the device loop. [`StateDir::flush`] waits for what was handed (at
//!   a stop). A failure is logged with what it costs and the file stays as it was.
//! - The LED's state is the one exception, on purpose: four bytes in one sector written in
//!   place *before* the LED switches (so a crash a moment later still starts it as told) and
//!   synced off the loop; a rename per switch would cost the card more for nothing.
//! - **The medium**: whether the directory is on storage or in memory (tmpfs, overlayroot), said
//!   once at start and in health ([`crate::queue::medium`]).
//! - Every file here is opened without following a symbolic link and used only when it is a
//!   regular file ([`open_regular`]), and read with a bound ([`read_small`]): a symlink planted
//!   there (to another user's file, to `/dev/zero`) or a FIFO neither redirects a write, nor
//!   hangs the device, nor fills its memory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

/// The state directory: where it is, what it is on, and its writer. Cheap to clone: every clone
/// hands its writes to the same writer thread, which ends with the last clone.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: Arc<PathBuf>,
    on_storage: bool,
    writer: mpsc::Sender<Job>,
}

#[derive(Debug)]
enum Job {
    Write { name: &'static str, bytes: Vec<u8>, failing: &'static str },
    Flush(mpsc::Sender<()>),
}

impl StateDir {
    /// Starts the writer of `path` (the queue makes the directory, and survives when it cannot);
    /// a directory in memory is warned about here.
    ///
    /// # Errors
    /// The writer thread cannot start.
    pub fn open(path: &Path) -> io::Result<Self> {
        let medium = crate::queue::medium::of_dir(path);
        if let Some(w) = medium.warning(path) {
            tracing::warn!("{w}");
        }
        let (writer, jobs) = mpsc::channel();
        let dir = path.to_owned();
        std::thread::Builder::new().name("state-writer".into()).spawn(move || write_jobs(&dir, &jobs))?;
        Ok(StateDir { path: Arc::new(path.to_owned()), on_storage: medium.is_durable(), writer })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory is on storage, not in memory ([`crate::queue::medium`]).
    pub fn on_storage(&self) -> bool {
        self.on_storage
    }

    /// Whether `name` is a regular file here (a symlink or anything else is not).
    pub fn has(&self, name: &str) -> bool {
        fs::symlink_metadata(self.path.join(name)).is_ok_and(|m| m.is_file())
    }

    /// Replaces `name` with `bytes`, atomically, on the writer thread; returns at once. If it
    /// fails, `failing` (what that costs, e.g. "it holds until the next start") is logged.
    pub fn keep(&self, name: &'static str, bytes: Vec<u8>, failing: &'static str) {
        // The writer ends only when every sender is gone, so this cannot fail while `self` lives.
        let _ = self.writer.send(Job::Write { name, bytes, failing });
    }

    /// Blocks until everything handed to [`StateDir::keep`] before this call is on disk (or
    /// failed, logged): for a stop, when nothing else is left to do.
    pub fn flush(&self) {
        let (done, written) = mpsc::channel();
        if self.writer.send(Job::Flush(done)).is_ok() {
            let _ = written.recv();
        }
    }
}

/// The writer thread: each job in the order handed.
fn write_jobs(dir: &Path, jobs: &mpsc::Receiver<Job>) {
    for job in jobs {
        match job {
            Job::Write { name, bytes, failing } => {
                if let Err(e) = write_atomic(dir, name, &bytes) {
                    tracing::warn!(file = name, error = %e, "cannot keep a file in the state directory: {failing}");
                }
            }
            Job::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Opens `path` with `options`, not following a final symbolic link and without blocking on a
/// FIFO, and only if it is a regular file.
///
/// # Errors
/// It cannot be opened, or it is not a regular file (a symlink, FIFO, device or directory).
pub fn open_regular(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    let file = options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            io::Error::new(io::ErrorKind::InvalidData, format!("{} is a symbolic link", path.display()))
        } else {
            e
        }
    })?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{} is not a regular file", path.display())));
    }
    Ok(file)
}

/// Reads `path` if it is a regular file, at most `max` bytes; `None` when there is none.
///
/// # Errors
/// It cannot be read, is not a regular file, or is larger than `max`.
pub fn read_small(path: &Path, max: u64) -> io::Result<Option<Vec<u8>>> {
    let file = match open_regular(path, OpenOptions::new().read(true)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {max} bytes", path.display()),
        ));
    }
    Ok(Some(bytes))
}

/// Replaces `dir/name` with `bytes`, atomically.
///
/// # Errors
/// A write, sync or rename failed (a full or failing disk); `dir/name` is then unchanged.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(dir, name, bytes, 0o600)
}

/// As [`write_atomic`], the file made with `mode` (the update installer's result, written by
/// root for the service to read, is 0644).
///
/// # Errors
/// As [`write_atomic`].
pub fn write_atomic_mode(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
    let new = dir.join(format!("{name}.new"));
    // A `<name>.new` left by a cut (or planted) is replaced, never written through.
    match fs::remove_file(&new) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = open_regular(&new, OpenOptions::new().write(true).create_new(true).mode(mode))?;
    f.write_all(bytes)?;
    f.sync_data()?;
    drop(f);
    fs::rename(&new, dir.join(name))?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_a_fifo_or_a_huge_file_is_refused_not_followed_read_or_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::os::unix::fs::symlink("/dev/zero", d.join("zero")).unwrap();
        assert!(read_small(&d.join("zero"), 1024).is_err(), "a symlink is not followed");
        let fifo = std::ffi::CString::new(d.join("fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        assert!(read_small(&d.join("fifo"), 1024).is_err(), "a FIFO is refused at once");
        fs::write(d.join("big"), vec![b'x'; 2048]).unwrap();
        assert!(read_small(&d.join("big"), 1024).is_err(), "bounded");
        assert_eq!(read_small(&d.join("none"), 1024).unwrap(), None);
        fs::write(d.join("ok"), b"on \n").unwrap();
        assert_eq!(read_small(&d.join("ok"), 1024).unwrap().unwrap(), b"on \n");
    }

    #[test]
    fn an_atomic_write_replaces_a_planted_symlink_instead_of_writing_through_it() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        std::os::unix::fs::symlink(&victim, state.join("config.json.new")).unwrap();
        write_atomic(&state, "config.json", b"{}").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(state.join("config.json")).unwrap(), b"{}");
    }

    #[test]
    fn what_is_kept_is_on_disk_after_a_flush_in_the_order_handed_and_a_failure_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(!state.has("marker"));
        state.keep("marker", b"1\n".to_vec(), "test");
        for i in 0..50u32 {
            state.keep("config.json", i.to_string().into_bytes(), "test");
        }
        state.flush();
        assert!(state.has("marker"));
        assert_eq!(fs::read(dir.path().join("config.json")).unwrap(), b"49", "the last one handed");
        // A directory where `<name>.new` cannot be made: the file stays as it was.
        fs::create_dir(dir.path().join("blocked.new")).unwrap();
        fs::write(dir.path().join("blocked"), b"old").unwrap();
        state.keep("blocked", b"new".to_vec(), "test");
        state.flush();
        assert_eq!(fs::read(dir.path().join("blocked")).unwrap(), b"old");
        std::os::unix::fs::symlink("/dev/null", dir.path().join("link")).unwrap();
        assert!(!state.has("link"), "a symlink is not a kept file");
    }
}
