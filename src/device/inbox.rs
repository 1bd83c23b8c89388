//! What the device listens to: the filters it subscribes to, and each incoming message
//! classified once by its topic, in the shape of mini-redis's `Command::from_frame`.
//!
//! Rules:
//! - A device subscribes to its commands, the controllers' statuses, its live configuration and
//!   its read requests; the simulated sensor's control topic in a build with a virtual sensor;
//!   Home Assistant's status while discovery is on; update manifests and Home Assistant's
//!   install button while a release key is trusted.
//! - A message is what its topic says, checked in the order above; anything else is ignored
//!   (a broker may send what a device did not ask for).
//!
//! Pure: no I/O, no state.

use crate::topics::{self, Topics};

/// What an incoming message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Command,
    ControllerStatus,
    ConfigSet,
    ReadRequest,
    VirtualLight,
    HomeAssistantStatus,
    Update,
    UpdateInstall,
    Other,
}

/// The device's subscriptions, in the order they are made.
pub(super) fn wanted(t: &Topics, simulated: bool, ha_status: Option<&str>, updates: bool) -> Vec<String> {
    let mut filters = vec![t.commands.clone(), topics::CONTROLLERS.to_owned(), t.config_set.clone(), t.read.clone()];
    if simulated {
        filters.push(t.virtual_light.clone());
    }
    filters.extend(ha_status.map(str::to_owned));
    if updates {
        filters.extend([t.update.clone(), t.update_install.clone()]);
    }
    filters
}

/// What a message on `topic` is. `ha_status` is Home Assistant's status topic while discovery
/// is on.
pub(super) fn classify(t: &Topics, ha_status: Option<&str>, topic: &str) -> Kind {
    if topic == t.commands {
        Kind::Command
    } else if topics::is_controller_status(topic) {
        Kind::ControllerStatus
    } else if topic == t.config_set {
        Kind::ConfigSet
    } else if topic == t.read {
        Kind::ReadRequest
    } else if topic == t.virtual_light {
        Kind::VirtualLight
    } else if ha_status == Some(topic) {
        Kind::HomeAssistantStatus
    } else if topic == t.update {
        Kind::Update
    } else if topic == t.update_install {
        Kind::UpdateInstall
    } else {
        Kind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_subscription_is_classified_as_what_it_brings() {
        let t = Topics::new("porch");
        let ha = Some("homeassistant/status");
        let kinds: Vec<Kind> =
            wanted(&t, true, ha, true).iter().map(|f| classify(&t, ha, &f.replace('+', "ctl-1"))).collect();
        assert_eq!(
            kinds,
            [
                Kind::Command,
                Kind::ControllerStatus,
                Kind::ConfigSet,
                Kind::ReadRequest,
                Kind::VirtualLight,
                Kind::HomeAssistantStatus,
                Kind::Update,
                Kind::UpdateInstall
            ]
        );
    }

    #[test]
    fn another_devices_topics_and_unasked_ones_are_other() {
        let t = Topics::new("porch");
        for topic in ["garage/commands", "porch/telemetry", "porch/commands/x", "homeassistant/status"] {
            assert_eq!(classify(&t, None, topic), Kind::Other, "{topic}");
        }
    }

    #[test]
    fn the_hardware_build_does_not_listen_to_the_simulated_sensor_nor_without_discovery_to_home_assistant() {
        let t = Topics::new("porch");
        let w = wanted(&t, false, None, false);
        assert!(!w.contains(&t.virtual_light) && !w.iter().any(|f| f.starts_with("homeassistant/")), "{w:?}");
        assert!(!w.contains(&t.update), "no key trusted, no manifest taken: {w:?}");
    }
}
