//! The MQTT link, for every role: the device, the controller (`nightlight server`),
//! `nightlight status` and the demo's view build their client here ([`client::build`]) and
//! drive it one way ([`Poller`]), under MQTT 5 (the default) or 3.1.1 (`mqtt.protocol`).
//!
//! # Parts
//! - [`client`]: what a role asks for ([`Spec`]), the client handle and the event loop as one
//!   type each whichever protocol rumqttc speaks, and its events translated ([`Event`]).
//! - [`Poller`] (here): drives the event loop without ever cancelling it.
//! - `v4.rs`, `v5.rs`: each protocol's side through rumqttc (options, requests, events) and every
//!   touch of rumqttc's internals, with the version they were checked against.
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
//! a `select!`: [`Poller`] moves the event loop into a task that polls it and hands the events
//! over in batches (everything rumqttc has buffered), through a channel whose receiving end is
//! cancel-safe. When the connection fails the task stops and hands the event loop back with the
//! error, so the owner reacts to a failure with the event loop in hand: it can drop rumqttc's own
//! replay list (for the device the durable queue, not rumqttc, decides what is re-sent) and choose
//! how the next connection is made. One task per connection, not per batch: a reading costs no
//! task spawn. [`Poller::close`] is the one clean stop: DISCONNECT after everything handed before
//! it, then the events until it is written.

pub mod backoff;
pub mod client;
pub mod error;
pub mod inflight;
pub mod security;
mod v4;
mod v5;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use backoff::Backoff;
pub use client::{build, Client, Event, EventLoop, Message, Qos, Reply, Spec};
pub use error::{LinkError, Lost, RequestError};
pub use inflight::{InFlight, Sent};
pub use security::{Security, SecurityError};

/// The largest message read; see the module docs.
pub const MAX_INCOMING_BYTES: usize = 256 * 1024;
/// Outgoing packets are small: telemetry, state, status, discovery.
pub const MAX_OUTGOING_BYTES: usize = 16 * 1024;
/// The most a 3.1.1 connection raises its limit to read an oversized message and reject it;
/// anything larger costs the session instead.
pub const MAX_RECOVERY_BYTES: usize = 16 * 1024 * 1024;
/// Events taken from rumqttc per batch.
const POLL_BATCH: usize = 64;
/// Batches the poll task may read ahead of its owner.
const BATCHES_AHEAD: usize = 2;

/// What the poll task hands over: events, and after a failure the event loop itself.
struct Batch {
    events: Vec<Result<Event, LinkError>>,
    /// The connection failed (the last event is its error): polling stopped.
    handback: Option<EventLoop>,
}

/// Owns the event loop between polls; see the module docs.
pub struct Poller {
    /// In hand: before the first start, and after a failed connection until polling again.
    idle: Option<EventLoop>,
    /// The poll task and its batches, while it runs.
    running: Option<(mpsc::Receiver<Batch>, JoinHandle<()>)>,
    /// Polling starts again at this moment (a failed connection's backoff).
    retry_at: Option<tokio::time::Instant>,
}

impl Poller {
    /// A poller for `eventloop`, not yet polling.
    pub fn new(eventloop: EventLoop) -> Self {
        Poller { idle: Some(eventloop), running: None, retry_at: None }
    }

    /// Starts polling if the event loop is in hand and no retry is scheduled.
    pub fn start(&mut self) {
        if self.retry_at.is_some() {
            return;
        }
        if let Some(el) = self.idle.take() {
            let (tx, rx) = mpsc::channel(BATCHES_AHEAD);
            self.running = Some((rx, tokio::spawn(poll_until_failure(el, tx))));
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
        let Some((rx, _)) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        // Panics abort the process (release profile), so the task always ends with a handback.
        let batch = rx.recv().await.expect("the poll task hands the event loop back");
        if let Some(el) = batch.handback {
            self.running = None;
            self.idle = Some(el);
        }
        batch.events
    }

    /// The event loop, while it is in hand (after a failed connection, before polling again).
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

impl Drop for Poller {
    fn drop(&mut self) {
        if let Some((_, task)) = self.running.take() {
            task.abort(); // the event loop goes with it; nothing is polled after its owner
        }
    }
}

/// The poll task: polls until rumqttc has no buffered events and the batch holds one the owner
/// needs now ([`Event::needs_owner`]), hands the batch over, and goes on until the connection
/// fails, when it hands the event loop back with everything since the last batch and the error.
async fn poll_until_failure(mut el: EventLoop, tx: mpsc::Sender<Batch>) {
    loop {
        let mut events = Vec::new();
        let mut needed = false;
        loop {
            let r = el.poll().await;
            match &r {
                Err(_) => {
                    events.push(r);
                    let _ = tx.send(Batch { events, handback: Some(el) }).await;
                    return;
                }
                Ok(ev) => needed |= ev.needs_owner(),
            }
            events.push(r);
            if (needed && !el.has_buffered_events()) || events.len() >= POLL_BATCH {
                break;
            }
        }
        if tx.send(Batch { events, handback: None }).await.is_err() {
            return; // the owner is gone
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MqttConfig, Protocol};

    #[test]
    fn a_qos_1_write_waits_for_its_acknowledgement_but_a_qos_0_write_is_delivered_at_once() {
        assert!(!Event::Written { pkid: 7 }.needs_owner(), "only its PUBACK tells anything");
        assert!(Event::Answered { pkid: 7, refused: None }.needs_owner());
        assert!(Event::Written { pkid: 0 }.needs_owner(), "QoS 0: written is delivered");
        assert!(!Event::Other.needs_owner());
        assert!(Event::DisconnectWritten.needs_owner(), "a clean stop waits for it");
    }

    #[test]
    fn forgetting_unsent_work_also_clears_a_parked_collision() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let mqtt = MqttConfig { protocol, port: 1, host: "127.0.0.1".into(), ..MqttConfig::default() };
            let (_client, mut el) = build(&mqtt, &Security::default(), &Spec::new(&mqtt, "t".into(), true));
            if let Some(el) = el.v4_mut() {
                el.state.collision =
                    Some(rumqttc::Publish::new("t/telemetry", rumqttc::QoS::AtLeastOnce, b"{}".to_vec()))
            }
            if let Some(el) = el.v5_mut() {
                el.state.collision = Some(rumqttc::v5::mqttbytes::v5::Publish::new(
                    "t/telemetry",
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    b"{}".to_vec(),
                    None,
                ))
            }
            let mut poller = Poller::new(el);
            poller.forget_unsent();
            let el = poller.eventloop().expect("idle");
            let cleared = match el.v4_mut() {
                Some(el) => el.state.collision.is_none() && el.pending.is_empty(),
                None => el.v5_mut().is_some_and(|el| el.state.collision.is_none() && el.pending.is_empty()),
            };
            assert!(cleared, "{protocol:?}: a parked publish would stop the next connection sending");
        }
    }

    /// A broker of one connection at a time on loopback: answers CONNECT with CONNACK and the
    /// first SUBSCRIBE with its SUBACK and, in the same write, the head of a 20 MiB PUBLISH.
    async fn suback_then_oversized(listener: tokio::net::TcpListener, protocol: Protocol) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let v5 = protocol == Protocol::V5;
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let mut buf = [0u8; 512];
            let _ = sock.read(&mut buf).await; // CONNECT
            let connack: &[u8] = if v5 { &[0x20, 3, 0, 0, 0] } else { &[0x20, 2, 0, 0] };
            if sock.write_all(connack).await.is_err() {
                continue;
            }
            let Ok(n) = sock.read(&mut buf).await else { continue };
            if n < 4 || buf[0] != 0x82 {
                continue;
            }
            let pkid = [buf[2], buf[3]]; // remaining length < 128: one byte
            let mut out = if v5 { vec![0x90, 4, pkid[0], pkid[1], 0, 0] } else { vec![0x90, 3, pkid[0], pkid[1], 0] };
            out.extend_from_slice(&[0x30, 0x80, 0x80, 0x80, 0x0a, 0, 1, b'a']); // PUBLISH of 20 MiB
            let _ = sock.write_all(&out).await;
            let _ = sock.read(&mut buf).await; // until the client hangs up
        }
    }

    #[tokio::test]
    async fn what_was_read_before_the_error_that_ends_a_connection_comes_before_that_error() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let broker = tokio::spawn(suback_then_oversized(listener, protocol));
            let mqtt = MqttConfig { protocol, port, host: "127.0.0.1".into(), ..MqttConfig::default() };
            let (client, mut el) = build(&mqtt, &Security::default(), &Spec::new(&mqtt, "t".into(), true));
            let mut seen = Vec::new();
            loop {
                let ev = tokio::time::timeout(Duration::from_secs(10), el.poll()).await.expect("the link answers");
                match ev {
                    Ok(Event::Connected { .. }) => {
                        seen.push("connected");
                        client.subscribe(&["a".to_owned()]).unwrap();
                    }
                    Ok(Event::Subscribed { .. }) => seen.push("subscribed"),
                    Ok(_) => {}
                    Err(_) => {
                        seen.push("ended");
                        break;
                    }
                }
            }
            // rumqttc alone hands the SUBACK out after the next CONNACK, as the new connection's.
            assert_eq!(seen, ["connected", "subscribed", "ended"], "{protocol:?}");
            broker.abort();
        }
    }
}
