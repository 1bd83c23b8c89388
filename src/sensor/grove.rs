//! The Grove Base Hat for Raspberry Pi: an STM32 (address 0x04) or MM32 (0x08) microcontroller
//! acting as an 8-channel 12-bit ADC, read the way Seeed's grove.py does.
//!
//! Register map (grove.py `grove/adc.py`, firmware `grove_rpi_base_hat.ino`):
//! `0x00` product id (0x0004 Base Hat, 0x0005 Zero hat), `0x10+ch` raw 12-bit, `0x20+ch` mV,
//! `0x30+ch` input/supply ratio in 0.1 % (0-1000): the lesson's `light`.
//! Every register is a 16-bit word sent **low byte first** (SMBus read word):
//! START, addr+W, register, repeated START (or STOP+START on rppal), addr+R, low, high, STOP.

use embedded_hal::i2c::I2c;

use super::{Reading, Sensor, SensorError};

/// The hat's I2C addresses: STM32 hats first (the grove.py default), then MM32 hats.
pub const ADDRESSES: [u8; 2] = [0x04, 0x08];

/// Register addresses.
pub struct Register;
impl Register {
    pub const PRODUCT_ID: u8 = 0x00;
    pub const RAW: u8 = 0x10;
    pub const VOLTAGE: u8 = 0x20;
    pub const RATIO: u8 = 0x30;
}

/// Product ids at [`Register::PRODUCT_ID`].
pub const PRODUCT_BASE_HAT: u16 = 0x0004;
pub const PRODUCT_ZERO_HAT: u16 = 0x0005;

/// The hat, on one channel.
#[derive(Debug)]
pub struct GroveAdc<I2C> {
    i2c: I2C,
    address: u8,
    channel: u8,
}

impl<I2C: I2c> GroveAdc<I2C> {
    /// A hat at `address`, reading `channel` (0-7; A0 is 0).
    pub fn new(i2c: I2C, address: u8, channel: u8) -> Self {
        GroveAdc { i2c, address, channel }
    }

    /// Finds the hat: `address`, or 0x04 then 0x08 when `None`, checking the product id.
    ///
    /// # Errors
    /// Nothing answers, or something other than a Grove hat does; the bus is handed back.
    pub fn probe(i2c: I2C, address: Option<u8>, channel: u8) -> Result<Self, (I2C, SensorError)> {
        let candidates: &[u8] = match &address {
            Some(a) => std::slice::from_ref(a),
            None => &ADDRESSES,
        };
        let mut dev = GroveAdc::new(i2c, candidates[0], channel);
        let mut last = SensorError::Timeout;
        for &addr in candidates {
            dev.address = addr;
            match dev.product_id() {
                Ok(PRODUCT_BASE_HAT | PRODUCT_ZERO_HAT) => return Ok(dev),
                Ok(other) => {
                    last = SensorError::WrongDevice(format!(
                    "product id {other:#06x} at {addr:#04x}; a Grove Base Hat reports 0x0004 (0x0005 for the Zero hat)"
                ))
                }
                Err(e) => last = e,
            }
        }
        Err((dev.destroy(), last))
    }

    /// The address in use.
    pub fn address(&self) -> u8 {
        self.address
    }

    /// The product id word.
    ///
    /// # Errors
    /// A bus error.
    pub fn product_id(&mut self) -> Result<u16, SensorError> {
        self.read_word(Register::PRODUCT_ID)
    }

    /// The input/supply ratio of the channel in 0.1 % (0-1000), as grove.py's `ADC.read`.
    ///
    /// # Errors
    /// A bus error.
    pub fn read_ratio(&mut self) -> Result<u16, SensorError> {
        Ok(self.read_word(Register::RATIO + self.channel)?.min(1000))
    }

    /// The raw 12-bit conversion of the channel.
    ///
    /// # Errors
    /// A bus error.
    pub fn read_raw(&mut self) -> Result<u16, SensorError> {
        Ok(self.read_word(Register::RAW + self.channel)? & 0x0fff)
    }

    /// The channel's input voltage in mV.
    ///
    /// # Errors
    /// A bus error.
    pub fn read_millivolts(&mut self) -> Result<u16, SensorError> {
        self.read_word(Register::VOLTAGE + self.channel)
    }

    /// Gives the bus back.
    pub fn destroy(self) -> I2C {
        self.i2c
    }

    fn read_word(&mut self, register: u8) -> Result<u16, SensorError> {
        let mut buf = [0u8; 2];
        self.i2c.write_read(self.address, &[register], &mut buf).map_err(SensorError::bus)?;
        Ok(u16::from_le_bytes(buf))
    }
}

impl<I2C: I2c + Send> Sensor for GroveAdc<I2C> {
    fn read(&mut self) -> Result<Reading, SensorError> {
        Ok(Reading { light: self.read_ratio()?, lux: None })
    }
}
