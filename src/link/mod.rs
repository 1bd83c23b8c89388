//! The MQTT link, for every role: the device, the controller (`nightlight server`),
//! `nightlight status` and the demo's view build their client here ([`client::build`]) and
//! drive it one way ([`Poller`]), under MQTT 5 (the default) or 3.1.1 (`mqtt.protocol`).
//!
//! # Parts
//! - [`client`]: what a role asks for ([`Spec`]), the client handle and the event loop as one
//!   type each whichever protocol rumqttc speaks, and its events translated ([`Event`]).
//! - [`Poller`] (here): drives the event loop without ever cancelling it.
//! - [`inflight`]: which publish a packet id stands for (pure).
//! - [`security`]: credentials and TLS, loaded once at start.
//! - [`error`]: why a connection failed, in words ([`LinkError`]).
//! - [`backoff`]: exponential backoff with jitter.
//!
//! # Sizes
//! Incoming messages up to [`MAX_INCOMING_BYTES`] are read (and a command above
//! [`crate::payload::MAX_COMMAND_BYTES`] is rejected by its handler). Under MQTT 5 this limit
//! is the Maximum Packet Size of CONNECT, so the broker itself drops anything larger, retained
//! or not, and it never reaches us. Under 3.1.1 the broker cannot be told: a larger message ends
//! the connection, and the owner reconnects once to the same session with the limit raised to
//! read it and reject it ([`EventLoop::set_max_incoming`]), so it costs no command and no loop.
//!
//! # Driving the event loop
//! `EventLoop::poll` is not cancel-safe (a write cut short can be repeated), so it never sits in
//! a `select!`: [`Poller`] moves the event loop into a short task that polls until rumqttc has
//! no buffered events, then hands the loop back with the batch. The owner reacts to a batch with
//! the event loop in hand, so after an error it can drop rumqttc's own replay list: for the
//! device the durable queue, not rumqttc, decides what is re-sent. [`Poller::close`] is the one
//! clean stop: DISCONNECT after everything handed before it, then the events until it is written.

pub mod backoff;
pub mod client;
pub mod error;
pub mod inflight;
pub mod security;

use std::time::Duration;

use tokio::task::JoinHandle;

pub use backoff::Backoff;
pub use client::{build, Client, Event, EventLoop, Message, Qos, Spec};
pub use error::{LinkError, RequestError};
pub use inflight::{InFlight, Sent};
pub use security::{Security, SecurityError};

/// The largest message read; see the module docs.
pub const MAX_INCOMING_BYTES: usize = 256 * 1024;
/// Outgoing packets are small: telemetry, state, status, discovery.
pub const MAX_OUTGOING_BYTES: usize = 16 * 1024;
/// The most a 3.1.1 connection raises its limit to read an oversized message and reject it;
/// anything larger costs the session instead.
pub const MAX_RECOVERY_BYTES: usize = 16 * 1024 * 1024;
/// Events taken from rumqttc per poll task.
const POLL_BATCH: usize = 64;

type PollOutput = (EventLoop, Vec<Result<Event, LinkError>>);

/// Owns the event loop between polls; see the module docs.
pub struct Poller {
    idle: Option<EventLoop>,
    running: Option<JoinHandle<PollOutput>>,
    /// Polling starts again at this moment (a failed connection's backoff).
    retry_at: Option<tokio::time::Instant>,
}

impl Poller {
    /// A poller for `eventloop`, not yet polling.
    pub fn new(eventloop: EventLoop) -> Self {
        Poller { idle: Some(eventloop), running: None, retry_at: None }
    }

    /// Starts a poll task if none is running and no retry is scheduled.
    pub fn start(&mut self) {
        if self.retry_at.is_some() {
            return;
        }
        if let Some(mut el) = self.idle.take() {
            self.running = Some(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let r = el.poll().await;
                    let failed = r.is_err();
                    out.push(r);
                    if failed || !el.has_buffered_events() || out.len() >= POLL_BATCH {
                        return (el, out);
                    }
                }
            }));
        }
    }

    /// Polls again (connects again) only after `delay`: the backoff after a failed
    /// connection. The event loop stays idle, and in hand, until then.
    pub fn start_after(&mut self, delay: Duration) {
        self.retry_at = Some(tokio::time::Instant::now() + delay);
    }

    /// Waits for the scheduled start, if any, then for the running poll task, and returns its
    /// events; with neither, never completes. Cancel-safe.
    pub async fn next(&mut self) -> Vec<Result<Event, LinkError>> {
        if let Some(at) = self.retry_at {
            tokio::time::sleep_until(at).await;
            self.retry_at = None;
            self.start();
        }
        let Some(handle) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        // Panics abort the process (release profile), so a join error is a cancelled runtime.
        let (el, events) = handle.await.expect("poll task is never cancelled");
        self.running = None;
        self.idle = Some(el);
        events
    }

    /// The event loop, while no poll task is running.
    pub fn eventloop(&mut self) -> Option<&mut EventLoop> {
        self.idle.as_mut()
    }

    /// Forgets everything rumqttc would replay or still send: after a connection error, the
    /// queue re-sends what was not acknowledged.
    pub fn forget_unsent(&mut self) {
        if let Some(el) = self.idle.as_mut() {
            el.forget_unsent();
        }
    }

    /// A clean stop: asks for DISCONNECT (after everything handed before) and polls until it is
    /// written, the connection fails or `grace` is up. Returns the events seen before it.
    pub async fn close(&mut self, client: &Client, grace: Duration) -> Vec<Result<Event, LinkError>> {
        client.disconnect();
        let deadline = tokio::time::Instant::now() + grace;
        let mut seen = Vec::new();
        self.start();
        while let Ok(events) = tokio::time::timeout_at(deadline, self.next()).await {
            for ev in events {
                match ev {
                    Ok(Event::DisconnectWritten) | Err(_) => return seen,
                    other => seen.push(other),
                }
            }
            self.start();
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MqttConfig, Protocol};

    #[test]
    fn forgetting_unsent_work_also_clears_a_parked_collision() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let mqtt = MqttConfig { protocol, port: 1, host: "127.0.0.1".into(), ..MqttConfig::default() };
            let (_client, mut el) = build(&mqtt, &Security::default(), &Spec::new(&mqtt, "t".into(), true));
            match &mut el {
                EventLoop::V4(el) => {
                    el.state.collision =
                        Some(rumqttc::Publish::new("t/telemetry", rumqttc::QoS::AtLeastOnce, b"{}".to_vec()))
                }
                EventLoop::V5(el) => {
                    el.state.collision = Some(rumqttc::v5::mqttbytes::v5::Publish::new(
                        "t/telemetry",
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                        b"{}".to_vec(),
                        None,
                    ))
                }
            }
            let mut poller = Poller::new(el);
            poller.forget_unsent();
            let cleared = match poller.eventloop().expect("idle") {
                EventLoop::V4(el) => el.state.collision.is_none() && el.pending.is_empty(),
                EventLoop::V5(el) => el.state.collision.is_none() && el.pending.is_empty(),
            };
            assert!(cleared, "{protocol:?}: a parked publish would stop the next connection sending");
        }
    }
}
