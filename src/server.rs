//! `nightlight server`: the lesson's controller as a long-running MQTT client.
//!
//! Subscribes to every device's telemetry (`+/telemetry`, or `$share/<group>/+/telemetry` so
//! several controllers split a fleet) and state (`+/state`), feeds them to [`Controller`], and
//! publishes the commands it decides on. It never touches sensor or LED code. It announces
//! itself on `nightlight/controller/<client id>/status` (retained `online`; `offline` is its
//! Last Will; a clean stop clears it), which the devices' local rule counts.

use std::future::Future;
use std::time::Duration;

use serde::Deserialize;
use tracing::{debug, info, trace, warn};

use crate::config::Config;
use crate::controller::{Command, Controller};
use crate::link::{self, Backoff, Event, Poller, Qos, Security, Spec};
use crate::payload;
use crate::topics;

/// How long a clean stop waits for the broker to take the emptied status.
const STOP_GRACE: Duration = Duration::from_millis(1000);

/// The telemetry fields the controller reads; the rest is ignored.
#[derive(Debug, Deserialize)]
struct Reading {
    light: u16,
    #[serde(default)]
    ts: u64,
}

/// Runs the controller until `shutdown` completes.
///
/// # Errors
/// None yet: a broker that cannot be reached is retried with backoff.
pub async fn run(cfg: Config, security: Security, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client_id = if cfg.mqtt.client_id.is_empty() {
        format!("nightlight-server-{:08x}", fastrand::u32(..))
    } else {
        cfg.mqtt.client_id.clone()
    };
    // Devices count the controllers online on these (the local rule): `offline` if this process
    // dies, nothing left behind on a clean stop.
    let status_topic = topics::controller_status(&client_id);
    // A generated client id cannot resume a session; a configured one may.
    let clean = cfg.mqtt.client_id.is_empty() || cfg.mqtt.clean_session;
    let mut spec = Spec::new(&cfg.mqtt, client_id, clean);
    spec.will = Some((status_topic.clone(), b"offline".to_vec()));
    let (client, eventloop) = link::build(&cfg.mqtt, &security, &spec);
    let mut poller = Poller::new(eventloop);
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.mqtt.reconnect_min_ms),
        Duration::from_millis(cfg.mqtt.reconnect_max_ms),
    );
    // A command the broker could not deliver in time is worth nothing (MQTT 5 message expiry).
    let expiry = u32::try_from(cfg.led.command_max_age_s).ok().filter(|s| *s > 0);

    let broker = cfg.mqtt.broker();
    let filter = topics::all_telemetry(&cfg.server.shared_group);
    let mut controller = Controller::new(cfg.server.threshold, cfg.server.hysteresis);
    if !cfg.server.shared_group.is_empty() {
        controller = controller.shared();
    }
    let mut last_error: Option<String> = None;
    let mut connected = false;
    // What this instance did, said at its stop (and every second at debug level, so a killed
    // instance's share is known too): with a shared group, the instances' readings add up to
    // the fleet's.
    let (mut readings, mut commands) = (0u64, 0u64);
    let mut tally = tokio::time::interval(Duration::from_secs(1));
    tally.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(broker = %broker, threshold = cfg.server.threshold, hysteresis = cfg.server.hysteresis,
        telemetry = %filter, "controller started");
    tokio::pin!(shutdown);
    poller.start();
    loop {
        let events = tokio::select! {
            _ = &mut shutdown => break,
            events = poller.next() => events,
            _ = tally.tick(), if tracing::enabled!(tracing::Level::DEBUG) => {
                debug!(readings, commands, "decided so far");
                continue;
            }
        };
        let mut failed = false;
        for ev in events {
            match ev {
                Ok(Event::Connected { .. }) => {
                    info!(broker = %broker, status = %status_topic, "connected");
                    last_error = None;
                    connected = true;
                    backoff.reset();
                    // Listening first, then `online`: the broker handles a connection's packets
                    // in order, so a device that sees this controller online is already heard.
                    if let Err(e) = client.subscribe(&[filter.clone(), topics::ALL_STATES.to_owned()]) {
                        warn!(error = %e, "cannot subscribe");
                    }
                    if let Err(e) = client.publish(&status_topic, Qos::AtLeastOnce, true, b"online".to_vec()) {
                        warn!(topic = %status_topic, error = %e, "cannot announce this controller");
                    }
                }
                Ok(Event::Message(m)) => {
                    let Some((id, leaf)) = m.topic.rsplit_once('/') else { continue };
                    let ignored = controller.ignored();
                    let cmd = match leaf {
                        "telemetry" => match serde_json::from_slice::<Reading>(&m.payload) {
                            Ok(r) => {
                                readings += 1;
                                trace!(device = %payload::printable(id, 80), light = r.light, "reading");
                                controller.on_reading(id, r.light, r.ts)
                            }
                            Err(e) => {
                                warn!(topic = %m.topic, error = %e, "ignored a reading that is not telemetry");
                                None
                            }
                        },
                        "state" => {
                            payload::parse_state(&m.payload).ok().and_then(|s| controller.on_state(id, s.led_on))
                        }
                        _ => None,
                    };
                    if ignored == 0 && controller.ignored() > 0 {
                        warn!(max = crate::controller::MAX_DEVICES, device = %payload::printable(id, 80),
                            "tracking as many devices as a controller may: messages from more are ignored (use server.shared_group to share the fleet)");
                    }
                    if let Some(Command { id, on }) = cmd {
                        commands += 1;
                        info!(device = %id, led_on = on, "sending command");
                        let json = payload::Command { led_on: on, ts: Some(crate::clock::unix_ms()) }.to_json();
                        let topic = topics::commands(&id);
                        if let Err(e) = client.publish_expiring(&topic, Qos::AtLeastOnce, false, json, expiry) {
                            warn!(device = %id, error = %e, "cannot send command");
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let reason = e.describe(&cfg.mqtt.host);
                    if last_error.as_deref() != Some(reason.as_str()) {
                        warn!(broker = %broker, reason = %reason, "disconnected; retrying with backoff");
                    }
                    last_error = Some(reason);
                    connected = false;
                    failed = true;
                }
            }
        }
        if failed {
            poller.start_after(backoff.next_delay());
        } else {
            poller.start();
        }
    }
    if connected {
        let _ = client.publish(&status_topic, Qos::AtLeastOnce, true, Vec::new());
        poller.close(&client, STOP_GRACE).await;
    }
    info!(readings, commands, "controller stopped");
    Ok(())
}
