//! TI ADS1115 at the register level; registers and bits declared here from datasheet SBAS444
//! (tables 6 and 8), not imported from the driver.

use embedded_hal::i2c::ErrorKind;
use embedded_hal_mock::eh1::delay::NoopDelay;
use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as T};
use nightlight::sensor::ads1115::Ads1115;
use nightlight::sensor::{Sensor, SensorError};

const ADDR: u8 = 0x48;
const REG_CONVERSION: u8 = 0x00;
const REG_CONFIG: u8 = 0x01;
const OS_START: u16 = 1 << 15;
const MUX_AIN0_GND: u16 = 0b100 << 12;
const PGA_4V096: u16 = 0b001 << 9;
const MODE_SINGLE_SHOT: u16 = 1 << 8;
const DR_128SPS: u16 = 0b100 << 5;
const COMP_QUE_DISABLE: u16 = 0b11;

fn config_for(channel: u16) -> u16 {
    OS_START | (MUX_AIN0_GND + (channel << 12)) | PGA_4V096 | MODE_SINGLE_SHOT | DR_128SPS | COMP_QUE_DISABLE
}

/// Write config (MSB first), poll OS (busy, then done), read the conversion (MSB first).
fn conversion(channel: u16, raw: i16) -> Vec<T> {
    let c = config_for(channel).to_be_bytes();
    vec![
        T::write(ADDR, vec![REG_CONFIG, c[0], c[1]]),
        T::write_read(ADDR, vec![REG_CONFIG], vec![0x05, 0x83]), // OS = 0: converting
        T::write_read(ADDR, vec![REG_CONFIG], vec![0x85, 0x83]), // OS = 1: done
        T::write_read(ADDR, vec![REG_CONVERSION], raw.to_be_bytes().to_vec()),
    ]
}

#[test]
fn single_shot_of_ain0_writes_the_datasheet_config_word() {
    assert_eq!(config_for(0), 0xC383, "OS | MUX=100 | PGA=001 | MODE=1 | DR=100 | COMP_QUE=11");
    let mut adc = Ads1115::new(I2cMock::new(&conversion(0, 0x1234)), NoopDelay, ADDR, 0);
    assert_eq!(adc.read_raw().unwrap(), 0x1234, "big-endian conversion register");
    adc.destroy().0.done();
}

#[test]
fn each_channel_selects_its_mux() {
    for ch in 0..4u16 {
        let mut adc = Ads1115::new(I2cMock::new(&conversion(ch, 100)), NoopDelay, ADDR, ch as u8);
        adc.read_raw().unwrap();
        adc.destroy().0.done();
    }
}

#[test]
fn readings_map_the_3v3_supply_to_1000() {
    // 3.3 V at +-4.096 V full scale = 3.3 / 4.096 * 32768 = 26400.
    let mut adc = Ads1115::new(I2cMock::new(&conversion(0, 26400)), NoopDelay, ADDR, 0);
    assert_eq!(adc.read().unwrap().light, 1000);
    adc.destroy().0.done();
    let mut adc = Ads1115::new(I2cMock::new(&conversion(0, 13200)), NoopDelay, ADDR, 0);
    assert_eq!(adc.read().unwrap().light, 500);
    adc.destroy().0.done();
}

#[test]
fn negative_and_over_range_readings_are_clamped() {
    let mut adc = Ads1115::new(I2cMock::new(&conversion(1, -200)), NoopDelay, ADDR, 1);
    assert_eq!(adc.read_raw().unwrap(), -200, "signed");
    adc.destroy().0.done();
    let mut adc = Ads1115::new(I2cMock::new(&conversion(1, -200)), NoopDelay, ADDR, 1);
    assert_eq!(adc.read().unwrap().light, 0);
    adc.destroy().0.done();
    let mut adc = Ads1115::new(I2cMock::new(&conversion(0, i16::MAX)), NoopDelay, ADDR, 0);
    assert_eq!(adc.read().unwrap().light, 1000);
    adc.destroy().0.done();
}

#[test]
fn a_nack_on_the_config_write_is_a_bus_error() {
    let c = config_for(0).to_be_bytes();
    let mut adc = Ads1115::new(
        I2cMock::new(&[T::write(ADDR, vec![REG_CONFIG, c[0], c[1]]).with_error(ErrorKind::Other)]),
        NoopDelay,
        ADDR,
        0,
    );
    assert_eq!(adc.read(), Err(SensorError::Bus(ErrorKind::Other)));
    adc.destroy().0.done();
}

#[test]
fn a_conversion_that_never_finishes_times_out() {
    let c = config_for(0).to_be_bytes();
    let mut t = vec![T::write(ADDR, vec![REG_CONFIG, c[0], c[1]])];
    t.extend((0..50).map(|_| T::write_read(ADDR, vec![REG_CONFIG], vec![0x05, 0x83])));
    let mut adc = Ads1115::new(I2cMock::new(&t), NoopDelay, ADDR, 0);
    assert_eq!(adc.read(), Err(SensorError::Timeout));
    adc.destroy().0.done();
}
