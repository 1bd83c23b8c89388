//! The controller's decisions, from the lesson's server: the LED should be on when it is dark.
//!
//! Pure logic, no I/O: readings and reported states go in, commands come out. Per device it
//! applies hysteresis (on below `threshold`, off at `threshold + hysteresis` or above, unchanged in
//! between), ignores readings older than the one behind its last decision (a device draining its
//! offline queue), and sends a command only when the wanted state differs from the state the
//! device last reported and that command is not already on its way.
//!
//! In a shared group (`server.shared_group`) each controller gets some of a device's readings
//! and every one of its states. Then the state the device reported, which all of them see, is
//! what a reading inside the hysteresis band keeps, and a state report alone sends nothing (the
//! device's next reading corrects it): a controller's own last decision may be older than
//! another's, and correcting toward it made two controllers switch a device back and forth
//! (found by `nightlight fleet` with two controllers: four times as many commands as readings).

use std::collections::HashMap;

/// The most devices one controller keeps track of (about 11 MB of names and state); messages
/// from more are ignored and counted, so a client that makes up device ids cannot exhaust it.
pub const MAX_DEVICES: usize = 100_000;

/// A command for one device: publish `{"led_on": on}` to `<id>/commands`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub id: String,
    pub on: bool,
}

#[derive(Debug, Default, Clone)]
struct DeviceView {
    /// What the readings say the LED should be.
    wanted: Option<bool>,
    /// `ts` of the reading behind `wanted`.
    decided_ts: u64,
    /// What the device last reported on `<id>/state`.
    reported: Option<bool>,
    /// The command sent since the last report, if any (one command per change).
    sent: Option<bool>,
}

/// The decisions for a fleet of devices.
#[derive(Debug, Clone)]
pub struct Controller {
    threshold: u16,
    hysteresis: u16,
    devices: HashMap<String, DeviceView>,
    max_devices: usize,
    /// Messages ignored because [`MAX_DEVICES`] were known already.
    ignored: u64,
    /// One of a shared group (see the module doc).
    shared: bool,
}

impl Controller {
    /// LED on below `threshold`, off from `threshold + hysteresis` up.
    pub fn new(threshold: u16, hysteresis: u16) -> Self {
        Controller::with_capacity(threshold, hysteresis, MAX_DEVICES)
    }

    /// As [`Controller::new`], keeping track of at most `max_devices`.
    pub fn with_capacity(threshold: u16, hysteresis: u16, max_devices: usize) -> Self {
        Controller { threshold, hysteresis, devices: HashMap::new(), max_devices, ignored: 0, shared: false }
    }

    /// One controller of a shared group (see the module doc).
    pub fn shared(mut self) -> Self {
        self.shared = true;
        self
    }

    /// Messages ignored because the controller kept track of as many devices as it may.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// The device's view, unless it would be one too many.
    fn view(&mut self, id: &str) -> Option<&mut DeviceView> {
        if !self.devices.contains_key(id) && self.devices.len() >= self.max_devices {
            self.ignored += 1;
            return None;
        }
        Some(self.devices.entry(id.to_owned()).or_default())
    }

    /// A reading from `<id>/telemetry`.
    pub fn on_reading(&mut self, id: &str, light: u16, ts: u64) -> Option<Command> {
        let (threshold, hysteresis, shared) = (self.threshold, self.hysteresis, self.shared);
        let d = self.view(id)?;
        if d.wanted.is_some() && ts < d.decided_ts {
            return None; // late, from an offline queue: a newer reading already decided
        }
        let previous = if shared { d.reported.or(d.wanted) } else { d.wanted };
        let wanted = match previous {
            _ if light < threshold => true,
            _ if u32::from(light) >= u32::from(threshold) + u32::from(hysteresis) => false,
            Some(previous) => previous,
            None => false,
        };
        d.wanted = Some(wanted);
        d.decided_ts = ts;
        Self::command_for(id, d)
    }

    /// A state report from `<id>/state`.
    pub fn on_state(&mut self, id: &str, led_on: bool) -> Option<Command> {
        let shared = self.shared;
        let d = self.view(id)?;
        d.reported = Some(led_on);
        d.sent = None;
        if shared {
            return None; // its next reading decides (see the module doc)
        }
        Self::command_for(id, d)
    }

    fn command_for(id: &str, d: &mut DeviceView) -> Option<Command> {
        let wanted = d.wanted?;
        if d.reported == Some(wanted) || d.sent == Some(wanted) {
            return None;
        }
        d.sent = Some(wanted);
        Some(Command { id: id.to_owned(), on: wanted })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(on: bool) -> Option<Command> {
        Some(Command { id: "a".into(), on })
    }

    #[test]
    fn dark_turns_the_led_on_once_and_bright_turns_it_off() {
        let mut c = Controller::new(300, 20);
        c.on_state("a", false);
        assert_eq!(c.on_reading("a", 500, 1), None);
        assert_eq!(c.on_reading("a", 250, 2), cmd(true));
        assert_eq!(c.on_reading("a", 240, 3), None, "one command per change, not per reading");
        assert_eq!(c.on_state("a", true), None);
        assert_eq!(c.on_reading("a", 200, 4), None);
        assert_eq!(c.on_reading("a", 330, 5), cmd(false));
    }

    #[test]
    fn two_controllers_of_a_shared_group_never_undo_each_other() {
        let (mut a, mut b) = (Controller::new(300, 20).shared(), Controller::new(300, 20).shared());
        let mut led = false;
        a.on_state("d", led);
        b.on_state("d", led);
        let (mut commands, mut changes) = (0, 0);
        // Readings alternate between the two; both see every state.
        let lights = [500, 250, 310, 305, 330, 100, 315, 600, 290, 310, 319, 321, 0, 1000];
        for (i, light) in lights.into_iter().enumerate() {
            let c = if i % 2 == 0 { &mut a } else { &mut b };
            if let Some(cmd) = c.on_reading("d", light, i as u64) {
                commands += 1;
                if cmd.on != led {
                    changes += 1;
                }
                led = cmd.on;
                assert_eq!(a.on_state("d", led), None);
                assert_eq!(b.on_state("d", led), None);
            }
            let want = if light < 300 {
                Some(true)
            } else if light >= 320 {
                Some(false)
            } else {
                None
            };
            if let Some(w) = want {
                assert_eq!(led, w, "reading {light}: the LED follows the light");
            }
        }
        assert_eq!(commands, changes, "one command per change, none undone");
        assert_eq!(commands, 8);
    }

    #[test]
    fn readings_inside_the_hysteresis_band_change_nothing() {
        let mut c = Controller::new(300, 20);
        c.on_state("a", false);
        assert_eq!(c.on_reading("a", 299, 1), cmd(true));
        c.on_state("a", true);
        for (i, light) in [300, 310, 319, 305].into_iter().enumerate() {
            assert_eq!(c.on_reading("a", light, 2 + i as u64), None, "{light} is inside the band");
        }
        assert_eq!(c.on_reading("a", 320, 10), cmd(false));
        c.on_state("a", false);
        assert_eq!(c.on_reading("a", 310, 11), None, "still off inside the band");
    }

    #[test]
    fn a_device_that_restarts_in_the_wrong_state_is_corrected() {
        let mut c = Controller::new(300, 20);
        c.on_state("a", false);
        assert_eq!(c.on_reading("a", 100, 1), cmd(true));
        c.on_state("a", true);
        assert_eq!(c.on_state("a", false), cmd(true), "it came back off while it is dark");
    }

    #[test]
    fn late_readings_never_override_a_newer_decision() {
        let mut c = Controller::new(300, 20);
        c.on_state("a", false);
        assert_eq!(c.on_reading("a", 100, 1_000), cmd(true));
        c.on_state("a", true);
        assert_eq!(c.on_reading("a", 900, 500), None, "an old bright reading from the queue");
        assert_eq!(c.on_reading("a", 900, 2_000), cmd(false));
    }

    #[test]
    fn devices_are_decided_independently() {
        let mut c = Controller::new(300, 20);
        assert_eq!(c.on_reading("a", 100, 1), cmd(true));
        assert_eq!(c.on_reading("b", 100, 1), Some(Command { id: "b".into(), on: true }));
        assert_eq!(c.on_reading("a", 100, 2), None);
    }

    #[test]
    fn made_up_device_ids_beyond_the_cap_are_ignored_and_counted_while_known_ones_go_on() {
        let mut c = Controller::with_capacity(300, 20, 2);
        assert_eq!(c.on_reading("a", 100, 1), cmd(true));
        assert!(c.on_reading("b", 100, 1).is_some());
        assert_eq!(c.on_reading("c", 100, 1), None, "one too many");
        assert_eq!(c.on_state("d", true), None);
        assert_eq!(c.ignored(), 2);
        assert_eq!(c.on_reading("a", 900, 2), cmd(false), "known devices are still decided");
    }
}
