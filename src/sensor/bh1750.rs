//! ROHM BH1750FVI ambient light sensor, one-time high-resolution measurements.
//!
//! Datasheet: opcode 0x20 starts a one-time H-resolution measurement (1 lx resolution, then
//! power-down); typical time 120 ms, **maximum 180 ms**; the result is 2 bytes, high byte first;
//! lux = count / 1.2 at the default measurement time.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use super::{scale_to_light, Reading, Sensor, SensorError};

/// ADDR pin low; 0x5C with ADDR high.
pub const DEFAULT_ADDRESS: u8 = 0x23;

/// Instruction opcodes.
pub struct Opcode;
impl Opcode {
    pub const ONE_TIME_H_RES: u8 = 0x20;
}

/// The datasheet's maximum H-resolution measurement time.
pub const MAX_MEASUREMENT_MS: u32 = 180;

/// The sensor.
#[derive(Debug)]
pub struct Bh1750<I2C, D> {
    i2c: I2C,
    delay: D,
    address: u8,
    full_scale_lux: f64,
}

impl<I2C: I2c, D: DelayNs> Bh1750<I2C, D> {
    /// A BH1750 at `address`; `full_scale_lux` maps to light = 1000.
    pub fn new(i2c: I2C, delay: D, address: u8, full_scale_lux: f64) -> Self {
        Bh1750 { i2c, delay, address, full_scale_lux }
    }

    /// One measurement in lux.
    ///
    /// # Errors
    /// A bus error.
    pub fn read_lux(&mut self) -> Result<f32, SensorError> {
        self.i2c.write(self.address, &[Opcode::ONE_TIME_H_RES]).map_err(SensorError::bus)?;
        self.delay.delay_ms(MAX_MEASUREMENT_MS);
        let mut buf = [0u8; 2];
        self.i2c.read(self.address, &mut buf).map_err(SensorError::bus)?;
        Ok(f32::from(u16::from_be_bytes(buf)) / 1.2)
    }

    /// Gives the bus and the delay back.
    pub fn destroy(self) -> (I2C, D) {
        (self.i2c, self.delay)
    }
}

impl<I2C: I2c + Send, D: DelayNs + Send> Sensor for Bh1750<I2C, D> {
    fn read(&mut self) -> Result<Reading, SensorError> {
        let lux = self.read_lux()?;
        Ok(Reading { light: scale_to_light(f64::from(lux), self.full_scale_lux), lux: Some(lux) })
    }
}
