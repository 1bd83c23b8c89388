//! End to end, against real Mosquitto brokers under the README's ACL: what MQTT 5 buys (and
//! what the device does under 3.1.1 instead): an oversized command costs no valid command and
//! no loop, a refused reading is kept until the broker takes it, the session outlives the
//! connection.

mod common;

use common::*;

/// Sends 20 commands, on and off in turn, each once the LED has followed the one before: the
/// LED lines the device printed since `before`.
fn twenty_commands(ctl: &Observer, d: &Daemon, before: usize) -> Vec<String> {
    for i in 0..20 {
        ctl.publish("porch/commands", format!(r#"{{"led_on": {}}}"#, i % 2 == 0), false);
        d.wait_stdout_lines(before + i + 1, 10 * S);
    }
    let lines = d.wait_stdout_lines(before + 20, 10 * S);
    lines[before..].iter().map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" ")).collect()
}

/// Waits until the device's subscriptions are in place: it publishes its state after sending
/// SUBSCRIBE, and the broker handles a connection's packets in order.
fn subscribed(ctl: &Observer) {
    ctl.wait_on("porch/state", 10 * S, |m| !m.is_empty());
}

fn on_off(n: usize) -> Vec<String> {
    (0..n).map(|i| if i % 2 == 0 { "led on".to_owned() } else { "led off".to_owned() }).collect()
}

#[test]
fn behind_a_400_kb_command_retained_or_not_20_valid_commands_all_switch_the_led_in_order() {
    for (protocol, retained) in [("5", false), ("5", true), ("3.1.1", false), ("3.1.1", true)] {
        let case = format!("MQTT {protocol}, retained {retained}");
        let acl = readme_acl("user observer\ntopic read #\n");
        let (broker, _dir) = password_broker(Some(acl.path().to_str().unwrap()));
        let ctl = Observer::with_login(broker.port, "porch/#", Some(("controller", "ctl-pass-2")));
        let dev = porch(broker.port, protocol);
        let big = vec![b'x'; 400 * 1024];
        if retained {
            // Waiting on the broker before the device ever subscribes: it comes with the
            // subscription, at every start with a new session.
            ctl.publish("porch/commands", big.clone(), true);
        }
        let mut d = dev.spawn();
        subscribed(&ctl);
        if !retained {
            ctl.publish("porch/commands", big.clone(), false);
        }
        let lines = twenty_commands(&ctl, &d, 0);
        assert_eq!(lines, on_off(20), "{case}: {}", d.stderr());
        let reconnects = d.stderr().matches("disconnected").count();
        if protocol == "5" {
            assert_eq!(reconnects, 0, "{case}: the broker drops it (Maximum Packet Size): {}", d.stderr());
            assert!(!d.stderr().contains("larger than the limit"), "{case}: {}", d.stderr());
        } else {
            assert!(reconnects <= 1, "{case}: one reconnect to read it and reject it: {}", d.stderr());
            assert!(d.stderr().contains("ignored an invalid command"), "{case}: rejected: {}", d.stderr());
        }

        // And after a restart, with the session the broker kept.
        d.stop_with(libc::SIGTERM, 5 * S);
        ctl.clear();
        let d = dev.spawn();
        subscribed(&ctl);
        // The last command of the first run was `off`: `led.power_on = last` starts off.
        let lines = twenty_commands(&ctl, &d, 0);
        assert_eq!(lines, on_off(20), "{case}, after a restart: {}", d.stderr());
        assert!(d.stderr().contains("session_present=true"), "{case}: the session outlived the connection");
        assert_eq!(d.stderr().matches("disconnected").count(), 0, "{case}, after a restart: {}", d.stderr());
    }
}

#[test]
fn a_reading_the_acl_refuses_is_counted_as_denied_kept_and_delivered_once_the_acl_is_fixed() {
    // The README's ACL without the line that lets a device publish its readings.
    let acl = readme_acl("user observer\ntopic read #\n");
    let full = std::fs::read_to_string(acl.path()).unwrap();
    std::fs::write(acl.path(), full.replace("pattern write %u/telemetry\n", "")).unwrap();
    let (broker, _dir) = password_broker(Some(acl.path().to_str().unwrap()));
    let obs = Observer::with_login(broker.port, "porch/#", Some(("observer", "obs-pass-3")));
    let dev = porch(broker.port, "5");
    let d = dev.spawn_with(&[("RUST_LOG", "info,nightlight::device=debug")]);
    d.wait_stderr("the broker refused a reading", 10 * S);
    let health = obs.wait_on("porch/health", 5 * S, |m| m.iter().any(|m| m.json()["denied"].as_u64() > Some(0)));
    assert!(health.iter().any(|m| m.json()["denied"].as_u64() > Some(0)));
    // The first refused reading is the run's first: nothing after it may be missing.
    let stderr = d.stderr();
    let line = stderr.lines().find(|l| l.contains("the broker refused a reading")).unwrap();
    let first: u64 = line.split("seq=").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    d.wait_stderr_count("a reading refused again", 3, 10 * S);
    assert!(obs.on("porch/telemetry").is_empty(), "the ACL refuses readings");
    assert_eq!(d.stderr().matches("the broker refused a reading").count(), 1, "logged once: {}", d.stderr());

    // The operator fixes the ACL and reloads the broker.
    std::fs::write(acl.path(), full).unwrap();
    signal(broker.pid(), libc::SIGHUP);
    let msgs =
        obs.wait_on("porch/telemetry", 15 * S, |m| m.iter().any(|m| m.json()["seq"].as_u64() > Some(first + 15)));
    let mut seqs = obs.seqs("porch/telemetry");
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs[0], first, "the first refused reading was delivered: {msgs:?}");
    assert_contiguous(&seqs);
    assert!(d.stderr().contains("the broker takes readings again"), "{}", d.stderr());
    assert_eq!(d.stderr().matches("disconnected").count(), 0, "a refusal is not a connection problem");
}

/// A plain device (no login) with `mqtt.protocol` set to `protocol` through the environment,
/// which wins over the file and over the 3.1.1 pass of the test command.
fn device_speaking(port: u16, protocol: &str) -> (DeviceDir, Daemon) {
    let dev = DeviceDir::new(port, 200, "[homeassistant]\nenabled = false\n");
    let d = dev.spawn_with(&[("NIGHTLIGHT__MQTT__PROTOCOL", protocol)]);
    (dev, d)
}

#[test]
fn by_default_a_device_meets_a_3_1_1_only_broker_says_so_once_and_everything_works() {
    let broker = Mosquitto::start("");
    let gate = V311Only::new(broker.port);
    let obs = Observer::new(broker.port, "#");
    let (dev, mut d) = device_speaking(gate.port, "auto");
    d.wait_stderr("the broker speaks only MQTT 3.1.1: connected with it", 20 * S);
    assert!(gate.seen().0 >= 2, "MQTT 5 was tried first");
    // Telemetry, a command, the retained state, health saying which protocol.
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= 2);
    obs.wait_on(&dev.topic("state"), 10 * S, |m| !m.is_empty());
    obs.publish(&dev.topic("commands"), r#"{"led_on": true}"#, false);
    assert!(d.wait_stdout_lines(1, 10 * S)[0].starts_with("led on"));
    obs.wait_on(&dev.topic("state"), 10 * S, |m| m.last().is_some_and(|s| s.json()["led_on"] == true));
    let health = obs.wait_on(&dev.topic("health"), 10 * S, |m| !m.is_empty());
    assert_eq!(health.last().unwrap().json()["protocol"], "3.1.1");
    // The Last Will, registered under 3.1.1.
    d.kill9();
    obs.wait_on(&dev.topic("status"), 20 * S, |m| m.last().is_some_and(|s| s.text() == "offline"));
    assert_eq!(d.stderr().matches("speaks only MQTT 3.1.1").count(), 1, "said once:\n{}", d.stderr());
}

#[test]
fn by_default_a_device_meets_an_mqtt_5_broker_with_mqtt_5() {
    let broker = Mosquitto::start("");
    let obs = Observer::new(broker.port, "#");
    let (dev, d) = device_speaking(broker.port, "auto");
    let health = obs.wait_on(&dev.topic("health"), 10 * S, |m| !m.is_empty());
    assert_eq!(health.last().unwrap().json()["protocol"], "5");
    d.wait_stderr("the broker speaks MQTT 5", 10 * S);
    assert!(!d.stderr().contains("3.1.1"), "{}", d.stderr());
}

#[test]
fn an_explicit_mqtt_5_means_mqtt_5_and_the_refusal_names_mqtt_protocol() {
    let broker = Mosquitto::start("");
    let gate = V311Only::new(broker.port);
    let obs = Observer::new(broker.port, "#");
    let (dev, d) = device_speaking(gate.port, "5");
    d.wait_stderr("remove mqtt.protocol", 10 * S);
    // It keeps trying MQTT 5 (and only MQTT 5): more closes, never a connection.
    let closed = gate.seen().0;
    wait_until(10 * S, || gate.seen().0 >= closed + 3, "three more MQTT 5 attempts");
    assert_eq!(gate.seen().1, 0, "an explicit MQTT 5 never tries 3.1.1");
    assert!(obs.on(&dev.topic("telemetry")).is_empty() && obs.on(&dev.topic("status")).is_empty());
    assert!(!d.stderr().contains("connected with it"), "{}", d.stderr());
}

#[test]
fn a_wrong_password_never_makes_the_device_fall_back_to_3_1_1() {
    let acl = readme_acl("");
    let (broker, _dir) = password_broker(Some(acl.path().to_str().unwrap()));
    let gate = V311Only::counting(broker.port);
    let dev = porch(gate.port, "auto");
    let pw = dev.dir.path().join("porch.pw");
    std::fs::write(&pw, "wrong\n").unwrap();
    let d = dev.spawn();
    d.wait_stderr("username or password", 10 * S);
    // Five refused logins later, every CONNECT was still MQTT 5.
    wait_until(10 * S, || gate.seen().0 >= 5, "five MQTT 5 attempts");
    assert_eq!(gate.seen().1, 0, "fell back on a refused login:\n{}", d.stderr());
    assert!(!d.stderr().contains("3.1.1"), "{}", d.stderr());
}
