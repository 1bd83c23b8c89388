//! The MQTT link: client options, reconnect backoff, and a poller that drives `rumqttc`'s event
//! loop without ever cancelling it.
//!
//! # Design
//! `EventLoop::poll` is not cancel-safe (a write cut short can be repeated), so it never sits in a
//! `select!`: [`Poller`] moves the event loop into a short task that polls until rumqttc has no
//! buffered events, then hands the loop back with the batch. The owner reacts to a batch with the
//! event loop in hand, so after an error it can drop rumqttc's own replay list (`pending`) and
//! the requests still in its channel: the durable queue, not rumqttc, decides what is re-sent.

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, QoS,
    StateError, TlsConfiguration, Transport,
};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::payload::{Topics, OFFLINE};

/// Incoming packets above this size are refused by rumqttc (and end the connection); anything
/// between [`crate::payload::MAX_COMMAND_BYTES`] and this is read and rejected as a command.
pub const MAX_INCOMING_BYTES: usize = 256 * 1024;
/// Outgoing packets are small: telemetry, state and status.
pub const MAX_OUTGOING_BYTES: usize = 16 * 1024;
/// Capacity of the request channel between the client handle and the event loop.
pub const REQUEST_CHANNEL: usize = 256;
/// rumqttc's limit of unacknowledged QoS 1 publishes.
pub const MAX_INFLIGHT: u16 = 100;
/// Events taken from rumqttc per poll task.
const POLL_BATCH: usize = 64;

/// Builds the client handle and the event loop from the configuration.
///
/// # Errors
/// The password file cannot be read.
pub fn connect_options(cfg: &Config, topics: &Topics) -> Result<(AsyncClient, EventLoop), crate::ConfigError> {
    let mut opts = MqttOptions::new(cfg.client_id(), &cfg.mqtt.host, cfg.mqtt.port);
    opts.set_keep_alive(Duration::from_secs(cfg.mqtt.keep_alive_s))
        .set_clean_session(cfg.mqtt.clean_session)
        .set_last_will(LastWill::new(&topics.status, OFFLINE, QoS::AtLeastOnce, true))
        .set_max_packet_size(MAX_INCOMING_BYTES, MAX_OUTGOING_BYTES)
        .set_inflight(MAX_INFLIGHT);
    apply_security(&mut opts, cfg)?;
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CHANNEL);
    eventloop.set_network_options(network_options());
    Ok((client, eventloop))
}

/// Socket options for every long-lived client (device and controller).
pub fn network_options() -> NetworkOptions {
    let mut net = NetworkOptions::new();
    // Without TCP_NODELAY a publish right after a QoS 1 ack waits ~40 ms behind Nagle.
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    net
}

/// Sets credentials and TLS from `[mqtt]` (device, controller and `status` alike).
///
/// # Errors
/// The password file or a TLS file cannot be read.
pub fn apply_security(opts: &mut MqttOptions, cfg: &Config) -> Result<(), crate::ConfigError> {
    if !cfg.mqtt.username.is_empty() {
        opts.set_credentials(&cfg.mqtt.username, cfg.password()?.unwrap_or_default());
    }
    if cfg.mqtt.tls.enabled {
        let tls = crate::tls::client_config(&cfg.mqtt.tls).map_err(|e| crate::ConfigError::Invalid {
            key: e.key,
            origin: String::new(),
            reason: e.to_string(),
        })?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    Ok(())
}

/// Whether the connection died because an incoming message exceeded [`MAX_INCOMING_BYTES`].
pub fn is_oversized_incoming(e: &ConnectionError) -> Option<usize> {
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}

/// A short, human description of why a connection failed or ended; `host` for TLS name errors.
pub fn describe_for(e: &ConnectionError, host: &str) -> String {
    if let Some(why) = crate::tls::explain(e, host) {
        return why;
    }
    describe(e)
}

/// The description of the MQTT-level causes; [`describe_for`] adds TLS ones.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => io.to_string(),
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => {
            "the broker refused the username or password (check mqtt.username and the password)".into()
        }
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => {
            "the broker refused the connection: not authorized (wrong username or password, or not allowed)".into()
        }
        ConnectionError::ConnectionRefused(code) => format!("broker refused the connection: {code:?}"),
        ConnectionError::NetworkTimeout => "timed out connecting".into(),
        ConnectionError::MqttState(StateError::Io(io)) => io.to_string(),
        ConnectionError::MqttState(StateError::ConnectionAborted) => "connection closed by the broker".into(),
        ConnectionError::MqttState(StateError::AwaitPingResp) => "broker stopped answering pings".into(),
        other => other.to_string(),
    }
}

/// Exponential backoff with jitter between a minimum and a maximum delay.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `min` and never waiting longer than `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max: max.max(min), attempt: 0 }
    }

    /// The delay before the next attempt: uniformly random in the upper half of
    /// `min * 2^attempt` (capped at `max`), never below `min`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.min.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter = Duration::from_nanos(fastrand::u64(0..=half.as_nanos() as u64));
        (half + jitter).max(self.min)
    }

    /// Back to the shortest delay, after a connection that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

type PollOutput = (EventLoop, Vec<Result<Event, ConnectionError>>);

/// Owns the event loop between polls; see the module docs.
pub struct Poller {
    idle: Option<EventLoop>,
    running: Option<JoinHandle<PollOutput>>,
}

impl Poller {
    /// A poller for `eventloop`, not yet polling.
    pub fn new(eventloop: EventLoop) -> Self {
        Poller { idle: Some(eventloop), running: None }
    }

    /// Starts a poll task if none is running.
    pub fn start(&mut self) {
        if let Some(mut el) = self.idle.take() {
            self.running = Some(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let r = el.poll().await;
                    let failed = r.is_err();
                    out.push(r);
                    if failed || el.state.events.is_empty() || out.len() >= POLL_BATCH {
                        return (el, out);
                    }
                }
            }));
        }
    }

    /// Whether a poll task is running (and [`next`](Self::next) will complete).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Waits for the running poll task and returns its events. Cancel-safe.
    pub async fn next(&mut self) -> Vec<Result<Event, ConnectionError>> {
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
            el.clean();
            el.pending.clear();
            // `MqttState::clean` leaves a publish parked by an out-of-order PUBACK; while it is
            // set the event loop takes no new requests, so a fresh connection would send nothing.
            el.state.collision = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgetting_unsent_work_also_clears_a_parked_collision() {
        let (_client, mut el) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 10);
        el.state.collision = Some(rumqttc::Publish::new("t/telemetry", QoS::AtLeastOnce, b"{}".to_vec()));
        let mut poller = Poller::new(el);
        poller.forget_unsent();
        let el = poller.eventloop().expect("idle");
        assert!(el.state.collision.is_none(), "a parked publish would stop the next connection sending");
        assert!(el.pending.is_empty());
    }

    #[test]
    fn backoff_grows_to_the_maximum_and_stays_within_bounds() {
        let (min, max) = (Duration::from_millis(250), Duration::from_millis(30_000));
        let mut b = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..30).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= min && *d <= max), "{delays:?}");
        assert!(delays[0] <= Duration::from_millis(250));
        assert!(delays[29] >= max / 2, "reaches the cap: {delays:?}");
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn backoff_is_jittered() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
            b.next_delay();
            b.next_delay();
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 1, "twenty devices reconnecting at the same instant: {seen:?}");
    }
}
