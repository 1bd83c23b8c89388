//! Light sensors: one [`Sensor`] interface over the I2C chip drivers and the simulated sensor.
//!
//! Drivers are generic over `embedded_hal::i2c::I2c` and know nothing of MQTT or the queue; they
//! return `light` on the contract's 0-1000 scale. [`open`] picks one from `sensor.kind`.
//! Operator troubleshooting (enabling I2C, the `i2c` group, hat addresses) is in docs/hardware.md.

pub mod ads1115;
pub mod bh1750;
pub mod grove;
#[cfg(feature = "hardware")]
mod hardware;
#[cfg(feature = "virtual")]
pub mod simulated;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::payload::SimulatedLight;

/// One reading of a sensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// 0-1000 on the lesson's scale.
    pub light: u16,
    /// Lux, from lux-capable chips.
    pub lux: Option<f32>,
}

/// Why a reading failed; the reading is skipped and the device goes on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SensorError {
    /// The bus reported an error (NACK: unplugged or wrong address; arbitration; timeout).
    #[error("I2C bus error: {0:?}")]
    Bus(embedded_hal::i2c::ErrorKind),
    /// A chip answered but it is not the one configured.
    #[error("unexpected device: {0}")]
    WrongDevice(String),
    /// The chip did not finish a conversion in time.
    #[error("conversion timed out")]
    Timeout,
    /// The simulated sensor was told to fail (`<id>/virtual/light` = `fail`).
    #[error("simulated failure")]
    Simulated,
}

impl SensorError {
    /// Maps a bus error from any `embedded_hal` implementation.
    pub fn bus<E: embedded_hal::i2c::Error>(e: E) -> Self {
        SensorError::Bus(e.kind())
    }
}

/// A light sensor.
pub trait Sensor: Send {
    /// Takes one reading. May block for the chip's conversion time (up to ~200 ms).
    ///
    /// # Errors
    /// A bus error or a chip that does not answer as expected; no reading is produced.
    fn read(&mut self) -> Result<Reading, SensorError>;

    /// Whether `read` talks to hardware and so belongs on a blocking thread.
    fn blocks(&self) -> bool {
        true
    }
}

/// Scales `value` of `full_scale` to 0-1000, clamping out-of-range values (negative included).
pub fn scale_to_light(value: f64, full_scale: f64) -> u16 {
    if !(value.is_finite() && full_scale > 0.0) {
        return 0;
    }
    (value / full_scale * 1000.0).round().clamp(0.0, 1000.0) as u16
}

/// Shared handle to the simulated device: through it the device applies `<id>/virtual/light`
/// (and the demo's page its slider) to the simulated sensor, and the device reports how many
/// readings its queue holds, for the demo's page.
#[derive(Debug, Clone, Default)]
pub struct SimulatedControl {
    light: Arc<Mutex<Option<SimulatedLight>>>,
    queued: Arc<AtomicU64>,
}

impl SimulatedControl {
    /// Holds the level, or fails every read, until the next call.
    pub fn set(&self, v: SimulatedLight) {
        // A poisoned lock means a panic elsewhere, and panics abort this program.
        *self.light.lock().expect("lock") = Some(v);
    }

    /// Back to the configured pattern (the simulated day).
    pub fn clear(&self) {
        *self.light.lock().expect("lock") = None;
    }

    /// The override in force, if any.
    pub fn get(&self) -> Option<SimulatedLight> {
        *self.light.lock().expect("lock")
    }

    /// The device's queue now holds `n` readings.
    pub fn set_queued(&self, n: u64) {
        self.queued.store(n, Ordering::Relaxed);
    }

    /// Readings in the device's queue, as last reported.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Opens the configured sensor, with the control handle when it is the simulated one.
///
/// # Errors
/// The hardware cannot be opened; the message says how to fix it.
pub fn open(cfg: &Config) -> anyhow::Result<(Box<dyn Sensor>, Option<SimulatedControl>)> {
    match cfg.sensor.kind {
        #[cfg(feature = "virtual")]
        crate::config::SensorKind::Virtual => {
            let s = simulated::SimulatedSensor::new(&cfg.sensor.simulated);
            let ctl = s.control();
            Ok((Box::new(s), Some(ctl)))
        }
        #[cfg(feature = "hardware")]
        kind => Ok((hardware::open(kind, &cfg.sensor)?, None)),
        #[allow(unreachable_patterns)]
        kind => anyhow::bail!("sensor.kind = {kind:?} is not supported by this build"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_clamps_to_the_contract_range() {
        assert_eq!(scale_to_light(0.0, 2.048), 0);
        assert_eq!(scale_to_light(1.024, 2.048), 500);
        assert_eq!(scale_to_light(3.0, 2.048), 1000);
        assert_eq!(scale_to_light(-0.5, 2.048), 0);
        assert_eq!(scale_to_light(f64::NAN, 1.0), 0);
    }
}
