//! The LED and who switches it: the kept LED ([`KeptLed`], `led.power_on`) and the local rule
//! ([`LocalRule`]) as one part, so every switch goes through one place.
//!
//! Rules:
//! - Every method that can change the LED or the mode answers whether `<id>/state` changed, and
//!   logs the change itself (once, here): the device loop only publishes.
//! - A command switches the LED and holds until the next dusk or dawn ([`crate::local`]).
//! - A reading may switch it: the first one under `power_on = "auto"`, or the local rule.
//!
//! Time is passed in, as to the rule itself.

use std::time::Instant;

use tracing::{info, warn};

use crate::led::power_on::KeptLed;
use crate::local::{self, LocalRule, Mode};
use crate::payload;

pub(super) struct Lamp {
    led: KeptLed,
    rule: LocalRule,
}

impl Lamp {
    pub fn new(led: KeptLed, rule: LocalRule) -> Self {
        Lamp { led, rule }
    }

    /// A reading: the first one under `auto`, then the rule. True when `<id>/state` changed.
    pub fn reading(&mut self, light: u16, now: Instant) -> bool {
        let first = self.led.reading(light).is_some();
        let step = self.rule.reading(light, self.led.is_on(), now);
        if let Some(on) = step.switch {
            info!(led_on = on, light, "local rule: switching the LED");
            self.led.set(on);
        }
        if step.mode_changed {
            info!(mode = self.mode().as_str(), "mode changed");
        }
        first || step.switch.is_some() || step.mode_changed
    }

    /// A command that passed its checks: obeyed, and held until the next dusk or dawn.
    pub fn command(&mut self, on: bool, now: Instant) {
        self.led.set(on);
        if self.rule.command(now) {
            info!(mode = self.mode().as_str(), "a command holds until the next dusk or dawn");
        }
    }

    /// The broker came or went (`session_present` on a connect that resumed the session).
    pub fn link(&mut self, up: bool, session_present: bool, now: Instant) {
        if self.rule.link(up, session_present, now) {
            // Down: unattended long enough, the rule takes over (its next reading switches).
            info!(mode = self.mode().as_str(), "mode changed");
        }
    }

    /// A controller's `online` or `offline`. True when `<id>/state` changed.
    pub fn controller_status(&mut self, topic: &str, payload: &[u8], now: Instant) -> bool {
        let ignored = self.rule.ignored();
        let changed = self.rule.controller_status(topic, payload, now);
        if ignored == 0 && self.rule.ignored() > 0 {
            warn!(
                max = local::MAX_CONTROLLERS,
                "more controllers say online than a device keeps track of: ignoring the rest"
            );
        }
        if changed {
            info!(mode = self.mode().as_str(), controller = %topic, "mode changed");
        }
        changed
    }

    /// A live change of `led.local_after_s`, `server.threshold` or `server.hysteresis`.
    pub fn reconfigure(&mut self, local_after_s: u64, threshold: u16, hysteresis: u16) {
        self.rule.reconfigure(local_after_s, threshold, hysteresis);
    }

    /// The controllers' retained statuses must be asked for again ([`LocalRule::must_ask`]).
    pub fn must_ask(&self) -> bool {
        self.rule.must_ask()
    }

    /// They were asked for.
    pub fn asking(&mut self) {
        self.rule.asking();
    }

    pub fn mode(&self) -> Mode {
        self.rule.mode()
    }

    /// The `<id>/state` payload.
    pub fn state(&self) -> Vec<u8> {
        payload::state_json(self.led.is_on(), self.mode().as_str())
    }
}
