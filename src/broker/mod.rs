//! The demo's embedded MQTT broker, 3.1.1 and 5 (virtual builds): just enough broker for one
//! laptop.
//!
//! `nightlight demo` needs a broker that the device, the controller, the view and any outside
//! client (`mosquitto_sub -p N -t '#' -v`) can share, without installing one. This is it, on
//! 127.0.0.1 only, using rumqttc's own packet codecs ([`wire`]: a connection speaks the version of
//! its CONNECT, so `mosquitto_sub -V 5` and `-V 311` both work). It does: QoS 0 and 1 (QoS 2 is acknowledged
//! and delivered as QoS 1), `+`/`#` filters, retained messages, last wills, keep-alive,
//! client-id takeover and `$share/<group>/` subscriptions (one member of a group gets each
//! message). It does not keep sessions: every CONNACK says `session_present = false`, and messages
//! for a client that is away are not kept. Use Mosquitto for anything beyond the demo.
//!
//! [`Router`] is the pure part (who gets what), the connection tasks do the I/O.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

mod wire;

use bytes::BytesMut;
use rumqttc::mqttbytes::{valid_filter, valid_topic, QoS};
use rumqttc::{Publish, SubscribeReasonCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::debug;

pub use wire::MAX_PACKET;
use wire::{Connect, In, Out, Props, Version, WireError};
/// The pause after a failed accept ([`accept`]).
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(50);
/// How long a new connection has to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Messages waiting for a slow client; beyond this they are dropped (the demo's clients read
/// promptly; a stopped `mosquitto_sub | less` must not grow the broker without bound).
const OUTBOX: usize = 1024;
/// Bytes waiting for one slow client, at most (1024 messages of 1 MiB would be 1 GiB).
const OUTBOX_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of retained messages (topics and payloads) the broker keeps, at most; a retained
/// message beyond it is delivered but not kept.
pub const RETAINED_BYTES: usize = 8 * 1024 * 1024;
/// Connections at once, at most; one more is closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// A client that turned keep-alive off (0) is closed after this long without a packet.
const IDLE_WITHOUT_KEEP_ALIVE: Duration = Duration::from_secs(600);

/// A connection's outbox: what the router hands to its connection task, bounded in messages and
/// in bytes.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<(Publish, Props)>,
    /// Payload bytes handed and not yet taken by the connection task.
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

impl Outbox {
    /// A new outbox and the connection task's end of it.
    pub fn new(messages: usize) -> (Self, Inbox) {
        let (tx, rx) = mpsc::channel(messages);
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (Outbox { tx, queued: queued.clone() }, Inbox { rx, queued })
    }

    /// Hands `p` over unless the client already has [`OUTBOX`] messages or [`OUTBOX_BYTES`]
    /// waiting (or is gone); false when dropped.
    /// `props`: the MQTT 5 properties it forwards.
    pub fn try_send(&self, p: Publish, props: Props) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let size = p.payload.len() + p.topic.len();
        if self.queued.load(Relaxed) + size > OUTBOX_BYTES {
            return false;
        }
        self.queued.fetch_add(size, Relaxed);
        if self.tx.try_send((p, props)).is_err() {
            self.queued.fetch_sub(size, Relaxed);
            return false;
        }
        true
    }
}

/// The connection task's end of an [`Outbox`].
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<(Publish, Props)>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

impl Inbox {
    pub async fn recv(&mut self) -> Option<(Publish, Props)> {
        let (p, props) = self.rx.recv().await?;
        self.queued.fetch_sub(p.payload.len() + p.topic.len(), std::sync::atomic::Ordering::Relaxed);
        Some((p, props))
    }
}

/// One subscription of one client.
#[derive(Debug)]
struct Subscription {
    filter: String,
    qos: QoS,
    /// `Some(group)` for `$share/<group>/<filter>`.
    group: Option<String>,
}

/// A connected client.
#[derive(Debug)]
struct Session {
    /// Distinguishes this connection from an older one with the same client id.
    conn: u64,
    outbox: Outbox,
    subscriptions: Vec<Subscription>,
}

/// Who receives what: sessions, their subscriptions and the retained messages. No I/O.
#[derive(Debug, Default)]
pub struct Router {
    sessions: BTreeMap<String, Session>,
    retained: BTreeMap<String, Publish>,
    /// Topic and payload bytes in `retained`, at most [`RETAINED_BYTES`].
    retained_bytes: usize,
    /// Retained messages not kept for want of room (logged once).
    retained_refused: u64,
    next_conn: u64,
    /// Rotates the member of a shared group that gets the next message.
    share_turn: usize,
}

impl Router {
    /// Registers a client; an existing session with the same id is dropped (its connection
    /// closes when it finds its outbox gone). Returns the connection's number.
    pub fn connect(&mut self, client_id: &str, outbox: Outbox) -> u64 {
        self.next_conn += 1;
        let session = Session { conn: self.next_conn, outbox, subscriptions: Vec::new() };
        if self.sessions.insert(client_id.to_string(), session).is_some() {
            debug!(client_id, "client id taken over by a new connection");
        }
        self.next_conn
    }

    /// Forgets connection `conn` of `client_id`, unless a newer connection took the id over.
    pub fn disconnect(&mut self, client_id: &str, conn: u64) {
        if self.sessions.get(client_id).is_some_and(|s| s.conn == conn) {
            self.sessions.remove(client_id);
        }
    }

    /// Adds subscriptions; returns the granted QoS (or failure) for each filter, and the
    /// retained messages they match, to be sent to the subscriber.
    pub fn subscribe(
        &mut self,
        client_id: &str,
        filters: &[(String, QoS)],
    ) -> (Vec<SubscribeReasonCode>, Vec<Publish>) {
        let mut codes = Vec::with_capacity(filters.len());
        let mut retained = Vec::new();
        let Some(session) = self.sessions.get_mut(client_id) else {
            return (vec![SubscribeReasonCode::Failure; filters.len()], retained);
        };
        for (path, qos) in filters {
            let Some(sub) = parse_filter(path, *qos) else {
                codes.push(SubscribeReasonCode::Failure);
                continue;
            };
            if sub.group.is_none() {
                for p in self.retained.values().filter(|p| matches(&p.topic, &sub.filter)) {
                    let mut p = p.clone();
                    p.qos = min_qos(p.qos, sub.qos);
                    retained.push(p);
                }
            }
            codes.push(SubscribeReasonCode::Success(sub.qos));
            session.subscriptions.retain(|s| s.filter != sub.filter || s.group != sub.group);
            session.subscriptions.push(sub);
        }
        (codes, retained)
    }

    /// Removes subscriptions by the filters they were made with.
    pub fn unsubscribe(&mut self, client_id: &str, paths: &[String]) {
        if let Some(session) = self.sessions.get_mut(client_id) {
            for path in paths {
                if let Some(sub) = parse_filter(path, QoS::AtMostOnce) {
                    session.subscriptions.retain(|s| s.filter != sub.filter || s.group != sub.group);
                }
            }
        }
    }

    /// Routes a message: keeps or clears it as retained, and returns each recipient's outbox
    /// with the copy it gets (one per client, at the highest QoS its matching subscriptions
    /// allow; one member per shared group).
    pub fn publish(&mut self, publish: &Publish) -> Vec<(Outbox, Publish)> {
        if publish.retain {
            let size = |p: &Publish| p.topic.len() + p.payload.len();
            if let Some(old) = self.retained.remove(&publish.topic) {
                self.retained_bytes -= size(&old);
            }
            if !publish.payload.is_empty() {
                if self.retained_bytes + size(publish) <= RETAINED_BYTES {
                    self.retained_bytes += size(publish);
                    self.retained.insert(publish.topic.clone(), publish.clone());
                } else {
                    self.retained_refused += 1;
                    if self.retained_refused == 1 {
                        tracing::warn!(limit = RETAINED_BYTES, topic = %crate::payload::printable(&publish.topic, 100),
                            "the demo broker keeps no more retained bytes: delivered, not kept");
                    }
                }
            }
        }
        let mut direct: Vec<(&Session, QoS)> = Vec::new();
        let mut groups: BTreeMap<(&str, &str), Vec<(&Session, QoS)>> = BTreeMap::new();
        for session in self.sessions.values() {
            let mut best: Option<QoS> = None;
            for sub in session.subscriptions.iter().filter(|s| matches(&publish.topic, &s.filter)) {
                let qos = min_qos(publish.qos, sub.qos);
                match &sub.group {
                    Some(g) => groups.entry((g.as_str(), sub.filter.as_str())).or_default().push((session, qos)),
                    None => best = Some(best.map_or(qos, |b| max_qos(b, qos))),
                }
            }
            if let Some(qos) = best {
                direct.push((session, qos));
            }
        }
        self.share_turn = self.share_turn.wrapping_add(1);
        for members in groups.values() {
            direct.push(members[self.share_turn % members.len()]);
        }
        direct
            .into_iter()
            .map(|(session, qos)| {
                let mut copy = Publish::from_bytes(publish.topic.clone(), qos, publish.payload.clone());
                copy.retain = false;
                (session.outbox.clone(), copy)
            })
            .collect()
    }
}

/// `$share/<group>/<filter>` or a plain filter, validated; QoS 2 is granted as 1.
fn parse_filter(path: &str, qos: QoS) -> Option<Subscription> {
    let qos = min_qos(qos, QoS::AtLeastOnce);
    let (group, filter) = match path.strip_prefix("$share/") {
        Some(rest) => {
            let (group, filter) = rest.split_once('/')?;
            if group.is_empty() || group.contains(['+', '#']) {
                return None;
            }
            (Some(group.to_string()), filter)
        }
        None => (None, path),
    };
    valid_filter(filter).then(|| Subscription { filter: filter.to_string(), qos, group })
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

fn max_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) >= (b as u8) {
        a
    } else {
        b
    }
}

/// A running broker: its address, and the router shared by its connections.
pub struct Broker {
    listener: TcpListener,
    router: Arc<Mutex<Router>>,
}

impl Broker {
    /// Listens on `addr`.
    ///
    /// # Errors
    /// The address cannot be bound (typically: the port is in use).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Broker { listener: TcpListener::bind(addr).await?, router: Arc::default() })
    }

    /// The address it listens on (its port, when bound to port 0).
    ///
    /// # Errors
    /// The socket cannot say (it does not happen to a bound listener).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections until the task is dropped; each is served by its own task.
    pub async fn run(self) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, peer) = accept(&self.listener).await;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(%peer, max = MAX_CONNECTIONS, "too many connections: closed");
                continue;
            };
            let router = self.router.clone();
            tokio::spawn(async move {
                if let Err(e) = serve(stream, router).await {
                    debug!(%peer, error = %e, "connection closed");
                }
                drop(slot);
            });
        }
    }
}

/// The next connection on `listener`. A failed accept (out of file descriptors, say) waits
/// [`ACCEPT_PAUSE`] before the next try instead of spinning; the demo's page and relay use it too.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}

/// Why a connection ended without a DISCONNECT.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] WireError),
    #[error("no CONNECT within {CONNECT_TIMEOUT:?}")]
    NoConnect,
    #[error("the first packet was not CONNECT")]
    NotConnect,
    #[error("keep-alive expired")]
    KeepAlive,
    #[error("taken over by a new connection with the same client id")]
    TakenOver,
}

/// One client's socket, speaking the version of its CONNECT.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    out: BytesMut,
    version: Version,
}

impl Conn {
    /// Reads the next packet, buffering partial ones. Cancel-safe: a packet only leaves `buf`
    /// once it is complete.
    async fn read(&mut self) -> Result<In, ConnectionError> {
        loop {
            match wire::read(self.version, &mut self.buf) {
                Ok(p) => return Ok(p),
                Err(WireError::Incomplete) => {}
                Err(e) => return Err(e.into()),
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), ConnectionError> {
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        Ok(())
    }

    async fn write(&mut self, packet: Out) -> Result<(), ConnectionError> {
        wire::write(self.version, &mut self.out, packet)?;
        self.stream.write_all(&self.out).await?;
        Ok(())
    }
}

/// Reads CONNECT, which says the version.
async fn read_connect(conn: &mut Conn) -> Result<Connect, ConnectionError> {
    loop {
        match wire::read_connect(&mut conn.buf) {
            Ok((version, In::Connect(c))) => {
                conn.version = version;
                return Ok(c);
            }
            Ok(_) => return Err(ConnectionError::NotConnect),
            Err(WireError::Incomplete) => conn.fill().await?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One client connection, from CONNECT to its end; publishes the client's will unless it said
/// DISCONNECT.
async fn serve(stream: TcpStream, router: Arc<Mutex<Router>>) -> Result<(), ConnectionError> {
    let _ = stream.set_nodelay(true);
    let mut conn =
        Conn { stream, buf: BytesMut::with_capacity(4096), out: BytesMut::with_capacity(4096), version: Version::V311 };
    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut conn)).await {
        Err(_) => return Err(ConnectionError::NoConnect),
        Ok(c) => c?,
    };
    let client_id = if connect.client_id.is_empty() && connect.clean {
        format!("auto-{:016x}", fastrand::u64(..))
    } else if connect.client_id.is_empty() {
        return conn.write(Out::ConnAck { accepted: false }).await;
    } else {
        connect.client_id.clone()
    };
    let (outbox, mut inbox) = Outbox::new(OUTBOX);
    let id = lock(&router).connect(&client_id, outbox);
    debug!(client_id, conn = id, version = ?conn.version, "client connected");
    let result = session(&mut conn, &router, &client_id, connect.keep_alive, &mut inbox).await;
    lock(&router).disconnect(&client_id, id);
    if result.is_err() {
        if let Some(will) = connect.will {
            deliver(&router, &will, &Props::default());
        }
    }
    result
}

/// The packets of a connected client, until DISCONNECT (`Ok`) or a failure.
async fn session(
    conn: &mut Conn,
    router: &Mutex<Router>,
    client_id: &str,
    keep_alive_s: u16,
    inbox: &mut Inbox,
) -> Result<(), ConnectionError> {
    conn.write(Out::ConnAck { accepted: true }).await?;
    // MQTT 3.1.1 and 5: the server may close a connection silent for 1.5 times its keep-alive.
    // Keep-alive off is allowed, but not for ever on a shared machine.
    let grace =
        if keep_alive_s == 0 { IDLE_WITHOUT_KEEP_ALIVE } else { Duration::from_millis(1500 * u64::from(keep_alive_s)) };
    // Counted from the last packet read, not from the last message sent to the client.
    let mut silent_until = tokio::time::Instant::now() + grace;
    let mut pkid: u16 = 0;
    loop {
        tokio::select! {
            packet = tokio::time::timeout_at(silent_until, conn.read()) => {
                silent_until = tokio::time::Instant::now() + grace;
                let reply = match packet.map_err(|_| ConnectionError::KeepAlive)?? {
                    In::Publish(p, props) => {
                        let reply = match p.qos {
                            QoS::AtMostOnce => None,
                            QoS::AtLeastOnce => Some(Out::PubAck(p.pkid)),
                            QoS::ExactlyOnce => Some(Out::PubRec(p.pkid)),
                        };
                        if valid_topic(&p.topic) && !p.topic.is_empty() {
                            deliver(router, &p, &props);
                        }
                        reply
                    }
                    In::PubRel(id) => Some(Out::PubComp(id)),
                    In::Subscribe { pkid: sub, filters } => {
                        let (codes, retained) = lock(router).subscribe(client_id, &filters);
                        conn.write(Out::SubAck { pkid: sub, codes }).await?;
                        for mut p in retained {
                            p.retain = true;
                            send(conn, &mut pkid, p, Props::default()).await?; // (retained: none kept)
                        }
                        None
                    }
                    In::Unsubscribe { pkid: unsub, topics } => {
                        lock(router).unsubscribe(client_id, &topics);
                        Some(Out::UnsubAck { pkid: unsub, count: topics.len() })
                    }
                    In::PingReq => Some(Out::PingResp),
                    In::Disconnect => return Ok(()),
                    In::Connect(_) => return Err(ConnectionError::NotConnect),
                    In::Other => None,
                };
                if let Some(reply) = reply {
                    conn.write(reply).await?;
                }
            }
            next = inbox.recv() => match next {
                Some((p, props)) => send(conn, &mut pkid, p, props).await?,
                None => return Err(ConnectionError::TakenOver),
            },
        }
    }
}

/// Writes a message to this client, numbering it when it is QoS 1.
async fn send(conn: &mut Conn, pkid: &mut u16, mut p: Publish, props: Props) -> Result<(), ConnectionError> {
    if p.qos != QoS::AtMostOnce {
        *pkid = pkid.checked_add(1).unwrap_or(1);
        p.pkid = *pkid;
    }
    conn.write(Out::Publish(p, props)).await
}

fn deliver(router: &Mutex<Router>, publish: &Publish, props: &Props) {
    for (outbox, copy) in lock(router).publish(publish) {
        if !outbox.try_send(copy, props.clone()) {
            debug!(topic = %publish.topic, "a client's outbox is full or gone: message dropped for it");
        }
    }
}

fn lock(router: &Mutex<Router>) -> std::sync::MutexGuard<'_, Router> {
    router.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether `topic` matches `filter` (MQTT 5 section 4.7): levels split on `/`, `+` one level,
/// `#` the rest (and the parent), and a topic starting with `$` matched by no wildcard at its
/// first level. rumqttc's `mqttbytes::matches` slices the topic's first byte and panics on a
/// topic whose first character is wider than one byte (`é/x`), which with `panic = "abort"`
/// ended the whole demo: this one never indexes into a string.
pub fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(router: &mut Router, id: &str) -> (u64, Inbox) {
        let (tx, rx) = Outbox::new(8);
        (router.connect(id, tx), rx)
    }

    fn msg(topic: &str, qos: QoS, payload: &str, retain: bool) -> Publish {
        let mut p = Publish::new(topic, qos, payload.as_bytes().to_vec());
        p.retain = retain;
        p
    }

    #[test]
    fn a_topic_starting_with_a_wide_character_is_routed_not_a_crash() {
        let mut r = Router::default();
        let _watcher = client(&mut r, "watcher");
        let (codes, _) = r.subscribe("watcher", &[("#".into(), QoS::AtMostOnce), ("+/x".into(), QoS::AtMostOnce)]);
        assert_eq!(codes.len(), 2);
        let out = r.publish(&msg("é/x", QoS::AtMostOnce, "hi", true));
        assert_eq!(out.len(), 1, "one copy for the one subscriber");
        assert_eq!(out[0].1.topic, "é/x");
        // Retained, and handed to a later subscriber whose filter starts with a wide character.
        let _late = client(&mut r, "late");
        let (_, retained) = r.subscribe("late", &[("é/+".into(), QoS::AtMostOnce)]);
        assert_eq!(retained.len(), 1);
    }

    #[test]
    fn filters_match_as_the_mqtt_specification_says() {
        for (topic, filter, want) in [
            ("a/b", "a/b", true),
            ("a/b", "a/+", true),
            ("a", "a/#", true),
            ("a/b/c", "a/#", true),
            ("a/b/c", "a/+", false),
            ("a", "a/+", false),
            ("a/b", "#", true),
            ("$SYS/x", "#", false),
            ("$SYS/x", "+/x", false),
            ("$SYS/x", "$SYS/#", true),
            ("é", "+", true),
            ("a//b", "a/+/b", true),
        ] {
            assert_eq!(matches(topic, filter), want, "{topic} against {filter}");
        }
    }

    #[test]
    fn wildcard_subscribers_get_one_copy_at_the_lower_qos() {
        let mut r = Router::default();
        let _a = client(&mut r, "a");
        let (codes, _) = r.subscribe("a", &[("#".into(), QoS::AtMostOnce), ("d/+".into(), QoS::AtLeastOnce)]);
        assert_eq!(
            codes,
            vec![SubscribeReasonCode::Success(QoS::AtMostOnce), SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
        let out = r.publish(&msg("d/telemetry", QoS::AtLeastOnce, "{}", false));
        assert_eq!(out.len(), 1, "one copy per client, not per matching filter");
        assert_eq!(out[0].1.qos, QoS::AtLeastOnce);
        let out = r.publish(&msg("other/x", QoS::AtLeastOnce, "{}", false));
        assert_eq!(out[0].1.qos, QoS::AtMostOnce, "granted QoS 0 caps delivery");
        assert!(r.publish(&msg("d", QoS::AtMostOnce, "x", false)).len() == 1, "# matches the parent level");
    }

    #[test]
    fn retained_messages_reach_later_subscribers_until_cleared_by_an_empty_one() {
        let mut r = Router::default();
        r.publish(&msg("d/status", QoS::AtLeastOnce, "online", true));
        r.publish(&msg("d/state", QoS::AtLeastOnce, "{}", true));
        let _a = client(&mut r, "a");
        let (_, retained) = r.subscribe("a", &[("d/status".into(), QoS::AtLeastOnce)]);
        assert_eq!(retained.len(), 1);
        assert_eq!(&retained[0].payload[..], b"online");
        r.publish(&msg("d/status", QoS::AtLeastOnce, "", true));
        let (_, retained) = r.subscribe("a", &[("d/+".into(), QoS::AtLeastOnce)]);
        assert_eq!(retained.iter().map(|p| p.topic.as_str()).collect::<Vec<_>>(), ["d/state"]);
    }

    #[test]
    fn live_copies_are_not_marked_retained() {
        let mut r = Router::default();
        let _a = client(&mut r, "a");
        r.subscribe("a", &[("d/#".into(), QoS::AtLeastOnce)]);
        let out = r.publish(&msg("d/status", QoS::AtLeastOnce, "online", true));
        assert!(!out[0].1.retain);
    }

    #[test]
    fn a_shared_group_gets_each_message_once_and_takes_turns() {
        let mut r = Router::default();
        for id in ["c1", "c2"] {
            let _ = client(&mut r, id);
            r.subscribe(id, &[("$share/ctl/+/telemetry".into(), QoS::AtLeastOnce)]);
        }
        let _v = client(&mut r, "view");
        r.subscribe("view", &[("+/telemetry".into(), QoS::AtMostOnce)]);
        let mut got = Vec::new();
        for _ in 0..4 {
            let out = r.publish(&msg("d/telemetry", QoS::AtLeastOnce, "{}", false));
            assert_eq!(out.len(), 2, "the view and one controller");
            got.extend(out.into_iter().map(|(tx, _)| tx));
        }
        let (c1, c2) = (&r.sessions["c1"].outbox, &r.sessions["c2"].outbox);
        assert!(got.iter().any(|tx| tx.tx.same_channel(&c1.tx)) && got.iter().any(|tx| tx.tx.same_channel(&c2.tx)));
    }

    #[test]
    fn invalid_filters_are_refused_and_qos_2_is_granted_as_1() {
        let mut r = Router::default();
        let _a = client(&mut r, "a");
        let (codes, _) = r.subscribe(
            "a",
            &[("a/#/b".into(), QoS::AtMostOnce), ("$share//x".into(), QoS::AtMostOnce), ("x".into(), QoS::ExactlyOnce)],
        );
        assert_eq!(
            codes,
            vec![
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtLeastOnce)
            ]
        );
    }

    #[test]
    fn a_takeover_keeps_the_new_session_when_the_old_connection_ends() {
        let mut r = Router::default();
        let (old, _) = client(&mut r, "d");
        let (_new, _rx) = client(&mut r, "d");
        r.subscribe("d", &[("x".into(), QoS::AtMostOnce)]);
        r.disconnect("d", old);
        assert_eq!(r.publish(&msg("x", QoS::AtMostOnce, "1", false)).len(), 1);
        r.unsubscribe("d", &["x".into()]);
        assert!(r.publish(&msg("x", QoS::AtMostOnce, "1", false)).is_empty());
    }

    #[test]
    fn retained_bytes_and_a_slow_clients_outbox_are_bounded() {
        let mut r = Router::default();
        let big = "x".repeat(1024 * 1024 - 16);
        for i in 0..20 {
            r.publish(&msg(&format!("r/{i}"), QoS::AtMostOnce, &big, true));
        }
        assert!(r.retained_bytes <= RETAINED_BYTES, "{}", r.retained_bytes);
        assert_eq!(r.retained.len(), 8, "8 MiB of retained messages, the rest delivered but not kept");
        assert_eq!(r.retained_refused, 12);
        r.publish(&msg("r/0", QoS::AtMostOnce, "", true));
        r.publish(&msg("r/late", QoS::AtMostOnce, "fits again", true));
        assert!(r.retained.contains_key("r/late"), "clearing one made room");

        // A subscriber that stopped reading: at most OUTBOX_BYTES wait for it.
        let (_, _stalled) = client(&mut r, "stalled");
        r.subscribe("stalled", &[("big/#".into(), QoS::AtMostOnce)]);
        let (outbox, _) = (r.sessions["stalled"].outbox.clone(), ());
        let mut taken = 0;
        for _ in 0..8 {
            if outbox.try_send(msg("big/x", QoS::AtMostOnce, &big, false), Props::default()) {
                taken += 1;
            }
        }
        assert_eq!(taken, OUTBOX_BYTES / (1024 * 1024), "4 MiB wait, the rest is dropped");
    }
}
