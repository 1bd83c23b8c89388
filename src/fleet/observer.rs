//! The fleet's observer: a client of its own that reads every reading the broker delivers
//! (`+/telemetry`, QoS 1, a session the broker keeps), so lost and duplicated readings are
//! counted from what arrived, not from what was sent ([`super::tally`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::mqttbytes::v4::{PubAck, Subscribe};
use rumqttc::mqttbytes::QoS;
use rumqttc::Packet;
use tokio::sync::watch;

use super::conn::{Conn, Hello};
use super::tally::Seen;

/// What the observer saw, per device.
pub type Sightings = Arc<Mutex<Vec<Seen>>>;

/// Connects, subscribes, and says so on `ready`; then reads until `stop`. Reconnects (the
/// broker restarts in a scenario) to the same session, so what arrived meanwhile is delivered.
pub async fn run(
    broker: String,
    devices: usize,
    seen: Sightings,
    ready: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let client_id = format!("fleet-observer-{}", std::process::id());
    loop {
        let hello = Hello { client_id: &client_id, keep_alive_s: 30, clean: false, will: None };
        let mut conn = match Conn::open(&broker, &hello, Duration::from_secs(5)).await {
            Ok((c, _)) => c,
            Err(_) => {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
        };
        let mut sub = Subscribe::new(crate::topics::all_telemetry(""), QoS::AtLeastOnce);
        sub.pkid = 1;
        if conn.send(&Packet::Subscribe(sub)).await.is_err() {
            continue;
        }
        let mut ping = tokio::time::interval(Duration::from_secs(15));
        loop {
            let packet = tokio::select! {
                _ = stop.changed() => return,
                _ = ping.tick() => match conn.send(&Packet::PingReq).await {
                    Ok(()) => continue,
                    Err(_) => break,
                },
                p = conn.recv() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            match packet {
                Packet::SubAck(_) => {
                    let _ = ready.send(true);
                }
                Packet::Publish(p) => {
                    if let Some((index, seq)) = reading(&p.topic, &p.payload, devices) {
                        seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[index].saw(seq);
                    }
                    if p.qos == QoS::AtLeastOnce && conn.send(&Packet::PubAck(PubAck::new(p.pkid))).await.is_err() {
                        break;
                    }
                }
                _ => {}
            }
        }
    }
}

/// `fleet-NNNNN/telemetry` and its `seq`: which device, which reading.
fn reading(topic: &str, payload: &[u8], devices: usize) -> Option<(usize, u64)> {
    #[derive(serde::Deserialize)]
    struct R {
        seq: u64,
    }
    let index: usize = topic.strip_prefix("fleet-")?.strip_suffix("/telemetry")?.parse().ok()?;
    let r: R = serde_json::from_slice(payload).ok()?;
    (index < devices).then_some((index, r.seq))
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_fleet_devices_readings_are_counted() {
        let p = br#"{"light":1,"ts":2,"seq":7,"run":3}"#;
        assert_eq!(super::reading("fleet-00042/telemetry", p, 100), Some((42, 7)));
        assert_eq!(super::reading("fleet-00042/telemetry", p, 10), None, "not one of this fleet");
        assert_eq!(super::reading("porch/telemetry", p, 100), None);
        assert_eq!(super::reading("fleet-00001/telemetry", b"{}", 100), None);
    }
}
