//! `nightlight demo` (virtual builds): the whole lesson in one process. It only composes: an
//! embedded MQTT broker ([`crate::broker`]) on 127.0.0.1, a virtual device with a fast daylight cycle, the
//! controller, and a view that watches the broker like any other client.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::sync::watch;

use crate::broker::Broker;
use crate::config::{Config, LedKind, Pattern, SensorKind};
use crate::led::simulated::SimulatedLed;
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
pub async fn run(port: u16, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let broker = match Broker::bind(addr).await {
        Ok(b) => b,
        Err(e) => bail!(
            "cannot listen on 127.0.0.1:{port} ({e}): is another broker running? Try `nightlight demo --port {}`",
            port.wrapping_add(1).max(1024)
        ),
    };
    let broker = tokio::spawn(broker.run());

    let queue_dir = std::env::temp_dir().join(format!("nightlight-demo-{}", std::process::id()));
    let mut cfg = Config { id: DEMO_ID.into(), ..Config::default() };
    cfg.mqtt.host = "127.0.0.1".into();
    cfg.mqtt.port = port;
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
        Box::new(sensor),
        Some(control),
        Box::new(led),
        stopped(stop_rx.clone()),
    ));
    let controller = tokio::spawn(crate::server::run(cfg.clone(), stopped(stop_rx.clone())));
    let view = tokio::spawn(view(port, cfg.server.threshold, stopped(stop_rx.clone())));

    shutdown.await;
    let _ = stop_tx.send(true);
    let (d, c, _) = tokio::join!(device, controller, view);
    broker.abort();
    let _ = std::fs::remove_dir_all(&queue_dir);
    d.map_err(|e| anyhow!("device task: {e}"))??;
    c.map_err(|e| anyhow!("controller task: {e}"))??;
    Ok(())
}

/// What the view knows, all learned from the broker.
#[derive(Debug, Default)]
struct Seen {
    light: Option<u16>,
    led: Option<bool>,
    status: String,
    queue: u64,
    commands: u64,
}

/// Watches the broker and shows the device: a live line on a terminal, plain lines otherwise.
async fn view(port: u16, threshold: u16, shutdown: impl Future<Output = ()>) {
    let mut opts = MqttOptions::new(format!("demo-view-{:08x}", fastrand::u32(..)), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let tty = std::io::stdout().is_terminal();
    let mut seen = Seen { status: "connecting".into(), ..Seen::default() };
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "nightlight demo: broker on 127.0.0.1:{port}, device \"{DEMO_ID}\", LED on below {threshold}. \
         Watch it with: mosquitto_sub -p {port} -t '#' -v   (Ctrl-C stops)"
    );
    tokio::pin!(shutdown);
    loop {
        let ev = tokio::select! {
            _ = &mut shutdown => break,
            ev = eventloop.poll() => ev,
        };
        let line = match ev {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                let _ = client.subscribe(format!("{DEMO_ID}/#"), QoS::AtMostOnce).await;
                None
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap_or_default();
                match p.topic.rsplit('/').next().unwrap_or_default() {
                    "telemetry" => {
                        seen.light = v["light"].as_u64().map(|l| l as u16);
                        Some(format!("telemetry light={} seq={}", v["light"], v["seq"]))
                    }
                    "state" => {
                        seen.led = v["led_on"].as_bool();
                        Some(format!("state led_on={}", v["led_on"]))
                    }
                    "commands" => {
                        seen.commands += 1;
                        Some(format!("command led_on={}", v["led_on"]))
                    }
                    "status" => {
                        seen.status = String::from_utf8_lossy(&p.payload).into_owned();
                        Some(format!("status {}", seen.status))
                    }
                    "health" => {
                        seen.queue = v["queue_readings"].as_u64().unwrap_or(0);
                        None
                    }
                    _ => None,
                }
            }
            Ok(_) => None,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                None
            }
        };
        if tty {
            let _ = write!(out, "\r{}\x1b[K", live_line(&seen, threshold));
        } else if let Some(l) = line {
            let _ = writeln!(out, "{l}");
        }
        let _ = out.flush();
    }
    if tty {
        let _ = writeln!(out);
    }
}

/// One terminal line: the light as a bar with the threshold marked, the LED as a lamp.
fn live_line(s: &Seen, threshold: u16) -> String {
    const WIDTH: usize = 30;
    let light = s.light.unwrap_or(0);
    let filled = usize::from(light.min(1000)) * WIDTH / 1000;
    let mark = usize::from(threshold.min(1000)) * WIDTH / 1000;
    let bar: String = (0..WIDTH)
        .map(|i| {
            if i == mark {
                '|'
            } else if i < filled {
                '#'
            } else {
                '.'
            }
        })
        .collect();
    let lamp = match s.led {
        Some(true) => "\x1b[1;33m(*) ON \x1b[0m",
        Some(false) => "( ) off",
        None => "( ) ?  ",
    };
    format!(
        "light [{bar}] {light:>4} (threshold {threshold})  LED {lamp}  {}  queue {}  commands {}",
        s.status, s.queue, s.commands
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_line_marks_the_threshold_and_lights_the_lamp() {
        let s = Seen { light: Some(500), led: Some(true), status: "online".into(), queue: 0, commands: 2 };
        let l = live_line(&s, 300);
        assert!(l.contains("[#########|#####..............."), "{l}");
        assert!(l.contains("ON") && l.contains("commands 2"), "{l}");
    }
}
