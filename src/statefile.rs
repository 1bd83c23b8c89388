//! Small files in the state directory (`queue.dir`) that must survive a power cut whole: the
//! live configuration (`config.json`, written off the device loop by [`crate::remote::Saver`])
//! and Home Assistant's migration marker (`ha-migrated`). Written atomically ([`write_atomic`]):
//! `<name>.new`, fdatasync, rename over `<name>`, directory fsync; a cut leaves the old content
//! or the new, never a mix. (The LED's kept state, `led`, is four bytes written in place by
//! [`crate::led::power_on::Memory`]: one sector, so it needs no rename; it is opened here.) The
//! queue's own files go through [`crate::queue::storage`]. The queue's `lock` covers them all:
//! one device per state directory.
//!
//! Every file of the state directory is opened without following a symbolic link and used only
//! when it is a regular file ([`open_regular`]), and read with a bound ([`read_small`]): a
//! symlink planted there (to another user's file, to `/dev/zero`) or a FIFO neither redirects a
//! write, nor hangs the device, nor fills its memory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
}
