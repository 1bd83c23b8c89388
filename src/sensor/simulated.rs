//! The simulated light sensor of the `virtual` build: a constant level or a daylight cycle,
//! which `<id>/virtual/light` can override (a level, or `fail`) at run time.

use std::f64::consts::TAU;
use std::time::{Duration, Instant};

use super::{Reading, Sensor, SensorError, SimulatedControl};
use crate::config::{Pattern, SimulatedSensorConfig};
use crate::payload::SimulatedLight;

/// The daylight cycle: `value` at t = 0, a sine between 0 and 1000 over `period`.
///
/// The trigonometry comes from the pure-Rust `libm` crate: `f64::sin` would make the binary
/// load the system's libm.so for these two calls, about 0.6 MiB of resident memory.
pub fn daylight(start: u16, period: Duration, elapsed: Duration) -> u16 {
    let phase0 = libm::asin((f64::from(start.min(1000)) - 500.0) / 500.0);
    let t = elapsed.as_secs_f64() / period.as_secs_f64().max(0.001);
    (500.0 + 500.0 * libm::sin(TAU * t + phase0)).round().clamp(0.0, 1000.0) as u16
}

/// The simulated sensor.
pub struct SimulatedSensor {
    pattern: Pattern,
    value: u16,
    period: Duration,
    started: Instant,
    control: SimulatedControl,
}

impl SimulatedSensor {
    /// A sensor following `cfg`.
    pub fn new(cfg: &SimulatedSensorConfig) -> Self {
        SimulatedSensor {
            pattern: cfg.pattern,
            value: cfg.value,
            period: Duration::from_secs(cfg.period_s),
            started: Instant::now(),
            control: SimulatedControl::default(),
        }
    }

    /// The handle that overrides this sensor.
    pub fn control(&self) -> SimulatedControl {
        self.control.clone()
    }
}

impl Sensor for SimulatedSensor {
    fn read(&mut self) -> Result<Reading, SensorError> {
        let light = match self.control.get() {
            Some(SimulatedLight::Fail) => return Err(SensorError::Simulated),
            Some(SimulatedLight::Level(v)) => v,
            None => match self.pattern {
                Pattern::Constant => self.value,
                Pattern::Daylight => daylight(self.value, self.period, self.started.elapsed()),
            },
        };
        Ok(Reading { light, lux: None })
    }

    fn blocks(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daylight_starts_at_value_and_spans_the_scale() {
        let p = Duration::from_secs(120);
        assert_eq!(daylight(400, p, Duration::ZERO), 400);
        let all: Vec<u16> = (0..120).map(|s| daylight(400, p, Duration::from_secs(s))).collect();
        assert_eq!(*all.iter().max().unwrap(), 1000);
        assert_eq!(*all.iter().min().unwrap(), 0);
        assert_eq!(daylight(400, p, p), 400, "one period later it is the same time of day");
    }

    #[test]
    fn control_overrides_and_fails_until_next_level() {
        let cfg = SimulatedSensorConfig { pattern: Pattern::Constant, value: 10, period_s: 60 };
        let mut s = SimulatedSensor::new(&cfg);
        assert_eq!(s.read().unwrap().light, 10);
        s.control().set(SimulatedLight::Fail);
        assert_eq!(s.read(), Err(SensorError::Simulated));
        s.control().set(SimulatedLight::Level(777));
        assert_eq!(s.read().unwrap().light, 777);
    }
}
