//! `nightlight server`: the lesson's controller as a long-running MQTT client.
//!
//! Subscribes to every device's telemetry (`+/telemetry`, or `$share/<group>/+/telemetry` so
//! several controllers split a fleet) and state (`+/state`), feeds them to [`Controller`], and
//! publishes the commands it decides on. It never touches sensor or LED code. It announces
//! itself on `nightlight/controller/<client id>/status` (retained `online`; `offline` is its
//! Last Will; a clean stop clears it), which the devices' local rule counts.

use std::future::Future;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::Config;
use crate::controller::{Command, Controller};
use crate::link::{self, Backoff};
use crate::payload;

/// The telemetry fields the controller reads; the rest is ignored.
#[derive(Debug, Deserialize)]
struct Reading {
    light: u16,
    #[serde(default)]
    ts: u64,
}

/// The subscription for telemetry: shared when `server.shared_group` is set.
pub fn telemetry_filter(shared_group: &str) -> String {
    if shared_group.is_empty() {
        "+/telemetry".to_owned()
    } else {
        format!("$share/{shared_group}/+/telemetry")
    }
}

/// Runs the controller until `shutdown` completes.
///
/// # Errors
/// The password file cannot be read.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client_id = if cfg.mqtt.client_id.is_empty() {
        format!("nightlight-server-{:08x}", fastrand::u32(..))
    } else {
        cfg.mqtt.client_id.clone()
    };
    let mut opts = MqttOptions::new(&client_id, &cfg.mqtt.host, cfg.mqtt.port);
    opts.set_keep_alive(Duration::from_secs(cfg.mqtt.keep_alive_s))
        // A generated client id cannot resume a session; a configured one may.
        .set_clean_session(cfg.mqtt.client_id.is_empty() || cfg.mqtt.clean_session)
        .set_max_packet_size(link::MAX_INCOMING_BYTES, link::MAX_OUTGOING_BYTES);
    // Devices count the controllers online on these (the local rule): `offline` if this process
    // dies, nothing left behind on a clean stop.
    let status_topic = crate::local::controller_status_topic(&client_id);
    opts.set_last_will(rumqttc::LastWill::new(&status_topic, "offline", QoS::AtLeastOnce, true));
    link::apply_security(&mut opts, &cfg)?;
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let host = cfg.mqtt.host.clone();
    eventloop.set_network_options(link::network_options());

    // The event loop runs alone in its task (never cancelled); events come here.
    let (events_tx, mut events_rx) = mpsc::channel(256);
    let mut backoff = Backoff::new(
        Duration::from_millis(cfg.mqtt.reconnect_min_ms),
        Duration::from_millis(cfg.mqtt.reconnect_max_ms),
    );
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(ev) => {
                    if matches!(ev, Event::Incoming(Incoming::ConnAck(_))) {
                        backoff.reset();
                    }
                    if events_tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    if events_tx.send(Err(link::describe_for(&e, &host))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    });

    let broker = format!("{}:{}", cfg.mqtt.host, cfg.mqtt.port);
    let filter = telemetry_filter(&cfg.server.shared_group);
    let mut controller = Controller::new(cfg.server.threshold, cfg.server.hysteresis);
    let mut last_error: Option<String> = None;
    info!(broker = %broker, threshold = cfg.server.threshold, hysteresis = cfg.server.hysteresis,
        telemetry = %filter, "controller started");
    tokio::pin!(shutdown);
    loop {
        let ev = tokio::select! {
            _ = &mut shutdown => break,
            ev = events_rx.recv() => match ev { Some(ev) => ev, None => break },
        };
        match ev {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                info!(broker = %broker, status = %status_topic, "connected");
                last_error = None;
                if let Err(e) = client.publish(&status_topic, QoS::AtLeastOnce, true, "online").await {
                    warn!(topic = %status_topic, error = %e, "cannot announce this controller");
                }
                for f in [filter.as_str(), "+/state"] {
                    if let Err(e) = client.subscribe(f, QoS::AtLeastOnce).await {
                        warn!(filter = f, error = %e, "cannot subscribe");
                    }
                }
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                let Some((id, leaf)) = p.topic.rsplit_once('/') else { continue };
                let cmd = match leaf {
                    "telemetry" => match serde_json::from_slice::<Reading>(&p.payload) {
                        Ok(r) => controller.on_reading(id, r.light, r.ts),
                        Err(e) => {
                            warn!(topic = %p.topic, error = %e, "ignored a reading that is not telemetry");
                            None
                        }
                    },
                    "state" => payload::parse_state(&p.payload).ok().and_then(|s| controller.on_state(id, s.led_on)),
                    _ => None,
                };
                if let Some(Command { id, on }) = cmd {
                    info!(device = %id, led_on = on, "sending command");
                    let topic = format!("{id}/commands");
                    if let Err(e) = client
                        .publish(
                            topic,
                            QoS::AtLeastOnce,
                            false,
                            payload::Command { led_on: on, ts: Some(crate::clock::unix_ms()) }.to_json(),
                        )
                        .await
                    {
                        warn!(device = %id, error = %e, "cannot send command");
                    }
                }
            }
            Ok(_) => {}
            Err(reason) => {
                if last_error.as_deref() != Some(reason.as_str()) {
                    warn!(broker = %broker, reason = %reason, "disconnected; retrying with backoff");
                }
                last_error = Some(reason);
            }
        }
    }
    let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, Vec::new());
    let _ = client.try_disconnect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    poller.abort();
    info!("controller stopped");
    Ok(())
}
