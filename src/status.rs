//! `nightlight status`: connects to the broker as a short-lived observer, reads the device's
//! retained `<id>/status`, `<id>/state` and `<id>/health`, and prints them for a person or as
//! JSON. It never publishes.

use std::time::Duration;

use anyhow::bail;
use serde::Serialize;

use crate::config::Config;
use crate::link::{self, Event, Poller, Security, Spec};
use crate::payload::Health;
use crate::payload::{self, LedState};
use crate::topics::{self, Topics};

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
    /// The retained `<id>/update/state`, when updates are on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update: Option<crate::update::state::UpdateState>,
}

/// Reads the device's retained messages.
///
/// # Errors
/// The broker cannot be reached or refuses the connection (the message names it).
pub async fn fetch(cfg: &Config, security: &Security) -> anyhow::Result<Snapshot> {
    let topics = Topics::new(&cfg.id);
    let broker = cfg.mqtt.broker();
    let spec = Spec::observer(&format!("{}-status", cfg.id));
    let (client, eventloop) = link::build(&cfg.mqtt, security, &spec);
    let mut poller = Poller::new(eventloop);
    let mut snap = Snapshot { id: cfg.id.clone(), ..Snapshot::default() };
    let mut deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    'read: loop {
        poller.start();
        let Ok(events) = tokio::time::timeout_at(deadline, poller.next()).await else { break };
        for ev in events {
            match ev {
                Err(e) => bail!("cannot read from the broker at {broker}: {}", e.describe(&cfg.mqtt.host)),
                Ok(Event::Connected { .. }) => {
                    // Health last: a broker sends the retained messages in this order, and health
                    // is what ends the wait (a device without updates has no update state).
                    client.subscribe(&[
                        topics.status.clone(),
                        topics.state.clone(),
                        topics.update_state.clone(),
                        topics.health.clone(),
                    ])?;
                }
                Ok(Event::Subscribed { .. }) => deadline = tokio::time::Instant::now() + RETAINED_GRACE,
                Ok(Event::Message(m)) => {
                    if m.topic == topics.status {
                        snap.status = Some(String::from_utf8_lossy(&m.payload).into_owned());
                    } else if m.topic == topics.state {
                        snap.state = payload::parse_state(&m.payload).ok();
                    } else if m.topic == topics.health {
                        snap.health = serde_json::from_slice(&m.payload).ok();
                    } else if m.topic == topics.update_state {
                        snap.update = serde_json::from_slice(&m.payload).ok();
                    }
                    if snap.status.is_some() && snap.state.is_some() && snap.health.is_some() {
                        break 'read;
                    }
                }
                Ok(_) => {}
            }
        }
    }
    poller.close(&client, Duration::from_millis(300)).await;
    Ok(snap)
}

/// How `nightlight status --read` got its reading.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// MQTT 5: the device's answer on our response topic (telemetry's fields, or `error`).
    Reply(serde_json::Value),
    /// MQTT 3.1.1 has no response topic: the first reading on `<id>/telemetry` after asking.
    Telemetry(serde_json::Value),
}

/// Asks the device for a reading now (`<id>/read`) and waits up to `wait` for it: under MQTT 5
/// with a response topic of our own below `<id>/reply/` (where `docs/mosquitto.acl` lets a
/// device answer) and random correlation data.
///
/// # Errors
/// The broker cannot be reached, or no answer came in time (the message says what to check).
pub async fn read(cfg: &Config, security: &Security, wait: Duration) -> anyhow::Result<Answer> {
    let topics = Topics::new(&cfg.id);
    let broker = cfg.mqtt.broker();
    let spec = Spec::observer(&format!("{}-read", cfg.id));
    let reply = link::Reply {
        topic: topics::reply(&cfg.id, &spec.client_id),
        correlation: Some(bytes::Bytes::from(format!("{:016x}", fastrand::u64(..)))),
    };
    let (client, eventloop) = link::build(&cfg.mqtt, security, &spec);
    let mut poller = Poller::new(eventloop);
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT + wait;
    let mut v5 = false;
    let answer = 'read: loop {
        poller.start();
        let Ok(events) = tokio::time::timeout_at(deadline, poller.next()).await else { break None };
        for ev in events {
            match ev {
                Err(e) => bail!("cannot read from the broker at {broker}: {}", e.describe(&cfg.mqtt.host)),
                Ok(Event::Connected { .. }) => {
                    v5 = client.protocol() == crate::config::Protocol::V5;
                    let listen = if v5 { reply.topic.clone() } else { topics.telemetry.clone() };
                    client.subscribe(&[listen])?;
                }
                // Listening: now ask.
                Ok(Event::Subscribed { .. }) => client.publish_request(&topics.read, &reply, b"read".to_vec())?,
                Ok(Event::Message(m)) => {
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) else { continue };
                    if v5 && m.topic == reply.topic && m.correlation == reply.correlation {
                        break 'read Some(Answer::Reply(v));
                    }
                    if !v5 && m.topic == topics.telemetry {
                        break 'read Some(Answer::Telemetry(v));
                    }
                }
                Ok(_) => {}
            }
        }
    };
    poller.close(&client, Duration::from_millis(300)).await;
    match answer {
        Some(a) => Ok(a),
        None => bail!(
            "no reading from {} within {} s: is it online (nightlight status), and may it write {}/reply/# (docs/mosquitto.acl)?",
            cfg.id,
            wait.as_secs(),
            cfg.id
        ),
    }
}

/// A reading for a person: `light 412 (0-1000)`, lux if any, when it was taken and its seq.
pub fn render_reading(v: &serde_json::Value) -> String {
    if let Some(e) = v["error"].as_str() {
        return format!("the sensor failed: {}\n", payload::printable(e, 200));
    }
    let mut out = format!("light {} (0-1000)", v["light"]);
    if let Some(lux) = v["lux"].as_f64() {
        out += &format!(", {lux:.1} lx");
    }
    if let Some(ts) = v["ts"].as_u64() {
        out += &format!(", taken {}", crate::clock::rfc3339_utc(ts / 1000));
    }
    if v["ts_ok"] == false {
        out += " (by a clock not yet synchronized)";
    }
    if let Some(seq) = v["seq"].as_u64() {
        out += &format!(", seq {seq}");
    }
    out + "\n"
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
                "{} readings ({} bytes on disk{}), {} dropped, {} disk errors{}{}",
                h.queue_readings,
                h.queue_bytes,
                if h.queue_readings > 0 && h.queue_oldest_age_s > 0 {
                    format!(", oldest waiting {}", human_duration(h.queue_oldest_age_s))
                } else {
                    String::new()
                },
                h.dropped,
                h.queue_errors,
                if h.seq_durable { "" } else { "; seq from the wall clock (queue meta not writable)" },
                if h.queue_durable { "" } else { "; NOT DURABLE: queue.dir is in memory or unusable" }
            ),
        );
        out += &line("sensor errors", h.sensor_errors.to_string());
        out += &line("rejected cmds", h.rejected_commands.to_string());
        out += &line("reconnects", h.reconnects.to_string());
        out += &line("protocol", format!("MQTT {}", h.protocol));
        out += &line("denied", format!("{} readings refused by the broker (its ACL?)", h.denied));
        out += &line("mode", h.mode.clone());
        out += &line("last error", h.last_error.clone().unwrap_or_else(|| "none".into()));
    } else {
        out += &line("health", "unknown (no retained health)".into());
    }
    if let Some(u) = &snap.update {
        out += &line("update", render_update(u));
    }
    out
}

/// One line for the update's state.
pub fn render_update(u: &crate::update::state::UpdateState) -> String {
    use crate::update::state::Phase;
    let to = u.to.as_deref().unwrap_or("?");
    let reason = u.reason.as_deref().map(|r| format!(": {}", payload::printable(r, 300))).unwrap_or_default();
    match u.state {
        Phase::Idle => format!("none under way (running {}){reason}", u.version),
        Phase::Downloading => format!("downloading {to}, {} %", u.percent.unwrap_or(0)),
        Phase::Verifying => format!("verifying {to}"),
        Phase::Installing => format!("installing {to}"),
        Phase::Gating => format!("health gate of {to}"),
        Phase::Done => format!("done: {} -> {to}, running {}", u.from.as_deref().unwrap_or("?"), u.version),
        Phase::RolledBack => format!("{to} rolled back, running {}{reason}", u.version),
        Phase::Failed => format!("{to} failed, running {}{reason}", u.version),
    }
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
                started: None,
                queue_readings: 5,
                queue_bytes: 120,
                queue_oldest_age_s: 0,
                storage_written_bytes: 0,
                storage_syncs: 0,
                dropped: 0,
                queue_errors: 0,
                seq_durable: true,
                queue_durable: true,
                sensor_errors: 2,
                rejected_commands: 1,
                reconnects: 3,
                denied: 0,
                requests_limited: 0,
                last_error: None,
                mode: "local".into(),
                protocol: "5".into(),
            }),
            update: None,
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
        assert!(!empty.contains("update"), "no update line without updates: {empty}");
    }

    #[test]
    fn a_rolled_back_update_is_one_line_with_its_reason() {
        use crate::update::state::{Phase, UpdateState};
        let u = UpdateState::toward(Phase::RolledBack, "0.1.0", "0.2.0")
            .with_reason("the new version failed the health gate: did not deliver readings within 60 s");
        let snap = Snapshot { id: "x".into(), update: Some(u), ..Snapshot::default() };
        let text = render(&snap, "h:1");
        let line = text.lines().find(|l| l.starts_with("update")).unwrap();
        assert_eq!(
            line,
            "update        0.2.0 rolled back, running 0.1.0: the new version failed the health gate: did not deliver \
             readings within 60 s"
        );
    }
}
