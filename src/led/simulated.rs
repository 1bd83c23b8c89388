//! The virtual LED: one line on stdout per change, `led on|off <CLOCK_MONOTONIC ns>`, flushed at
//! once. Nothing else in the program writes to stdout.

use std::io::Write;

use super::{monotonic_ns, Led};

/// The virtual LED, off at start (and silent about it).
pub struct SimulatedLed<W: Write + Send> {
    on: bool,
    out: W,
}

impl SimulatedLed<std::io::Stdout> {
    /// A virtual LED printing to stdout.
    pub fn stdout() -> Self {
        SimulatedLed { on: false, out: std::io::stdout() }
    }
}

impl<W: Write + Send> SimulatedLed<W> {
    /// A virtual LED printing to `out` (tests).
    pub fn new(out: W) -> Self {
        SimulatedLed { on: false, out }
    }
}

impl<W: Write + Send> Led for SimulatedLed<W> {
    fn set(&mut self, on: bool) -> bool {
        if on == self.on {
            return false;
        }
        self.on = on;
        let stamp = monotonic_ns();
        // A closed stdout must not stop the device; the state is still applied and published.
        let _ = writeln!(self.out, "led {} {stamp}", if on { "on" } else { "off" }).and_then(|_| self.out.flush());
        true
    }

    fn is_on(&self) -> bool {
        self.on
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_one_line_per_change_and_nothing_for_repeats() {
        let mut led = SimulatedLed::new(Vec::new());
        assert!(!led.set(false));
        assert!(led.set(true));
        assert!(!led.set(true));
        assert!(led.set(false));
        let text = String::from_utf8(led.out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("led on "));
        assert!(lines[1].starts_with("led off "));
        let stamps: Vec<u64> = lines.iter().map(|l| l.rsplit(' ').next().unwrap().parse().unwrap()).collect();
        assert!(stamps[0] <= stamps[1] && stamps[0] > 0);
    }
}
