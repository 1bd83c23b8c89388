//! `nightlight demo` (virtual builds): the whole lesson in one process. It only composes: an
//! embedded MQTT broker ([`crate::broker`]) on 127.0.0.1, a virtual device with a fast daylight
//! cycle that reaches the broker through a network it can cut ([`relay`]), the controller, a view
//! that watches the broker like any other client ([`view`]) and the page that shows it ([`web`]).

pub mod relay;
pub mod view;
pub mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::broker::Broker;
use crate::config::{Config, LedKind, Pattern, SensorKind};
use crate::led::simulated::SimulatedLed;
use crate::link::Security;
use crate::sensor::simulated::SimulatedSensor;

/// The demo device's id and its day: a 12 s day, so dusk (LED on) and dawn (LED off) come
/// within seconds of each other.
const DEMO_ID: &str = "demo";
const DAY_S: u64 = 12;
const INTERVAL_MS: u64 = 200;

/// Runs broker, device, controller and view until `shutdown` completes.
///
/// # Errors
/// The port is in use (the message names it and suggests `--port`), or the device or the
/// controller fails.
pub async fn run(port: u16, web_port: u16, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let broker = match Broker::bind(addr).await {
        Ok(b) => b,
        Err(e) => bail!(
            "cannot listen on 127.0.0.1:{port} ({e}): is another broker running? Try `nightlight demo --port {}`",
            port.wrapping_add(1).max(1024)
        ),
    };
    let web = match TcpListener::bind(("127.0.0.1", web_port)).await {
        Ok(l) => l,
        Err(e) => bail!(
            "cannot serve the page on 127.0.0.1:{web_port} ({e}): Try `nightlight demo --web-port {}` (0 picks a free port)",
            web_port.wrapping_add(1).max(1024)
        ),
    };
    let web_addr = web.local_addr()?;
    let broker = tokio::spawn(broker.run());
    // The device's own way to the broker, which the page's Network switch cuts.
    let (device_addr, network, relay) = relay::bind(addr).await?;
    let relay = tokio::spawn(relay);

    let queue_dir = private_dir().context("cannot make the demo's state directory")?;
    let mut cfg = Config { id: DEMO_ID.into(), ..Config::default() };
    cfg.mqtt.host = "127.0.0.1".into();
    cfg.mqtt.port = device_addr.port();
    // Back soon after the network is: the queue drains while a person watches.
    cfg.mqtt.reconnect_min_ms = 250;
    cfg.mqtt.reconnect_max_ms = 2000;
    cfg.sensor.kind = SensorKind::Virtual;
    cfg.sensor.interval_ms = INTERVAL_MS;
    cfg.sensor.simulated.pattern = Pattern::Daylight;
    cfg.sensor.simulated.value = 500;
    cfg.sensor.simulated.period_s = DAY_S;
    cfg.led.kind = LedKind::Virtual;
    cfg.homeassistant.enabled = false;
    cfg.queue.dir = queue_dir.display().to_string();

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let sensor = SimulatedSensor::new(&cfg.sensor.simulated);
    let control = sensor.control();
    // The view shows the LED; the device's own LED lines would garble it.
    let led = SimulatedLed::new(std::io::sink());
    let device = tokio::spawn(crate::device::run_with(
        cfg.clone(),
        Security::default(),
        crate::device::Io {
            sensor: Box::new(sensor),
            simulated: Some(control.clone()),
            led: Box::new(led),
            wall: crate::clock::Wall::System,
        },
        stopped(stop_rx.clone()),
    ));
    let mut server_cfg = cfg.clone();
    server_cfg.mqtt.port = port;
    let controller =
        tokio::spawn(crate::server::run(server_cfg.clone(), Security::default(), stopped(stop_rx.clone())));
    let board = Arc::new(view::Board::default());
    let app = Arc::new(web::App {
        id: DEMO_ID.into(),
        threshold: cfg.server.threshold,
        hysteresis: cfg.server.hysteresis,
        board: board.clone(),
        control: control.clone(),
        network: network.clone(),
    });
    let page = tokio::spawn(web::serve(web, app));
    println!(
        "nightlight demo: open http://{web_addr}/ for the page. Broker on 127.0.0.1:{port}, device \"{DEMO_ID}\", \
         LED on below {}. Watch it with: mosquitto_sub -p {port} -t '#' -v   (Ctrl-C stops)",
        cfg.server.threshold
    );
    let local = view::Local { control, network };
    let threshold = cfg.server.threshold;
    let view = tokio::spawn(async move {
        view::run(&server_cfg.mqtt, DEMO_ID, threshold, &board, local, stopped(stop_rx.clone())).await;
    });

    shutdown.await;
    let _ = stop_tx.send(true);
    let (d, c, _) = tokio::join!(device, controller, view);
    page.abort();
    relay.abort();
    broker.abort();
    let _ = std::fs::remove_dir_all(&queue_dir);
    d.map_err(|e| anyhow!("device task: {e}"))??;
    c.map_err(|e| anyhow!("controller task: {e}"))??;
    Ok(())
}

/// A new directory of this user's alone (mode 0700) under the temporary directory, with a name
/// nobody can guess: a path another local user made first (a directory of symlinks to the
/// victim's files, say) is never taken over, since `mkdir` refuses one that exists.
fn private_dir() -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut last = None;
    for _ in 0..16 {
        let path =
            std::env::temp_dir().join(format!("nightlight-demo-{}-{:016x}", std::process::id(), fastrand::u64(..)));
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("the loop ran"))
}
