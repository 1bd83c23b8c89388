//! The local rule: a nightlight that does its job with no broker or no controller.
//!
//! Rules:
//! - The device is *attended* while it is connected to its broker and at least one controller
//!   says `online` on `nightlight/controller/<client id>/status` (retained; `offline` is the
//!   controller's Last Will, an empty message a clean stop). Several controllers (a shared
//!   group) each count: the device is attended while any of them is online.
//! - Unattended for `led.local_after_s` (0: never), the device is in charge: mode `local`. It
//!   decides on its own readings with the controller's own logic ([`Controller`]: on below
//!   `server.threshold`, off from `threshold + hysteresis` up, unchanged in between), so the
//!   LED does what the controller would have made it do.
//! - Attended again, the mode is `remote` at once and only commands switch the LED.
//!
//! Pure: time is passed in; the device reports the mode in `<id>/state` and health.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::controller::Controller;

/// The topic filter of the controllers' statuses.
pub const CONTROLLERS: &str = "nightlight/controller/+/status";

/// The status topic of the controller with `client_id`.
pub fn controller_status_topic(client_id: &str) -> String {
    format!("nightlight/controller/{client_id}/status")
}

/// Whether `topic` is a controller's status.
pub fn is_controller_status(topic: &str) -> bool {
    topic
        .strip_prefix("nightlight/controller/")
        .and_then(|rest| rest.strip_suffix("/status"))
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// Who switches the LED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Commands from a controller.
    Remote,
    /// The device's own readings.
    Local,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Remote => "remote",
            Mode::Local => "local",
        }
    }
}

/// What a reading did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Step {
    /// Switch the LED to this.
    pub switch: Option<bool>,
    /// The mode changed (report it).
    pub mode_changed: bool,
}

/// The local rule's state.
#[derive(Debug)]
pub struct LocalRule {
    after: Option<Duration>,
    decide: Controller,
    connected: bool,
    /// Controllers (by status topic) that said `online`.
    online: HashSet<String>,
    /// Since when no controller is reachable; `None` while attended.
    unattended_since: Option<Instant>,
    mode: Mode,
}

impl LocalRule {
    /// Starts unattended at `now` (no broker yet), in mode `remote`.
    pub fn new(local_after_s: u64, threshold: u16, hysteresis: u16, now: Instant) -> Self {
        LocalRule {
            after: (local_after_s > 0).then(|| Duration::from_secs(local_after_s)),
            decide: Controller::new(threshold, hysteresis),
            connected: false,
            online: HashSet::new(),
            unattended_since: Some(now),
            mode: Mode::Remote,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// New settings (live configuration); the mode and what is known of controllers stay.
    pub fn reconfigure(&mut self, local_after_s: u64, threshold: u16, hysteresis: u16) {
        self.after = (local_after_s > 0).then(|| Duration::from_secs(local_after_s));
        self.decide = Controller::new(threshold, hysteresis);
    }

    /// The broker connection came up or went down. True when the mode changed.
    pub fn link(&mut self, connected: bool, now: Instant) -> bool {
        self.connected = connected;
        if !connected {
            // Statuses are learned again (retained) on the next connection.
            self.online.clear();
        }
        self.settle(now)
    }

    /// A controller's status message (`payload`: `online`, `offline` or empty). True when the
    /// mode changed.
    pub fn controller_status(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        if payload == b"online" {
            self.online.insert(topic.to_owned());
        } else {
            self.online.remove(topic);
        }
        self.settle(now)
    }

    /// A reading (its light and `ts`), with the LED as it is now.
    pub fn reading(&mut self, light: u16, ts: u64, led_on: bool, now: Instant) -> Step {
        let mode_changed = self.settle(now);
        let mut step = Step { switch: None, mode_changed };
        if self.mode == Mode::Local {
            // The reading updates what the controller's logic wants; the LED as it is now is
            // then the "reported" state it compares with: a switch when they differ.
            let _ = self.decide.on_reading("", light, ts);
            step.switch = self.decide.on_state("", led_on).map(|c| c.on);
        }
        step
    }

    /// Brings the mode up to date; true when it changed.
    fn settle(&mut self, now: Instant) -> bool {
        let attended = self.connected && !self.online.is_empty();
        let before = self.mode;
        if attended {
            self.unattended_since = None;
            self.mode = Mode::Remote;
        } else {
            let since = *self.unattended_since.get_or_insert(now);
            if self.after.is_some_and(|after| now.duration_since(since) >= after) {
                self.mode = Mode::Local;
            }
        }
        self.mode != before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTL: &str = "nightlight/controller/a/status";

    fn at(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn with_no_broker_the_device_takes_over_after_local_after_s_and_not_before() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(60, 300, 20, t0);
        assert_eq!(r.reading(100, 1, false, at(t0, 59)), Step::default(), "not yet");
        assert_eq!(r.mode(), Mode::Remote);
        assert_eq!(r.reading(100, 2, false, at(t0, 60)), Step { switch: Some(true), mode_changed: true });
        assert_eq!(r.mode(), Mode::Local);
    }

    #[test]
    fn locally_it_decides_as_the_controller_would_with_the_hysteresis_band() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(1, 300, 20, t0);
        assert_eq!(r.reading(250, 1, false, at(t0, 1)).switch, Some(true));
        assert_eq!(r.reading(240, 2, true, at(t0, 2)).switch, None, "already on");
        assert_eq!(r.reading(310, 3, true, at(t0, 3)).switch, None, "inside the band");
        assert_eq!(r.reading(320, 4, true, at(t0, 4)).switch, Some(false));
    }

    #[test]
    fn a_controller_online_puts_it_back_in_remote_at_once_and_its_will_hands_it_back() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(10, 300, 20, t0);
        r.link(true, at(t0, 1));
        r.reading(100, 1, false, at(t0, 20));
        assert_eq!(r.mode(), Mode::Local, "connected, but no controller online");
        assert!(r.controller_status(CTL, b"online", at(t0, 21)));
        assert_eq!(r.mode(), Mode::Remote);
        assert_eq!(r.reading(100, 2, false, at(t0, 22)).switch, None, "the controller is in charge");
        assert!(!r.controller_status(CTL, b"offline", at(t0, 30)), "not local before local_after_s");
        assert!(!r.reading(100, 3, false, at(t0, 39)).mode_changed);
        assert_eq!(r.reading(100, 4, false, at(t0, 40)), Step { switch: Some(true), mode_changed: true });
    }

    #[test]
    fn any_controller_of_a_shared_group_counts_and_losing_the_broker_forgets_them() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(5, 300, 20, t0);
        r.link(true, t0);
        r.controller_status(CTL, b"online", t0);
        r.controller_status("nightlight/controller/b/status", b"online", t0);
        r.controller_status(CTL, b"", at(t0, 1)); // a clean stop clears a's status
        assert_eq!(r.reading(100, 1, false, at(t0, 100)).switch, None, "b is still online");
        r.link(false, at(t0, 100));
        assert_eq!(r.reading(100, 2, false, at(t0, 105)).switch, Some(true), "no broker for 5 s");
    }

    #[test]
    fn local_after_s_0_never_takes_over() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(0, 300, 20, t0);
        assert_eq!(r.reading(100, 1, false, at(t0, 86_400)), Step::default());
    }
}
