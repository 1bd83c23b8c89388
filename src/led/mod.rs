//! The LED: a GPIO pin through the kernel's GPIO character device, or the virtual LED that prints its changes.
//!
//! LED drivers know nothing of MQTT: the device calls [`Led::set`] with the commanded state,
//! through [`power_on::KeptLed`], which sets the state at start and keeps every change.

#[cfg(feature = "hardware")]
mod gpio;
pub mod power_on;
#[cfg(feature = "virtual")]
pub mod simulated;

use crate::config::{Config, LedKind};

/// An LED that can be switched.
pub trait Led: Send {
    /// Switches the LED. Returns whether that was a change.
    fn set(&mut self, on: bool) -> bool;
    /// The current state.
    fn is_on(&self) -> bool;
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the machine, so the virtual
/// LED's stamps can be compared with another program's.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime only writes into the timespec we pass, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Opens the configured LED, off.
///
/// # Errors
/// The GPIO pin cannot be opened; the message names the device and the fix.
pub fn open(cfg: &Config) -> anyhow::Result<Box<dyn Led>> {
    match cfg.led.kind {
        #[cfg(feature = "virtual")]
        LedKind::Virtual => Ok(Box::new(simulated::SimulatedLed::stdout())),
        #[cfg(feature = "hardware")]
        LedKind::Gpio => Ok(Box::new(gpio::GpioLed::open(cfg.led.pin, cfg.led.active_low)?)),
        #[allow(unreachable_patterns)]
        kind => anyhow::bail!("led.kind = {kind:?} is not supported by this build"),
    }
}
