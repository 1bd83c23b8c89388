//! End to end: the real binary (virtual build) against a real Mosquitto started per test.

mod common;

use std::time::Duration;

use common::*;

fn led_lines(d: &Daemon) -> Vec<String> {
    d.stdout().into_iter().filter(|l| l.starts_with("led ")).collect()
}

#[test]
fn telemetry_has_contract_fields_and_cadence() {
    let Rig { broker: _broker, dev, obs } = Rig::new(200);
    let d = dev.spawn();
    let msgs = obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= 6);
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut last_ts = 0;
    let (run, seq0) = (msgs[0].json()["run"].as_u64().expect("run"), msgs[0].json()["seq"].as_u64().expect("seq"));
    assert!(run > 0 && run + 60_000 > before, "a fresh run starts at the Unix time in ms: {run}");
    for (i, m) in msgs.iter().take(6).enumerate() {
        let v = m.json();
        assert!(!m.retain, "telemetry must not be retained");
        assert_eq!(v["light"], 123, "{v}");
        assert_eq!(v["run"], run, "one run: {v}");
        assert_eq!(v["seq"], seq0 + i as u64, "seq rises by one within a run: {v}");
        let ts = v["ts"].as_u64().expect("ts is a number");
        assert!(ts <= before && ts + 60_000 > before, "ts is the Unix time in ms: {ts}");
        if i > 0 {
            let gap = ts - last_ts;
            assert!((100..=1000).contains(&gap), "readings every ~200 ms, got a gap of {gap} ms");
        }
        last_ts = ts;
    }
    assert!(d.stdout().is_empty(), "nothing but LED lines on stdout: {:?}", d.stdout());
}

#[test]
fn at_qos_0_a_reading_is_done_when_written_and_never_reaches_the_disk_while_online() {
    let Rig { broker: _broker, dev, obs } = Rig::new(100);
    let _d = dev.spawn_with(&[("NIGHTLIGHT__MQTT__QOS", "0")]);
    // Three seconds of readings: any still counted in flight after queue.spill_ms (1 s) would
    // have been written to a segment file.
    let msgs = obs.wait_on(&dev.topic("telemetry"), 20 * S, |m| m.len() >= 30);
    let seqs: Vec<u64> = msgs.iter().map(|m| m.json()["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "in order, none missing: {seqs:?}");
    let spilled: u64 = std::fs::read_dir(dev.queue())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(spilled, 0, "readings sent at QoS 0 were kept as if waiting for an acknowledgement");
}

#[test]
fn commands_switch_the_led_and_update_the_retained_state() {
    let Rig { broker, dev, obs } = Rig::new(1000);
    let d = dev.spawn();
    obs.wait_on(&dev.topic("status"), 10 * S, |m| m.iter().any(|m| m.text() == "online"));
    obs.wait_on(&dev.topic("state"), 5 * S, |m| m.iter().any(|m| m.json()["led_on"] == false));

    obs.publish(&dev.topic("commands"), r#"{"led_on": true}"#, false);
    let lines = d.wait_stdout_lines(1, 5 * S);
    assert!(lines[0].starts_with("led on "), "{lines:?}");
    obs.wait_on(&dev.topic("state"), 5 * S, |m| m.last().is_some_and(|m| m.json()["led_on"] == true));

    // A repeated command changes nothing on the LED (no line) but is still acknowledged in state.
    obs.publish(&dev.topic("commands"), r#"{"led_on": true, "from": "test"}"#, false);
    obs.publish(&dev.topic("commands"), r#"{"led_on": false}"#, false);
    let lines = d.wait_stdout_lines(2, 5 * S);
    assert!(lines[1].starts_with("led off "), "{lines:?}");
    let stamps: Vec<u64> = lines.iter().map(|l| l.split(' ').nth(2).unwrap().parse().unwrap()).collect();
    assert!(stamps[0] < stamps[1], "monotonic stamps: {lines:?}");

    // A late subscriber sees the retained state (once the broker has it: the LED's line comes
    // before the state is on the wire).
    obs.wait_on(&dev.topic("state"), 5 * S, |m| m.last().is_some_and(|m| m.json()["led_on"] == false));
    let late = Observer::new(broker.port, &dev.topic("state"));
    let st = late.wait_on(&dev.topic("state"), 5 * S, |m| !m.is_empty());
    assert!(st[0].retain);
    assert_eq!(st[0].json(), serde_json::json!({"led_on": false, "mode": "remote"}));
    assert_eq!(led_lines(&d).len(), 2);
}

#[test]
fn last_will_says_offline_after_kill_9() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 1000, "");
    let obs = Observer::new(broker.port, &dev.topic("status"));
    let mut d = dev.spawn();
    obs.wait_on(&dev.topic("status"), 10 * S, |m| m.iter().any(|m| m.text() == "online"));
    d.kill9();
    obs.wait_on(&dev.topic("status"), 10 * S, |m| m.last().is_some_and(|m| m.text() == "offline"));
    let late = Observer::new(broker.port, &dev.topic("status"));
    let st = late.wait_on(&dev.topic("status"), 5 * S, |m| !m.is_empty());
    assert!(st[0].retain && st[0].text() == "offline", "retained offline: {:?}", st[0]);
}

#[test]
fn clean_stop_on_sigterm_and_sigint_publishes_offline_and_exits_zero() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let broker = Mosquitto::start("");
        let dev = DeviceDir::new(broker.port, 1000, "");
        let obs = Observer::new(broker.port, "#");
        let mut d = dev.spawn();
        obs.wait_on(&dev.topic("status"), 10 * S, |m| m.iter().any(|m| m.text() == "online"));
        let (status, took) = d.stop_with(sig, 5 * S);
        assert_eq!(status.code(), Some(0), "signal {sig}: {}", d.stderr());
        assert!(took < 2 * S, "stopped in {took:?}");
        obs.wait_on(&dev.topic("status"), 5 * S, |m| m.last().is_some_and(|m| m.text() == "offline"));
    }
}

#[test]
fn device_rides_out_a_broker_restart_and_delivers_what_it_read_meanwhile() {
    let mut broker = Mosquitto::start("persistence true");
    let dev = DeviceDir::new(broker.port, 100, "");
    let obs = Observer::persistent(broker.port, "#");
    let mut d = dev.spawn();
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= 3);
    broker.stop();
    let before = readings_on_disk(&dev.queue());
    wait_readings_on_disk(&dev.queue(), before + 12, 20 * S);
    assert!(d.is_running(), "a vanished broker must not stop the device");
    broker.restart();
    // Readings taken during the outage arrive, none missing, in order.
    let topic = dev.topic("telemetry");
    obs.wait_on(&topic, 15 * S, |_| obs.runs(&topic).values().map(Vec::len).sum::<usize>() >= 25);
    let runs = obs.runs(&topic);
    assert_eq!(runs.len(), 1, "one run: {runs:?}");
    let uniq = runs.values().next().unwrap();
    assert!(uniq.len() >= 25);
    assert_contiguous(uniq);
    // The new broker has no session for us: the device must have subscribed again.
    obs.publish(&dev.topic("commands"), r#"{"led_on": true}"#, false);
    let lines = d.wait_stdout_lines(1, 5 * S);
    assert!(lines[0].starts_with("led on"), "{lines:?}");
    assert!(d.stderr().contains("disconnected"), "the outage is logged");
}

#[test]
fn device_starts_while_the_broker_is_down_and_connects_when_it_comes() {
    let mut broker = Mosquitto::start("persistence true");
    let dev = DeviceDir::new(broker.port, 100, "");
    let obs = Observer::persistent(broker.port, &dev.topic("telemetry"));
    broker.stop();
    let mut d = dev.spawn();
    d.wait_stderr("cannot connect", 5 * S);
    wait_readings_on_disk(&dev.queue(), 8, 20 * S);
    let back = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    broker.restart();
    let msgs = obs.wait_on(&dev.topic("telemetry"), 15 * S, |m| m.len() >= 10);
    let first = msgs[0].json();
    assert!(first["ts"].as_u64().unwrap() + 500 < back, "readings from before the first connection are kept: {first}");
    let seqs = obs.seqs(&dev.topic("telemetry"));
    assert_contiguous(&seqs);
    assert!(d.is_running());
    assert_eq!(d.stderr().matches("cannot connect").count(), 1, "one line per failure streak:\n{}", d.stderr());
}

#[test]
fn hostile_commands_change_nothing_and_the_device_goes_on() {
    let Rig { broker: _broker, dev, obs } = Rig::new(100);
    let d = dev.spawn();
    obs.wait_on(&dev.topic("state"), 10 * S, |m| !m.is_empty());
    let deep = format!("{{\"led_on\": true, \"x\": {}1{}}}", "[".repeat(5000), "]".repeat(5000));
    let hostile: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        br#"{"led_on": "true"}"#.to_vec(),
        br#"{"led_on": 1}"#.to_vec(),
        br#"[true]"#.to_vec(),
        b"\x00\xff\xfe\x80binary".to_vec(),
        format!("{{\"led_on\": true, \"pad\": \"{}\"}}", "a".repeat(5000)).into_bytes(),
        deep.into_bytes(),
        vec![b'{'; 100_000],
    ];
    let n = hostile.len();
    for h in hostile {
        obs.publish(&dev.topic("commands"), h, false);
    }
    d.wait_stderr("rejected_total=8", 10 * S);
    let before = obs.on(&dev.topic("telemetry")).len();
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= before + 5);
    assert!(led_lines(&d).is_empty(), "a hostile command switched the LED: {:?}", d.stdout());
    assert_eq!(d.stderr().matches("ignored an invalid command").count(), n, "one warning each:\n{}", d.stderr());
    // And a valid command still works.
    obs.publish(&dev.topic("commands"), r#"{"led_on": true}"#, false);
    d.wait_stdout_lines(1, 5 * S);
    assert!(!d.stderr().contains("disconnected"), "no reconnect loop:\n{}", d.stderr());
}

#[test]
fn commands_sent_while_the_device_was_away_arrive_when_it_returns() {
    let Rig { broker: _broker, dev, obs } = Rig::new(1000);
    let mut d = dev.spawn();
    obs.wait_on(&dev.topic("status"), 10 * S, |m| m.iter().any(|m| m.text() == "online"));
    d.stop_with(libc::SIGTERM, 5 * S);
    obs.publish(&dev.topic("commands"), r#"{"led_on": true}"#, false);
    let d = dev.spawn();
    let lines = d.wait_stdout_lines(1, 10 * S);
    assert!(lines[0].starts_with("led on"), "{lines:?}");
}

#[test]
fn an_oversized_message_held_by_the_broker_does_not_trap_the_device() {
    let Rig { broker: _broker, dev, obs } = Rig::new(100);
    let mut d = dev.spawn();
    obs.wait_on(&dev.topic("status"), 10 * S, |m| m.iter().any(|m| m.text() == "online"));
    d.stop_with(libc::SIGTERM, 5 * S);
    // Queued in the device's persistent session: re-delivered on every reconnect, unless handled.
    obs.publish(&dev.topic("commands"), vec![b'x'; 600 * 1024], false);
    obs.clear();
    let mut d = dev.spawn();
    obs.wait_on(&dev.topic("telemetry"), 15 * S, |m| m.len() >= 20);
    assert!(d.is_running());
    // MQTT 5: the broker drops it (too large for the device's Maximum Packet Size); 3.1.1: the
    // device reconnects once to the same session to read it and reject it.
    assert!(d.stderr().matches("larger than the limit").count() <= 1, "{}", d.stderr());
    assert!(d.stderr().matches("disconnected").count() <= 1, "{}", d.stderr());
    // Commands work afterwards, through a persistent session again.
    obs.publish(&dev.topic("commands"), r#"{"led_on": true}"#, false);
    d.wait_stdout_lines(1, 5 * S);
    assert!(d.stderr().contains("session_present=true"), "{}", d.stderr());
}

#[test]
fn simulated_light_can_be_set_and_made_to_fail_at_run_time() {
    let Rig { broker: _broker, dev, obs } = Rig::new(100);
    let d = dev.spawn_with(&[("RUST_LOG", "info,nightlight::device::sampler=debug")]);
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| !m.is_empty());
    obs.publish(&dev.topic("virtual/light"), "777", false);
    obs.wait_on(&dev.topic("telemetry"), 5 * S, |m| m.last().is_some_and(|m| m.json()["light"] == 777));
    obs.publish(&dev.topic("virtual/light"), "fail", false);
    d.wait_stderr("sensor read failed", 5 * S);
    let failing_since = now_ms();
    // The sensor fails until the device has tried it a few more times.
    d.wait_stderr("failed_reads=4", 10 * S);
    let recovering_at = now_ms();
    let recovered = |e: &str| e.lines().find(|l| l.contains("sensor recovered")).map(str::to_owned);
    obs.publish(&dev.topic("virtual/light"), "55", false);
    d.wait_stderr("sensor recovered", 5 * S);
    let line = recovered(&d.stderr()).unwrap();
    let failed: u64 = line.split("failed_reads=").nth(1).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    assert!(failed >= 3, "the sensor was read and failed meanwhile: {line}");
    let msgs = obs.wait_on(&dev.topic("telemetry"), 5 * S, |m| m.last().is_some_and(|m| m.json()["light"] == 55));
    let lights: Vec<i64> = msgs.iter().map(|m| m.json()["light"].as_i64().unwrap()).collect();
    assert!(lights.iter().all(|l| [123, 777, 55].contains(l)), "no bogus reading: {lights:?}");
    let during: Vec<String> = msgs
        .iter()
        .filter(|m| (failing_since..recovering_at).contains(&m.json()["ts"].as_u64().unwrap()))
        .map(Msg::text)
        .collect();
    assert!(during.is_empty(), "no readings while the sensor fails: {during:?}");
    let seqs = obs.seqs(&dev.topic("telemetry"));
    assert_contiguous(&seqs);
    assert_eq!(d.stderr().matches("sensor read failed").count(), 1, "one warning per streak");
}

#[test]
fn systemd_is_told_ready_fed_by_the_watchdog_and_told_stopping() {
    use std::os::unix::net::UnixDatagram;
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 1000, "");
    let sock_dir = tempfile::tempdir().unwrap();
    let path = sock_dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(5 * S)).unwrap();
    let mut d = dev.spawn_with(&[("NOTIFY_SOCKET", path.to_str().unwrap()), ("WATCHDOG_USEC", "200000")]);
    let recv = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification from nightlight");
        String::from_utf8_lossy(&buf[..n]).trim_end().to_owned()
    };
    let first = recv();
    assert!(first.contains("READY=1"), "{first}");
    assert!(first.contains("STATUS=started; connecting to 127.0.0.1:"), "{first}");
    // Watchdog feeds, and the status line as the link comes up, in whatever order they come.
    let mut seen = vec![];
    while seen.iter().filter(|m: &&String| m.contains("WATCHDOG=1")).count() < 3
        || !seen.iter().any(|m| m.starts_with("STATUS=delivering to "))
    {
        assert!(seen.len() < 20, "3 watchdog feeds and a delivering status line: {seen:?}");
        seen.push(recv());
    }
    let delivering = format!("STATUS=delivering to 127.0.0.1:{}", broker.port);
    assert!(seen.contains(&delivering), "systemd's status line names the broker: {seen:?}");
    let connected = seen.iter().position(|m| m.starts_with("STATUS=connected to 127.0.0.1:"));
    let delivered = seen.iter().position(|m| *m == delivering);
    assert!(connected < delivered && connected.is_some(), "connected, then delivering: {seen:?}");
    let (status, _) = d.stop_with(libc::SIGTERM, 5 * S);
    assert_eq!(status.code(), Some(0));
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut after = vec![];
    let mut buf = [0u8; 512];
    while let Ok(n) = sock.recv(&mut buf) {
        after.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(after.iter().any(|m| m.contains("STOPPING=1")), "{after:?}");
}

#[test]
fn sigint_stops_it_even_when_started_with_sigint_ignored_like_a_background_job() {
    use std::os::unix::process::CommandExt;
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 1000, "");
    let obs = Observer::new(broker.port, &dev.topic("status"));
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["run", "--config", dev.config().to_str().unwrap()]).stderr(std::process::Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe signal(2) is called.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    obs.wait_on(&dev.topic("status"), 10 * S, |m| m.iter().any(|m| m.text() == "online"));
    signal(child.id(), libc::SIGINT);
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < 5 * S, "SIGINT was ignored");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn the_led_comes_back_as_it_was_before_any_network_unless_power_on_says_otherwise() {
    let Rig { broker, dev, obs } = Rig::new(200);
    let mut d = dev.spawn();
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| !m.is_empty());
    obs.publish(&dev.topic("commands"), r#"{"led_on": true}"#, false);
    d.wait_stdout_lines(1, 5 * S);
    assert!(d.stdout()[0].starts_with("led on"), "{:?}", d.stdout());
    // A crash, not a clean stop: the kept state was written when the LED changed.
    d.stop_with(libc::SIGKILL, 5 * S);
    drop(broker); // no network from here on

    // led.power_on = "last" (the default): on again at start, with no broker to say so (within
    // ms; the bound leaves room for a loaded machine).
    let mut d = dev.spawn_with(&[]);
    let lines = d.wait_stdout_lines(1, 2 * S);
    assert!(lines[0].starts_with("led on"), "{lines:?}");
    d.wait_stderr("cannot connect", 5 * S);
    assert_eq!(d.stop_with(libc::SIGTERM, 5 * S).0.code(), Some(0));

    // "off" overrides what was kept (and keeps off).
    let mut d = dev.spawn_with(&[("NIGHTLIGHT__LED__POWER_ON", "off")]);
    d.wait_stderr("cannot connect", 5 * S);
    assert!(d.stdout().is_empty(), "the LED stays off: {:?}", d.stdout());
    assert_eq!(d.stop_with(libc::SIGTERM, 5 * S).0.code(), Some(0));
    let mut d = dev.spawn_with(&[]);
    d.wait_stderr("cannot connect", 5 * S);
    assert!(d.stdout().is_empty(), "last is off now: {:?}", d.stdout());
    assert_eq!(d.stop_with(libc::SIGTERM, 5 * S).0.code(), Some(0));

    // "auto": the first reading (the simulated 123, below the threshold of 300) switches it on.
    let mut d = dev.spawn_with(&[("NIGHTLIGHT__LED__POWER_ON", "auto")]);
    let lines = d.wait_stdout_lines(1, 5 * S);
    assert!(lines[0].starts_with("led on"), "{lines:?}");
    assert_eq!(d.stop_with(libc::SIGTERM, 5 * S).0.code(), Some(0));
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Waits until `needle` is in the daemon's stderr `n` times.
#[test]
fn retained_and_hour_old_commands_change_nothing_but_a_fresh_one_does() {
    let Rig { broker: _broker, dev, obs } = Rig::new(200);
    // Left on the command topic, retained, from some earlier day: it must not switch the LED at
    // every start ("ghost switching").
    obs.publish(&dev.topic("commands"), r#"{"led_on": true}"#, true);
    obs.wait_on(&dev.topic("commands"), 5 * S, |m| !m.is_empty());
    let mut d = dev.spawn_with(&[("NIGHTLIGHT_CLOCK_SYNCED", "1")]);
    d.wait_stderr_count("ignored a stale command", 1, 10 * S);
    assert!(d.stderr().contains("retained message"), "{}", d.stderr());

    // An hour old by a synchronized clock: stale too. A fresh one switches the LED.
    let hour_ago = now_ms() - 3_600_000;
    obs.publish(&dev.topic("commands"), format!(r#"{{"led_on": true, "ts": {hour_ago}}}"#), false);
    d.wait_stderr_count("ignored a stale command", 2, 10 * S);
    assert!(d.stderr().contains("sent 3600 s ago, more than led.command_max_age_s = 300"), "{}", d.stderr());
    assert!(d.stdout().is_empty(), "nothing stale switched the LED: {:?}", d.stdout());
    obs.publish(&dev.topic("commands"), format!(r#"{{"led_on": true, "ts": {}}}"#, now_ms()), false);
    let lines = d.wait_stdout_lines(1, 5 * S);
    assert!(lines[0].starts_with("led on"), "{lines:?}");
    assert_eq!(d.stop_with(libc::SIGTERM, 5 * S).0.code(), Some(0));

    // With a clock not known to be right, `ts` says nothing: the hour-old command switches it.
    // (The broker kept the session, so the retained command is not delivered again.)
    let env = [("NIGHTLIGHT_CLOCK_SYNCED", "0"), ("NIGHTLIGHT__LED__POWER_ON", "off")];
    let mut d = dev.spawn_with(&env);
    d.wait_stderr("connected", 10 * S);
    assert!(d.stdout().is_empty(), "{:?}", d.stdout());
    obs.publish(&dev.topic("commands"), format!(r#"{{"led_on": true, "ts": {hour_ago}}}"#), false);
    let lines = d.wait_stdout_lines(1, 5 * S);
    assert!(lines[0].starts_with("led on"), "{lines:?}");
    assert_eq!(d.stop_with(libc::SIGTERM, 5 * S).0.code(), Some(0));
}

#[test]
fn live_configuration_changes_the_interval_at_once_is_kept_across_a_restart_and_refuses_the_broker() {
    let Rig { broker, dev, obs } = Rig::new(1000);
    let mut d = dev.spawn();
    let report = |obs: &Observer, done: &dyn Fn(&serde_json::Value) -> bool| {
        obs.wait_on(&dev.topic("config"), 10 * S, |m| m.last().is_some_and(|m| done(&m.json())))
    };
    report(&obs, &|v| v["sensor"]["interval_ms"] == 1000 && v["refused"].is_null());

    obs.publish(&dev.topic("config/set"), r#"{"sensor": {"interval_ms": 200}}"#, false);
    report(&obs, &|v| v["sensor"]["interval_ms"] == 200);
    assert_interval(&obs, &dev.topic("telemetry"), 200);

    // The broker, the identity and the queue can never be set; a refusal changes nothing.
    obs.publish(
        &dev.topic("config/set"),
        r#"{"sensor": {"interval_ms": 500}, "mqtt": {"host": "evil.example"}}"#,
        false,
    );
    let r = report(&obs, &|v| !v["refused"].is_null());
    let last = r.last().unwrap().json();
    assert_eq!(last["refused"]["key"], "mqtt.host");
    assert_eq!(last["sensor"]["interval_ms"], 200, "nothing changed");
    obs.publish(&dev.topic("config/set"), "not json at all", false);
    d.wait_stderr("refused a live configuration change", 5 * S);
    assert_eq!(d.stop_with(libc::SIGTERM, 5 * S).0.code(), Some(0));

    // Kept in the state directory: the next start reads every 200 ms again.
    let late = Observer::new(broker.port, &dev.topic("#"));
    let _d = dev.spawn();
    late.wait_on(&dev.topic("config"), 10 * S, |m| m.last().is_some_and(|m| m.json()["sensor"]["interval_ms"] == 200));
    assert_interval(&late, &dev.topic("telemetry"), 200);
}

/// Waits for the next ten readings on `topic` and checks they were taken `ms` apart: the
/// time each was taken (`ts`), not when it arrived, so a slow machine changes nothing.
fn assert_interval(obs: &Observer, topic: &str, ms: u64) {
    let before = obs.on(topic).len();
    let msgs = obs.wait_on(topic, 20 * S, |m| m.len() >= before + 11);
    let ts: Vec<u64> = msgs[before..].iter().map(|m| m.json()["ts"].as_u64().unwrap()).collect();
    let mut gaps: Vec<u64> = ts.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!(median.abs_diff(ms) <= ms / 4, "one reading every {ms} ms: taken {gaps:?} ms apart");
}

#[test]
fn readings_taken_before_the_clock_is_synchronized_are_marked_and_the_queued_ones_re_stamped() {
    let mut broker = Mosquitto::start("persistence true");
    let dev = DeviceDir::new(broker.port, 100, "");
    let obs = Observer::persistent(broker.port, &dev.topic("telemetry"));
    // A Pi that booted without network: its clock an hour behind, not synchronized.
    let seam = dev.dir.path().join("clock-unsynced");
    std::fs::write(&seam, "-3600000").unwrap();
    let _d = dev.spawn_with(&[("NIGHTLIGHT_CLOCK_SEAM", seam.to_str().unwrap())]);
    let topic = dev.topic("telemetry");
    let live = obs.wait_on(&topic, 10 * S, |m| m.len() >= 3);
    let hour_ago = now_ms() - 3_600_000;
    for m in &live {
        assert_eq!(m.json()["ts_ok"], false, "marked: {}", m.text());
        assert!(m.json()["ts"].as_u64().unwrap().abs_diff(hour_ago) < 10_000, "the clock's own (wrong) time");
    }

    // Offline, readings queue with the wrong time; then NTP answers; then the broker is back.
    broker.stop();
    let outage = now_ms();
    let stored = readings_on_disk(&dev.queue());
    wait_readings_on_disk(&dev.queue(), stored + 8, 20 * S);
    let synced_at = now_ms();
    std::fs::remove_file(&seam).unwrap();
    // The device has seen the clock synchronized once it stores a reading not marked unsynced.
    let synced_on_disk = || flags_on_disk(&dev.queue()).last().is_some_and(|f| f & 2 == 0);
    wait_until(20 * S, synced_on_disk, "a reading taken by the synchronized clock on disk");
    broker.restart();
    obs.wait_on(&topic, 15 * S, |m| m.iter().any(|m| m.json()["ts"].as_u64().unwrap() > now_ms() - 1_000));
    let runs = obs.runs(&topic);
    assert_eq!(runs.len(), 1);
    assert_contiguous(runs.values().next().unwrap());
    let mut restamped = 0;
    for v in obs.on(&topic).iter().map(|m| m.json()) {
        let ts = v["ts"].as_u64().unwrap();
        if v["ts_ok"] == false {
            assert!(ts < outage - 3_590_000, "a marked reading carries the clock's own time: {v}");
        } else {
            assert!(v.get("ts_ok").is_none(), "{v}");
            assert!(ts + 5_000 > outage, "an unmarked reading has the right time: {v}");
            // Taken while the clock was an hour off, queued, and sent with the right time.
            restamped += usize::from(ts + 500 > outage && ts < synced_at);
        }
    }
    assert!(restamped >= 5, "the readings queued before the sync were re-stamped: {restamped}");
}

#[test]
fn with_no_broker_the_led_follows_the_simulated_day_on_its_own() {
    let dev = DeviceDir::new(free_port(), 300, ""); // nothing listens there
                                                    // A 4 s day starting at dusk (400, falling): dark, then light, then dark again. Failed
                                                    // connections every 20 ms, so the takeover at 1 s is noticed at one of them, between the
                                                    // readings at 0.9 s and 1.2 s.
    let env = [
        ("NIGHTLIGHT__MQTT__RECONNECT_MIN_MS", "20"),
        ("NIGHTLIGHT__MQTT__RECONNECT_MAX_MS", "20"),
        ("NIGHTLIGHT__LED__LOCAL_AFTER_S", "1"),
        ("NIGHTLIGHT__SENSOR__VIRTUAL__PATTERN", "daylight"),
        ("NIGHTLIGHT__SENSOR__VIRTUAL__PERIOD_S", "4"),
        ("NIGHTLIGHT__SENSOR__VIRTUAL__VALUE", "400"),
        ("NIGHTLIGHT__LED__POWER_ON", "off"),
    ];
    let d = dev.spawn_with(&env);
    let lines = d.wait_stdout_lines(3, 10 * S);
    assert!(
        lines[0].starts_with("led on") && lines[1].starts_with("led off") && lines[2].starts_with("led on"),
        "{lines:?}"
    );
    let log = d.stderr();
    let changed = log.find("mode changed mode=\"local\"").unwrap_or_else(|| panic!("the takeover is logged: {log}"));
    assert!(changed < log.find("local rule: switching").unwrap(), "logged before the first switch: {log}");
}

#[test]
fn live_configuration_refuses_a_retained_set_forgets_a_key_on_null_and_writes_nothing_for_a_repeat() {
    use std::os::unix::fs::MetadataExt;
    let Rig { broker, dev, obs } = Rig::new(1000);
    let report = |obs: &Observer, done: &dyn Fn(&serde_json::Value) -> bool| {
        obs.wait_on(&dev.topic("config"), 10 * S, |m| m.last().is_some_and(|m| done(&m.json())))
    };
    // A set left retained on the broker (a script's mistake) would apply again at every session.
    obs.publish(&dev.topic("config/set"), r#"{"sensor": {"interval_ms": 300}}"#, true);
    let mut d = dev.spawn();
    let r = report(&obs, &|v| !v["refused"].is_null());
    let last = r.last().unwrap().json();
    assert!(last["refused"]["reason"].as_str().unwrap().contains("retained"), "{last}");
    assert_eq!(last["sensor"]["interval_ms"], 1000, "nothing changed");
    obs.publish(&dev.topic("config/set"), "", true);

    // A change is kept; the same change again, a hundred times, writes nothing more.
    obs.publish(&dev.topic("config/set"), r#"{"sensor": {"interval_ms": 2000}}"#, false);
    report(&obs, &|v| v["sensor"]["interval_ms"] == 2000);
    let kept = dev.queue().join("config.json");
    wait_until(10 * S, || kept.exists(), "the change kept on disk");
    let written = std::fs::metadata(&kept).unwrap().ino();
    let reports = obs.on(&dev.topic("config")).len();
    for _ in 0..100 {
        obs.publish(&dev.topic("config/set"), r#"{"sensor": {"interval_ms": 2000}}"#, false);
    }
    obs.wait_on(&dev.topic("config"), 10 * S, |m| m.len() >= reports + 100);
    assert_eq!(d.stop_with(libc::SIGTERM, 5 * S).0.code(), Some(0));
    assert_eq!(std::fs::metadata(&kept).unwrap().ino(), written, "a repeat rewrote the kept file");

    // `null` forgets the key: the file's value again, also after a restart.
    let late = Observer::new(broker.port, &dev.topic("#"));
    let mut d = dev.spawn();
    report(&late, &|v| v["sensor"]["interval_ms"] == 2000);
    late.publish(&dev.topic("config/set"), r#"{"sensor": {"interval_ms": null}}"#, false);
    report(&late, &|v| v["sensor"]["interval_ms"] == 1000 && v["refused"].is_null());
    assert_eq!(d.stop_with(libc::SIGTERM, 5 * S).0.code(), Some(0));
    let again = Observer::new(broker.port, &dev.topic("#"));
    let _d = dev.spawn();
    report(&again, &|v| v["sensor"]["interval_ms"] == 1000);
}

#[test]
fn under_3_1_1_a_retained_message_too_large_to_read_cannot_keep_the_device_reconnecting() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 100, "");
    // 17 MiB retained on a topic the device subscribes to: more than it can read even to reject.
    let big = dev.dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 17 << 20]).unwrap();
    let topic = dev.topic("config/set");
    let port = broker.port.to_string();
    let sent = std::process::Command::new("mosquitto_pub")
        .args(["-p", &port, "-t", &topic, "-r", "-f", big.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(sent.success());
    // (Not `#`: the observer could not read that message either.)
    let obs = Observer::new(broker.port, &dev.topic("telemetry"));
    let status = Observer::new(broker.port, &dev.topic("status"));
    let d = dev.spawn_with(&[("NIGHTLIGHT__MQTT__PROTOCOL", "3.1.1")]);
    // Readings flow (each observed once the broker took it), commands still arrive.
    obs.wait_on(&dev.topic("telemetry"), 30 * S, |m| {
        m.iter().filter_map(|m| m.json()["seq"].as_u64()).collect::<std::collections::BTreeSet<_>>().len() >= 30
    });
    obs.publish(&dev.topic("commands"), r#"{"led_on": true}"#, false);
    assert!(d.wait_stdout_lines(1, 5 * S).iter().any(|l| l.starts_with("led on")));
    let connects = status.on(&dev.topic("status")).iter().filter(|m| m.text() == "online").count();
    assert!(connects <= 4, "{connects} connections: the oversized message kept it reconnecting");
    assert!(d.stderr().contains(&format!("subscription {topic}")), "names the subscription: {}", d.stderr());
}
