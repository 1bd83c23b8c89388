//! The device loop in process: `device::run_with` with the simulated sensor and LED, on
//! tokio's paused time, so minutes of the device's life take milliseconds and no test sleeps.
//! With a broker, it is the demo's embedded one on a free port ([`Rig`]), watched by a rumqttc
//! client; the wall clock is given to the device ([`Wall`]), so "synchronized" is said per test,
//! not through the environment. Commands (fresh, stale, retained, hostile), live configuration,
//! the local rule and Home Assistant's discovery run here. What needs a process of its own
//! (signals, kill -9, sd_notify, TLS, a full disk, Mosquitto's own features) stays in the
//! spawned-binary tests.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nightlight::clock::Wall;
use nightlight::config::{Config, LedKind, Pattern, PowerOn, Protocol, SensorKind};
use nightlight::device::Io;
use nightlight::led::simulated::SimulatedLed;
use nightlight::sensor::simulated::SimulatedSensor;
use tokio::sync::watch;

/// The virtual LED's lines, shared with the test.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn get(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect()
    }
}

/// A device on `port` (nothing listens there unless the test says so) reading `light` every
/// second, its queue in `dir`.
fn config(dir: &std::path::Path, port: u16, light: u16) -> Config {
    let mut cfg = Config { id: "loop".into(), ..Config::default() };
    cfg.mqtt.host = "127.0.0.1".into();
    cfg.mqtt.port = port;
    // The embedded broker and the hand-made one below speak 3.1.1.
    cfg.mqtt.protocol = Protocol::V311;
    cfg.sensor.kind = SensorKind::Virtual;
    cfg.sensor.interval_ms = 1000;
    cfg.sensor.simulated.pattern = Pattern::Constant;
    cfg.sensor.simulated.value = light;
    cfg.led.kind = LedKind::Virtual;
    cfg.homeassistant.enabled = false;
    cfg.queue.dir = dir.display().to_string();
    cfg
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs the device until the returned sender says stop; the LED's lines.
fn start(cfg: Config) -> (watch::Sender<bool>, Lines, tokio::task::JoinHandle<anyhow::Result<()>>) {
    start_with(cfg, Wall::System)
}

/// As [`start`], on the wall clock given.
fn start_with(cfg: Config, wall: Wall) -> (watch::Sender<bool>, Lines, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let (stop, mut stopped) = watch::channel(false);
    let lines = Lines::default();
    let sensor = SimulatedSensor::new(&cfg.sensor.simulated);
    let control = sensor.control();
    let led = SimulatedLed::new(lines.clone());
    let task = tokio::spawn(nightlight::device::run_with(
        cfg,
        Default::default(),
        Io { sensor: Box::new(sensor), simulated: Some(control), led: Box::new(led), wall },
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    (stop, lines, task)
}

async fn stop(stop: watch::Sender<bool>, task: tokio::task::JoinHandle<anyhow::Result<()>>) {
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn with_no_broker_the_local_rule_switches_the_led_after_local_after_s_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), closed_port(), 100); // dark
    cfg.led.local_after_s = 60;
    let (tx, lines, task) = start(cfg);
    tokio::time::sleep(Duration::from_secs(58)).await;
    assert!(lines.get().is_empty(), "not before local_after_s: {:?}", lines.get());
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(lines.get(), ["led on"], "the device's own rule, 60 s after it lost its broker");
    stop(tx, task).await;
}

#[tokio::test(start_paused = true)]
async fn the_led_starts_as_it_was_kept_and_auto_follows_the_first_reading() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), closed_port(), 900); // bright
    cfg.led.local_after_s = 0;
    std::fs::write(dir.path().join("led"), "on\n").unwrap();
    let (tx, lines, task) = start(cfg.clone());
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(lines.get(), ["led on"], "power_on = last: as it was kept");
    stop(tx, task).await;

    let mut auto = cfg.clone();
    auto.led.power_on = PowerOn::Auto;
    let (tx, lines, task) = start(auto.clone());
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The kept state is not used; the first reading (900, bright) keeps it off: no line.
    assert!(lines.get().is_empty(), "{:?}", lines.get());
    stop(tx, task).await;
    auto.sensor.simulated.value = 100;
    let (tx, lines, task) = start(auto);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(lines.get(), ["led on"], "auto: on from the first (dark) reading");
    stop(tx, task).await;
}

#[tokio::test(start_paused = true)]
async fn readings_taken_with_no_broker_are_kept_on_disk_for_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), closed_port(), 500);
    let (tx, _, task) = start(cfg.clone());
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop(tx, task).await;
    let q = nightlight::DiskQueue::open(dir.path(), cfg.queue.max_bytes, Duration::from_millis(cfg.queue.spill_ms))
        .unwrap();
    let n = q.stats().readings;
    assert!((30..=32).contains(&n), "one reading a second for 30 s, all on disk: {n}");
}

#[tokio::test(start_paused = true)]
async fn after_an_outage_the_device_connects_within_its_backoff_bound_and_delivers_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let mut cfg = config(dir.path(), port, 500);
    cfg.mqtt.reconnect_min_ms = 500;
    cfg.mqtt.reconnect_max_ms = 4000;
    let (tx, _, task) = start(cfg);
    tokio::time::sleep(Duration::from_secs(60)).await; // 60 readings queue; backoff reaches its cap

    // The demo's broker comes up on that port, with a subscriber.
    let broker = nightlight::broker::Broker::bind(([127, 0, 0, 1], port).into()).await.unwrap();
    tokio::spawn(broker.run());
    let mut opts = rumqttc::MqttOptions::new("watcher", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 100);
    client.subscribe("loop/telemetry", rumqttc::QoS::AtLeastOnce).await.unwrap();
    let mut seqs = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(4000 + 1000 + 2000);
    while seqs.len() < 60 {
        let ev = tokio::time::timeout_at(deadline, events.poll()).await;
        match ev {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p)))) => {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                seqs.push(v["seq"].as_u64().unwrap());
            }
            Ok(_) => {}
            Err(_) => panic!("not connected within the 4 s backoff cap (+ jitter): {} readings", seqs.len()),
        }
    }
    seqs.sort_unstable();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "in order, none missing: {seqs:?}");
    stop(tx, task).await;
}

/// Bytes in the queue's segment files.
fn on_disk(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[tokio::test(start_paused = true)]
async fn online_a_reading_the_broker_does_not_acknowledge_within_spill_ms_goes_to_disk_and_not_before() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A broker that accepts the connection and never acknowledges a publish.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await; // CONNECT
        s.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap(); // CONNACK, accepted
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            let _ = n; // subscriptions and publishes, never answered
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), port, 500);
    cfg.queue.spill_ms = 2000;
    let (tx, _, task) = start(cfg);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The first reading came before the CONNACK (offline: written at once); the one at 1 s did
    // not touch the disk.
    let before = on_disk(dir.path());
    assert!(before <= 32, "online, within spill_ms: nothing more touches the disk ({before} bytes)");
    // At 6 s the readings of 1 s to 4 s are past their 2 s.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let after = on_disk(dir.path());
    assert!(after >= before + 2 * 32, "unacknowledged past spill_ms: written ({before} -> {after} bytes)");
    stop(tx, task).await;
}

/// The demo's embedded broker on a free port, and a watcher of everything the device says
/// (`loop/#`), of Home Assistant's prefix and of the controllers' statuses. The watcher's event
/// loop runs in a task of its own, so it keeps its connection alive while a test waits for
/// something else (a stop, say) and the paused clock jumps ahead.
struct Rig {
    port: u16,
    client: rumqttc::AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Event>,
    /// Every message the watcher saw, in order: topic and payload.
    seen: Vec<(String, String)>,
}

/// How long (on the paused clock) a wait for a message may take before the test fails.
const BOUND: Duration = Duration::from_secs(300);

impl Rig {
    async fn new() -> Self {
        let broker = nightlight::broker::Broker::bind(([127, 0, 0, 1], 0).into()).await.unwrap();
        let port = broker.local_addr().unwrap().port();
        tokio::spawn(broker.run());
        let mut opts = rumqttc::MqttOptions::new("watcher", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(60));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await.unwrap_or_else(|e| panic!("the watcher lost the broker: {e}"));
                if tx.send(ev).is_err() {
                    return; // the test is over
                }
            }
        });
        let filters = ["loop/#", "homeassistant/#", "nightlight/#"];
        for f in filters {
            client.subscribe(f, rumqttc::QoS::AtLeastOnce).await.unwrap();
        }
        let mut rig = Rig { port, client, events, seen: Vec::new() };
        // Nothing the device says may come before the watcher listens.
        let mut acked = 0;
        while acked < filters.len() {
            if let rumqttc::Event::Incoming(rumqttc::Incoming::SubAck(_)) = rig.poll().await {
                acked += 1;
            }
        }
        rig
    }

    async fn poll(&mut self) -> rumqttc::Event {
        let deadline = tokio::time::Instant::now() + BOUND;
        match tokio::time::timeout_at(deadline, self.events.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => panic!("the watcher lost the broker; seen: {:#?}", self.seen),
            Err(_) => panic!("nothing happened for {BOUND:?}; seen: {:#?}", self.seen),
        }
    }

    /// The next message on `topic` whose payload passes `pred` (earlier ones are passed over).
    async fn wait(&mut self, topic: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + BOUND;
        loop {
            assert!(tokio::time::Instant::now() < deadline, "no such message on {topic}; seen: {:#?}", self.seen);
            if let rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p)) = self.poll().await {
                let text = String::from_utf8_lossy(&p.payload).into_owned();
                self.seen.push((p.topic.clone(), text.clone()));
                if p.topic == topic && pred(&text) {
                    return text;
                }
            }
        }
    }

    /// Publishes, and waits until the broker has it (the watcher's own PUBACK).
    async fn send(&mut self, topic: &str, payload: &str, retain: bool) {
        self.client.publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload.as_bytes().to_vec()).await.unwrap();
        while !matches!(self.poll().await, rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_))) {}
    }

    /// A device on this broker, reading `light`, its state in `dir`.
    fn config(&self, dir: &std::path::Path, light: u16) -> Config {
        config(dir, self.port, light)
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(start_paused = true)]
async fn a_command_switches_the_led_and_the_retained_state_says_so() {
    let mut rig = Rig::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (tx, lines, task) = start(rig.config(dir.path(), 500));
    rig.wait("loop/status", |p| p == "online").await;
    rig.wait("loop/state", |p| json(p)["led_on"] == false).await;

    rig.send("loop/commands", r#"{"led_on": true}"#, false).await;
    rig.wait("loop/state", |p| json(p)["led_on"] == true).await;
    assert_eq!(lines.get(), ["led on"]);
    rig.send("loop/commands", r#"{"led_on": false, "ts": 1}"#, false).await;
    rig.wait("loop/state", |p| json(p)["led_on"] == false).await;
    assert_eq!(lines.get(), ["led on", "led off"], "without a synchronized clock a command's age is not judged");
    stop(tx, task).await;
}

#[tokio::test(start_paused = true)]
async fn with_a_synchronized_clock_stale_retained_and_hostile_commands_are_ignored_and_counted() {
    let mut rig = Rig::new().await;
    // Retained before the device subscribes: the broker hands it over marked retained.
    rig.send("loop/commands", r#"{"led_on": true}"#, true).await;
    let dir = tempfile::tempdir().unwrap();
    let (tx, lines, task) = start_with(rig.config(dir.path(), 500), Wall::fixed(0, true));
    rig.wait("loop/status", |p| p == "online").await;
    let hour_ago = nightlight::clock::unix_ms() - 3_600_000;
    rig.send("loop/commands", &format!(r#"{{"led_on": true, "ts": {hour_ago}}}"#), false).await;
    rig.send("loop/commands", "on", false).await;
    rig.send("loop/commands", r#"{"led_on": "yes"}"#, false).await;
    rig.send("loop/commands", &format!("{}{}", "[".repeat(5000), "]".repeat(5000)), false).await;
    // Health goes out every minute: the five show there.
    let health = rig.wait("loop/health", |p| json(p)["rejected_commands"] == 5).await;
    assert!(lines.get().is_empty(), "none of them switched the LED: {:?} ({health})", lines.get());
    // A fresh one still works, so nothing above stopped the device.
    let now = nightlight::clock::unix_ms();
    rig.send("loop/commands", &format!(r#"{{"led_on": true, "ts": {now}}}"#), false).await;
    rig.wait("loop/state", |p| json(p)["led_on"] == true).await;
    assert_eq!(lines.get(), ["led on"]);
    stop(tx, task).await;
}

#[tokio::test(start_paused = true)]
async fn a_live_change_applies_at_once_survives_a_restart_and_a_retained_one_is_refused() {
    let mut rig = Rig::new().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = rig.config(dir.path(), 500);
    let (tx, _, task) = start(cfg.clone());
    rig.wait("loop/config", |p| json(p)["sensor"]["interval_ms"] == 1000).await;

    rig.send("loop/config/set", r#"{"sensor": {"interval_ms": 5000}}"#, false).await;
    let report = rig.wait("loop/config", |p| json(p)["sensor"]["interval_ms"] == 5000).await;
    assert!(json(&report)["refused"].is_null(), "{report}");
    // Readings now come 5 s apart (on the paused clock, as the device sees time).
    rig.wait("loop/telemetry", |_| true).await;
    let at = tokio::time::Instant::now();
    rig.wait("loop/telemetry", |_| true).await;
    let gap = at.elapsed();
    assert!(gap >= Duration::from_millis(4900) && gap <= Duration::from_millis(5100), "{gap:?}");
    stop(tx, task).await;

    // Retained, it would be applied again at every new session: refused, nothing changed. (Sent
    // while the device is away: to a standing subscription a broker hands it on unmarked.)
    rig.send("loop/config/set", r#"{"sensor": {"interval_ms": 2000}}"#, true).await;
    // Kept in the state directory: the next start has it before anything is set.
    let (tx, _, task) = start(cfg);
    let report = rig.wait("loop/config", |p| !json(p)["refused"].is_null()).await;
    let v = json(&report);
    assert_eq!(v["sensor"]["interval_ms"], 5000, "{report}");
    assert!(v["refused"]["reason"].as_str().unwrap().contains("retained"), "{report}");
    rig.send("loop/config/set", "", true).await; // clear it for the broker's sake
    stop(tx, task).await;
}

#[tokio::test(start_paused = true)]
async fn when_its_controller_goes_offline_the_device_takes_over_after_local_after_s_and_not_before() {
    let mut rig = Rig::new().await;
    rig.send("nightlight/controller/c1/status", "online", true).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = rig.config(dir.path(), 100); // dark
    cfg.led.local_after_s = 60;
    let (tx, lines, task) = start(cfg);
    rig.wait("loop/state", |p| json(p)["mode"] == "remote").await;
    assert!(lines.get().is_empty(), "attended: only commands switch the LED: {:?}", lines.get());

    rig.send("nightlight/controller/c1/status", "offline", true).await;
    let gone = tokio::time::Instant::now();
    let state = rig.wait("loop/state", |p| json(p)["mode"] == "local").await;
    let waited = gone.elapsed();
    assert_eq!(json(&state)["led_on"], true, "dark: the device's own rule switches it on ({state})");
    assert!(waited >= Duration::from_secs(60) && waited <= Duration::from_secs(62), "{waited:?}");
    assert_eq!(lines.get(), ["led on"]);
    stop(tx, task).await;
}

#[tokio::test(start_paused = true)]
async fn home_assistant_gets_its_discovery_at_connect_and_again_soon_after_its_birth_message() {
    let mut rig = Rig::new().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = rig.config(dir.path(), 500);
    cfg.homeassistant.enabled = true;
    let (tx, _, task) = start(cfg);
    let disc = json(&rig.wait("homeassistant/device/loop/config", |p| !p.is_empty()).await);
    assert_eq!(disc["avty"][0]["t"].as_str().or(disc["avty_t"].as_str()).unwrap_or("loop/status"), "loop/status");
    let cmps = disc["cmps"].as_object().expect("components");
    let platforms: Vec<&str> = cmps.values().filter_map(|c| c["p"].as_str()).collect();
    assert!(platforms.contains(&"light") && platforms.contains(&"sensor"), "{platforms:?}");
    rig.wait("loop/telemetry", |_| true).await;

    // Home Assistant restarted: it lost every entity until the device announces itself again.
    rig.send("homeassistant/status", "online", false).await;
    let born = tokio::time::Instant::now();
    let again = rig.wait("homeassistant/device/loop/config", |p| !p.is_empty()).await;
    let waited = born.elapsed();
    assert_eq!(json(&again), disc);
    assert!(waited >= Duration::from_millis(500) && waited <= Duration::from_millis(5100), "{waited:?}");
    stop(tx, task).await;
}
