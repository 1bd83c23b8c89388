//! Whether this machine's wall clock is known to be right.
//!
//! A Raspberry Pi has no real-time clock: after a boot without network its clock sits at the
//! last saved time until NTP answers. What depends on the wall clock (rejecting a command by its
//! `ts`) asks [`synchronized`] first. The answer, in order:
//!
//! 1. `NIGHTLIGHT_CLOCK_SYNCED=1` or `=0` in the environment: the tests' seam (and an override
//!    for a clock kept right by other means);
//! 2. `/run/systemd/timesync/synchronized` exists: systemd-timesyncd has synchronized it;
//! 3. the kernel's NTP state through `adjtimex(2)`: synchronized unless it reports
//!    `TIME_ERROR` or `STA_UNSYNC` (chrony and ntpd keep it up to date).

/// The tests' seam; see the module doc.
pub const SEAM: &str = "NIGHTLIGHT_CLOCK_SYNCED";

/// Whether the wall clock is known to be synchronized.
pub fn synchronized() -> bool {
    match std::env::var(SEAM).as_deref() {
        Ok("1") => return true,
        Ok("0") => return false,
        _ => {}
    }
    std::path::Path::new("/run/systemd/timesync/synchronized").exists() || kernel_synchronized()
}

fn kernel_synchronized() -> bool {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's state into the struct we own.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
}
