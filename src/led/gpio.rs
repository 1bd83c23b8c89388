//! The LED on a GPIO pin (BCM numbering) through rppal; `active_low` for an LED wired as a sink.

use anyhow::anyhow;
use rppal::gpio::{Error as GpioError, Gpio, OutputPin};

use super::Led;

/// An LED on a GPIO output; off when dropped (a clean stop).
pub struct GpioLed {
    pin: OutputPin,
    active_low: bool,
    on: bool,
}

impl GpioLed {
    /// Claims BCM pin `pin` as an output, LED off.
    ///
    /// # Errors
    /// No GPIO access (`/dev/gpiomem` or `/dev/gpiochip*`), or the pin is in use.
    pub fn open(pin: u8, active_low: bool) -> anyhow::Result<Self> {
        let gpio = Gpio::new().map_err(|e| match e {
            GpioError::UnknownModel => anyhow!(
                "GPIO: this machine is not a Raspberry Pi rppal can identify (no /dev/gpiomem): use led.kind = \"virtual\" elsewhere"
            ),
            GpioError::PermissionDenied(path) => {
                anyhow!("GPIO {path}: permission denied: add the user to the `gpio` group and log in again")
            }
            other => anyhow!("GPIO (/dev/gpiomem, /dev/gpiochip0): {other}"),
        })?;
        let mut pin = gpio
            .get(pin)
            .map_err(|e| anyhow!("GPIO pin BCM {pin}: {e} (led.pin is a BCM number; the lesson's LED is on 5)"))?
            .into_output();
        pin.set_reset_on_drop(false);
        let mut led = GpioLed { pin, active_low, on: true };
        led.set(false);
        Ok(led)
    }
}

impl Led for GpioLed {
    fn set(&mut self, on: bool) -> bool {
        let changed = on != self.on;
        self.on = on;
        if on != self.active_low {
            self.pin.set_high();
        } else {
            self.pin.set_low();
        }
        changed
    }

    fn is_on(&self) -> bool {
        self.on
    }
}

impl Drop for GpioLed {
    fn drop(&mut self) {
        self.set(false);
    }
}
