//! End to end: Home Assistant discovery, the health message and `nightlight status`, against a
//! real Mosquitto.

mod common;

use std::time::Duration;

use common::*;

/// Renders a Home Assistant value template the way HA does: `value_json` is the parsed payload.
fn render(template: &str, payload: &str) -> String {
    let env = minijinja::Environment::new();
    let value: serde_json::Value = serde_json::from_str(payload).unwrap();
    env.render_str(template, minijinja::context! { value_json => value, value => payload }).unwrap()
}

#[test]
fn discovery_makes_a_light_ha_can_switch_and_read_back() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 500, "");
    let d = dev.spawn();
    obs_online(&broker, &dev);
    let late = Observer::new(broker.port, "homeassistant/#");
    let configs = late.wait_on_prefix("homeassistant/", 5 * S, 5);
    let light =
        configs.iter().find(|m| m.topic == format!("homeassistant/light/{}/led/config", dev.id)).expect("light");
    assert!(light.retain, "discovery configs are retained");
    let p = light.json();
    for key in
        ["command_topic", "state_topic", "unique_id", "device", "availability_topic", "payload_on", "payload_off"]
    {
        assert!(!p[key].is_null(), "light config lacks {key}: {p}");
    }
    assert_eq!(p["command_topic"], dev.topic("commands"));
    assert_eq!(p["state_topic"], dev.topic("state"));
    assert_eq!(p["availability_topic"], dev.topic("status"));
    assert_eq!(p["device"]["sw_version"], env!("CARGO_PKG_VERSION"));
    let tpl = p["state_value_template"].as_str().unwrap();
    // HA compares the rendered state with payload_on / payload_off.
    assert_eq!(render(tpl, r#"{"led_on":true}"#), p["payload_on"].as_str().unwrap());
    assert_eq!(render(tpl, r#"{"led_on":false}"#), p["payload_off"].as_str().unwrap());
    // HA sends payload_on unchanged: the device obeys it.
    let obs = Observer::new(broker.port, "#");
    obs.publish(p["command_topic"].as_str().unwrap(), p["payload_on"].as_str().unwrap(), false);
    assert!(d.wait_stdout_lines(1, 5 * S)[0].starts_with("led on"));
    let state = obs.wait_on(&dev.topic("state"), 5 * S, |m| m.last().is_some_and(|m| m.json()["led_on"] == true));
    assert_eq!(render(tpl, &state.last().unwrap().text()), p["payload_on"].as_str().unwrap());

    let level = configs
        .iter()
        .find(|m| m.topic.ends_with("/light/config") && m.topic.contains("/sensor/"))
        .expect("light level sensor");
    let lp = level.json();
    assert_eq!(lp["state_topic"], dev.topic("telemetry"));
    assert!(lp["device_class"].is_null(), "a 0-1000 ratio is not illuminance: {lp}");
    assert_eq!(render(lp["value_template"].as_str().unwrap(), r#"{"light":412,"ts":1,"seq":2}"#), "412");
    assert!(!configs.iter().any(|m| m.topic.contains("/lux/")), "no lux sensor for a sensor without lux");
    let diag = configs.iter().find(|m| m.json()["entity_category"] == "diagnostic").expect("a diagnostic sensor");
    assert_eq!(diag.json()["state_topic"], dev.topic("health"));
}

fn obs_online(broker: &Mosquitto, dev: &DeviceDir) {
    let o = Observer::new(broker.port, &dev.topic("status"));
    o.wait_on(&dev.topic("status"), 10 * S, |m| m.iter().any(|m| m.text() == "online"));
}

#[test]
fn disabling_discovery_removes_the_entities() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 1000, "");
    let mut d = dev.spawn();
    obs_online(&broker, &dev);
    let o = Observer::new(broker.port, "homeassistant/#");
    o.wait_on_prefix("homeassistant/", 5 * S, 5);
    d.stop_with(libc::SIGTERM, 5 * S);
    let d = Daemon::spawn(
        &["run", "--config", dev.config().to_str().unwrap()],
        &[("NIGHTLIGHT__HOMEASSISTANT__ENABLED", "false")],
    );
    o.wait_on_prefix("homeassistant/", 5 * S, 10); // the empty configs arrive
    std::thread::sleep(Duration::from_millis(300));
    let late = Observer::new(broker.port, "homeassistant/#");
    std::thread::sleep(Duration::from_millis(500));
    assert!(late.all().is_empty(), "retained configs left behind: {:?}", late.all());
    drop(d);
}

#[test]
fn health_after_an_outage_counts_the_reconnect_and_the_queue_and_status_prints_it() {
    let mut broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 100, "");
    let _d = dev.spawn();
    obs_online(&broker, &dev);
    broker.stop();
    std::thread::sleep(S);
    broker.restart();
    let obs = Observer::new(broker.port, &dev.topic("health"));
    let h = obs.wait_on(&dev.topic("health"), 10 * S, |m| !m.is_empty());
    let h = h[0].json();
    assert_eq!(h["reconnects"], 1, "{h}");
    assert!(h["queue_readings"].as_u64().unwrap() >= 5, "readings taken during the outage are queued: {h}");
    assert!(h["last_error"].as_str().is_some_and(|e| e.contains("mqtt")), "{h}");
    for key in ["uptime_s", "queue_bytes", "dropped", "sensor_errors", "rejected_commands"] {
        assert!(h[key].is_u64(), "health lacks {key}: {h}");
    }

    let cfg = dev.config();
    let (code, out, err) = run_to_end(&["status", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("online") && out.contains("reconnects") && out.contains("LED"), "{out}");
    let (code, out, _) = run_to_end(&["status", "--json", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], "online");
    assert_eq!(v["state"]["led_on"], false);
    assert_eq!(v["health"]["reconnects"], 1);
}

#[test]
fn status_names_an_unreachable_broker_and_exits_1() {
    let port = free_port();
    let dev = DeviceDir::new(port, 1000, "");
    let (code, _, err) = run_to_end(&["status", "--config", dev.config().to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
}
