//! What arrives, once [`super::inbox`] has said what it is: commands (checked for size, shape
//! and age, then obeyed), the controllers' statuses, live configuration, requests for a reading,
//! Home Assistant's birth, the virtual sensor's light and update manifests.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{inbox, now, Device};
use crate::homeassistant;
use crate::link::Message;
use crate::metrics::Reject;
use crate::payload;

impl Device {
    pub(super) fn on_message(&mut self, p: &Message) {
        if self.ha.message(self.live.cfg(), &p.topic, &p.payload) {
            return; // an old discovery config, looked up
        }
        let ha_status = self.live.cfg().homeassistant.enabled.then(|| homeassistant::ha_status_topic(self.live.cfg()));
        match inbox::classify(&self.topics, ha_status.as_deref(), &p.topic) {
            inbox::Kind::Command => self.on_command(p),
            inbox::Kind::ControllerStatus => self.on_controller_status(p),
            inbox::Kind::ConfigSet => self.on_config_set(&p.payload, p.retain),
            inbox::Kind::ReadRequest => self.on_read_request(p),
            inbox::Kind::VirtualLight => self.on_virtual_light(p),
            inbox::Kind::HomeAssistantStatus => self.on_ha_status(p),
            inbox::Kind::Update => {
                if let Some(u) = &self.updates {
                    if !p.payload.is_empty() {
                        u.offer(&p.payload);
                    }
                }
            }
            inbox::Kind::UpdateInstall => {
                if let Some(u) = &self.updates {
                    info!("asked to install the update again");
                    u.retry();
                }
            }
            inbox::Kind::Other => {}
        }
    }

    /// A command: obeyed unless it is invalid, retained or stale (counted and logged).
    pub(super) fn on_command(&mut self, p: &Message) {
        let taken = Instant::now();
        let (wall, synced) = self.wall.now();
        let now_ms = synced.then_some(wall);
        let max_age_s = self.live.cfg().led.command_max_age_s;
        match payload::parse_command(&p.payload) {
            Ok(cmd) => match payload::check_fresh(&cmd, p.retain, now_ms, max_age_s) {
                Ok(()) => {
                    self.lamp.command(cmd.led_on, now());
                    self.counters.command_led.observe(taken.elapsed());
                    self.publish_state();
                }
                Err(why) => {
                    let n = self.counters.reject(Reject::Stale);
                    warn!(topic = %p.topic, led_on = cmd.led_on, reason = %why, rejected_total = n,
                        "ignored a stale command");
                }
            },
            Err(e) => {
                let n = self.counters.reject(Reject::Invalid);
                warn!(topic = %p.topic, bytes = p.payload.len(), error = %e, rejected_total = n,
                    "ignored an invalid command");
            }
        }
    }

    /// A controller's `online` or `offline` ([`local`]).
    pub(super) fn on_controller_status(&mut self, p: &Message) {
        if self.lamp.controller_status(&p.topic, &p.payload, now()) {
            self.publish_state();
        }
    }

    /// Home Assistant's birth message: discovery, state and the last reading again, soon.
    pub(super) fn on_ha_status(&mut self, p: &Message) {
        // A fleet must not answer in one burst.
        let delay = Duration::from_millis(fastrand::u64(500..=5000));
        if let Some(delay) = self.ha.ha_status(&p.payload, now(), delay) {
            info!(in_ms = delay.as_millis() as u64, "Home Assistant is online: discovery follows");
        }
    }

    /// The simulated sensor's control topic (virtual sensor only).
    pub(super) fn on_virtual_light(&mut self, p: &Message) {
        match (payload::parse_simulated_light(&p.payload), self.sampler.simulated()) {
            (Some(v), Some(ctl)) => {
                info!(?v, "simulated light set");
                ctl.set(v);
            }
            (None, _) if p.payload.is_empty() => {}
            _ => warn!(topic = %p.topic, bytes = p.payload.len(), "ignored: expected 0-1000 or `fail`"),
        }
    }

    /// A live change: applied and kept, or refused (counted) with nothing changed; reported.
    pub(super) fn on_config_set(&mut self, payload: &[u8], retained: bool) {
        let interval = self.live.cfg().sensor.interval_ms;
        match self.live.set(payload, retained, tokio::time::Instant::now()) {
            Ok(cfg) => {
                info!(changed = %crate::payload::printable(&String::from_utf8_lossy(payload), 400), "live configuration applied");
                if cfg.sensor.interval_ms != interval {
                    self.sampler.set_interval(Duration::from_millis(cfg.sensor.interval_ms));
                }
                self.lamp.reconfigure(cfg.led.local_after_s, cfg.server.threshold, cfg.server.hysteresis);
            }
            Err(refusal) => {
                let n = self.counters.reject(Reject::Config);
                warn!(topic = %self.topics.config_set, bytes = payload.len(), retained, refused = %refusal,
                    rejected_total = n, "refused a live configuration change");
            }
        }
        self.publish_config();
    }
}
