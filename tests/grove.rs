//! Grove Base Hat ADC at the register level. The register map is declared here from Seeed's
//! grove.py (`grove/adc.py`) and the hat firmware, not imported from the driver.

use embedded_hal::i2c::ErrorKind;
use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as T};
use nightlight::sensor::grove::GroveAdc;
use nightlight::sensor::{Sensor, SensorError};

const STM32_ADDR: u8 = 0x04;
const MM32_ADDR: u8 = 0x08;
const REG_PRODUCT_ID: u8 = 0x00;
const REG_RAW_A0: u8 = 0x10;
const REG_MV_A0: u8 = 0x20;
const REG_RATIO_A0: u8 = 0x30;
/// 0x0004 = "Grove Base Hat RPi", sent low byte first.
const PID_BASE_HAT_LE: [u8; 2] = [0x04, 0x00];

fn done(dev: GroveAdc<I2cMock>) {
    dev.destroy().done();
}

#[test]
fn ratio_is_read_from_0x30_plus_channel_low_byte_first() {
    // 634 = 0x027A: low byte 0x7A first (SMBus read word).
    let mut dev =
        GroveAdc::new(I2cMock::new(&[T::write_read(STM32_ADDR, vec![REG_RATIO_A0], vec![0x7A, 0x02])]), STM32_ADDR, 0);
    assert_eq!(dev.read().unwrap().light, 634);
    done(dev);

    let mut dev = GroveAdc::new(
        I2cMock::new(&[T::write_read(STM32_ADDR, vec![REG_RATIO_A0 + 6], vec![0xE8, 0x03])]),
        STM32_ADDR,
        6,
    );
    assert_eq!(dev.read().unwrap().light, 1000, "channel A6");
    done(dev);
}

#[test]
fn ratio_above_1000_is_clamped() {
    let mut dev =
        GroveAdc::new(I2cMock::new(&[T::write_read(STM32_ADDR, vec![REG_RATIO_A0], vec![0xFF, 0xFF])]), STM32_ADDR, 0);
    assert_eq!(dev.read().unwrap().light, 1000);
    done(dev);
}

#[test]
fn raw_and_millivolt_registers_are_read_by_channel() {
    let mut dev = GroveAdc::new(
        I2cMock::new(&[
            T::write_read(STM32_ADDR, vec![REG_RAW_A0 + 2], vec![0xFF, 0x0F]),
            T::write_read(STM32_ADDR, vec![REG_MV_A0 + 2], vec![0xE4, 0x0C]),
        ]),
        STM32_ADDR,
        2,
    );
    assert_eq!(dev.read_raw().unwrap(), 4095);
    assert_eq!(dev.read_millivolts().unwrap(), 3300);
    done(dev);
}

#[test]
fn probe_finds_an_stm32_hat_at_0x04() {
    let i2c = I2cMock::new(&[T::write_read(STM32_ADDR, vec![REG_PRODUCT_ID], PID_BASE_HAT_LE.to_vec())]);
    let dev = GroveAdc::probe(i2c, None, 0).map_err(|(_, e)| e).unwrap();
    assert_eq!(dev.address(), STM32_ADDR);
    done(dev);
}

#[test]
fn probe_falls_back_from_0x04_to_an_mm32_hat_at_0x08() {
    let i2c = I2cMock::new(&[
        T::write_read(STM32_ADDR, vec![REG_PRODUCT_ID], vec![0, 0])
            .with_error(ErrorKind::NoAcknowledge(embedded_hal::i2c::NoAcknowledgeSource::Address)),
        T::write_read(MM32_ADDR, vec![REG_PRODUCT_ID], PID_BASE_HAT_LE.to_vec()),
        T::write_read(MM32_ADDR, vec![REG_RATIO_A0], vec![0x2C, 0x01]),
    ]);
    let mut dev = GroveAdc::probe(i2c, None, 0).map_err(|(_, e)| e).unwrap();
    assert_eq!(dev.address(), MM32_ADDR);
    assert_eq!(dev.read().unwrap().light, 300);
    done(dev);
}

#[test]
fn probe_accepts_the_zero_hat_and_rejects_other_chips() {
    let i2c = I2cMock::new(&[T::write_read(STM32_ADDR, vec![REG_PRODUCT_ID], vec![0x05, 0x00])]);
    done(GroveAdc::probe(i2c, Some(STM32_ADDR), 0).map_err(|(_, e)| e).unwrap());

    let i2c = I2cMock::new(&[T::write_read(STM32_ADDR, vec![REG_PRODUCT_ID], vec![0x34, 0x12])]);
    let (mut bus, err) = GroveAdc::probe(i2c, Some(STM32_ADDR), 0).unwrap_err();
    assert!(matches!(&err, SensorError::WrongDevice(m) if m.contains("0x1234")), "{err}");
    bus.done();
}

#[test]
fn probe_with_nothing_on_the_bus_reports_a_bus_error() {
    let i2c = I2cMock::new(&[
        T::write_read(STM32_ADDR, vec![REG_PRODUCT_ID], vec![0, 0]).with_error(ErrorKind::Other),
        T::write_read(MM32_ADDR, vec![REG_PRODUCT_ID], vec![0, 0]).with_error(ErrorKind::Other),
    ]);
    let (mut bus, err) = GroveAdc::probe(i2c, None, 0).unwrap_err();
    assert_eq!(err, SensorError::Bus(ErrorKind::Other));
    bus.done();
}

#[test]
fn a_nack_during_a_read_is_a_sensor_error_not_a_reading() {
    let mut dev = GroveAdc::new(
        I2cMock::new(&[
            T::write_read(STM32_ADDR, vec![REG_RATIO_A0], vec![0, 0]).with_error(ErrorKind::Other),
            T::write_read(STM32_ADDR, vec![REG_RATIO_A0], vec![0x10, 0x00]),
        ]),
        STM32_ADDR,
        0,
    );
    assert_eq!(dev.read(), Err(SensorError::Bus(ErrorKind::Other)));
    assert_eq!(dev.read().unwrap().light, 16, "the next read recovers");
    done(dev);
}
