//! The LED's state at start (`led.power_on`), set before any network, and the memory behind
//! `last`: the state the LED had when the device stopped or lost power.
//!
//! Rules:
//! - `off` and `on` are what they say; `last` is the kept state (off when none was ever kept);
//!   `auto` waits for the first reading and applies the controller's rule to it: on below
//!   `server.threshold` (a first reading has no state before it, so the hysteresis band is off).
//! - The memory is one file, `led`, in the state directory (`queue.dir`), holding `on` or `off`.
//!   It is written only when the state changes (no SD-card wear per reading), in place before
//!   the LED switches (four bytes in one sector: a power cut leaves the old state or the new,
//!   never a torn file; a crash at any point starts the LED as it was last told to be), and
//!   synced at once off the device loop (so the disk's wait delays neither the light nor the
//!   next command; a power cut in the millisecond before the sync may start it as it was
//!   before). An unreadable file counts as none kept.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::Led;
use crate::config::PowerOn;

/// The LED state to apply at start; `None` for `auto` (the first reading decides).
pub fn at_start(mode: PowerOn, kept: Option<bool>) -> Option<bool> {
    match mode {
        PowerOn::Off => Some(false),
        PowerOn::On => Some(true),
        PowerOn::Last => Some(kept.unwrap_or(false)),
        PowerOn::Auto => None,
    }
}

/// `auto`: the controller's rule applied to a first reading.
pub fn auto(light: u16, threshold: u16) -> bool {
    light < threshold
}

/// The kept LED state in a state directory.
#[derive(Debug)]
pub struct Memory {
    dir: PathBuf,
    /// What the file holds (as far as this process knows).
    kept: Option<bool>,
    /// The file, open once it was first written.
    file: Option<fs::File>,
}

impl Memory {
    /// Reads the kept state from `dir`; none when there is no file or it cannot be read.
    pub fn open(dir: &Path) -> Self {
        let kept = match crate::statefile::read_small(&dir.join("led"), 64) {
            Ok(Some(s)) if s.trim_ascii() == b"on" => Some(true),
            Ok(Some(s)) if s.trim_ascii() == b"off" => Some(false),
            Ok(_) => None,
            Err(e) => {
                warn!(error = %e, "ignored the LED's kept state");
                None
            }
        };
        Memory { dir: dir.to_owned(), kept, file: None }
    }

    pub fn kept(&self) -> Option<bool> {
        self.kept
    }

    /// Keeps `on` as the LED's state, writing only when it differs from what is kept.
    ///
    /// # Errors
    /// The file cannot be written or synced (a full or failing disk); the kept state is then
    /// what it was, and the next call tries again.
    pub fn record(&mut self, on: bool) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.kept == Some(on) {
            return Ok(());
        }
        let file = match self.file.take() {
            Some(f) => f,
            None => self.open_file()?,
        };
        // Four bytes in place, in one sector: a power cut leaves the old or the new.
        let written = file.write_all_at(if on { b"on \n" } else { b"off\n" }, 0);
        let file = self.file.insert(file);
        written?;
        self.kept = Some(on);
        // In place for any restart but a power cut now (the page cache outlives the process);
        // synced off the device loop, so the disk's wait never delays the light or a command.
        let syncing = file.try_clone()?;
        let sync = move || {
            if let Err(e) = syncing.sync_data() {
                warn!(error = %e, "cannot sync the LED's kept state: a power cut may start it wrong");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(sync)),
            Err(_) => sync(),
        }
        Ok(())
    }

    /// Opens `led` for writing in place; a file made now is made durable (the directory synced).
    fn open_file(&self) -> io::Result<fs::File> {
        let path = self.dir.join("led");
        let existed = path.exists();
        let file =
            crate::statefile::open_regular(&path, fs::OpenOptions::new().write(true).create(true).truncate(false))?;
        if !existed {
            fs::File::open(&self.dir)?.sync_all()?;
        }
        Ok(file)
    }
}

/// The LED as the device switches it: the power-on rule applied at start, every state kept.
pub struct KeptLed {
    led: Box<dyn Led>,
    memory: Memory,
    /// `auto` and no reading yet: the threshold the first reading is held against.
    auto_threshold: Option<u16>,
    /// The last write of the memory failed (warned once until one succeeds).
    failing: bool,
}

impl KeptLed {
    /// Applies `mode` to `led` with the state kept in `dir`.
    pub fn start(led: Box<dyn Led>, mode: PowerOn, threshold: u16, dir: &Path) -> Self {
        let memory = Memory::open(dir);
        let mut this = KeptLed { led, memory, auto_threshold: None, failing: false };
        match at_start(mode, this.memory.kept()) {
            Some(on) => {
                this.set(on);
            }
            None => this.auto_threshold = Some(threshold),
        }
        this
    }

    /// Keeps the state, then switches the LED. Returns whether that was a change.
    ///
    /// The state is kept first: a power cut between the two starts the LED as it was told to be,
    /// and once the LED shows a state (the virtual LED's line), that state is on disk.
    pub fn set(&mut self, on: bool) -> bool {
        let kept = self.memory.record(on);
        let changed = self.led.set(on);
        match kept {
            Ok(()) if self.failing => {
                self.failing = false;
                info!("the LED's state is kept again");
            }
            Ok(()) => {}
            Err(e) if !self.failing => {
                self.failing = true;
                warn!(error = %e, "cannot keep the LED's state: led.power_on = \"last\" may start it wrong");
            }
            Err(_) => {}
        }
        changed
    }

    pub fn is_on(&self) -> bool {
        self.led.is_on()
    }

    /// Under `auto`, the first reading switches the LED: its new state, once.
    pub fn reading(&mut self, light: u16) -> Option<bool> {
        let threshold = self.auto_threshold.take()?;
        self.set(auto(light, threshold));
        Some(self.is_on())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_is_the_kept_state_and_off_when_nothing_was_kept() {
        assert_eq!(at_start(PowerOn::Last, Some(true)), Some(true));
        assert_eq!(at_start(PowerOn::Last, None), Some(false));
        assert_eq!(at_start(PowerOn::Off, Some(true)), Some(false));
        assert_eq!(at_start(PowerOn::On, Some(false)), Some(true));
        assert_eq!(at_start(PowerOn::Auto, Some(true)), None, "auto waits for the first reading");
    }

    #[test]
    fn auto_is_on_below_the_threshold() {
        assert!(auto(299, 300));
        assert!(!auto(300, 300));
    }

    #[test]
    fn the_state_survives_a_reopen_and_is_written_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Memory::open(dir.path());
        assert_eq!(m.kept(), None);
        m.record(true).unwrap();
        assert_eq!(Memory::open(dir.path()).kept(), Some(true));
        let written = fs::metadata(dir.path().join("led")).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        m.record(true).unwrap();
        assert_eq!(
            fs::metadata(dir.path().join("led")).unwrap().modified().unwrap(),
            written,
            "no write for no change"
        );
        m.record(false).unwrap();
        assert_eq!(Memory::open(dir.path()).kept(), Some(false));
        assert!(!dir.path().join("led.new").exists());
    }

    #[test]
    fn a_damaged_file_counts_as_none_kept() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("led"), b"\xff\x00garbage").unwrap();
        assert_eq!(Memory::open(dir.path()).kept(), None);
    }

    #[test]
    fn a_failed_write_keeps_the_old_state_and_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Memory::open(dir.path());
        m.record(true).unwrap();
        let gone = dir.path().join("gone");
        let mut broken = Memory { dir: gone.clone(), kept: Some(true), file: None };
        assert!(broken.record(false).is_err());
        assert_eq!(broken.kept(), Some(true), "nothing was kept, so nothing changed");
        fs::create_dir(&gone).unwrap();
        broken.record(false).unwrap();
        assert_eq!(Memory::open(&gone).kept(), Some(false));
    }
}
