//! Home Assistant MQTT discovery: the retained config messages that make the nightlight appear
//! in Home Assistant with no YAML, and the health payload its diagnostic sensors read.
//!
//! Pure data: builds `(topic, payload)` pairs; the device publishes them on every connect.

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

/// One discovery message: `<prefix>/<component>/<id>/<object>/config`.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovery {
    pub topic: String,
    pub payload: Value,
}

/// The discovery configs for this device: the LED as a `light`, the light level as a `sensor`,
/// lux for lux-capable chips, and diagnostic sensors from the health message.
pub fn discovery(cfg: &Config) -> Vec<Discovery> {
    let id = &cfg.id;
    let t = Topics::new(id);
    let device = json!({
        "identifiers": [format!("nightlight_{id}")],
        "name": id,
        "manufacturer": "nightlight",
        "model": format!("nightlight ({})", kind_name(cfg.sensor.kind)),
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let common = |object: &str, name: &str| {
        json!({
            "name": name,
            "unique_id": format!("{id}_{object}"),
            "object_id": format!("{id}_{object}"),
            "availability_topic": t.status,
            "payload_available": ONLINE,
            "payload_not_available": OFFLINE,
            "device": device,
        })
    };
    let mut out = Vec::new();
    let mut add = |component: &str, object: &str, mut payload: Value, extra: Value| {
        merge(&mut payload, extra);
        out.push(Discovery {
            topic: format!("{}/{component}/{id}/{object}/config", cfg.homeassistant.prefix),
            payload,
        });
    };
    add(
        "light",
        "led",
        common("led", "LED"),
        json!({
            "command_topic": t.commands,
            "state_topic": t.state,
            "payload_on": PAYLOAD_ON,
            "payload_off": PAYLOAD_OFF,
            "state_value_template": STATE_TEMPLATE,
            "optimistic": false,
            "qos": 1,
            "retain": false,
        }),
    );
    add(
        "sensor",
        "light",
        common("light", "Light level"),
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
            "sensor",
            "lux",
            common("lux", "Illuminance"),
            json!({
                "state_topic": t.telemetry,
                "value_template": "{{ value_json.lux }}",
                "device_class": "illuminance",
                "unit_of_measurement": "lx",
                "state_class": "measurement",
            }),
        );
    }
    for (object, name, field, unit) in [
        ("queue", "Queued readings", "queue_readings", None),
        ("reconnects", "Reconnects", "reconnects", None),
        ("uptime", "Uptime", "uptime_s", Some("s")),
    ] {
        let mut extra = json!({
            "state_topic": format!("{id}/health"),
            "value_template": format!("{{{{ value_json.{field} }}}}"),
            "entity_category": "diagnostic",
            "state_class": "measurement",
        });
        if let Some(u) = unit {
            merge(&mut extra, json!({"unit_of_measurement": u, "device_class": "duration"}));
        }
        add("sensor", object, common(object, name), extra);
    }
    out
}

/// Every discovery topic this device could have published (all components, lux included), so
/// that disabling discovery removes them all with empty retained messages.
pub fn all_topics(cfg: &Config) -> Vec<String> {
    let mut with_lux = cfg.clone();
    with_lux.sensor.kind = SensorKind::Bh1750;
    discovery(&with_lux).into_iter().map(|d| d.topic).collect()
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
    pub sensor_errors: u64,
    pub rejected_commands: u64,
    pub reconnects: u64,
    /// The last connection or sensor error, if any.
    pub last_error: Option<String>,
    /// Who switches the LED: `remote` (a controller's commands) or `local` (the local rule).
    #[serde(default = "remote")]
    pub mode: String,
}

fn remote() -> String {
    "remote".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_has_what_home_assistant_requires() {
        let cfg = Config { id: "porch".into(), ..Config::default() };
        let d = discovery(&cfg);
        assert!(d.iter().all(|d| d.topic.starts_with("homeassistant/") && d.topic.ends_with("/config")));
        for x in &d {
            let p = &x.payload;
            assert!(p["unique_id"].as_str().is_some_and(|u| u.starts_with("porch_")), "{p}");
            assert_eq!(p["availability_topic"], "porch/status");
            assert_eq!(p["device"]["identifiers"][0], "nightlight_porch");
            assert_eq!(p["device"]["sw_version"], env!("CARGO_PKG_VERSION"));
            assert!(p["state_topic"].is_string(), "{p}");
        }
        let light = d.iter().find(|d| d.topic == "homeassistant/light/porch/led/config").unwrap();
        assert_eq!(light.payload["command_topic"], "porch/commands");
        assert!(d.iter().all(|d| d.payload.get("device_class") != Some(&json!("illuminance"))), "ratio, not lux");
    }

    #[test]
    fn lux_sensor_only_for_lux_capable_chips() {
        let mut cfg = Config::default();
        cfg.sensor.kind = SensorKind::Bh1750;
        let lux = discovery(&cfg).into_iter().find(|d| d.topic.contains("/lux/")).unwrap();
        assert_eq!(lux.payload["device_class"], "illuminance");
        assert_eq!(lux.payload["unit_of_measurement"], "lx");
        assert_eq!(all_topics(&Config::default()).len(), discovery(&cfg).len());
    }
}
