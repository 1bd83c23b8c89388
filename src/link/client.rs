//! One client for every role, under MQTT 5 or 3.1.1: the options a role asks for
//! ([`Spec`]), the client handle ([`Client`]) and the event loop ([`EventLoop`]), each one type
//! whichever protocol rumqttc speaks underneath, the events ([`Event`]), and the default
//! protocol choice (`Auto`). What each protocol does, and every touch of rumqttc's
//! internals, is in `v4.rs` and `v5.rs`.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::NetworkOptions;

use super::{v4, v5, LinkError, RequestError, Security};
use crate::config::{MqttConfig, Protocol};

/// rumqttc's limit of unacknowledged QoS 1 publishes.
pub const MAX_INFLIGHT: u16 = 100;

/// What a role asks of its connection.
#[derive(Debug, Clone)]
pub struct Spec {
    pub client_id: String,
    /// Start without the session the broker may hold (and, under MQTT 5, keep none after).
    pub clean: bool,
    /// A retained QoS 1 message the broker publishes if this client vanishes.
    pub will: Option<(String, Vec<u8>)>,
    pub keep_alive: Duration,
    /// Capacity of the channel between the handle and the event loop.
    pub channel: usize,
}

impl Spec {
    /// The long-lived roles' spec (device and controller) from `[mqtt]`.
    pub fn new(mqtt: &MqttConfig, client_id: String, clean: bool) -> Spec {
        Spec { client_id, clean, will: None, keep_alive: Duration::from_secs(mqtt.keep_alive_s), channel: 256 }
    }

    /// A watcher's spec (`nightlight status`, the demo's view): a new session, no will, a
    /// short keep-alive, a small channel; the client id is `<prefix>-<random>`.
    pub fn observer(prefix: &str) -> Spec {
        Spec {
            client_id: format!("{prefix}-{:08x}", fastrand::u32(..)),
            clean: true,
            will: None,
            keep_alive: Duration::from_secs(10),
            channel: 10,
        }
    }
}

/// How long a broker keeps a persistent session after the connection ends (MQTT 5; under 3.1.1
/// the broker decides): a day covers any outage the stale-command rule would not make moot.
pub const SESSION_EXPIRY_S: u32 = 86_400;

/// Quality of service of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

/// A message the broker delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// Sent from the broker's retained store (a subscription's first message), not live.
    pub retain: bool,
    /// MQTT 5 request/response (3.1.1 has no such thing): where the sender wants the answer,
    /// and the Correlation Data on this message (an answer carries the request's back).
    pub response_topic: Option<String>,
    pub correlation: Option<Bytes>,
}

impl Message {
    /// Where and how to answer this message, when it is an MQTT 5 request.
    pub fn reply(&self) -> Option<Reply> {
        Some(Reply { topic: self.response_topic.clone()?, correlation: self.correlation.clone() })
    }
}

/// An MQTT 5 request's Response Topic and Correlation Data.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub topic: String,
    pub correlation: Option<Bytes>,
}

/// What the event loop reports, the same under both protocols.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// CONNACK: the connection is up.
    Connected {
        session_present: bool,
    },
    Message(Message),
    /// PUBACK for the publish written as `pkid`; `refused` is the broker's reason code when it
    /// did not take it (MQTT 5; under 3.1.1 a broker cannot say so).
    Answered {
        pkid: u16,
        refused: Option<String>,
    },
    /// SUBACK: for each filter of the SUBSCRIBE, whether it was refused.
    Subscribed {
        refused: Vec<bool>,
    },
    /// UNSUBACK.
    Unsubscribed,
    /// A publish was written to the socket as `pkid` (0 for QoS 0).
    Written {
        pkid: u16,
    },
    /// Our DISCONNECT was written.
    DisconnectWritten,
    Other,
}

impl Event {
    /// Whether the owner needs to see this event now. A QoS 1 publish written to the socket
    /// only tells its packet id, which matters together with its PUBACK (and rumqttc's
    /// bookkeeping, pings and acknowledgements we send, not at all): such events wait in the
    /// batch for the next one that counts, so a reading wakes its owner once, for its
    /// acknowledgement, not also for its write. A QoS 0 publish (packet id 0) is delivered when
    /// written, so that write counts.
    pub fn needs_owner(&self) -> bool {
        !matches!(self, Event::Other) && !matches!(self, Event::Written { pkid } if *pkid != 0)
    }
}

/// The client handle: cheap to clone, never blocks. Its clones share one rumqttc handle, which
/// the event loop replaces when `mqtt.protocol = "auto"` falls back to 3.1.1.
#[derive(Clone)]
pub struct Client {
    slot: Arc<RwLock<Handle>>,
}

#[derive(Clone)]
enum Handle {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// rumqttc's event loop of either protocol.
pub struct EventLoop {
    kind: Kind,
    /// `mqtt.protocol = "auto"`: how to build the other protocol's loop, and what was seen.
    auto: Option<Box<Auto>>,
    /// The error that ended the connection, held back while rumqttc still holds events it read
    /// before it (see [`EventLoop::poll`]).
    ended: Option<LinkError>,
}

enum Kind {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// The default protocol choice. Rules:
/// - Connect with MQTT 5. A broker that speaks only 3.1.1 closes the connection at an MQTT 5
///   CONNECT (or answers it with "unsupported protocol version"): after two such closes in a
///   row, with no CONNACK between, the next connection is made with 3.1.1. A failure of
///   anything else (refused login, TLS, no route, a CONNACK then a drop) never counts, and an
///   unsupported-version CONNACK counts as both.
/// - A 3.1.1 connection that fails before its CONNACK goes back to MQTT 5 for the next one, so a
///   network cut during the handshake cannot leave the device on 3.1.1 with an MQTT 5 broker.
/// - Once a CONNACK arrived with a protocol, that protocol is kept for the process's life, and
///   which one it was is logged once.
struct Auto {
    mqtt: MqttConfig,
    security: Security,
    spec: Spec,
    client: Arc<RwLock<Handle>>,
    /// MQTT 5 CONNECTs closed without a CONNACK, in a row.
    closed_at_v5: u8,
    /// The protocol a CONNACK confirmed; kept from then on. Until it is set, every failure is
    /// one before a CONNACK (a CONNACK sets it).
    settled: Option<Protocol>,
}

/// Builds the client and its event loop for `spec` from `[mqtt]` and the loaded security.
pub fn build(mqtt: &MqttConfig, security: &Security, spec: &Spec) -> (Client, EventLoop) {
    let (handle, kind) = build_kind(mqtt.protocol, mqtt, security, spec);
    let slot = Arc::new(RwLock::new(handle));
    let auto = (mqtt.protocol == Protocol::Auto).then(|| {
        Box::new(Auto {
            mqtt: mqtt.clone(),
            security: security.clone(),
            spec: spec.clone(),
            client: slot.clone(),
            closed_at_v5: 0,
            settled: None,
        })
    });
    (Client { slot }, EventLoop { kind, auto, ended: None })
}

fn build_kind(protocol: Protocol, mqtt: &MqttConfig, security: &Security, spec: &Spec) -> (Handle, Kind) {
    match protocol {
        Protocol::V311 => {
            let (client, el) = v4::build(mqtt, security, spec);
            (Handle::V4(client), Kind::V4(Box::new(el)))
        }
        Protocol::V5 | Protocol::Auto => {
            let (client, el) = v5::build(mqtt, security, spec);
            (Handle::V5(client), Kind::V5(Box::new(el)))
        }
    }
}

/// Socket options for every client.
pub(super) fn network_options() -> NetworkOptions {
    let mut net = NetworkOptions::new();
    // Without TCP_NODELAY a publish right after a QoS 1 ack waits ~40 ms behind Nagle.
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    net
}

pub(super) fn request_error(e: impl std::fmt::Display) -> RequestError {
    RequestError::new(e)
}

impl Client {
    /// Hands a publish to the event loop; fails when its channel is full.
    ///
    /// # Errors
    /// The channel is full or the event loop is gone.
    pub fn publish(&self, topic: &str, qos: Qos, retain: bool, payload: Vec<u8>) -> Result<(), RequestError> {
        self.publish_expiring(topic, qos, retain, payload, None)
    }

    /// An MQTT 5 request: `payload` to `topic` (QoS 1), asking for the answer on `reply`'s topic
    /// with its correlation data. Under 3.1.1 a plain publish: no answer comes.
    ///
    /// # Errors
    /// The channel is full or the event loop is gone.
    pub fn publish_request(&self, topic: &str, reply: &Reply, payload: Vec<u8>) -> Result<(), RequestError> {
        match &*self.handle() {
            Handle::V4(c) => v4::publish(c, topic, Qos::AtLeastOnce, false, payload),
            Handle::V5(c) => v5::publish_request(c, topic, reply, payload),
        }
    }

    /// The answer to an MQTT 5 request: to its Response Topic with its Correlation Data, QoS 1,
    /// not retained. (Under 3.1.1 no request carries a reply, so there is none to send.)
    ///
    /// # Errors
    /// The channel is full or the event loop is gone.
    pub fn publish_reply(&self, reply: &Reply, payload: Vec<u8>) -> Result<(), RequestError> {
        match &*self.handle() {
            Handle::V4(_) => Ok(()),
            Handle::V5(c) => v5::publish_reply(c, reply, payload),
        }
    }

    /// As [`publish`](Self::publish); under MQTT 5 the broker discards the message if it cannot
    /// deliver it within `expiry_s` (3.1.1 has no such thing).
    ///
    /// # Errors
    /// The channel is full or the event loop is gone.
    pub fn publish_expiring(
        &self,
        topic: &str,
        qos: Qos,
        retain: bool,
        payload: Vec<u8>,
        expiry_s: Option<u32>,
    ) -> Result<(), RequestError> {
        match &*self.handle() {
            Handle::V4(c) => v4::publish(c, topic, qos, retain, payload),
            Handle::V5(c) => v5::publish(c, topic, qos, retain, payload, expiry_s),
        }
    }

    /// Subscribes to `filters` with QoS 1, in one SUBSCRIBE.
    ///
    /// # Errors
    /// The channel is full or the event loop is gone.
    pub fn subscribe(&self, filters: &[String]) -> Result<(), RequestError> {
        match &*self.handle() {
            Handle::V4(c) => v4::subscribe(c, filters),
            Handle::V5(c) => v5::subscribe(c, filters),
        }
    }

    /// Asks for what the broker holds retained under `filter`, once: a SUBSCRIBE at QoS 0
    /// (answered with [`Event::Subscribed`]) and at once an UNSUBSCRIBE. A broker answers the
    /// UNSUBSCRIBE ([`Event::Unsubscribed`]) after the retained messages the SUBSCRIBE sent, so
    /// what arrives in between is all it holds.
    ///
    /// # Errors
    /// The channel is full or the event loop is gone.
    pub fn look_up_retained(&self, filter: &str) -> Result<(), RequestError> {
        match &*self.handle() {
            Handle::V4(c) => v4::look_up_retained(c, filter),
            Handle::V5(c) => v5::look_up_retained(c, filter),
        }
    }

    /// Asks the event loop to send DISCONNECT after what it was handed before.
    pub fn disconnect(&self) {
        match &*self.handle() {
            Handle::V4(c) => v4::disconnect(c),
            Handle::V5(c) => v5::disconnect(c),
        }
    }

    /// The protocol the client speaks now (with `auto`, 3.1.1 once it fell back).
    pub fn protocol(&self) -> Protocol {
        match &*self.handle() {
            Handle::V4(_) => Protocol::V311,
            Handle::V5(_) => Protocol::V5,
        }
    }

    fn handle(&self) -> std::sync::RwLockReadGuard<'_, Handle> {
        // A panic aborts the process (release profile): a poisoned lock cannot be observed.
        self.slot.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl EventLoop {
    /// The next event; connects first if there is no connection. Not cancel-safe: see
    /// [`super::Poller`].
    ///
    /// # Errors
    /// The connection failed or ended.
    ///
    /// rumqttc reads packets in bulk: a SUBACK or PUBACK read in the same bulk as a packet that
    /// ends the connection (one too large, say) is still in its buffer when the error comes, and
    /// rumqttc would hand it out after the next CONNACK, as if the new connection had sent it.
    /// So what was read before the error comes first, then the error: every event belongs to the
    /// connection that brought it.
    pub async fn poll(&mut self) -> Result<Event, LinkError> {
        if let Some(e) = self.ended.take() {
            if let Some(ev) = self.pop_buffered() {
                self.ended = Some(e);
                return Ok(ev);
            }
            return self.observed(Err(e));
        }
        let r = match &mut self.kind {
            Kind::V4(el) => el.poll().await.map(v4::translate).map_err(LinkError::from),
            Kind::V5(el) => el.poll().await.map(v5::translate).map_err(LinkError::from),
        };
        match r {
            Err(e) if self.has_buffered_events() => {
                self.ended = Some(e);
                Ok(self.pop_buffered().unwrap_or(Event::Other))
            }
            r => self.observed(r),
        }
    }

    /// An event rumqttc read and has not handed out yet.
    fn pop_buffered(&mut self) -> Option<Event> {
        match &mut self.kind {
            Kind::V4(el) => v4::pop_buffered(el),
            Kind::V5(el) => v5::pop_buffered(el),
        }
    }

    /// `r`, once `mqtt.protocol = "auto"` has seen it.
    fn observed(&mut self, r: Result<Event, LinkError>) -> Result<Event, LinkError> {
        let now = self.protocol();
        if let Some(auto) = self.auto.as_mut() {
            if let Some(next) = auto.observe(now, &r) {
                let (handle, kind) = build_kind(next, &auto.mqtt, &auto.security, &auto.spec);
                *auto.client.write().unwrap_or_else(|p| p.into_inner()) = handle;
                self.kind = kind;
            }
        }
        r
    }

    /// Whether rumqttc holds events already read (polling again returns at once).
    pub fn has_buffered_events(&self) -> bool {
        if self.ended.is_some() {
            return true;
        }
        match &self.kind {
            Kind::V4(el) => v4::has_buffered(el),
            Kind::V5(el) => v5::has_buffered(el),
        }
    }

    /// Forgets everything rumqttc would replay or still send.
    pub fn forget_unsent(&mut self) {
        self.ended = None;
        match &mut self.kind {
            Kind::V4(el) => v4::forget_unsent(el),
            Kind::V5(el) => v5::forget_unsent(el),
        }
    }

    /// How the next connection starts: with the session the broker holds, or a new one.
    pub fn set_clean(&mut self, clean: bool) {
        match &mut self.kind {
            Kind::V4(el) => v4::set_clean(el, clean),
            Kind::V5(el) => v5::set_clean(el, clean),
        }
    }

    /// The largest message the next connection reads (MQTT 5: and tells the broker).
    pub fn set_max_incoming(&mut self, bytes: usize) {
        match &mut self.kind {
            Kind::V4(el) => v4::set_max_incoming(el, bytes),
            Kind::V5(el) => v5::set_max_incoming(el, bytes),
        }
    }

    /// The protocol this loop speaks.
    pub fn protocol(&self) -> Protocol {
        match &self.kind {
            Kind::V4(_) => Protocol::V311,
            Kind::V5(_) => Protocol::V5,
        }
    }

    /// rumqttc's 3.1.1 event loop, for tests that reach into its state.
    #[cfg(test)]
    pub(crate) fn v4_mut(&mut self) -> Option<&mut rumqttc::EventLoop> {
        match &mut self.kind {
            Kind::V4(el) => Some(el),
            Kind::V5(_) => None,
        }
    }

    /// rumqttc's MQTT 5 event loop, for tests that reach into its state.
    #[cfg(test)]
    pub(crate) fn v5_mut(&mut self) -> Option<&mut rumqttc::v5::EventLoop> {
        match &mut self.kind {
            Kind::V5(el) => Some(el),
            Kind::V4(_) => None,
        }
    }
}

impl Auto {
    /// Takes one poll's outcome on a `now` connection; returns the protocol to build the next
    /// connection with, when it changes. See [`Auto`]'s rules.
    fn observe(&mut self, now: Protocol, r: &Result<Event, LinkError>) -> Option<Protocol> {
        match r {
            Ok(Event::Connected { .. }) => {
                if self.settled.is_none() {
                    self.settled = Some(now);
                    if now == Protocol::V311 {
                        tracing::warn!(
                            broker = %self.mqtt.broker(),
                            "the broker speaks only MQTT 3.1.1: connected with it. Under 3.1.1 a refused reading cannot be told \
                             from a delivered one (no reason codes), the broker cannot be told the largest message we read, \
                             and commands carry no expiry; set mqtt.protocol = \"3.1.1\" to say so and skip the MQTT 5 attempt"
                        );
                    } else {
                        tracing::info!(broker = %self.mqtt.broker(), "the broker speaks MQTT 5");
                    }
                }
                None
            }
            Ok(_) => None,
            Err(_) if self.settled.is_some() => None,
            Err(e) => {
                match now {
                    Protocol::V5 => {
                        match e.v5_refused_at_connect() {
                            0 => self.closed_at_v5 = 0, // another failure: not in a row
                            n => self.closed_at_v5 = self.closed_at_v5.saturating_add(n),
                        }
                        (self.closed_at_v5 >= 2).then(|| {
                            tracing::info!(
                                "the broker closed two MQTT 5 CONNECTs without an answer: trying MQTT 3.1.1"
                            );
                            self.closed_at_v5 = 0;
                            Protocol::V311
                        })
                    }
                    _ => Some(Protocol::V5),
                }
            }
        }
    }
}
