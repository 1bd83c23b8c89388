//! Home Assistant's part of the device loop: what to publish on a connect and on Home
//! Assistant's birth, the look-up of old per-entity configs and the migration it leads to, and
//! the last reading (the rules are [`crate::homeassistant`]'s module doc).
//!
//! Home Assistant's birth message (`online` on `<prefix>/status`) makes discovery, state and the
//! last reading due after a delay the loop draws (a fleet must not answer in one burst); a
//! birth while one is due changes nothing.
//!
//! Pure: the loop tells it what happened (time passed in) and publishes what it returns,
//! retained, in that order. The one file it depends on, `ha-migrated` in the state directory, the loop reads and
//! writes ([`Discovery::looked_up`] says when).

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::homeassistant;
use crate::link::Qos;
use crate::topics::Topics;

/// One retained message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: Qos,
}

fn retained(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Out {
    Out { topic: topic.into(), payload: payload.into(), qos: Qos::AtLeastOnce }
}

/// What a connect (or Home Assistant's birth) asks of the loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Announce {
    /// Publish these, in this order.
    Publish(Vec<Out>),
    /// First look up what the broker holds retained under this filter
    /// ([`crate::link::Client::look_up_retained`]); [`Discovery::looked_up`] follows.
    LookUp(String),
}

/// The look-up of the old per-entity configs under way.
#[derive(Debug, Default)]
struct Probe {
    /// The old topics that hold a config.
    found: Vec<String>,
    /// The broker refused the look-up (its ACL): which it holds is unknown.
    blind: bool,
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct Discovery {
    /// The board's model, for the device's `hw`.
    hw: Option<String>,
    /// Discovery is off and its retained messages were emptied in this run.
    cleared: bool,
    probe: Option<Probe>,
    /// The last reading as `<id>/reading` carries it.
    last_reading: Option<Vec<u8>>,
    /// Home Assistant came online: discovery and state go out at this moment.
    due: Option<Instant>,
}

impl Discovery {
    pub fn new(hw: Option<String>) -> Self {
        Discovery { hw, ..Discovery::default() }
    }

    /// A connect, or Home Assistant's birth. `migrated`: the state directory notes that the
    /// old configs were dealt with.
    pub fn announce(&mut self, cfg: &Config, migrated: bool) -> Announce {
        if !cfg.homeassistant.enabled {
            if std::mem::replace(&mut self.cleared, true) {
                return Announce::Publish(Vec::new());
            }
            let mut topics = homeassistant::legacy_topics(cfg);
            topics.push(Topics::new(&cfg.id).reading);
            topics.push(homeassistant::device_discovery(cfg, None).topic);
            return Announce::Publish(topics.into_iter().map(|t| retained(t, Vec::new())).collect());
        }
        if self.probe.is_some() {
            return Announce::Publish(Vec::new()); // the device message follows the look-up
        }
        if !migrated {
            self.probe = Some(Probe::default());
            return Announce::LookUp(homeassistant::legacy_filter(cfg));
        }
        Announce::Publish(vec![self.device_message(cfg)])
    }

    /// A message on Home Assistant's status topic at `now`: its birth makes the announcement due
    /// `delay` later. Returns the delay when it did.
    pub fn ha_status(&mut self, payload: &[u8], now: Instant, delay: Duration) -> Option<Duration> {
        if payload != homeassistant::HA_ONLINE || self.due.is_some() {
            return None;
        }
        self.due = Some(now + delay);
        Some(delay)
    }

    /// When the announcement after Home Assistant's birth is due.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The announcement after the birth is being made ([`Discovery::announce`] follows).
    pub fn answered_birth(&mut self) {
        self.due = None;
    }

    /// The broker refused the look-up's subscription (its ACL).
    pub fn look_up_refused(&mut self) {
        if let Some(p) = &mut self.probe {
            p.blind = true;
        }
    }

    /// A message arrived; true when it was the look-up's (the loop is done with it).
    pub fn message(&mut self, cfg: &Config, topic: &str, payload: &[u8]) -> bool {
        let Some(probe) = &mut self.probe else { return false };
        if payload.is_empty() || probe.found.iter().any(|t| t == topic) {
            return false;
        }
        if !homeassistant::legacy_topics(cfg).iter().any(|t| t == topic) {
            return false;
        }
        probe.found.push(topic.to_owned());
        true
    }

    /// The look-up is answered (or could not be made: `None` from the start): migrate, clear,
    /// then the device message; the loop then notes `ha-migrated`. `None` when no look-up was
    /// under way.
    pub fn looked_up(&mut self, cfg: &Config) -> Option<Vec<Out>> {
        let probe = self.probe.take()?;
        let old = if probe.blind { homeassistant::legacy_topics(cfg) } else { probe.found };
        let mut out: Vec<Out> =
            old.iter().map(|t| retained(t.clone(), homeassistant::MIGRATE.as_bytes().to_vec())).collect();
        out.extend(old.iter().map(|t| retained(t.clone(), Vec::new())));
        out.push(self.device_message(cfg));
        Some(out)
    }

    /// The look-up could not even be asked for: migrate every old topic, in the same order.
    pub fn look_up_failed(&mut self, cfg: &Config) -> Vec<Out> {
        self.probe = Some(Probe { found: Vec::new(), blind: true });
        self.looked_up(cfg).unwrap_or_default()
    }

    /// The connection ended: a look-up under way is made again at the next connect.
    pub fn disconnected(&mut self) {
        self.probe = None;
    }

    /// A reading was taken: its `<id>/reading` (QoS 0: the next one replaces a lost one), when
    /// discovery is on.
    pub fn reading(&mut self, cfg: &Config, json: Vec<u8>) -> Option<Out> {
        self.last_reading = Some(json);
        self.last_reading(cfg, Qos::AtMostOnce)
    }

    /// The last reading again (QoS 1 on a connect and Home Assistant's birth, so a broker's
    /// refusal is logged), when discovery is on and there is one.
    pub fn last_reading(&self, cfg: &Config, qos: Qos) -> Option<Out> {
        let json = self.last_reading.clone().filter(|_| cfg.homeassistant.enabled)?;
        Some(Out { topic: Topics::new(&cfg.id).reading, payload: json, qos })
    }

    fn device_message(&self, cfg: &Config) -> Out {
        let d = homeassistant::device_discovery(cfg, self.hw.as_deref());
        retained(d.topic, d.payload.to_string().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn porch() -> Config {
        Config { id: "porch".into(), ..Config::default() }
    }

    fn topics(out: &[Out]) -> Vec<(&str, bool)> {
        out.iter().map(|o| (o.topic.as_str(), o.payload.is_empty())).collect()
    }

    #[test]
    fn home_assistants_birth_makes_one_announcement_due_and_another_birth_meanwhile_changes_nothing() {
        let (t0, d) = (Instant::now(), Duration::from_secs(2));
        let mut ha = Discovery::new(None);
        assert_eq!(ha.ha_status(b"offline", t0, d), None, "its Last Will is no birth");
        assert_eq!(ha.due(), None);
        assert_eq!(ha.ha_status(b"online", t0, d), Some(d));
        assert_eq!(ha.due(), Some(t0 + d));
        assert_eq!(ha.ha_status(b"online", t0 + d / 2, d), None, "one due already");
        assert_eq!(ha.due(), Some(t0 + d));
        ha.answered_birth();
        assert_eq!(ha.due(), None);
        assert_eq!(ha.ha_status(b"online", t0 + d, d), Some(d), "a later birth is answered again");
    }

    #[test]
    fn a_new_device_looks_up_first_and_then_sends_only_its_device_message() {
        let cfg = porch();
        let mut d = Discovery::new(None);
        assert_eq!(d.announce(&cfg, false), Announce::LookUp("homeassistant/+/porch/+/config".into()));
        assert_eq!(d.announce(&cfg, false), Announce::Publish(vec![]), "Home Assistant's birth meanwhile waits");
        let out = d.looked_up(&cfg).unwrap();
        assert_eq!(topics(&out), [("homeassistant/device/porch/config", false)]);
        assert_eq!(d.looked_up(&cfg), None);
    }

    #[test]
    fn old_configs_found_are_migrated_then_cleared_then_the_device_message() {
        let cfg = porch();
        let mut d = Discovery::new(Some("Raspberry Pi 5".into()));
        d.announce(&cfg, false);
        assert!(d.message(&cfg, "homeassistant/light/porch/led/config", b"{}"));
        assert!(!d.message(&cfg, "homeassistant/light/porch/led/config", b"{}"), "once");
        assert!(!d.message(&cfg, "homeassistant/sensor/porch/other/config", b"{}"), "not one of ours");
        assert!(!d.message(&cfg, "porch/commands", b"{}"));
        let out = d.looked_up(&cfg).unwrap();
        assert_eq!(
            topics(&out),
            [
                ("homeassistant/light/porch/led/config", false),
                ("homeassistant/light/porch/led/config", true),
                ("homeassistant/device/porch/config", false),
            ]
        );
        assert_eq!(out[0].payload, homeassistant::MIGRATE.as_bytes());
        assert!(String::from_utf8_lossy(&out[2].payload).contains("Raspberry Pi 5"));
    }

    #[test]
    fn a_refused_look_up_migrates_every_old_topic_and_a_later_connect_only_announces() {
        let cfg = porch();
        let mut d = Discovery::new(None);
        d.announce(&cfg, false);
        d.look_up_refused();
        let out = d.looked_up(&cfg).unwrap();
        let old = homeassistant::legacy_topics(&cfg).len();
        assert_eq!(out.len(), 2 * old + 1);
        assert!(
            out[..old].iter().all(|o| !o.payload.is_empty()) && out[old..2 * old].iter().all(|o| o.payload.is_empty())
        );
        assert_eq!(topics(&d.announce_after_migration(&cfg)), [("homeassistant/device/porch/config", false)]);
    }

    #[test]
    fn disabled_empties_everything_once_with_the_device_message_last() {
        let mut cfg = porch();
        cfg.homeassistant.enabled = false;
        let mut d = Discovery::new(None);
        let Announce::Publish(out) = d.announce(&cfg, true) else { panic!("no look-up when disabled") };
        assert!(out.iter().all(|o| o.payload.is_empty()));
        assert_eq!(out.last().unwrap().topic, "homeassistant/device/porch/config");
        assert!(out.iter().any(|o| o.topic == "porch/reading"));
        assert_eq!(d.announce(&cfg, true), Announce::Publish(vec![]), "once");
        assert_eq!(d.reading(&cfg, b"{}".to_vec()), None, "no last reading either");
    }

    #[test]
    fn the_last_reading_goes_out_at_qos_0_and_again_at_qos_1() {
        let cfg = porch();
        let mut d = Discovery::new(None);
        assert_eq!(d.last_reading(&cfg, Qos::AtLeastOnce), None, "none yet");
        let r = d.reading(&cfg, br#"{"light":1}"#.to_vec()).unwrap();
        assert_eq!((r.topic.as_str(), r.qos), ("porch/reading", Qos::AtMostOnce));
        assert_eq!(d.last_reading(&cfg, Qos::AtLeastOnce).unwrap().qos, Qos::AtLeastOnce);
    }

    impl Discovery {
        fn announce_after_migration(&mut self, cfg: &Config) -> Vec<Out> {
            match self.announce(cfg, true) {
                Announce::Publish(out) => out,
                Announce::LookUp(_) => panic!("looked up again"),
            }
        }
    }
}
