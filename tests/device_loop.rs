//! The device loop in process: `device::run_with` with the simulated sensor and LED, on
//! tokio's paused time, so minutes of the device's life take milliseconds and no test sleeps.
//! What needs a process of its own (signals, kill -9, sd_notify, TLS, a full disk) stays in
//! the spawned-binary tests.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nightlight::config::{Config, LedKind, Pattern, PowerOn, Protocol, SensorKind};
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
    let (stop, mut stopped) = watch::channel(false);
    let lines = Lines::default();
    let sensor = SimulatedSensor::new(&cfg.sensor.simulated);
    let control = sensor.control();
    let led = SimulatedLed::new(lines.clone());
    let task = tokio::spawn(nightlight::device::run_with(
        cfg,
        Default::default(),
        Box::new(sensor),
        Some(control),
        Box::new(led),
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
