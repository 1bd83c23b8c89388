//! Home Assistant MQTT discovery: the one retained device-based message that makes the
//! nightlight appear in Home Assistant with no YAML, and the health payload its diagnostic
//! sensors read.
//!
//! Rules (the device applies them; this module only builds the messages):
//! - On every connect, and after Home Assistant's birth message (`online` on `<prefix>/status`,
//!   answered after a random 0.5-5 s so a fleet does not answer in one burst), the device
//!   publishes [`device_discovery`] and its state.
//! - Once per state directory, before that, the migration from the per-entity configs of
//!   earlier releases: [`MIGRATE`] to each [`legacy_topics`] topic (Home Assistant's documented
//!   step, which keeps the entities), then the device message, then an empty retained message
//!   on each old topic.
//! - `homeassistant.enabled = false` empties the device message and the old topics, once.

use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{Config, SensorKind};
use crate::payload::{Topics, OFFLINE, ONLINE};

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
    format!("{}/status", cfg.homeassistant.prefix)
}

/// The one retained device-based discovery message, `<prefix>/device/<id>/config`: the device
/// (`dev`), the origin (`o`), availability from `<id>/status`, and its components (`cmps`). Every
/// component has `p`, `unique_id` and `default_entity_id` (`<platform>.<id>_<object>`: the entity
/// ids the per-entity configs gave, so an installation keeps them and their history); none has
/// `object_id`.
pub fn device_discovery(cfg: &Config) -> Discovery {
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
            "state_topic": t.telemetry,
            "value_template": "{{ value_json.light }}",
            "state_class": "measurement",
            "icon": "mdi:brightness-6",
            // 0-1000 is a ratio of voltages (0.1 %), not lux: no illuminance class.
            "unit_of_measurement": "‰",
        }),
    );
    if cfg.sensor.kind == SensorKind::Bh1750 {
        add(
            "lux",
            "sensor",
            "Illuminance",
            json!({
                "state_topic": t.telemetry,
                "value_template": "{{ value_json.lux }}",
                "device_class": "illuminance",
                "unit_of_measurement": "lx",
                "state_class": "measurement",
            }),
        );
    }
    // Counters that only rise are `total_increasing` (HA's long-term statistics need it); the
    // queue's depth and the uptime are measurements.
    for (object, name, field, unit, class) in [
        ("queue", "Queued readings", "queue_readings", None, "measurement"),
        ("dropped", "Dropped readings", "dropped", None, "total_increasing"),
        ("reconnects", "Reconnects", "reconnects", None, "total_increasing"),
        ("denied", "Refused readings", "denied", None, "total_increasing"),
        ("uptime", "Uptime", "uptime_s", Some("s"), "measurement"),
    ] {
        let mut extra = json!({
            "state_topic": t.health,
            "value_template": format!("{{{{ value_json.{field} }}}}"),
            "entity_category": "diagnostic",
            "state_class": class,
        });
        if let Some(u) = unit {
            merge(&mut extra, json!({"unit_of_measurement": u, "device_class": "duration"}));
        }
        add(object, "sensor", name, extra);
    }
    add(
        "mode",
        "sensor",
        "Mode",
        json!({
            "state_topic": t.state,
            "value_template": "{{ value_json.mode }}",
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
    let mut interval = setting(
        "{{ value_json.sensor.interval_ms / 1000 }}",
        r#"{"sensor": {"interval_ms": {{ (value * 1000) | round | int }}}}"#,
    );
    merge(&mut interval, json!({"min": 1, "max": 3600, "step": 1, "unit_of_measurement": "s", "mode": "box"}));
    add("interval", "number", "Reading interval", interval);
    for (object, name, key) in
        [("threshold", "Local threshold", "threshold"), ("hysteresis", "Local hysteresis", "hysteresis")]
    {
        let mut n = setting(
            &format!("{{{{ value_json.server.{key} }}}}"),
            &format!(r#"{{"server": {{"{key}": {{{{ value | int }}}}}}}}"#),
        );
        merge(&mut n, json!({"min": 0, "max": 1000, "step": 1, "mode": "box"}));
        add(object, "number", name, n);
    }
    let mut power_on = setting("{{ value_json.led.power_on }}", r#"{"led": {"power_on": "{{ value }}"}}"#);
    merge(&mut power_on, json!({"options": ["last", "off", "on", "auto"]}));
    add("power_on", "select", "Power-on state", power_on);

    Discovery {
        topic: format!("{}/device/{id}/config", cfg.homeassistant.prefix),
        payload: json!({
            "dev": {
                "ids": [format!("nightlight_{id}")],
                "name": id,
                "mf": "nightlight",
                "mdl": format!("nightlight ({})", kind_name(cfg.sensor.kind)),
                "sw": env!("CARGO_PKG_VERSION"),
            },
            "o": { "name": "nightlight", "sw": env!("CARGO_PKG_VERSION") },
            "avty_t": t.status,
            "pl_avail": ONLINE,
            "pl_not_avail": OFFLINE,
            "qos": 1,
            "cmps": cmps,
        }),
    }
}

/// The per-entity discovery topics of earlier releases (lux included), to migrate from and
/// then clear.
pub fn legacy_topics(cfg: &Config) -> Vec<String> {
    let id = &cfg.id;
    let p = &cfg.homeassistant.prefix;
    let mut topics = vec![format!("{p}/light/{id}/led/config")];
    for object in ["light", "lux", "queue", "reconnects", "uptime"] {
        topics.push(format!("{p}/sensor/{id}/{object}/config"));
    }
    topics
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

fn yes() -> bool {
    true
}

/// The retained `<id>/health` message.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Health {
    pub uptime_s: u64,
    pub queue_readings: u64,
    pub queue_bytes: u64,
    pub dropped: u64,
    /// Failed queue storage calls (full disk, I/O errors); each is retried.
    #[serde(default)]
    pub queue_errors: u64,
    /// False while `seq` comes from the wall clock because the queue's meta cannot be written.
    #[serde(default = "yes")]
    pub seq_durable: bool,
    /// False while `queue.dir` is in memory (tmpfs, ramfs, zram, an overlay with its upper layer
    /// in memory) or unusable: a reboot loses what is queued.
    #[serde(default = "yes")]
    pub queue_durable: bool,
    pub sensor_errors: u64,
    pub rejected_commands: u64,
    pub reconnects: u64,
    /// Readings the broker refused (MQTT 5 PUBACK reason codes); each stays queued.
    #[serde(default)]
    pub denied: u64,
    /// The last connection or sensor error, if any.
    pub last_error: Option<String>,
    /// Who switches the LED: `remote` (a controller's commands) or `local` (the local rule).
    #[serde(default = "remote")]
    pub mode: String,
    /// The MQTT protocol of the connection: `5` or `3.1.1`.
    #[serde(default = "five")]
    pub protocol: String,
}

fn five() -> String {
    "5".into()
}

fn remote() -> String {
    "remote".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn porch() -> Config {
        Config { id: "porch".into(), ..Config::default() }
    }

    #[test]
    fn one_device_message_with_device_origin_and_components_as_home_assistant_requires() {
        let d = device_discovery(&porch());
        assert_eq!(d.topic, "homeassistant/device/porch/config");
        let p = &d.payload;
        assert_eq!(p["dev"]["ids"][0], "nightlight_porch");
        assert_eq!(p["dev"]["sw"], env!("CARGO_PKG_VERSION"));
        assert_eq!(p["o"]["name"], "nightlight", "the origin is required for device-based discovery");
        assert_eq!(p["avty_t"], "porch/status");
        let cmps = p["cmps"].as_object().unwrap();
        for (key, c) in cmps {
            let platform = c["p"].as_str().unwrap_or_else(|| panic!("{key} has no platform"));
            assert_eq!(c["unique_id"], format!("porch_{key}"));
            assert_eq!(c["default_entity_id"], format!("{platform}.porch_{key}"));
            assert!(c.get("object_id").is_none(), "object_id is no longer honoured: {key}");
            match platform {
                "light" | "number" => assert!(c["command_topic"].is_string(), "{key}"),
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
            "uptime",
            "mode",
            "interval",
            "threshold",
            "hysteresis",
            "power_on",
        ] {
            assert!(cmps.contains_key(key), "no {key}");
        }
        assert!(cmps.values().all(|c| c.get("device_class") != Some(&json!("illuminance"))), "ratio, not lux");
        assert_eq!(cmps["interval"]["unit_of_measurement"], "s");
        for counter in ["dropped", "reconnects", "denied"] {
            assert_eq!(cmps[counter]["state_class"], "total_increasing", "{counter} only rises");
        }
        assert_eq!(cmps["queue"]["state_class"], "measurement", "the queue's depth goes up and down");
        assert_eq!(cmps["interval"]["command_topic"], "porch/config/set");
        let size = d.payload.to_string().len();
        assert!(size < crate::link::MAX_OUTGOING_BYTES / 4, "small enough for any broker: {size} bytes");
    }

    #[test]
    fn the_lux_component_only_for_lux_capable_chips() {
        assert!(device_discovery(&porch()).payload["cmps"].get("lux").is_none());
        let mut cfg = porch();
        cfg.sensor.kind = SensorKind::Bh1750;
        let lux = &device_discovery(&cfg).payload["cmps"]["lux"];
        assert_eq!(lux["device_class"], "illuminance");
        assert_eq!(lux["unit_of_measurement"], "lx");
    }

    #[test]
    fn the_legacy_topics_are_the_per_entity_ones_of_earlier_releases() {
        let t = legacy_topics(&porch());
        assert!(t.contains(&"homeassistant/light/porch/led/config".to_owned()));
        assert!(t.contains(&"homeassistant/sensor/porch/lux/config".to_owned()));
        assert_eq!(t.len(), 6);
    }
}
