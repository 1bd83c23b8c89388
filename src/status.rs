//! `nightlight status`: connects to the broker as a short-lived observer, reads the device's
//! retained `<id>/status`, `<id>/state` and `<id>/health`, and prints them for a person or as
//! JSON. It never publishes.

use std::time::Duration;

use anyhow::{anyhow, bail};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde::Serialize;

use crate::config::Config;
use crate::homeassistant::Health;
use crate::payload::{self, LedState, Topics};

/// How long to wait for retained messages after the subscription is acknowledged.
const RETAINED_GRACE: Duration = Duration::from_millis(700);
/// How long connecting may take before the broker counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the broker holds for one device.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Snapshot {
    pub id: String,
    pub status: Option<String>,
    pub state: Option<LedState>,
    pub health: Option<Health>,
}

/// Reads the device's retained messages.
///
/// # Errors
/// The broker cannot be reached or refuses the connection (the message names it).
pub async fn fetch(cfg: &Config) -> anyhow::Result<Snapshot> {
    let topics = Topics::new(&cfg.id);
    let broker = format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port);
    let host = &cfg.mqtt.host;
    let mut opts =
        MqttOptions::new(format!("{}-status-{:08x}", cfg.id, fastrand::u32(..)), &cfg.mqtt.host, cfg.mqtt.port);
    opts.set_clean_session(true).set_keep_alive(Duration::from_secs(10));
    crate::link::apply_security(&mut opts, cfg)?;
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let mut snap = Snapshot { id: cfg.id.clone(), ..Snapshot::default() };
    let mut deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        let ev = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => break,
            Ok(Err(e)) => bail!("cannot read from the broker at {broker}: {}", crate::link::describe_for(&e, host)),
            Ok(Ok(ev)) => ev,
        };
        match ev {
            Event::Incoming(Incoming::ConnAck(_)) => {
                for t in [&topics.status, &topics.state, &topics.health] {
                    client.subscribe(t.clone(), QoS::AtLeastOnce).await.map_err(|e| anyhow!("subscribe: {e}"))?;
                }
            }
            Event::Incoming(Incoming::SubAck(_)) => {
                deadline = tokio::time::Instant::now() + RETAINED_GRACE;
            }
            Event::Incoming(Incoming::Publish(p)) => {
                if p.topic == topics.status {
                    snap.status = Some(String::from_utf8_lossy(&p.payload).into_owned());
                } else if p.topic == topics.state {
                    snap.state = payload::parse_state(&p.payload).ok();
                } else if p.topic == topics.health {
                    snap.health = serde_json::from_slice(&p.payload).ok();
                }
                if snap.status.is_some() && snap.state.is_some() && snap.health.is_some() {
                    break;
                }
            }
            _ => {}
        }
    }
    let _ = client.try_disconnect();
    Ok(snap)
}

/// The snapshot for a person.
pub fn render(snap: &Snapshot, broker: &str) -> String {
    let mut out = format!("{:<14}{} (broker {broker})\n", "device", snap.id);
    let line = |k: &str, v: String| format!("{k:<14}{v}\n");
    out += &line("status", snap.status.clone().unwrap_or_else(|| "unknown (no retained status)".into()));
    out += &line(
        "LED",
        snap.state.map_or_else(|| "unknown".into(), |s| if s.led_on { "on".into() } else { "off".into() }),
    );
    if let Some(h) = &snap.health {
        out += &line("uptime", human_duration(h.uptime_s));
        out += &line(
            "queue",
            format!(
                "{} readings ({} bytes on disk), {} dropped, {} disk errors{}",
                h.queue_readings,
                h.queue_bytes,
                h.dropped,
                h.queue_errors,
                if h.seq_durable { "" } else { "; seq from the wall clock (queue meta not writable)" }
            ),
        );
        out += &line("sensor errors", h.sensor_errors.to_string());
        out += &line("rejected cmds", h.rejected_commands.to_string());
        out += &line("reconnects", h.reconnects.to_string());
        out += &line("mode", h.mode.clone());
        out += &line("last error", h.last_error.clone().unwrap_or_else(|| "none".into()));
    } else {
        out += &line("health", "unknown (no retained health)".into());
    }
    out
}

fn human_duration(s: u64) -> String {
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h {m:02}m")
    } else {
        format!("{h}h {m:02}m {s:02}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_shows_state_and_health_for_a_person() {
        let snap = Snapshot {
            id: "porch".into(),
            status: Some("online".into()),
            state: Some(LedState { led_on: true }),
            health: Some(Health {
                uptime_s: 3723,
                queue_readings: 5,
                queue_bytes: 120,
                dropped: 0,
                queue_errors: 0,
                seq_durable: true,
                sensor_errors: 2,
                rejected_commands: 1,
                reconnects: 3,
                last_error: None,
                mode: "local".into(),
            }),
        };
        let text = render(&snap, "localhost:1883");
        assert!(text.contains("online") && text.contains("LED           on"), "{text}");
        assert!(
            text.contains("1h 02m 03s")
                && text.contains("5 readings")
                && text.contains("reconnects    3")
                && text.contains("mode          local"),
            "{text}"
        );
        let empty = render(&Snapshot { id: "x".into(), ..Snapshot::default() }, "h:1");
        assert!(empty.contains("unknown (no retained status)"));
    }
}
