//! ROHM BH1750FVI at the register level; opcodes and timing declared here from the datasheet.

use embedded_hal::i2c::ErrorKind;
use embedded_hal_mock::eh1::delay::{CheckedDelay, Transaction as D};
use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as T};
use nightlight::sensor::bh1750::Bh1750;
use nightlight::sensor::{Sensor, SensorError};

const ADDR_LOW: u8 = 0x23;
const ONE_TIME_H_RES: u8 = 0x20;
/// Datasheet: H-resolution mode measurement time, max 180 ms.
const MAX_H_RES_MS: u32 = 180;

#[test]
fn one_time_h_res_waits_the_maximum_time_and_reads_big_endian() {
    // 0x01F4 = 500 counts -> 500 / 1.2 = 416.67 lx.
    let i2c = I2cMock::new(&[T::write(ADDR_LOW, vec![ONE_TIME_H_RES]), T::read(ADDR_LOW, vec![0x01, 0xF4])]);
    let delay = CheckedDelay::new(&[D::delay_ms(MAX_H_RES_MS)]);
    let mut s = Bh1750::new(i2c, delay, ADDR_LOW, 1000.0);
    let r = s.read().unwrap();
    assert!((r.lux.unwrap() - 416.667).abs() < 0.01, "{r:?}");
    assert_eq!(r.light, 417, "mapped with full_scale_lux = 1000");
    let (mut i2c, mut delay) = s.destroy();
    i2c.done();
    delay.done();
}

#[test]
fn lux_above_full_scale_clamps_light_but_not_lux() {
    let i2c = I2cMock::new(&[T::write(ADDR_LOW, vec![ONE_TIME_H_RES]), T::read(ADDR_LOW, vec![0xFF, 0xFF])]);
    let mut s = Bh1750::new(i2c, embedded_hal_mock::eh1::delay::NoopDelay, ADDR_LOW, 1000.0);
    let r = s.read().unwrap();
    assert_eq!(r.light, 1000);
    assert!((r.lux.unwrap() - 54612.5).abs() < 0.1, "the datasheet's maximum: {r:?}");
    s.destroy().0.done();
}

#[test]
fn a_nack_is_a_bus_error() {
    let i2c = I2cMock::new(&[T::write(ADDR_LOW, vec![ONE_TIME_H_RES]).with_error(ErrorKind::Other)]);
    let mut s = Bh1750::new(i2c, embedded_hal_mock::eh1::delay::NoopDelay, ADDR_LOW, 1000.0);
    assert_eq!(s.read(), Err(SensorError::Bus(ErrorKind::Other)));
    s.destroy().0.done();
}
