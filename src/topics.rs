//! Every topic and topic filter nightlight publishes or subscribes to, in one place (the
//! contract's topic table). The payloads are in [`crate::payload`].
//!
//! - A device's own topics are under `<id>/` ([`Topics`]); answers to its requests go where the
//!   requester asked, below `<id>/reply/` under the project's ACL (docs/mosquitto.acl).
//! - Controllers announce themselves on `nightlight/controller/<client id>/status`.
//! - Home Assistant's are under its discovery prefix (`homeassistant` by default).

/// The topics of one device, built once from its id.
#[derive(Debug, Clone)]
pub struct Topics {
    pub telemetry: String,
    pub commands: String,
    pub state: String,
    pub status: String,
    pub health: String,
    pub virtual_light: String,
    /// A reading on request in (`read`).
    pub read: String,
    /// Live configuration in (`config/set`) and its report out (`config`).
    pub config_set: String,
    pub config: String,
    /// The last reading, retained, for dashboards (Home Assistant's light level).
    pub reading: String,
    /// Signed update manifests in (`update`), the update's state out (`update/state`), and Home
    /// Assistant's install button in (`update/install`).
    pub update: String,
    pub update_state: String,
    pub update_install: String,
}

impl Topics {
    /// The topics under `<id>/`.
    pub fn new(id: &str) -> Self {
        Topics {
            telemetry: telemetry(id),
            commands: commands(id),
            state: state(id),
            status: status(id),
            health: format!("{id}/health"),
            virtual_light: format!("{id}/virtual/light"),
            read: format!("{id}/read"),
            config_set: format!("{id}/config/set"),
            config: format!("{id}/config"),
            reading: format!("{id}/reading"),
            update: update(id),
            update_state: update_state(id),
            update_install: format!("{id}/update/install"),
        }
    }
}

// One device's topics one at a time, for code that holds many devices and builds a topic when
// it sends rather than keeping a [`Topics`] for each (`nightlight fleet`, a rollout).

/// A device's readings.
pub fn telemetry(id: &str) -> String {
    format!("{id}/telemetry")
}

/// A device's commands topic (what a controller publishes to).
pub fn commands(id: &str) -> String {
    format!("{id}/commands")
}

/// A device's LED state.
pub fn state(id: &str) -> String {
    format!("{id}/state")
}

/// A device's presence (`online`, its Last Will `offline`).
pub fn status(id: &str) -> String {
    format!("{id}/status")
}

/// Signed update manifests to a device.
pub fn update(id: &str) -> String {
    format!("{id}/update")
}

/// A device's update state.
pub fn update_state(id: &str) -> String {
    format!("{id}/update/state")
}

/// Every device's update state (what a rollout watches).
pub const ALL_UPDATE_STATES: &str = "+/update/state";

/// The device whose update state `topic` is.
pub fn update_state_of(topic: &str) -> Option<&str> {
    topic.strip_suffix("/update/state").filter(|id| !id.is_empty() && !id.contains('/'))
}

/// Where `nightlight status --read` asks a device to answer: below `<id>/reply/`, the one place
/// under its own id the project's ACL (docs/mosquitto.acl) lets a device answer.
pub fn reply(id: &str, asker: &str) -> String {
    format!("{id}/reply/{asker}")
}

/// The prefix below which a device answers requests under its own id.
pub fn reply_prefix(id: &str) -> String {
    format!("{id}/reply/")
}

/// The controller's subscription to every device's telemetry: shared when `server.shared_group`
/// is set.
pub fn all_telemetry(shared_group: &str) -> String {
    if shared_group.is_empty() {
        "+/telemetry".to_owned()
    } else {
        format!("$share/{shared_group}/+/telemetry")
    }
}

/// The controller's subscription to every device's state.
pub const ALL_STATES: &str = "+/state";

/// The topic filter of the controllers' statuses.
pub const CONTROLLERS: &str = "nightlight/controller/+/status";

/// The status topic of the controller with `client_id`.
pub fn controller_status(client_id: &str) -> String {
    format!("nightlight/controller/{client_id}/status")
}

/// Whether `topic` is a controller's status.
pub fn is_controller_status(topic: &str) -> bool {
    topic
        .strip_prefix("nightlight/controller/")
        .and_then(|rest| rest.strip_suffix("/status"))
        .is_some_and(|id| !id.is_empty() && !id.contains('/'))
}

/// Where Home Assistant announces itself (its birth message): `<prefix>/status`.
pub fn ha_status(prefix: &str) -> String {
    format!("{prefix}/status")
}

/// The one device-based discovery message: `<prefix>/device/<id>/config`.
pub fn ha_device_config(prefix: &str, id: &str) -> String {
    format!("{prefix}/device/{id}/config")
}

/// The per-entity discovery topics of earlier releases (lux included), to migrate from and then
/// clear.
pub fn ha_legacy_configs(prefix: &str, id: &str) -> Vec<String> {
    let mut topics = vec![format!("{prefix}/light/{id}/led/config")];
    for object in ["light", "lux", "queue", "reconnects", "uptime"] {
        topics.push(format!("{prefix}/sensor/{id}/{object}/config"));
    }
    topics
}

/// The filter that holds every per-entity discovery topic of a device.
pub fn ha_legacy_filter(prefix: &str, id: &str) -> String {
    format!("{prefix}/+/{id}/+/config")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_controller_status_is_one_level_between_the_fixed_parts() {
        assert!(is_controller_status(&controller_status("ctl-1")));
        assert!(!is_controller_status("nightlight/controller//status"));
        assert!(!is_controller_status("nightlight/controller/a/b/status"));
        assert!(!is_controller_status("porch/status"));
    }

    #[test]
    fn answers_to_status_read_go_below_the_devices_reply_prefix() {
        assert!(reply("porch", "me").starts_with(&reply_prefix("porch")));
    }
}
