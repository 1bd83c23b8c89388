//! One simulated nightlight, as a broker, a controller and Home Assistant see a real one.
//!
//! Rules (the device contract, kept small):
//! - A reading every `interval` (the first at a random phase, so a fleet does not publish in
//!   step), `seq` from 1 in this run, `run` the process's start; its wall clock may be skewed.
//! - Readings wait in an in-memory queue (at most [`QUEUE_MAX`]; the oldest go past it) and are
//!   sent at QoS 1, oldest first, at most [`WINDOW`] in flight; a PUBACK takes a reading off the
//!   queue; a dropped connection sends again from the oldest one not acknowledged.
//! - Reconnects wait the project's backoff with jitter (1 s to 30 s, reset by a connection that
//!   lasted); the Last Will makes `<id>/status` `offline`, retained.
//! - On every connect: `online`, the LED's state and Home Assistant's discovery (retained), the
//!   update state when updates are on; `{"led_on": bool}` on `<id>/commands` switches the LED
//!   and is answered with `<id>/state`.
//! - A manifest on `<id>/update` is verified as the real device does it (signature, version);
//!   its install is simulated: downloading, verifying, installing, gating, then `done` on the new
//!   version, or `rolled_back` on the old one for the devices told to fail; a version that failed
//!   is not tried again.
//! - A cut (a scenario: a partition, a reconnect storm) drops the connection at once, without
//!   DISCONNECT, and holds the device off the broker until the cut ends.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{PubAck, Subscribe};
use rumqttc::mqttbytes::QoS;
use rumqttc::{Packet, Publish};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant, Sleep};

use super::conn::{Conn, ConnError, Hello};
use super::{Control, Shared};
use crate::link::Backoff;
use crate::topics;
use crate::update::manifest::Manifest;
use crate::update::state::{Phase, UpdateState};

/// Readings held at most while the broker is away.
pub const QUEUE_MAX: usize = 4096;
/// Readings in flight at once.
pub const WINDOW: usize = 16;
/// Keep-alive, seconds.
const KEEP_ALIVE: u16 = 60;
/// Packet ids from here on are the device's other messages (status, state, discovery): their
/// PUBACKs are not readings'.
const OTHER_PKIDS: u16 = 60_000;
/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(5);

/// What makes one device different from the others.
pub struct Spec {
    pub index: usize,
    /// Added to the wall clock of its readings' `ts`.
    pub skew_ms: i64,
    /// Its simulated installs fail.
    pub fail_installs: bool,
}

struct Reading {
    seq: u64,
    ts: u64,
    light: u16,
    taken: Instant,
    /// Handed to the connection in this connection's life.
    sent: bool,
}

struct Sim<'a> {
    spec: Spec,
    id: String,
    shared: &'a Shared,
    queue: VecDeque<Reading>,
    next_seq: u64,
    led: bool,
    version: String,
    failed: Option<String>,
    update: Option<UpdateState>,
    other_pkid: u16,
    /// When a packet last went to the broker: keep-alive needs a PINGREQ only after silence.
    last_sent: Instant,
}

/// The device's next reading: one timer, moved on rather than made anew at every turn of its
/// loop (10,000 devices turning twice per reading made timer churn the fleet's largest cost).
struct Clock {
    next: Instant,
    timer: Pin<Box<Sleep>>,
    interval: Duration,
}

impl Clock {
    fn new(first: Instant, interval: Duration) -> Self {
        Clock { next: first, timer: Box::pin(sleep_until(first)), interval }
    }

    /// Waits for the next reading's time; then it is one interval later.
    async fn tick(&mut self) {
        self.timer.as_mut().await;
        self.next += self.interval;
        self.timer.as_mut().reset(self.next);
    }
}

/// Runs one device until its control says stop.
pub async fn run(spec: Spec, shared: Arc<Shared>, mut control: watch::Receiver<Control>) {
    let id = super::device_id(spec.index);
    let mut sim = Sim {
        spec,
        id,
        shared: &shared,
        queue: VecDeque::new(),
        next_seq: 1,
        led: false,
        version: shared.version.clone(),
        failed: None,
        update: None,
        other_pkid: OTHER_PKIDS,
        last_sent: Instant::now(),
    };
    let interval = shared.interval;
    let mut clock = Clock::new(Instant::now() + interval.mul_f64(fastrand::f64()), interval);
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    // The first connects spread over a second, as a fleet powered on together.
    let mut connect_at = Instant::now() + Duration::from_millis(fastrand::u64(0..1000));
    loop {
        // Away from the broker: readings queue until it is time to try again.
        loop {
            let (stop, held_until) = {
                let c = control.borrow_and_update();
                (c.stop, c.cut.until(sim.spec.index))
            };
            if stop {
                return;
            }
            let at = connect_at.max(held_until.unwrap_or(connect_at));
            tokio::select! {
                _ = control.changed() => continue,
                _ = clock.tick() => sim.take_reading(),
                _ = sleep_until(at) => break,
            }
        }
        let will = Some((topics::status(&sim.id), &b"offline"[..]));
        let hello = Hello { client_id: &sim.id, keep_alive_s: KEEP_ALIVE, clean: true, will };
        let mut conn = match Conn::open(&shared.broker, &hello, Duration::from_secs(10)).await {
            Ok((c, _)) => c,
            Err(_) => {
                shared.connect_failures.fetch_add(1, Relaxed);
                connect_at = Instant::now() + backoff.next_delay();
                continue;
            }
        };
        let up = Instant::now();
        shared.connected.fetch_add(1, Relaxed);
        let ended = sim.session(&mut conn, &mut clock, &mut control).await;
        shared.connected.fetch_sub(1, Relaxed);
        sim.queue.iter_mut().for_each(|r| r.sent = false);
        match ended {
            Ended::Stop => {
                let _ = conn.send(&Packet::Disconnect).await;
                return;
            }
            Ended::Cut | Ended::Lost(_) => {
                if let Ended::Lost(e) = &ended {
                    // The first few say why; the rest are counted.
                    if shared.drops.fetch_add(1, Relaxed) < 3 {
                        eprintln!("fleet: {} lost its connection: {e}", sim.id);
                    }
                }
                if up.elapsed() >= STABLE {
                    backoff.reset();
                }
                connect_at = Instant::now() + backoff.next_delay();
            }
        }
    }
}

enum Ended {
    Stop,
    Cut,
    Lost(ConnError),
}

impl Sim<'_> {
    fn take_reading(&mut self) {
        if self.queue.len() >= QUEUE_MAX {
            self.queue.pop_front();
            self.shared.dropped.fetch_add(1, Relaxed);
            self.shared.dropped_by[self.spec.index].fetch_add(1, Relaxed);
        }
        let ts = crate::clock::unix_ms().saturating_add_signed(self.spec.skew_ms);
        let light = fastrand::u16(0..=1000);
        self.queue.push_back(Reading { seq: self.next_seq, ts, light, taken: Instant::now(), sent: false });
        self.next_seq += 1;
        self.shared.taken.fetch_add(1, Relaxed);
        self.released();
    }

    /// Says which readings the device no longer holds: every seq below its queue's oldest.
    fn released(&self) {
        let oldest = self.queue.front().map_or(self.next_seq, |r| r.seq);
        self.shared.released_upto[self.spec.index].store(oldest - 1, Relaxed);
    }

    async fn session(&mut self, conn: &mut Conn, clock: &mut Clock, control: &mut watch::Receiver<Control>) -> Ended {
        if let Err(e) = self.hello(conn).await {
            return Ended::Lost(e);
        }
        let ping_every = Duration::from_secs(u64::from(KEEP_ALIVE) / 2);
        let ping = sleep_until(Instant::now() + ping_every);
        tokio::pin!(ping);
        loop {
            if let Err(e) = self.pump(conn).await {
                return Ended::Lost(e);
            }
            tokio::select! {
                _ = control.changed() => {
                    let c = control.borrow_and_update();
                    if c.stop {
                        return Ended::Stop;
                    }
                    if c.cut.takes(self.spec.index) {
                        return Ended::Cut;
                    }
                }
                _ = clock.tick() => self.take_reading(),
                _ = &mut ping => {
                    // Readings keep the connection alive; a PINGREQ only after ping_every of silence.
                    if self.last_sent.elapsed() >= ping_every {
                        if let Err(e) = conn.send(&Packet::PingReq).await {
                            return Ended::Lost(e);
                        }
                        self.last_sent = Instant::now();
                    }
                    ping.as_mut().reset(self.last_sent + ping_every);
                }
                packet = conn.recv() => match packet {
                    Ok(p) => if let Err(e) = self.on_packet(conn, p).await {
                        return Ended::Lost(e);
                    },
                    Err(e) => return Ended::Lost(e),
                },
            }
        }
    }

    /// What a connect sends: subscriptions, then the retained reports.
    async fn hello(&mut self, conn: &mut Conn) -> Result<(), ConnError> {
        let mut filters = vec![topics::commands(&self.id)];
        if self.shared.keys.is_some() {
            filters.push(topics::update(&self.id));
        }
        let mut sub =
            Subscribe::new_many(filters.into_iter().map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce)));
        sub.pkid = 1;
        conn.send(&Packet::Subscribe(sub)).await?;
        self.publish(conn, topics::status(&self.id), b"online".to_vec()).await?;
        self.publish_state(conn).await?;
        let discovery = format!(
            concat!(
                r#"{{"dev":{{"ids":["{id}"],"name":"{id}","mdl":"nightlight (fleet)"}},"o":{{"name":"nightlight"}},"#,
                r#""avty_t":"{id}/status","cmps":{{"led":{{"p":"light","unique_id":"{id}_led","cmd_t":"{id}/commands","#,
                r#""stat_t":"{id}/state"}},"light":{{"p":"sensor","unique_id":"{id}_light","stat_t":"{id}/telemetry","#,
                r#""val_tpl":"{{{{ value_json.light }}}}"}}}}}}"#
            ),
            id = self.id
        );
        let topic = topics::ha_device_config("homeassistant", &self.id);
        self.publish(conn, topic, discovery.into_bytes()).await?;
        if self.shared.keys.is_some() {
            let state = self.update_state();
            self.publish(conn, topics::update_state(&self.id), state.to_json()).await?;
        }
        Ok(())
    }

    fn update_state(&self) -> UpdateState {
        self.update.clone().unwrap_or_else(|| UpdateState::idle(&self.version))
    }

    async fn publish_state(&mut self, conn: &mut Conn) -> Result<(), ConnError> {
        let state = crate::payload::state_json(self.led, "remote");
        self.publish(conn, topics::state(&self.id), state).await
    }

    /// A retained QoS 1 message (not a reading).
    async fn publish(&mut self, conn: &mut Conn, topic: String, payload: Vec<u8>) -> Result<(), ConnError> {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload);
        p.retain = true;
        self.other_pkid = if self.other_pkid == u16::MAX { OTHER_PKIDS } else { self.other_pkid + 1 };
        p.pkid = self.other_pkid;
        conn.send(&Packet::Publish(p)).await
    }

    /// Sends queued readings, oldest first, while the window has room.
    async fn pump(&mut self, conn: &mut Conn) -> Result<(), ConnError> {
        let in_flight = self.queue.iter().take_while(|r| r.sent).count();
        for r in self.queue.iter_mut().skip(in_flight).take(WINDOW.saturating_sub(in_flight)) {
            let payload = format!(r#"{{"light":{},"ts":{},"seq":{},"run":{}}}"#, r.light, r.ts, r.seq, self.shared.run);
            let mut p = Publish::new(topics::telemetry(&self.id), QoS::AtLeastOnce, payload);
            p.pkid = reading_pkid(r.seq);
            r.sent = true;
            self.shared.sent.fetch_add(1, Relaxed);
            conn.send(&Packet::Publish(p)).await?;
            self.last_sent = Instant::now();
        }
        Ok(())
    }

    async fn on_packet(&mut self, conn: &mut Conn, packet: Packet) -> Result<(), ConnError> {
        match packet {
            Packet::PubAck(a) if a.pkid < OTHER_PKIDS => self.acked(a.pkid),
            Packet::Publish(p) => {
                if p.qos == QoS::AtLeastOnce {
                    conn.send(&Packet::PubAck(PubAck::new(p.pkid))).await?;
                }
                let leaf = p.topic.strip_prefix(self.id.as_str()).and_then(|t| t.strip_prefix('/')).unwrap_or("");
                match leaf {
                    "commands" => {
                        if let Ok(cmd) = crate::payload::parse_command(&p.payload) {
                            self.led = cmd.led_on;
                            self.shared.commands.fetch_add(1, Relaxed);
                            self.publish_state(conn).await?;
                        }
                    }
                    "update" if !p.payload.is_empty() => self.on_manifest(conn, &p.payload).await?,
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A reading's PUBACK: it leaves the queue (and with it every acknowledged one before it).
    fn acked(&mut self, pkid: u16) {
        let Some(at) = self.queue.iter().position(|r| r.sent && reading_pkid(r.seq) == pkid) else { return };
        // QoS 1 acknowledgements come in order: everything before it was answered too.
        for r in self.queue.drain(..=at) {
            self.shared.acked.fetch_add(1, Relaxed);
            self.shared.observe_ack(r.taken.elapsed());
        }
        self.released();
    }

    /// A manifest: verified as the real device does, then a simulated install.
    async fn on_manifest(&mut self, conn: &mut Conn, payload: &[u8]) -> Result<(), ConnError> {
        let Some(keys) = &self.shared.keys else { return Ok(()) };
        let manifest = match Manifest::accept(payload, keys, crate::update::state::architecture(), &self.version) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(why) => {
                let state = UpdateState { state: Phase::Failed, ..UpdateState::idle(&self.version) }
                    .with_reason(why.to_string());
                self.update = Some(state.clone());
                return self.publish(conn, topics::update_state(&self.id), state.to_json()).await;
            }
        };
        if self.failed.as_deref() == Some(manifest.version.as_str()) {
            return Ok(()); // failed before: not tried again by itself
        }
        let (from, to) = (self.version.clone(), manifest.version.clone());
        for (phase, percent) in [
            (Phase::Downloading, Some(0)),
            (Phase::Downloading, Some(100)),
            (Phase::Verifying, None),
            (Phase::Installing, None),
            (Phase::Gating, None),
        ] {
            let state = UpdateState { percent, ..UpdateState::toward(phase, &from, &to) };
            self.publish(conn, topics::update_state(&self.id), state.to_json()).await?;
            // A step of the install takes a moment; readings go on meanwhile on the real device,
            // and here they wait: the steps are short.
            tokio::time::sleep(Duration::from_millis(fastrand::u64(50..200))).await;
        }
        let state = if self.spec.fail_installs {
            self.failed = Some(to.clone());
            self.shared.rolled_back.fetch_add(1, Relaxed);
            UpdateState::toward(Phase::RolledBack, &from, &to)
                .with_reason("the new version failed the health gate (simulated)")
        } else {
            self.version = to.clone();
            self.shared.updated.fetch_add(1, Relaxed);
            UpdateState { version: to.clone(), ..UpdateState::toward(Phase::Done, &from, &to) }
        };
        self.update = Some(state.clone());
        self.publish(conn, topics::update_state(&self.id), state.to_json()).await
    }
}

/// A reading's packet id: 1 to OTHER_PKIDS - 1, distinct within any window.
fn reading_pkid(seq: u64) -> u16 {
    (seq % u64::from(OTHER_PKIDS - 1)) as u16 + 1
}
