//! End to end: Home Assistant discovery, the health message and `nightlight status`, against a
//! real Mosquitto.

mod common;

use common::*;

/// Renders a Home Assistant value template the way HA does: `value_json` is the parsed payload.
fn render(template: &str, payload: &str) -> String {
    let env = minijinja::Environment::new();
    let value: serde_json::Value = serde_json::from_str(payload).unwrap();
    env.render_str(template, minijinja::context! { value_json => value, value => payload }).unwrap()
}

/// Renders a command template the way HA does: `value` is the entity's new value.
fn render_command(template: &str, value: impl serde::Serialize) -> String {
    let env = minijinja::Environment::new();
    env.render_str(template, minijinja::context! { value => minijinja::Value::from_serialize(&value) }).unwrap()
}

/// What a late subscriber finds retained under the discovery prefix: (topic, payload).
fn retained_discovery(broker: &Mosquitto) -> Vec<(String, String)> {
    let late = Observer::new(broker.port, "homeassistant/#");
    fence(&late);
    late.all().into_iter().filter(|m| m.retain && !m.text().is_empty()).map(|m| (m.topic.clone(), m.text())).collect()
}

/// Returns once everything the broker sent `obs` before now has arrived: the broker delivers
/// in order, so a message `obs` publishes itself, on a topic it subscribes to, comes after the
/// retained messages of its subscription.
fn fence(obs: &Observer) {
    let topic = format!("homeassistant/fence-{}", fastrand::u64(..));
    obs.publish(&topic, "fence", false);
    obs.wait_on(&topic, 5 * S, |m| !m.is_empty());
}

/// As [`fence`], on `topic` (which `obs` subscribes to): a non-retained empty message, which
/// does not disturb what is retained there.
fn fence_on(obs: &Observer, topic: &str) {
    let before = obs.on(topic).len();
    obs.publish(topic, "fence", false);
    obs.wait_on(topic, 5 * S, |m| m.len() > before && m.last().is_some_and(|m| m.text() == "fence"));
}

/// Waits until the broker holds the device's discovery message.
fn obs_discovered(broker: &Mosquitto, dev: &DeviceDir) {
    let topic = format!("homeassistant/device/{}/config", dev.id);
    Observer::new(broker.port, &topic).wait_on(&topic, 10 * S, |m| m.iter().any(|m| !m.text().is_empty()));
}

/// The retained `<id>/health`, as text.
fn obs_health(broker: &Mosquitto, dev: &DeviceDir) -> String {
    let o = Observer::new(broker.port, &dev.topic("health"));
    o.wait_on(&dev.topic("health"), 10 * S, |m| !m.is_empty())[0].text()
}

fn obs_online(broker: &Mosquitto, dev: &DeviceDir) {
    let o = Observer::new(broker.port, &dev.topic("status"));
    o.wait_on(&dev.topic("status"), 10 * S, |m| m.iter().any(|m| m.text() == "online"));
}

#[test]
fn one_device_message_makes_a_light_ha_can_switch_and_an_interval_number_that_sets_the_rate() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 500, "");
    let d = dev.spawn();
    obs_discovered(&broker, &dev);
    let held = retained_discovery(&broker);
    assert_eq!(held.len(), 1, "exactly one discovery message, no per-entity ones: {held:?}");
    assert_eq!(held[0].0, format!("homeassistant/device/{}/config", dev.id));
    let p: serde_json::Value = serde_json::from_str(&held[0].1).unwrap();
    assert_eq!(p["dev"]["sw"], env!("CARGO_PKG_VERSION"));
    assert_eq!(p["avty_t"], dev.topic("status"));
    let led = &p["cmps"]["led"];
    let tpl = led["state_value_template"].as_str().unwrap();
    // HA compares the rendered state with payload_on / payload_off, and sends them unchanged.
    assert_eq!(render(tpl, r#"{"led_on":true,"mode":"remote"}"#), led["payload_on"].as_str().unwrap());
    assert_eq!(render(tpl, r#"{"led_on":false,"mode":"remote"}"#), led["payload_off"].as_str().unwrap());
    let obs = Observer::new(broker.port, "#");
    obs.publish(led["command_topic"].as_str().unwrap(), led["payload_on"].as_str().unwrap(), false);
    assert!(d.wait_stdout_lines(1, 5 * S)[0].starts_with("led on"));
    let state = obs.wait_on(&dev.topic("state"), 5 * S, |m| m.last().is_some_and(|m| m.json()["led_on"] == true));
    assert_eq!(render(tpl, &state.last().unwrap().text()), led["payload_on"].as_str().unwrap());
    assert_eq!(render(p["cmps"]["mode"]["value_template"].as_str().unwrap(), &state.last().unwrap().text()), "remote");
    let level = &p["cmps"]["light"];
    assert!(level["device_class"].is_null(), "a 0-1000 ratio is not illuminance");
    // The statistics Home Assistant keeps: counters only rise, the queue's depth does not.
    for (object, class) in
        [("dropped", "total_increasing"), ("reconnects", "total_increasing"), ("denied", "total_increasing")]
    {
        assert_eq!(p["cmps"][object]["state_class"], class, "{object}");
    }
    assert_eq!(p["cmps"]["queue"]["state_class"], "measurement");
    assert_eq!(p["cmps"]["mode"]["device_class"], "enum");
    // "Started" reads a timestamp from health.
    let health = obs_health(&broker, &dev);
    let started = render(p["cmps"]["started"]["value_template"].as_str().unwrap(), &health);
    assert!(started.ends_with('Z') && started.len() == 20, "an RFC 3339 time: {started}");
    let oldest = render(p["cmps"]["oldest"]["value_template"].as_str().unwrap(), &health);
    assert!(oldest.parse::<u64>().is_ok(), "seconds the oldest queued reading waited: {oldest}");
    assert_eq!(render(level["value_template"].as_str().unwrap(), r#"{"light":412,"ts":1,"seq":2}"#), "412");

    // The "Reading interval" number set to 2: its command template, written where it says,
    // gives one reading every 2 s, and its state template reads 2 back.
    let n = &p["cmps"]["interval"];
    let command = render_command(n["command_template"].as_str().unwrap(), 2);
    obs.publish(n["command_topic"].as_str().unwrap(), command, false);
    let cfg = obs
        .wait_on(&dev.topic("config"), 5 * S, |m| m.last().is_some_and(|m| m.json()["sensor"]["interval_ms"] == 2000));
    assert_eq!(render(n["value_template"].as_str().unwrap(), &cfg.last().unwrap().text()), "2", "whole seconds");
    let before = obs.on(&dev.topic("telemetry")).len();
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= before + 3);
    let ts: Vec<u64> =
        obs.on(&dev.topic("telemetry"))[before..].iter().map(|m| m.json()["ts"].as_u64().unwrap()).collect();
    for w in ts.windows(2).skip(1) {
        assert!((1900..=2100).contains(&(w[1] - w[0])), "one reading every 2 s: {ts:?}");
    }
    // The select and the threshold write what `nightlight check` accepts.
    let sel = &p["cmps"]["power_on"];
    obs.publish(
        sel["command_topic"].as_str().unwrap(),
        render_command(sel["command_template"].as_str().unwrap(), "auto"),
        false,
    );
    let th = &p["cmps"]["threshold"];
    obs.publish(
        th["command_topic"].as_str().unwrap(),
        render_command(th["command_template"].as_str().unwrap(), 250.0),
        false,
    );
    obs.wait_on(&dev.topic("config"), 5 * S, |m| {
        m.last().is_some_and(|m| m.json()["led"]["power_on"] == "auto" && m.json()["server"]["threshold"] == 250)
    });
}

#[test]
fn an_installation_of_the_per_entity_release_migrates_and_keeps_nothing_behind() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 500, "");
    // What an earlier release left retained.
    let old = Observer::new(broker.port, "homeassistant/#");
    for object in ["light/{id}/led", "sensor/{id}/light", "sensor/{id}/queue"] {
        let topic = format!("homeassistant/{}/config", object.replace("{id}", &dev.id));
        old.publish(&topic, format!(r#"{{"unique_id": "{}_x", "object_id": "x"}}"#, dev.id), true);
    }
    old.wait_on_prefix("homeassistant/", 5 * S, 3);
    let _d = dev.spawn();
    obs_online(&broker, &dev);
    // Home Assistant's documented step first, on each old topic, then the new message.
    let led_topic = format!("homeassistant/light/{}/led/config", dev.id);
    let seen = old.wait_on(&led_topic, 5 * S, |m| m.iter().any(|m| m.text().is_empty()));
    let texts: Vec<String> = seen.iter().map(|m| m.text()).collect();
    let migrate = texts.iter().position(|t| t.contains("migrate_discovery")).expect("the migrate_discovery step");
    assert!(migrate < texts.len() - 1 && texts.last().unwrap().is_empty(), "migrate, then cleared: {texts:?}");
    // Every old topic is cleared before the device message: a clear after it shares a discovery
    // id with one of its components, and Home Assistant logs a conflicting discovery message.
    let device_topic = format!("homeassistant/device/{}/config", dev.id);
    old.wait_on(&device_topic, 5 * S, |m| !m.is_empty());
    let all = old.all();
    let device_at = all.iter().position(|m| m.topic == device_topic && !m.text().is_empty()).unwrap();
    let last_clear = all.iter().rposition(|m| m.topic != device_topic && m.text().is_empty()).unwrap();
    assert!(
        last_clear < device_at,
        "a clear after the device message: {:?}",
        all.iter().map(|m| &m.topic).collect::<Vec<_>>()
    );
    let untouched = format!("homeassistant/sensor/{}/lux/config", dev.id);
    assert!(all.iter().all(|m| m.topic != untouched), "nothing held there, nothing sent there");
    let held = retained_discovery(&broker);
    assert_eq!(held.len(), 1, "only the device message remains: {held:?}");
    assert!(held[0].0.ends_with(&format!("/device/{}/config", dev.id)));
}

#[test]
fn a_new_device_sends_no_migration_traffic_only_its_device_message() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 500, "");
    let obs = Observer::new(broker.port, "homeassistant/#");
    let _d = dev.spawn();
    let device_topic = format!("homeassistant/device/{}/config", dev.id);
    obs.wait_on(&device_topic, 10 * S, |m| !m.is_empty());
    // Anything about the old topics would come before the device message.
    let all: Vec<String> = obs.all().iter().map(|m| m.topic.clone()).collect();
    assert_eq!(all, [device_topic], "the device message and nothing else");
}

#[test]
fn home_assistants_birth_brings_the_discovery_back_after_it_was_lost() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 500, "");
    let d = dev.spawn();
    obs_online(&broker, &dev);
    let topic = format!("homeassistant/device/{}/config", dev.id);
    let obs = Observer::new(broker.port, "#");
    obs.wait_on(&topic, 5 * S, |m| !m.is_empty());
    obs.publish(&topic, "", true); // lost: a broker without persistence restarted, say
    obs.wait_on(&topic, 5 * S, |m| m.last().is_some_and(|m| m.text().is_empty()));
    assert!(retained_discovery(&broker).is_empty());
    obs.publish("homeassistant/status", "online", false);
    d.wait_stderr("Home Assistant is online", 5 * S);
    obs.wait_on(&topic, 8 * S, |m| m.last().is_some_and(|m| !m.text().is_empty()));
    assert_eq!(retained_discovery(&broker).len(), 1, "back, and retained");
}

#[test]
fn right_after_home_assistant_restarts_the_light_level_has_the_last_reading() {
    let broker = Mosquitto::start("");
    // One reading an hour (set from Home Assistant, say): the one taken at start.
    let dev = DeviceDir::new(broker.port, 3_600_000, "");
    let d = dev.spawn();
    let discovery = Observer::new(broker.port, "homeassistant/device/+/config");
    let p = discovery.wait_on(&format!("homeassistant/device/{}/config", dev.id), 10 * S, |m| !m.is_empty())[0].json();
    let level = &p["cmps"]["light"];
    let topic = level["state_topic"].as_str().unwrap();
    let template = level["value_template"].as_str().unwrap();

    // Home Assistant restarts: it subscribes again and finds the light level at once.
    let ha = Observer::new(broker.port, topic);
    let held = ha.wait_on(topic, 5 * S, |m| !m.is_empty());
    assert!(held[0].retain, "retained");
    assert_eq!(render(template, &held[0].text()), "123");
    // Its birth message is answered with the reading too (a broker that lost it, say).
    ha.publish("homeassistant/status", "online", false);
    d.wait_stderr("Home Assistant is online", 5 * S);
    let again = ha.wait_on(topic, 8 * S, |m| m.len() >= 2);
    assert_eq!(render(template, &again[1].text()), "123");
    assert_eq!(Observer::new(broker.port, &dev.topic("telemetry")).all().len(), 0, "telemetry is not retained");

    // The light changes; "Read now" shows it at once, not in an hour.
    ha.publish(&dev.topic("virtual/light"), "777", false);
    d.wait_stderr("simulated light set", 5 * S);
    let button = &p["cmps"]["read"];
    assert_eq!(button["p"], "button");
    ha.publish(button["command_topic"].as_str().unwrap(), button["payload_press"].as_str().unwrap(), false);
    let now = ha.wait_on(topic, 5 * S, |m| m.last().is_some_and(|m| render(template, &m.text()) == "777"));
    assert!(now.len() >= 3, "a new reading, not the retained one again: {now:?}");
}

#[test]
fn disabling_discovery_removes_the_device() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 1000, "");
    let mut d = dev.spawn();
    obs_discovered(&broker, &dev);
    assert_eq!(retained_discovery(&broker).len(), 1);
    d.stop_with(libc::SIGTERM, 5 * S);
    let obs = Observer::new(broker.port, "#");
    let d = dev.spawn_with(&[("NIGHTLIGHT__HOMEASSISTANT__ENABLED", "false")]);
    // The device message is emptied last, after the old topics and the last reading.
    let topic = format!("homeassistant/device/{}/config", dev.id);
    obs.wait_on(&topic, 10 * S, |m| m.iter().any(|m| m.text().is_empty()));
    assert!(retained_discovery(&broker).is_empty(), "retained configs left behind");
    let reading = Observer::new(broker.port, &dev.topic("reading"));
    fence_on(&reading, &dev.topic("reading"));
    assert!(reading.all().iter().all(|m| !m.retain), "the last reading left behind");
    drop(d);
}

#[test]
fn health_after_an_outage_counts_the_reconnect_and_the_queue_and_status_prints_it() {
    let mut broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 100, "");
    let _d = dev.spawn();
    obs_online(&broker, &dev);
    broker.stop();
    let stored = readings_on_disk(&dev.queue());
    wait_readings_on_disk(&dev.queue(), stored + 6, 20 * S);
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

/// Waits until `n` more readings than `before` were published.
fn readings_after(obs: &Observer, dev: &DeviceDir, before: usize, n: usize) {
    obs.wait_on(&dev.topic("telemetry"), 20 * S, |m| m.len() >= before + n);
}

/// The virtual LED's lines so far: `true` for on.
fn led_lines(d: &Daemon) -> Vec<bool> {
    d.stdout().iter().map(|l| l.starts_with("led on")).collect()
}

#[test]
fn home_assistants_commands_hold_until_dusk_or_dawn_and_with_none_the_led_follows_the_light() {
    // Home Assistant is the only controller: it never says online on nightlight/controller/+.
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 100, ""); // a constant 123: dark
    let obs = Observer::new(broker.port, "#");
    let d = dev.spawn_with(&[("NIGHTLIGHT__LED__LOCAL_AFTER_S", "1")]);
    let state_is = |mode: &str, on: bool| state_is(&obs, &dev, mode, on);
    let light = |v: &str| {
        obs.publish(&dev.topic("virtual/light"), v, false);
        obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| {
            m.last().is_some_and(|m| m.json()["light"] == v.parse::<u64>().unwrap())
        })
        .len()
    };
    // Dark and nobody commanding: the rule switches it on; dawn switches it off.
    state_is("local", true);
    light("900");
    state_is("local", false);
    assert_eq!(led_lines(&d), [true, false]);

    // Noon: Home Assistant turns it on. It stays on, reading after reading, and the mode says a
    // controller decided.
    obs.publish(&dev.topic("commands"), r#"{"led_on": true}"#, false);
    let n = state_is("remote", true).len();
    let at = obs.on(&dev.topic("telemetry")).len();
    readings_after(&obs, &dev, at, 30);
    assert_eq!(led_lines(&d), [true, false, true], "Home Assistant's `on` held in bright light");
    assert_eq!(obs.on(&dev.topic("state")).len(), n, "no state change while the command holds");

    // Dusk: the rule agrees (on) and is in charge again. Home Assistant turns it off in the dark:
    // held all night.
    light("100");
    state_is("local", true);
    obs.publish(&dev.topic("commands"), r#"{"led_on": false}"#, false);
    state_is("remote", false);
    let at = obs.on(&dev.topic("telemetry")).len();
    readings_after(&obs, &dev, at, 30);
    assert_eq!(led_lines(&d), [true, false, true, false], "Home Assistant's `off` held in the dark");

    // Dawn agrees with it; at the next dusk, with no command, the LED switches on by itself.
    light("900");
    state_is("local", false);
    light("100");
    state_is("local", true);
    assert_eq!(led_lines(&d), [true, false, true, false, true]);
}
