//! End to end: `nightlight server` against a real Mosquitto with real devices, and
//! `nightlight demo` with its embedded broker.

mod common;

use std::time::Duration;

use common::*;

fn server(port: u16, extra_env: &[(&str, &str)]) -> Daemon {
    let port = port.to_string();
    let mut env = vec![
        ("NIGHTLIGHT_CONFIG", "/dev/null"),
        ("NIGHTLIGHT__MQTT__HOST", "127.0.0.1"),
        ("NIGHTLIGHT__MQTT__PORT", port.as_str()),
        ("NIGHTLIGHT__MQTT__RECONNECT_MIN_MS", "50"),
        ("NIGHTLIGHT__MQTT__RECONNECT_MAX_MS", "400"),
        ("NIGHTLIGHT__SENSOR__KIND", "virtual"),
        ("NIGHTLIGHT__LED__KIND", "virtual"),
    ];
    env.extend_from_slice(extra_env);
    let d = Daemon::spawn(&["server"], &env);
    d.wait_stderr("connected", 10 * S);
    d
}

fn commands(obs: &Observer, topic: &str) -> Vec<bool> {
    obs.on(topic).iter().filter_map(|m| m.json()["led_on"].as_bool()).collect()
}

#[test]
fn dark_turns_the_led_on_bright_off_and_the_band_changes_nothing() {
    let Rig { broker, dev, obs } = Rig::new(100);
    // The controller's trace line for each reading it decided on: what "nothing was sent" waits for.
    let srv = server(broker.port, &[("RUST_LOG", "info,nightlight::server=trace")]);
    let decided = |light: u16, n: usize| srv.wait_stderr_count(&format!("light={light}"), n, 10 * S);
    // Bright at first: no command.
    let d = dev.spawn_with(&[("NIGHTLIGHT__SENSOR__VIRTUAL__VALUE", "600")]);
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= 5);
    assert!(commands(&obs, &dev.topic("commands")).is_empty(), "600 is bright: no command");
    obs.publish(&dev.topic("virtual/light"), "100", false); // dark
    let lines = d.wait_stdout_lines(1, 5 * S);
    assert!(lines[0].starts_with("led on"), "{lines:?}");
    decided(100, 5);
    assert_eq!(commands(&obs, &dev.topic("commands")), vec![true], "one command, not one per dark reading");
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let ts = obs.on(&dev.topic("commands"))[0].json()["ts"].as_u64().expect("the controller stamps ts");
    assert!(now_ms.abs_diff(ts) < 60_000, "ts is when it was sent: {ts} vs {now_ms}");

    obs.publish(&dev.topic("virtual/light"), "310", false); // inside the band: nothing
    decided(310, 5);
    assert_eq!(commands(&obs, &dev.topic("commands")), vec![true], "no command inside the hysteresis band");
    obs.publish(&dev.topic("virtual/light"), "700", false);
    let lines = d.wait_stdout_lines(2, 5 * S);
    assert!(lines[1].starts_with("led off"), "{lines:?}");
    decided(700, 5);
    assert_eq!(commands(&obs, &dev.topic("commands")), vec![true, false], "one command per change");
}

#[test]
fn a_device_that_restarts_in_the_wrong_state_is_corrected() {
    let Rig { broker, dev, obs } = Rig::new(100);
    let _srv = server(broker.port, &[]);
    let mut d = dev.spawn();
    d.wait_stdout_lines(1, 10 * S); // dark: on
    d.stop_with(libc::SIGTERM, 5 * S);
    obs.clear();
    let d = dev.spawn(); // comes back with the LED off
    let lines = d.wait_stdout_lines(1, 10 * S);
    assert!(lines[0].starts_with("led on"), "corrected: {lines:?}");
}

#[test]
fn two_controllers_in_a_shared_group_never_both_act_on_one_reading() {
    let broker = Mosquitto::start("");
    let obs = Observer::new(broker.port, "#");
    let env = [("NIGHTLIGHT__SERVER__SHARED_GROUP", "fleet"), ("RUST_LOG", "info,nightlight::server=trace")];
    let (a, b) = (server(broker.port, &env), server(broker.port, &env));
    // Each controller's trace line for each reading it decided on.
    let decided = || a.stderr().matches("light=50").count() + b.stderr().matches("light=50").count();
    // Each controller says `online` once it has subscribed.
    obs.wait_on_prefix("nightlight/controller/", 10 * S, 2);
    // One dark reading for each of 20 devices: each reading reaches one controller only.
    for i in 0..20 {
        obs.publish(&format!("fleet{i}/telemetry"), r#"{"light": 50, "ts": 1, "seq": 1}"#, false);
    }
    obs.wait_on_prefix("fleet", 10 * S, 40);
    wait_until(10 * S, || decided() >= 20, "both controllers' decisions");
    let cmds = obs.all().into_iter().filter(|m| m.topic.ends_with("/commands")).count();
    assert_eq!(cmds, 20, "one command per reading, not one per controller");
    assert_eq!(decided(), 20, "each reading reached one controller of the group");
}

#[test]
fn demo_runs_headless_shows_both_commands_to_outside_clients_and_stops_on_sigint() {
    let (mut d, port) = demo();
    let obs = Observer::new(port, "#");
    obs.wait_on("demo/commands", 30 * S, |m| {
        let v: Vec<bool> = m.iter().filter_map(|m| m.json()["led_on"].as_bool()).collect();
        v.contains(&true) && v.contains(&false)
    });
    assert!(!obs.on("demo/telemetry").is_empty());
    let out = d.stdout().join("\n");
    assert!(out.contains("open http://127.0.0.1:"), "the page's address is printed:\n{out}");
    assert!(
        out.contains("command led_on=true") && out.contains("telemetry light="),
        "plain lines when not a terminal:\n{out}"
    );
    let (status, took) = d.stop_with(libc::SIGINT, 5 * S);
    assert_eq!(status.code(), Some(0), "{}", d.stderr());
    assert!(took < 3 * S);
}

#[test]
fn the_demo_keeps_its_state_in_a_new_directory_of_its_own_and_removes_it() {
    use std::os::unix::fs::PermissionsExt;
    // A shared machine: another user may create paths in the temporary directory first.
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut d = Daemon::spawn(
        &["demo", "--port", &port.to_string(), "--web-port", "0"],
        &[("TMPDIR", tmp.path().to_str().unwrap())],
    );
    let obs = Observer::new(port, "demo/telemetry");
    obs.wait_on("demo/telemetry", 10 * S, |m| !m.is_empty());
    let dirs: Vec<std::path::PathBuf> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let name = dirs[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert!(name.starts_with(&format!("nightlight-demo-{}-", d.pid())), "not guessable from the pid alone: {name}");
    let meta = std::fs::symlink_metadata(&dirs[0]).unwrap();
    assert!(meta.is_dir(), "a directory, not a symlink");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700, "this user's alone");
    assert_eq!(d.stop_with(libc::SIGINT, 5 * S).0.code(), Some(0));
    assert!(!dirs[0].exists(), "removed at the end");
}

#[test]
fn demo_on_a_busy_port_says_so_and_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let (code, _, err) = run_to_end(&["demo", "--port", &port, "--web-port", "0"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&port) && err.contains("--port"), "{err}");
}

#[test]
fn demo_on_a_busy_web_port_says_so_and_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let web = taken.local_addr().unwrap().port().to_string();
    let (code, _, err) = run_to_end(&["demo", "--port", &free_port().to_string(), "--web-port", &web], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&web) && err.contains("--web-port"), "{err}");
}

/// Runs `nightlight demo` on a free port and waits until its broker accepts connections.
fn demo() -> (Daemon, u16) {
    let port = free_port();
    let d = Daemon::spawn(&["demo", "--port", &port.to_string(), "--web-port", "0"], &[]);
    let deadline = std::time::Instant::now() + 10 * S;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "demo broker did not start: {}", d.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    (d, port)
}

#[test]
fn demo_broker_gives_standard_clients_retained_messages_qos_2_delivery_and_last_wills() {
    let (_d, port) = demo();
    let p = port.to_string();
    // Once the device is online, a late subscriber gets its retained status, as from any broker.
    Observer::new(port, "demo/status").wait_on("demo/status", 10 * S, |m| !m.is_empty());
    let obs = Observer::new(port, "demo/status");
    let status = obs.wait_on("demo/status", 10 * S, |m| !m.is_empty());
    assert_eq!(status[0].text(), "online");
    assert!(status[0].retain, "delivered as a retained message");

    let obs = Observer::new(port, "x/#");
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-p", &p, "-q", "2", "-t", "x/q2", "-m", "exactly once"])
        .output()
        .expect("mosquitto_pub runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(obs.wait_on("x/q2", 5 * S, |m| !m.is_empty())[0].text(), "exactly once");

    // A client that vanishes without DISCONNECT has its will published.
    let mut opts = rumqttc::MqttOptions::new("doomed", "127.0.0.1", port);
    opts.set_last_will(rumqttc::LastWill::new("x/will", "gone", rumqttc::QoS::AtLeastOnce, false));
    let (_client, mut conn) = rumqttc::Client::new(opts, 10);
    let connected = conn.iter().next().expect("an event");
    assert!(matches!(connected, Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_)))), "{connected:?}");
    drop(conn); // the socket closes without DISCONNECT
    assert_eq!(obs.wait_on("x/will", 5 * S, |m| !m.is_empty())[0].text(), "gone");

    // A client that stays connected but falls silent past 1.5 times its keep-alive is dropped
    // and its will published, even while the broker keeps sending it telemetry: a client whose
    // network died does not linger.
    let mut connect = rumqttc::Connect::new("silent");
    connect.keep_alive = 1;
    connect.last_will = Some(rumqttc::LastWill::new("x/silent", "timed out", rumqttc::QoS::AtMostOnce, false));
    let mut bytes = bytes::BytesMut::new();
    rumqttc::Packet::Connect(connect).write(&mut bytes, 1024).unwrap();
    let subscribe = rumqttc::Subscribe::new("demo/telemetry", rumqttc::QoS::AtMostOnce);
    rumqttc::Packet::Subscribe(subscribe).write(&mut bytes, 1024).unwrap();
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut silent, &bytes).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(obs.wait_on("x/silent", 5 * S, |m| !m.is_empty())[0].text(), "timed out");
    assert!(started.elapsed() >= Duration::from_millis(1400), "not before 1.5 x keep-alive");
    drop(silent);
}

/// One raw HTTP/1.1 request to the demo's page server; the status line and the body.
fn http(port: u16, request: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(5 * S)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// The demo page's port, from the line the demo prints.
fn web_port(d: &Daemon) -> u16 {
    let port = || {
        let out = d.stdout().join("\n");
        out.split("open http://127.0.0.1:").nth(1).and_then(|rest| rest.split('/').next()?.parse::<u16>().ok())
    };
    wait_until(10 * S, || port().is_some(), "the page's address");
    port().unwrap()
}

/// Whether the peer closes `s` within `within` (reads EOF or a reset), sending nothing.
fn closed_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn the_demo_is_bounded_for_a_shared_machine_connections_and_half_sent_requests() {
    use std::io::Write;
    let (_d, port) = demo();
    let web = web_port(&_d);
    // A request whose headers never end is closed after the header timeout (5 s), not held.
    let mut half = std::net::TcpStream::connect(("127.0.0.1", web)).unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
    assert!(closed_within(&mut half, 10 * S), "a half-sent request is held");
    // The broker takes 256 connections at once; the next is closed at once, not after the
    // 5 s it gives a connection to send CONNECT.
    let held: Vec<std::net::TcpStream> =
        (0..256).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let mut one_more = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert!(closed_within(&mut one_more, 2 * S), "a connection past the cap is held");
    drop(held);
    // Room again: a real client connects.
    let obs = Observer::new(port, "demo/telemetry");
    obs.wait_on("demo/telemetry", 10 * S, |m| !m.is_empty());
}

#[test]
fn the_demo_page_answers_only_itself_and_moves_nothing_for_another_origin() {
    let (d, _) = demo();
    let web = web_port(&d);
    let host = format!("Host: 127.0.0.1:{web}\r\nConnection: close\r\n");
    let (status, body) = http(web, &format!("GET / HTTP/1.1\r\n{host}\r\n"));
    assert!(status.ends_with("200 OK") && body.contains(r#"aria-label="Light level""#), "{status}");
    // A page elsewhere can send a simple POST, but not this header without a preflight.
    let (status, _) = http(web, &format!("POST /network?up=false HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n"));
    assert!(status.ends_with("403 Forbidden"), "{status}");
    // A rebinding DNS name reaches 127.0.0.1 with another Host: refused.
    let (status, _) = http(web, "GET / HTTP/1.1\r\nHost: attacker.example:80\r\nConnection: close\r\n\r\n");
    assert!(status.contains("421"), "{status}");
    let (status, _) =
        http(web, &format!("POST /light?level=2000 HTTP/1.1\r\n{host}X-Nightlight: 1\r\nContent-Length: 0\r\n\r\n"));
    assert!(status.ends_with("400 Bad Request"), "{status}");
    let (status, _) =
        http(web, &format!("POST /light?level=20 HTTP/1.1\r\n{host}X-Nightlight: 1\r\nContent-Length: 0\r\n\r\n"));
    assert!(status.ends_with("204 No Content"), "{status}");
}

/// Waits for 30 more readings; fails if any state since the first `states` said `local`.
fn stays_remote_for_30_readings(obs: &Observer, dev: &DeviceDir, states: usize) {
    let at = obs.on(&dev.topic("telemetry")).len();
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= at + 30);
    let since: Vec<String> = obs.on(&dev.topic("state"))[states..].iter().map(|m| m.text()).collect();
    assert!(since.iter().all(|s| !s.contains("local")), "went local with its controller online: {since:?}");
}

#[test]
fn with_no_controller_online_the_device_switches_the_led_itself_until_a_controller_is_back() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 100, ""); // a constant 123: dark
    let obs = Observer::new(broker.port, "#");
    let d = dev.spawn_with(&[("NIGHTLIGHT__LED__LOCAL_AFTER_S", "1")]);
    // Connected, but no controller online: after 1 s the device's own rule switches it on.
    let lines = d.wait_stdout_lines(1, 10 * S);
    assert!(lines[0].starts_with("led on"), "{lines:?}");
    state_is(&obs, &dev, "local", true);
    d.wait_stderr("local rule: switching the LED", 5 * S);

    // A controller announces itself (retained `online`): the device hands over at once.
    let srv = server(broker.port, &[]);
    let status = obs.wait_on_prefix("nightlight/controller/", 10 * S, 1);
    assert_eq!(status[0].text(), "online");
    let late = Observer::new(broker.port, "nightlight/controller/+/status");
    let kept = late.wait_on(&status[0].topic, 5 * S, |m| !m.is_empty());
    assert!(kept[0].retain && kept[0].text() == "online", "retained, for devices that connect later");
    state_is(&obs, &dev, "remote", true);
    // Bright now: the controller, not the device, turns it off.
    obs.publish(&dev.topic("virtual/light"), "900", false);
    state_is(&obs, &dev, "remote", false);
    assert_eq!(commands(&obs, &dev.topic("commands")), vec![false], "the controller's command");

    // The controller dies: its Last Will says offline, and 1 s later the device is in charge.
    drop(srv);
    obs.wait_on(&status[0].topic, 10 * S, |m| m.last().is_some_and(|m| m.text() == "offline"));
    obs.publish(&dev.topic("virtual/light"), "100", false);
    state_is(&obs, &dev, "local", true);
    assert_eq!(commands(&obs, &dev.topic("commands")), vec![false], "no controller sent it");
}

#[test]
fn the_demo_broker_can_be_watched_with_mosquitto_sub_speaking_mqtt_5_or_3_1_1() {
    let (_d, port) = demo();
    let p = port.to_string();
    for version in ["5", "311"] {
        // Three readings, and the retained status that comes with the subscription.
        let out = std::process::Command::new("mosquitto_sub")
            .args(["-V", version, "-p", &p, "-t", "demo/telemetry", "-t", "demo/status", "-v", "-C", "4", "-W", "10"])
            .output()
            .expect("mosquitto_sub runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "-V {version}: {text} {}", String::from_utf8_lossy(&out.stderr));
        assert!(text.lines().any(|l| l == "demo/status online"), "-V {version}: {text}");
        assert!(
            text.lines().filter(|l| l.starts_with("demo/telemetry {\"light\":")).count() >= 3,
            "-V {version}: {text}"
        );
    }
}

#[test]
fn under_mqtt_5_every_command_carries_a_message_expiry_of_command_max_age_s() {
    let broker = Mosquitto::start("");
    let p = broker.port.to_string();
    // mosquitto_sub prints the remaining expiry (%E) a broker forwards with the message.
    // `-d` prints the SUBACK: from then on the broker forwards it what it routes.
    // (`stdbuf -oL`: line by line into the pipe, not at exit.)
    let mut watcher = std::process::Command::new("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-d",
            "-V",
            "5",
            "-p",
            &p,
            "-t",
            "+/commands",
            "-F",
            "%E %p",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_sub runs");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(watcher.stdout.take().unwrap()));
    lines.by_ref().map_while(Result::ok).find(|l| l.contains("received SUBACK")).expect("mosquitto_sub subscribed");
    let _srv =
        server(broker.port, &[("NIGHTLIGHT__MQTT__PROTOCOL", "5"), ("NIGHTLIGHT__LED__COMMAND_MAX_AGE_S", "120")]);
    let obs = Observer::new(broker.port, "#");
    obs.publish("porch/telemetry", r#"{"light": 10, "seq": 1}"#, false); // dark: a command
    let line = lines.map_while(Result::ok).find(|l| l.contains("led_on")).unwrap_or_default();
    let _ = watcher.wait();
    let (expiry, payload) = line.split_once(' ').unwrap_or_else(|| panic!("no command seen: {line:?}"));
    let expiry: u32 = expiry.parse().unwrap_or_else(|_| panic!("no expiry on {line:?}"));
    assert!((100..=120).contains(&expiry), "{line}");
    assert!(payload.contains(r#""led_on":true"#), "{line}");
}

#[test]
fn a_reconnect_that_resumes_the_session_keeps_the_controller_in_charge() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 100, ""); // a constant 123: dark
    let obs = Observer::new(broker.port, "#");
    let d = dev.spawn_with(&[("NIGHTLIGHT__LED__LOCAL_AFTER_S", "1")]);
    let _srv = server(broker.port, &[]);
    state_is(&obs, &dev, "remote", true);
    let online = |m: &[Msg]| m.iter().filter(|m| m.text() == "online").count();
    let connects = online(&obs.on(&dev.topic("status")));

    // Another client takes the device's session for a moment (what a Wi-Fi blip does to the
    // connection): the device connects again, and the broker resumes its session.
    let mut opts = rumqttc::MqttOptions::new(&dev.id, "127.0.0.1", broker.port);
    opts.set_clean_session(false);
    let (intruder, mut conn) = rumqttc::Client::new(opts, 10);
    for ev in conn.iter() {
        if matches!(ev, Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) | Err(_)) {
            break;
        }
    }
    intruder.disconnect().unwrap();
    drop(conn);
    obs.wait_on(&dev.topic("status"), 10 * S, |m| online(m) > connects);
    d.wait_stderr("session_present=true", 10 * S);
    // More than led.local_after_s later the controller is still known to be online.
    stays_remote_for_30_readings(&obs, &dev, obs.on(&dev.topic("state")).len());
}

#[test]
fn a_restart_that_resumes_the_session_learns_that_the_controller_is_online() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 100, ""); // a constant 123: dark
    let obs = Observer::new(broker.port, "#");
    let spawn = || dev.spawn_with(&[("NIGHTLIGHT__LED__LOCAL_AFTER_S", "1")]);
    let _srv = server(broker.port, &[]);
    let mut d = spawn();
    state_is(&obs, &dev, "remote", true);
    assert_eq!(d.stop_with(libc::SIGTERM, 5 * S).0.code(), Some(0));
    // The broker kept the device's session: it connects to it again, and the controller's
    // retained `online` is not sent again unless asked for.
    let d = spawn();
    d.wait_stderr("session_present=true", 10 * S);
    stays_remote_for_30_readings(&obs, &dev, obs.on(&dev.topic("state")).len());
}

#[test]
fn mosquitto_rr_gets_a_reading_from_the_demo_through_its_embedded_broker() {
    let (_d, port) = demo();
    // The demo's device listens once it has said its state (it subscribes first).
    Observer::new(port, "demo/state").wait_on("demo/state", 10 * S, |m| !m.is_empty());
    let asked = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let out = std::process::Command::new("mosquitto_rr")
        .args(["-V", "5", "-p", &port.to_string(), "-t", "demo/read", "-e", "laptop/rr", "-m", "", "-W", "10"])
        .args(["-D", "publish", "correlation-data", "q-9", "-F", "%D %p"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let (correlation, json) = text.trim().split_once(' ').unwrap_or_else(|| panic!("{text:?}"));
    assert_eq!(correlation, "q-9", "the embedded broker forwards the correlation data");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert!(v["ts"].as_u64().unwrap() >= asked && v["light"].is_u64(), "{v}");
}
