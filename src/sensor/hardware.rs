//! Opens the real I2C bus through rppal and probes the configured chip, turning failures into
//! messages that say how to fix them (docs/hardware.md, "Troubleshooting").

use anyhow::{anyhow, Context};
use rppal::i2c::I2c;

use super::{ads1115::Ads1115, bh1750::Bh1750, grove::GroveAdc, Sensor, SensorError};
use crate::config::{SensorConfig, SensorKind};

/// A `DelayNs` that sleeps the thread (reads run on a blocking thread).
pub struct StdDelay;
impl embedded_hal::delay::DelayNs for StdDelay {
    fn delay_ns(&mut self, ns: u32) {
        std::thread::sleep(std::time::Duration::from_nanos(u64::from(ns)));
    }
}

pub(super) fn open(kind: SensorKind, cfg: &SensorConfig) -> anyhow::Result<Box<dyn Sensor>> {
    let dev = format!("/dev/i2c-{}", cfg.i2c_bus);
    let bus = I2c::with_bus(cfg.i2c_bus).map_err(|e| match e {
        rppal::i2c::Error::Io(ref io) if io.kind() == std::io::ErrorKind::NotFound => anyhow!(
            "{dev} does not exist: enable I2C (`sudo raspi-config nonint do_i2c 0`, or `dtparam=i2c_arm=on` in /boot/firmware/config.txt) and reboot"
        ),
        rppal::i2c::Error::Io(ref io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            anyhow!("{dev}: permission denied: add the user to the `i2c` group (`sudo adduser $USER i2c`) and log in again")
        }
        rppal::i2c::Error::UnknownModel => {
            anyhow!("{dev}: this machine is not a Raspberry Pi rppal can identify: use sensor.kind = \"virtual\" elsewhere")
        }
        other => anyhow!("{dev}: {other}"),
    })?;
    match kind {
        SensorKind::Grove => match GroveAdc::probe(bus, cfg.address, cfg.channel) {
            Ok(adc) => {
                tracing::info!(device = %dev, address = format!("{:#04x}", adc.address()), "Grove Base Hat found");
                Ok(Box::new(adc))
            }
            Err((_, SensorError::Bus(_))) => Err(anyhow!(
                "{dev}: no Grove Base Hat answers at {}: check that the hat is seated; STM32 hats use 0x04, MM32 hats 0x08 (`i2cdetect -y {}` lists what answers)",
                cfg.address.map_or("0x04 or 0x08".to_string(), |a| format!("{a:#04x}")),
                cfg.i2c_bus
            )),
            Err((_, e)) => Err(anyhow!("{dev}: {e}")),
        },
        SensorKind::Ads1115 => {
            let addr = cfg.address.unwrap_or(super::ads1115::DEFAULT_ADDRESS);
            let mut adc = Ads1115::new(bus, StdDelay, addr, cfg.channel);
            adc.read_raw().with_context(|| format!("{dev}: no ADS1115 answers at {addr:#04x}: check the wiring and the ADDR pin (0x48-0x4B)"))?;
            Ok(Box::new(adc))
        }
        SensorKind::Bh1750 => {
            let addr = cfg.address.unwrap_or(super::bh1750::DEFAULT_ADDRESS);
            let mut s = Bh1750::new(bus, StdDelay, addr, cfg.full_scale_lux);
            s.read_lux().with_context(|| format!("{dev}: no BH1750 answers at {addr:#04x}: check the wiring and the ADDR pin (0x23 or 0x5C)"))?;
            Ok(Box::new(s))
        }
        SensorKind::Virtual => unreachable!("virtual sensors are opened by sensor::open"),
    }
}
