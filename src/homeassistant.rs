//! Home Assistant MQTT discovery: the one retained device-based message that makes the
//! nightlight appear in Home Assistant with no YAML (its diagnostic sensors read the health
//! payload, [`crate::payload::Health`]).
//!
//! Rules (the device applies them; this module only builds the messages):
//! - On every connect, and after Home Assistant's birth message (`online` on `<prefix>/status`,
//!   answered after a random 0.5-5 s so a fleet does not answer in one burst), the device
//!   publishes [`device_discovery`] and its state.
//! - Once per state directory, before that, the migration from the per-entity configs of
//!   earlier releases, only where the broker holds one (the device looks them up, retained, under
//!   [`legacy_filter`]): [`MIGRATE`] to each such topic (Home Assistant's documented step, which
//!   keeps the entities), then an empty retained message on each, then the device message. A
//!   clear sent after the device message shares a discovery id with one of its components and
//!   Home Assistant logs it as a conflicting discovery message; a new device sends nothing but
//!   the device message.
//! - The light level (and lux) is read from the retained `<id>/reading`, the last reading, so
//!   Home Assistant shows it at once after it restarts instead of `unknown` until the next one
//!   (telemetry is not retained: it is the durable, ordered record).
//! - `homeassistant.enabled = false` empties the device message and the old topics, once.

use serde_json::{json, Value};

use crate::config::{Config, SensorKind};
use crate::payload::{OFFLINE, ONLINE};
use crate::topics::{self, Topics};

/// The LED command payloads, exactly as the device expects them: Home Assistant sends
/// `payload_on` / `payload_off` unchanged.
pub const PAYLOAD_ON: &str = r#"{"led_on": true}"#;
pub const PAYLOAD_OFF: &str = r#"{"led_on": false}"#;
/// Renders `<id>/state` to `payload_on` or `payload_off`, which Home Assistant compares with.
pub const STATE_TEMPLATE: &str = r#"{% if value_json.led_on %}{"led_on": true}{% else %}{"led_on": false}{% endif %}"#;

/// One discovery message and its topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovery {
    pub topic: String,
    pub payload: Value,
}

/// Home Assistant's birth message on `<prefix>/status`; the device answers it.
pub const HA_ONLINE: &[u8] = b"online";

/// The payload of Home Assistant's documented migration step from single-component to
/// device-based discovery, published to each old topic before the new message.
pub const MIGRATE: &str = r#"{"migrate_discovery": true}"#;

/// Where Home Assistant announces itself (`<prefix>/status`).
pub fn ha_status_topic(cfg: &Config) -> String {
    topics::ha_status(&cfg.homeassistant.prefix)
}

/// The one retained device-based discovery message, `<prefix>/device/<id>/config`: the device
/// (`dev`), the origin (`o`), availability from `<id>/status`, and its components (`cmps`). Every
/// component has `p`, `unique_id` and `default_entity_id` (`<platform>.<id>_<object>`: the entity
/// ids the per-entity configs gave, so an installation keeps them and their history); none has
/// `object_id`.
pub fn device_discovery(cfg: &Config, hw_version: Option<&str>) -> Discovery {
    let id = &cfg.id;
    let t = Topics::new(id);
    let mut cmps = serde_json::Map::new();
    let mut add = |object: &str, platform: &str, name: &str, extra: Value| {
        let mut c = json!({
            "p": platform,
            "name": name,
            "unique_id": format!("{id}_{object}"),
            "default_entity_id": format!("{platform}.{id}_{object}"),
        });
        merge(&mut c, extra);
        cmps.insert(object.to_owned(), c);
    };
    add(
        "led",
        "light",
        "LED",
        json!({
            "command_topic": t.commands,
            "state_topic": t.state,
            "payload_on": PAYLOAD_ON,
            "payload_off": PAYLOAD_OFF,
            "state_value_template": STATE_TEMPLATE,
            "optimistic": false,
            "retain": false,
        }),
    );
    add(
        "light",
        "sensor",
        "Light level",
        json!({
            "state_topic": t.reading,
            "value_template": "{{ value_json.light }}",
            "state_class": "measurement",
            "icon": "mdi:brightness-6",
            // 0-1000 is a ratio of voltages (0.1 %), not lux: no illuminance class.
            "unit_of_measurement": "‰",
        }),
    );
    // A reading at once (`<id>/read`): the light level above moves without waiting the interval.
    add(
        "read",
        "button",
        "Read now",
        json!({ "command_topic": t.read, "payload_press": "read", "retain": false, "icon": "mdi:refresh" }),
    );
    if cfg.sensor.kind == SensorKind::Bh1750 {
        add(
            "lux",
            "sensor",
            "Illuminance",
            json!({
                "state_topic": t.reading,
                "value_template": "{{ value_json.lux }}",
                "device_class": "illuminance",
                "unit_of_measurement": "lx",
                "state_class": "measurement",
            }),
        );
    }
    // Counters that only rise are `total_increasing` (HA's long-term statistics need it); the
    // queue's depth is a measurement.
    for (object, name, field, class) in [
        ("queue", "Queued readings", "queue_readings", "measurement"),
        ("dropped", "Dropped readings", "dropped", "total_increasing"),
        ("reconnects", "Reconnects", "reconnects", "total_increasing"),
        ("denied", "Refused readings", "denied", "total_increasing"),
    ] {
        let extra = json!({
            "state_topic": t.health,
            "value_template": format!("{{{{ value_json.{field} }}}}"),
            "entity_category": "diagnostic",
            "state_class": class,
        });
        add(object, "sensor", name, extra);
    }
    // How long the oldest queued reading has waited: what an outage costs, at a glance (the
    // same figure as the metric nightlight_queue_oldest_age_seconds, at health's pace).
    add(
        "oldest",
        "sensor",
        "Oldest queued reading",
        json!({
            "state_topic": t.health,
            "value_template": "{{ value_json.queue_oldest_age_s | default(0) }}",
            "device_class": "duration",
            "unit_of_measurement": "s",
            "state_class": "measurement",
            "entity_category": "diagnostic",
        }),
    );
    // When it started: a timestamp never goes stale, where an uptime in seconds would be a
    // minute old between two health messages. `None` is Home Assistant's "no value".
    add(
        "started",
        "sensor",
        "Started",
        json!({
            "state_topic": t.health,
            "value_template": "{% if value_json.started %}{{ value_json.started }}{% else %}None{% endif %}",
            "device_class": "timestamp",
            "entity_category": "diagnostic",
        }),
    );
    add(
        "mode",
        "sensor",
        "Mode",
        json!({
            "state_topic": t.state,
            "value_template": "{{ value_json.mode }}",
            "device_class": "enum",
            "options": ["remote", "local"],
            "entity_category": "diagnostic",
            "icon": "mdi:account-switch",
        }),
    );
    // The live settings: read from the retained <id>/config, written to <id>/config/set.
    let setting = |state: &str, command: &str| {
        json!({
            "state_topic": t.config,
            "value_template": state,
            "command_topic": t.config_set,
            "command_template": command,
            "entity_category": "config",
            "retain": false,
        })
    };
    // Every number offers exactly the range live configuration accepts ([`Config::validate`]).
    let mut interval = setting(
        "{{ (value_json.sensor.interval_ms / 1000) | round | int }}",
        r#"{"sensor": {"interval_ms": {{ (value * 1000) | round | int }}}}"#,
    );
    merge(&mut interval, json!({"min": 1, "max": 3600, "step": 1, "unit_of_measurement": "s", "mode": "box"}));
    add("interval", "number", "Reading interval", interval);
    for (object, name, section, key, max, unit) in [
        ("threshold", "Local threshold", "server", "threshold", 1000, None),
        ("hysteresis", "Local hysteresis", "server", "hysteresis", 1000, None),
        ("local_after", "Local rule after", "led", "local_after_s", 86_400, Some("s")),
        ("command_max_age", "Command max age", "led", "command_max_age_s", 86_400, Some("s")),
    ] {
        let mut n = setting(
            &format!("{{{{ value_json.{section}.{key} }}}}"),
            &format!(r#"{{"{section}": {{"{key}": {{{{ value | int }}}}}}}}"#),
        );
        merge(&mut n, json!({"min": 0, "max": max, "step": 1, "mode": "box"}));
        if let Some(u) = unit {
            merge(&mut n, json!({"unit_of_measurement": u}));
        }
        add(object, "number", name, n);
    }
    let mut power_on = setting("{{ value_json.led.power_on }}", r#"{"led": {"power_on": "{{ value }}"}}"#);
    merge(&mut power_on, json!({"options": ["last", "off", "on", "auto"]}));
    add("power_on", "select", "Power-on state", power_on);

    // Updates over MQTT, while a release key is trusted: installed and latest version, progress,
    // and the install button (which tries the last manifest again).
    if !cfg.update.keys.is_empty() {
        add(
            "firmware",
            "update",
            "Firmware",
            json!({
                "state_topic": t.update_state,
                "value_template": UPDATE_TEMPLATE,
                "command_topic": t.update_install,
                "payload_install": "install",
                "retain": false,
                "entity_category": "config",
            }),
        );
    }

    let mut dev = json!({
        "ids": [format!("nightlight_{id}")],
        "name": id,
        "mf": "nightlight",
        "mdl": format!("nightlight ({})", kind_name(cfg.sensor.kind)),
        "sw": crate::VERSION,
    });
    if let Some(hw) = hw_version {
        merge(&mut dev, json!({ "hw": hw }));
    }
    Discovery {
        topic: topics::ha_device_config(&cfg.homeassistant.prefix, id),
        payload: json!({
            "dev": dev,
            "o": { "name": "nightlight", "sw": crate::VERSION },
            "avty_t": t.status,
            "pl_avail": ONLINE,
            "pl_not_avail": OFFLINE,
            "qos": 1,
            "cmps": cmps,
        }),
    }
}

/// `<id>/update/state` as Home Assistant's update entity wants it (its JSON keys only: it
/// rejects others): the version the update goes to is the latest while it runs, failed or was
/// rolled back.
pub const UPDATE_TEMPLATE: &str = "{% set busy = value_json.state in ['downloading', 'verifying', 'installing', \
'gating'] %}{% set latest = value_json.to if value_json.to is defined and value_json.state != 'done' else \
value_json.version %}{{ {'installed_version': value_json.version, 'latest_version': latest, 'in_progress': busy, \
'update_percentage': value_json.percent if busy and value_json.percent is defined else none} | tojson }}";

/// The per-entity discovery topics of earlier releases (lux included), to migrate from and
/// then clear.
pub fn legacy_topics(cfg: &Config) -> Vec<String> {
    topics::ha_legacy_configs(&cfg.homeassistant.prefix, &cfg.id)
}

/// The filter that holds every per-entity discovery topic of this device, to look up which of
/// them the broker still holds.
pub fn legacy_filter(cfg: &Config) -> String {
    topics::ha_legacy_filter(&cfg.homeassistant.prefix, &cfg.id)
}

/// The board's model as the kernel has it (`Raspberry Pi 5 Model B Rev 1.0`), for `hw`: read
/// from `path` (`/proc/device-tree/model`), bounded, its trailing NUL and any unprintable
/// character dropped; `None` when there is none.
pub fn board_model(path: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path).ok()?.take(256).read_to_end(&mut buf).ok()?;
    let text: String =
        String::from_utf8_lossy(&buf).chars().filter(|c| !c.is_control()).collect::<String>().trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn kind_name(kind: SensorKind) -> &'static str {
    match kind {
        SensorKind::Grove => "Grove Base Hat",
        SensorKind::Ads1115 => "ADS1115",
        SensorKind::Bh1750 => "BH1750",
        SensorKind::Virtual => "simulated",
    }
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn porch() -> Config {
        Config { id: "porch".into(), ..Config::default() }
    }

    #[test]
    fn one_device_message_with_device_origin_and_components_as_home_assistant_requires() {
        let d = device_discovery(&porch(), None);
        assert_eq!(d.topic, "homeassistant/device/porch/config");
        let p = &d.payload;
        assert_eq!(p["dev"]["ids"][0], "nightlight_porch");
        assert_eq!(p["dev"]["sw"], crate::VERSION);
        assert_eq!(p["o"]["name"], "nightlight", "the origin is required for device-based discovery");
        assert_eq!(p["avty_t"], "porch/status");
        let cmps = p["cmps"].as_object().unwrap();
        for (key, c) in cmps {
            let platform = c["p"].as_str().unwrap_or_else(|| panic!("{key} has no platform"));
            assert_eq!(c["unique_id"], format!("porch_{key}"));
            assert_eq!(c["default_entity_id"], format!("{platform}.porch_{key}"));
            assert!(c.get("object_id").is_none(), "object_id is no longer honoured: {key}");
            match platform {
                "light" | "number" | "button" => assert!(c["command_topic"].is_string(), "{key}"),
                "select" => assert!(c["command_topic"].is_string() && c["options"].is_array(), "{key}"),
                "sensor" => assert!(c["state_topic"].is_string(), "{key}"),
                other => panic!("{key}: unexpected platform {other}"),
            }
        }
        for key in [
            "led",
            "light",
            "queue",
            "dropped",
            "reconnects",
            "denied",
            "oldest",
            "started",
            "mode",
            "interval",
            "threshold",
            "hysteresis",
            "power_on",
            "local_after",
            "command_max_age",
            "read",
        ] {
            assert!(cmps.contains_key(key), "no {key}");
        }
        assert_eq!(cmps["read"]["command_topic"], "porch/read", "Read now asks for a reading");
        assert_eq!(cmps["mode"]["device_class"], "enum");
        assert_eq!(cmps["mode"]["options"], json!(["remote", "local"]), "every mode the state can say");
        assert_eq!(cmps["started"]["device_class"], "timestamp", "never stale, unlike an uptime");
        assert_eq!(cmps["light"]["state_topic"], "porch/reading", "the retained last reading");
        assert!(p["dev"].get("hw").is_none(), "no model known, no hw");
        assert!(cmps.values().all(|c| c.get("device_class") != Some(&json!("illuminance"))), "ratio, not lux");
        assert_eq!(cmps["interval"]["unit_of_measurement"], "s");
        for counter in ["dropped", "reconnects", "denied"] {
            assert_eq!(cmps[counter]["state_class"], "total_increasing", "{counter} only rises");
        }
        assert_eq!(cmps["queue"]["state_class"], "measurement", "the queue's depth goes up and down");
        assert_eq!(cmps["oldest"]["device_class"], "duration", "the oldest reading's wait");
        assert_eq!(cmps["oldest"]["unit_of_measurement"], "s");
        assert_eq!(cmps["interval"]["command_topic"], "porch/config/set");
        let size = d.payload.to_string().len();
        assert!(size < crate::link::MAX_OUTGOING_BYTES / 2, "small enough for any broker: {size} bytes");
    }

    #[test]
    fn the_lux_component_only_for_lux_capable_chips() {
        assert!(device_discovery(&porch(), None).payload["cmps"].get("lux").is_none());
        let mut cfg = porch();
        cfg.sensor.kind = SensorKind::Bh1750;
        let lux = &device_discovery(&cfg, None).payload["cmps"]["lux"];
        assert_eq!(lux["device_class"], "illuminance");
        assert_eq!(lux["unit_of_measurement"], "lx");
    }

    #[test]
    fn the_boards_model_is_the_hardware_version_read_bounded_without_its_nul() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::write(&model, b"Raspberry Pi 5 Model B Rev 1.0\0").unwrap();
        let hw = board_model(&model);
        assert_eq!(hw.as_deref(), Some("Raspberry Pi 5 Model B Rev 1.0"));
        let d = device_discovery(&porch(), hw.as_deref());
        assert_eq!(d.payload["dev"]["hw"], "Raspberry Pi 5 Model B Rev 1.0");
        std::fs::write(&model, "x".repeat(10_000)).unwrap();
        assert_eq!(board_model(&model).unwrap().len(), 256, "bounded");
        assert_eq!(board_model(&dir.path().join("none")), None, "not a Pi (or no device tree)");
    }

    #[test]
    fn the_legacy_topics_are_the_per_entity_ones_of_earlier_releases() {
        let t = legacy_topics(&porch());
        assert!(t.contains(&"homeassistant/light/porch/led/config".to_owned()));
        assert!(t.contains(&"homeassistant/sensor/porch/lux/config".to_owned()));
        assert_eq!(t.len(), 6);
        let filter = legacy_filter(&porch());
        assert_eq!(filter, "homeassistant/+/porch/+/config");
        let matches = |t: &str| {
            let (levels, pattern): (Vec<&str>, Vec<&str>) = (t.split('/').collect(), filter.split('/').collect());
            levels.len() == pattern.len() && levels.iter().zip(&pattern).all(|(l, p)| p == &"+" || l == p)
        };
        assert!(t.iter().all(|t| matches(t)), "{filter} holds them all");
    }
}
