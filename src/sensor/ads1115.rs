//! TI ADS1115 16-bit ADC, single-shot conversions of one input against GND.
//!
//! Datasheet SBAS444 (section 9.6): registers are 16-bit, **big-endian** (MSB first); writing
//! the config register is `[0x01, msb, lsb]`; reading a register is a write of its pointer
//! followed by a 2-byte read. Single-shot: write the config with OS = 1, poll until OS reads 1
//! (conversion done), then read the signed conversion register.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use super::{scale_to_light, Reading, Sensor, SensorError};

/// ADDR pin to GND; 0x49 (VDD), 0x4A (SDA), 0x4B (SCL) are the others.
pub const DEFAULT_ADDRESS: u8 = 0x48;
/// The input voltage that reads as light = 1000: the Pi's 3.3 V rail that powers the sensor,
/// so `light` is input over supply voltage like the Grove hat's ratio.
pub const SUPPLY_VOLTS: f64 = 3.3;
/// The programmable gain used: +-4.096 V full scale covers a 3.3 V input.
pub const FULL_SCALE_VOLTS: f64 = 4.096;

/// Register pointers (datasheet table 6).
pub struct Register;
impl Register {
    pub const CONVERSION: u8 = 0x00;
    pub const CONFIG: u8 = 0x01;
}

/// Config register bits (datasheet table 8).
pub struct BitFlags;
impl BitFlags {
    /// Write: start a single conversion. Read: 1 = idle (conversion done).
    pub const OS: u16 = 0b1000_0000_0000_0000;
    /// MUX = 100 + channel: AINx against GND.
    pub const MUX_SINGLE_AIN0: u16 = 0b0100_0000_0000_0000;
    /// PGA = 001: +-4.096 V.
    pub const PGA_4_096V: u16 = 0b0000_0010_0000_0000;
    /// MODE = 1: single-shot, power-down between conversions.
    pub const MODE_SINGLE: u16 = 0b0000_0001_0000_0000;
    /// DR = 100: 128 samples per second (7.8 ms a conversion).
    pub const DR_128SPS: u16 = 0b0000_0000_1000_0000;
    /// COMP_QUE = 11: comparator disabled.
    pub const COMP_DISABLE: u16 = 0b0000_0000_0000_0011;
}

/// How many times the OS bit is polled (1 ms apart) before giving up: 128 SPS takes 7.8 ms.
const MAX_POLLS: u32 = 50;

/// The ADC, reading one single-ended input.
#[derive(Debug)]
pub struct Ads1115<I2C, D> {
    i2c: I2C,
    delay: D,
    address: u8,
    channel: u8,
}

impl<I2C: I2c, D: DelayNs> Ads1115<I2C, D> {
    /// An ADS1115 at `address` reading AIN`channel` (0-3) against GND.
    pub fn new(i2c: I2C, delay: D, address: u8, channel: u8) -> Self {
        Ads1115 { i2c, delay, address, channel: channel.min(3) }
    }

    /// The config word that starts one conversion of the channel.
    pub fn start_config(&self) -> u16 {
        BitFlags::OS
            | (BitFlags::MUX_SINGLE_AIN0 | (u16::from(self.channel) << 12))
            | BitFlags::PGA_4_096V
            | BitFlags::MODE_SINGLE
            | BitFlags::DR_128SPS
            | BitFlags::COMP_DISABLE
    }

    /// One single-shot conversion: the signed raw value.
    ///
    /// # Errors
    /// A bus error, or the conversion did not finish.
    pub fn read_raw(&mut self) -> Result<i16, SensorError> {
        let cfg = self.start_config().to_be_bytes();
        self.i2c.write(self.address, &[Register::CONFIG, cfg[0], cfg[1]]).map_err(SensorError::bus)?;
        let mut polls = 0;
        loop {
            self.delay.delay_ms(1);
            if self.read_register(Register::CONFIG)? & BitFlags::OS != 0 {
                break;
            }
            polls += 1;
            if polls >= MAX_POLLS {
                return Err(SensorError::Timeout);
            }
        }
        Ok(self.read_register(Register::CONVERSION)? as i16)
    }

    /// Gives the bus and the delay back.
    pub fn destroy(self) -> (I2C, D) {
        (self.i2c, self.delay)
    }

    fn read_register(&mut self, register: u8) -> Result<u16, SensorError> {
        let mut buf = [0u8; 2];
        self.i2c.write_read(self.address, &[register], &mut buf).map_err(SensorError::bus)?;
        Ok(u16::from_be_bytes(buf))
    }
}

impl<I2C: I2c + Send, D: DelayNs + Send> Sensor for Ads1115<I2C, D> {
    fn read(&mut self) -> Result<Reading, SensorError> {
        let volts = f64::from(self.read_raw()?) * FULL_SCALE_VOLTS / 32768.0;
        Ok(Reading { light: scale_to_light(volts, SUPPLY_VOLTS), lux: None })
    }
}
