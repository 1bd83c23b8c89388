//! The wall clock, and whether it is known to be right.
//!
//! A Raspberry Pi has no real-time clock: after a boot without network its clock sits at the
//! last saved time until NTP answers, exactly when the queue matters. What depends on the wall
//! clock asks [`now`] (the device loop asks the [`Wall`] it was given, which is [`now`] unless an
//! in-process test sets its own): the time, and whether it is synchronized. The answer, in order:
//!
//! 1. The spawned-binary tests' seams. `NIGHTLIGHT_CLOCK_SYNCED=1` or `=0`: synchronized or not, for the whole
//!    run. `NIGHTLIGHT_CLOCK_SEAM=<path>`: while that file exists the clock is not synchronized
//!    and reads the file's number of milliseconds off (e.g. `-3600000`: an hour behind, as a Pi
//!    that booted without network); once it is removed, the clock is right again.
//! 2. `/run/systemd/timesync/synchronized` exists: systemd-timesyncd has synchronized it.
//! 3. The kernel's NTP state through `adjtimex(2)`: synchronized unless it reports
//!    `TIME_ERROR` or `STA_UNSYNC` (chrony and ntpd keep it up to date).
//!
//! [`Restamp`] turns readings taken before the clock was synchronized into readings stamped
//! with the right time, once it is (pure: the times are passed in).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::payload::Telemetry;

/// The whole-run seam.
pub const SYNCED: &str = "NIGHTLIGHT_CLOCK_SYNCED";
/// The seam that simulates a clock that is off until NTP answers.
pub const SEAM: &str = "NIGHTLIGHT_CLOCK_SEAM";

/// The wall clock in Unix ms, and whether it is known to be synchronized.
pub fn now() -> (u64, bool) {
    let (offset, synced) = state();
    (unix_ms().saturating_add_signed(offset), synced)
}

/// The real wall clock in Unix ms, seams aside (0 before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Whether the wall clock can be trusted to be above every earlier run's `seq` and `run`:
/// synchronized, or `boot_wait` after boot with no NTP answer (a Pi that is never online; waiting
/// longer would keep it from working for good). A seam that says "not synchronized" stands for
/// a machine just booted.
pub fn trusted(boot_wait: std::time::Duration) -> bool {
    let (_, synced) = now();
    let seamed = std::env::var_os(SEAM).is_some() || std::env::var_os(SYNCED).is_some();
    synced || (!seamed && since_boot() >= boot_wait)
}

/// How long the machine has been up (`CLOCK_BOOTTIME`: suspend included, no `/proc` needed).
pub fn since_boot() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `unix_s` as RFC 3339 in UTC (`2026-12-02T15:23:10Z`), what Home Assistant's timestamp
/// sensors read. Days to a civil date as in Howard Hinnant's `civil_from_days`.
pub fn rfc3339_utc(unix_s: u64) -> String {
    let (days, secs) = ((unix_s / 86_400) as i64, unix_s % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// What to add to the real clock (the seam's offset), and whether it is synchronized.
fn state() -> (i64, bool) {
    if let Some(path) = std::env::var_os(SEAM) {
        return match std::fs::read_to_string(&path) {
            Ok(off) => (off.trim().parse::<i64>().unwrap_or(0), false),
            Err(_) => (0, true),
        };
    }
    match std::env::var(SYNCED).as_deref() {
        Ok("1") => return (0, true),
        Ok("0") => return (0, false),
        _ => {}
    }
    (0, std::path::Path::new("/run/systemd/timesync/synchronized").exists() || kernel_synchronized())
}

/// The wall clock a device is given: the system's ([`now`]), or one a test sets.
///
/// The device loop asks its `Wall`, never the process-wide seams directly, so an in-process test
/// can say "synchronized" or "an hour behind" for one device without touching the environment
/// every other test shares.
#[derive(Debug, Clone, Default)]
pub enum Wall {
    /// [`now`]: the machine's clock and its NTP state (and the environment's seams).
    #[default]
    System,
    /// The machine's clock shifted by an offset in ms, synchronized or not, as the test says.
    Set(std::sync::Arc<std::sync::Mutex<(i64, bool)>>),
}

impl Wall {
    /// A clock `offset_ms` off the machine's, synchronized or not; change it with [`Wall::set`].
    pub fn fixed(offset_ms: i64, synced: bool) -> Self {
        Wall::Set(std::sync::Arc::new(std::sync::Mutex::new((offset_ms, synced))))
    }

    /// A set clock is now `offset_ms` off and synchronized or not (the system's is not changed).
    pub fn set(&self, offset_ms: i64, synced: bool) {
        if let Wall::Set(s) = self {
            *s.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = (offset_ms, synced);
        }
    }

    /// The time in Unix ms, and whether it is synchronized.
    pub fn now(&self) -> (u64, bool) {
        match self {
            Wall::System => now(),
            Wall::Set(s) => {
                let (offset, synced) = *s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                (unix_ms().saturating_add_signed(offset), synced)
            }
        }
    }
}

/// A [`Wall`] for a loop that reads it often: the system clock's state is looked at again at
/// most once a second, and never again once synchronized (two syscalls per reading saved).
#[derive(Debug, Default)]
pub struct Reader {
    wall: Wall,
    checked: Option<(std::time::Instant, i64, bool)>,
}

impl Reader {
    pub fn new(wall: Wall) -> Self {
        Reader { wall, checked: None }
    }

    pub fn now(&mut self) -> (u64, bool) {
        if let Wall::Set(_) = self.wall {
            return self.wall.now();
        }
        let fresh = match self.checked {
            Some((_, offset, true)) => (offset, true),
            Some((at, offset, synced)) if at.elapsed() < std::time::Duration::from_secs(1) => (offset, synced),
            _ => {
                let (offset, synced) = state();
                self.checked = Some((std::time::Instant::now(), offset, synced));
                (offset, synced)
            }
        };
        (unix_ms().saturating_add_signed(fresh.0), fresh.1)
    }
}

/// CLOCK_MONOTONIC in ms: it runs at the same rate whatever the wall clock does.
pub fn monotonic_ms() -> u64 {
    crate::led::monotonic_ns() / 1_000_000
}

fn kernel_synchronized() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's state into the struct we own.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
}

/// Re-stamps this run's readings taken before the clock was synchronized.
///
/// Rules:
/// - While the clock is not synchronized, readings are marked (`ts_ok: false`) and the offset
///   of the wall clock from the monotonic clock is kept (the monotonic clock is not changed by
///   NTP).
/// - When it is, the offset's change is the error of every marked reading of this run: a
///   marked reading still queued is sent with its `ts` corrected and unmarked.
/// - Readings of an earlier run (a restart, maybe another boot: the monotonic clock starts
///   again) cannot be corrected and are sent marked.
/// - Once synchronized, the clock stays so for this run (a flapping NTP state does not mark
///   readings again).
#[derive(Debug, Clone)]
pub struct Restamp {
    run: u64,
    /// Wall minus monotonic while not synchronized.
    unsynced_offset: Option<i64>,
    /// What to add to this run's marked readings; known once synchronized.
    shift: Option<i64>,
    synced: bool,
}

impl Restamp {
    pub fn new(run: u64) -> Self {
        Restamp { run, unsynced_offset: None, shift: None, synced: false }
    }

    /// A reading taken at `wall_ms` (by a clock `synced` or not) and `mono_ms`: whether its
    /// `ts` is known to be right.
    pub fn observe(&mut self, wall_ms: u64, mono_ms: u64, synced: bool) -> bool {
        let offset = wall_ms as i64 - mono_ms as i64;
        if self.synced || synced {
            if !self.synced {
                self.synced = true;
                self.shift = self.unsynced_offset.map(|before| offset - before);
            }
            return true;
        }
        self.unsynced_offset.get_or_insert(offset);
        false
    }

    /// How far the wall clock moved against the monotonic one when it was synchronized (ms), if
    /// this run saw that happen.
    pub fn shift(&self) -> Option<i64> {
        self.shift
    }

    /// `rec` as it should be sent.
    pub fn apply(&self, mut rec: Telemetry) -> Telemetry {
        if let (false, true, Some(shift)) = (rec.ts_ok, rec.run == self.run, self.shift) {
            rec.ts = rec.ts.saturating_add_signed(shift);
            rec.ts_ok = true;
        }
        rec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(run: u64, ts: u64, ts_ok: bool) -> Telemetry {
        Telemetry { light: 1, ts, seq: 1, run, lux: None, ts_ok }
    }

    const HOUR: u64 = 3_600_000;

    #[test]
    fn readings_before_the_sync_are_marked_and_corrected_by_the_clock_jump() {
        let mut r = Restamp::new(7);
        // The Pi booted at its last saved time, an hour behind; monotonic 1000 ms.
        assert!(!r.observe(10 * HOUR, 1_000, false));
        assert!(!r.observe(10 * HOUR + 5_000, 6_000, false));
        let queued = reading(7, 10 * HOUR + 5_000, false);
        assert_eq!(r.apply(queued), queued, "not synchronized yet: sent marked");
        // NTP answers: the clock jumps an hour ahead.
        assert!(r.observe(11 * HOUR + 10_000, 11_000, true));
        assert_eq!(r.apply(queued), reading(7, 11 * HOUR + 5_000, true));
    }

    #[test]
    fn an_earlier_runs_readings_stay_marked() {
        let mut r = Restamp::new(8);
        r.observe(10 * HOUR, 1_000, false);
        r.observe(11 * HOUR, 1_000, true);
        let old = reading(7, 10 * HOUR, false);
        assert_eq!(r.apply(old), old);
    }

    #[test]
    fn a_clock_synchronized_from_the_start_marks_nothing_and_changes_nothing() {
        let mut r = Restamp::new(7);
        assert!(r.observe(10 * HOUR, 1_000, true));
        assert!(r.observe(10 * HOUR + 1, 1_001, false), "it stays synchronized");
        let rec = reading(7, 10 * HOUR, true);
        assert_eq!(r.apply(rec), rec);
    }

    #[test]
    fn rfc3339_gives_the_calendar_date_and_time_in_utc() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z", "a leap day of a century leap year");
        assert_eq!(rfc3339_utc(1_763_776_000), "2025-11-22T01:46:40Z");
        assert_eq!(rfc3339_utc(4_107_542_399), "2100-02-28T23:59:59Z", "2100 is not a leap year");
    }
}
