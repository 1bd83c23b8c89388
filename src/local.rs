//! The local rule: a nightlight that does its job with no broker or no controller, and never
//! undoes a command.
//!
//! Rules:
//! - The device is *attended* while it is connected to its broker and at least one nightlight
//!   controller says `online` on `nightlight/controller/<client id>/status` (retained; `offline`
//!   is the controller's Last Will, an empty message a clean stop). Several controllers (a shared
//!   group) each count: the device is attended while any of them is online. What is known of
//!   them survives a reconnect that resumes the session (the broker queues their news meanwhile)
//!   and is learned again, from their retained statuses, when the session is new.
//! - The light is *dark* below `server.threshold` and *bright* from `threshold + hysteresis` up;
//!   in between it stays what it was (the first reading there counts as bright, as the
//!   controller's logic has it). *Dusk* and *dawn* are the crossings from one to the other.
//! - A command, from any controller (a nightlight server, Home Assistant, `mosquitto_pub`),
//!   switches the LED and holds until the next dusk or dawn.
//! - Unattended for `led.local_after_s` (0: never), the device is in charge: mode `local`. It
//!   keeps the LED on while dark and off while bright, except while a command holds: then the
//!   mode is `remote` (a controller decided), and at the next dusk or dawn it is `local` again
//!   and the LED follows the light.
//! - Attended, the mode is `remote` at once and only commands switch the LED.
//!
//! So a command is never undone by the next reading, and with no command the LED switches on
//! at dusk and off at dawn on its own. Pure: time is passed in; the device reports the mode in
//! `<id>/state` and health.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The most controllers a device keeps track of; statuses from more are ignored and counted (a
/// shared group is a handful; only a misbehaving client makes up thousands).
pub const MAX_CONTROLLERS: usize = 64;

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
    threshold: u16,
    hysteresis: u16,
    connected: bool,
    /// Controllers (by status topic) that said `online`.
    online: HashSet<String>,
    /// Statuses ignored because [`MAX_CONTROLLERS`] were online already.
    ignored: u64,
    /// The controllers' retained statuses were asked for in this process (a subscription made).
    asked: bool,
    /// Since when no controller is reachable; `None` while attended.
    unattended_since: Option<Instant>,
    /// Whether the light is dark (`Some(true)`) or bright, once a reading said so.
    dark: Option<bool>,
    /// A command came since the last dusk or dawn: it holds.
    commanded: bool,
    mode: Mode,
}

impl LocalRule {
    /// Starts unattended at `now` (no broker yet), in mode `remote`.
    pub fn new(local_after_s: u64, threshold: u16, hysteresis: u16, now: Instant) -> Self {
        LocalRule {
            after: (local_after_s > 0).then(|| Duration::from_secs(local_after_s)),
            threshold,
            hysteresis,
            connected: false,
            online: HashSet::new(),
            ignored: 0,
            asked: false,
            unattended_since: Some(now),
            dark: None,
            commanded: false,
            mode: Mode::Remote,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// New settings (live configuration); the mode and what is known of controllers stay.
    pub fn reconfigure(&mut self, local_after_s: u64, threshold: u16, hysteresis: u16) {
        self.after = (local_after_s > 0).then(|| Duration::from_secs(local_after_s));
        self.threshold = threshold;
        self.hysteresis = hysteresis;
    }

    /// The broker connection came up (`session_present`: the broker kept the session) or went
    /// down. True when the mode changed.
    pub fn link(&mut self, connected: bool, session_present: bool, now: Instant) -> bool {
        self.connected = connected;
        if connected && !session_present {
            // New subscriptions: the controllers' retained statuses arrive again. A resumed
            // session delivers what they said meanwhile, so what is known stays.
            self.online.clear();
            self.asked = true;
        }
        self.settle(now)
    }

    /// Whether this process has yet to ask for the controllers' retained statuses: after a
    /// restart that resumed the broker's session, the broker sends them only to a new
    /// SUBSCRIBE (which the device then makes, [`LocalRule::asking`]).
    pub fn must_ask(&self) -> bool {
        !self.asked
    }

    /// The device subscribed to [`crate::topics::CONTROLLERS`] again.
    pub fn asking(&mut self) {
        self.asked = true;
    }

    /// Controllers' `online` ignored because [`MAX_CONTROLLERS`] were online already.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// The number of controllers known to be online.
    pub fn controllers_online(&self) -> usize {
        self.online.len()
    }

    /// A controller's status message (`payload`: `online`, `offline` or empty). True when the
    /// mode changed.
    pub fn controller_status(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        if payload == b"online" {
            if self.online.len() < MAX_CONTROLLERS || self.online.contains(topic) {
                self.online.insert(topic.to_owned());
            } else {
                self.ignored += 1;
            }
        } else {
            self.online.remove(topic);
        }
        self.settle(now)
    }

    /// A command switched the LED: it holds until the next dusk or dawn. True when the mode
    /// changed.
    pub fn command(&mut self, now: Instant) -> bool {
        self.commanded = true;
        self.settle(now)
    }

    /// A reading, with the LED as it is now.
    pub fn reading(&mut self, light: u16, led_on: bool, now: Instant) -> Step {
        let dark = if light < self.threshold {
            Some(true)
        } else if u32::from(light) >= u32::from(self.threshold) + u32::from(self.hysteresis) {
            Some(false)
        } else {
            self.dark.or(Some(false))
        };
        if dark != self.dark {
            // Dusk or dawn (or the first reading): a command held until now gives way.
            self.dark = dark;
            self.commanded = false;
        }
        let mode_changed = self.settle(now);
        let mut step = Step { switch: None, mode_changed };
        if self.mode == Mode::Local {
            step.switch = self.dark.filter(|&d| d != led_on);
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
            let takes_over = self.after.is_some_and(|after| now.duration_since(since) >= after);
            self.mode = if takes_over && !self.commanded { Mode::Local } else { Mode::Remote };
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
        assert_eq!(r.reading(100, false, at(t0, 59)), Step::default(), "not yet");
        assert_eq!(r.mode(), Mode::Remote);
        assert_eq!(r.reading(100, false, at(t0, 60)), Step { switch: Some(true), mode_changed: true });
        assert_eq!(r.mode(), Mode::Local);
    }

    #[test]
    fn locally_it_decides_as_the_controller_would_with_the_hysteresis_band() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(1, 300, 20, t0);
        assert_eq!(r.reading(250, false, at(t0, 1)).switch, Some(true));
        assert_eq!(r.reading(240, true, at(t0, 2)).switch, None, "already on");
        assert_eq!(r.reading(310, true, at(t0, 3)).switch, None, "inside the band");
        assert_eq!(r.reading(320, true, at(t0, 4)).switch, Some(false));
    }

    #[test]
    fn a_command_holds_through_every_reading_until_the_next_dusk_or_dawn() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(1, 300, 20, t0);
        r.link(true, false, t0); // a broker, Home Assistant, no nightlight controller
        assert_eq!(r.reading(800, false, at(t0, 1)), Step { switch: None, mode_changed: true }, "bright, off");
        assert_eq!(r.mode(), Mode::Local);
        // Home Assistant switches it on in bright light: held, reported as a controller's.
        assert!(r.command(at(t0, 2)), "the mode says a controller decided");
        assert_eq!(r.mode(), Mode::Remote);
        for s in 3..100 {
            assert_eq!(r.reading(800 - s as u16, true, at(t0, s)).switch, None, "held at {s} s");
        }
        // Dusk: the rule wants it on, as it is; the rule is in charge again.
        assert_eq!(r.reading(250, true, at(t0, 100)), Step { switch: None, mode_changed: true });
        assert_eq!(r.mode(), Mode::Local);
        // Switched off in the dark: held all night.
        r.command(at(t0, 101));
        for s in 102..200 {
            assert_eq!(r.reading(100, false, at(t0, s)).switch, None, "held at {s} s");
        }
        // Dawn agrees with it (off); the next dusk, with no command, switches on by itself.
        assert_eq!(r.reading(900, false, at(t0, 200)).switch, None);
        assert_eq!(r.reading(100, false, at(t0, 300)).switch, Some(true), "dusk, no command: on");
    }

    #[test]
    fn a_command_given_before_the_takeover_still_holds_after_it() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(60, 300, 20, t0);
        r.link(true, false, t0);
        assert_eq!(r.reading(800, false, at(t0, 1)).switch, None);
        r.command(at(t0, 10)); // on, in bright light, while the device waits for a controller
        assert_eq!(r.reading(800, true, at(t0, 61)), Step::default(), "not undone at the takeover");
        assert_eq!(r.mode(), Mode::Remote);
    }

    #[test]
    fn a_controller_online_puts_it_back_in_remote_at_once_and_its_will_hands_it_back() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(10, 300, 20, t0);
        r.link(true, false, at(t0, 1));
        r.reading(100, false, at(t0, 20));
        assert_eq!(r.mode(), Mode::Local, "connected, but no controller online");
        assert!(r.controller_status(CTL, b"online", at(t0, 21)));
        assert_eq!(r.mode(), Mode::Remote);
        assert_eq!(r.reading(100, false, at(t0, 22)).switch, None, "the controller is in charge");
        assert!(!r.controller_status(CTL, b"offline", at(t0, 30)), "not local before local_after_s");
        assert!(!r.reading(100, false, at(t0, 39)).mode_changed);
        assert_eq!(r.reading(100, false, at(t0, 40)), Step { switch: Some(true), mode_changed: true });
    }

    #[test]
    fn a_resumed_session_keeps_the_controllers_and_a_new_one_learns_them_again() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(5, 300, 20, t0);
        r.link(true, false, t0);
        r.controller_status(CTL, b"online", t0);
        r.link(false, false, at(t0, 1)); // a Wi-Fi blip
        r.link(true, true, at(t0, 2)); // the broker kept the session: no retained status again
        assert_eq!(r.reading(100, false, at(t0, 100)).switch, None, "the controller is still in charge");
        assert_eq!(r.mode(), Mode::Remote);
        r.link(false, false, at(t0, 101));
        r.link(true, false, at(t0, 102)); // a new session: statuses come again, retained
        assert_eq!(r.controllers_online(), 0);
        r.controller_status(CTL, b"online", at(t0, 102));
        assert_eq!(r.mode(), Mode::Remote);
    }

    #[test]
    fn any_controller_of_a_shared_group_counts_and_losing_the_broker_hands_over() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(5, 300, 20, t0);
        r.link(true, false, t0);
        r.controller_status(CTL, b"online", t0);
        r.controller_status("nightlight/controller/b/status", b"online", t0);
        r.controller_status(CTL, b"", at(t0, 1)); // a clean stop clears a's status
        assert_eq!(r.reading(100, false, at(t0, 100)).switch, None, "b is still online");
        r.link(false, false, at(t0, 100));
        assert_eq!(r.reading(100, false, at(t0, 105)).switch, Some(true), "no broker for 5 s");
    }

    #[test]
    fn local_after_s_0_never_takes_over() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(0, 300, 20, t0);
        assert_eq!(r.reading(100, false, at(t0, 86_400)), Step::default());
    }

    #[test]
    fn made_up_controllers_beyond_the_cap_are_ignored_and_counted() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(5, 300, 20, t0);
        r.link(true, false, t0);
        for i in 0..MAX_CONTROLLERS + 10 {
            r.controller_status(&crate::topics::controller_status(&format!("c{i}")), b"online", t0);
        }
        assert_eq!((r.controllers_online(), r.ignored()), (MAX_CONTROLLERS, 10));
        r.controller_status(&crate::topics::controller_status("c0"), b"offline", t0);
        r.controller_status(&crate::topics::controller_status("late"), b"online", t0);
        assert_eq!(r.controllers_online(), MAX_CONTROLLERS, "room again once one left");
    }

    #[test]
    fn a_restart_that_resumes_the_session_asks_for_the_statuses_once() {
        let t0 = Instant::now();
        let mut r = LocalRule::new(5, 300, 20, t0);
        r.link(true, true, t0); // a new process, the broker kept its session
        assert!(r.must_ask(), "nothing known and nothing coming: ask");
        r.asking();
        assert!(!r.must_ask());
        let mut fresh = LocalRule::new(5, 300, 20, t0);
        fresh.link(true, false, t0);
        assert!(!fresh.must_ask(), "a new session's subscription brings them");
    }
}
