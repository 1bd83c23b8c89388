//! Small files in the state directory (`queue.dir`) that must survive a power cut whole: the
//! LED's kept state, the live configuration. Written atomically: `<name>.new`, fdatasync,
//! rename over `<name>`, directory fsync; a cut leaves the old content or the new, never a mix.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Replaces `dir/name` with `bytes`, atomically.
///
/// # Errors
/// A write, sync or rename failed (a full or failing disk); `dir/name` is then unchanged.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let new = dir.join(format!("{name}.new"));
    let mut f = File::create(&new)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    drop(f);
    fs::rename(&new, dir.join(name))?;
    File::open(dir)?.sync_all()
}
