//! The device: wires the sensor, the LED, the queue and the MQTT link together.
//!
//! ```text
//!  sampler ───readings──────▶ ┌──────────── device loop ────────────┐
//!  (sampler.rs: a Ticker,     │ queue.push ─▶ pump ─▶ client.publish ──▶ link (rumqttc)
//!   sensor.read; part of      │ poller batch ◀──────── events ◀──────────── link
//!   the loop's task)          │ PUBACK ─▶ queue.ack (refused: denial)│
//!  shutdown future ─────────▶ │ commands ─▶ led.set ─▶ state        │
//!                             └─────────────────────────────────────┘
//! ```
//! The loop is the only owner of the queue, the LED and the client, so ordering is simple: a
//! reading is published only after every older one, and a connection error (or a reading the
//! broker refused, [`denial`]) rewinds the queue before anything else is sent. The link
//! ([`crate::link`]) is the same under MQTT 5 and 3.1.1; what differs is in its module doc.

mod alarm;
mod connection;
mod denial;
mod discovery;
mod health;
mod inbox;
mod lamp;
mod outbox;
mod oversized;
mod request;
mod sampler;
mod subscriptions;

use std::future::Future;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::time::MissedTickBehavior;
use tracing::{debug, error, info, trace, warn};

use crate::clock;
use crate::config::{Config, SensorKind};
use crate::homeassistant;
use crate::led::power_on::KeptLed;
use crate::led::{self, Led};
use crate::link::{self, Backoff, Event, LinkError, Message, Poller, Qos, Security, Sent, Spec};
use crate::local::LocalRule;
use crate::metrics::{self, Reject};
use crate::payload::{self, OFFLINE, ONLINE};
use crate::queue::DiskQueue;
use crate::remote;
use crate::sensor::{self, Reading, Sensor, SimulatedControl};
use crate::statefile::StateDir;
use crate::systemd::Notifier;
use crate::topics::Topics;
use crate::update;
use alarm::Alarm;
use connection::{Connection, Ended, Oversize};
use denial::{Denial, Settle};
pub use health::Counters;
use health::Started;
use sampler::Sampler;

/// Telemetry publishes in flight at once while a backlog drains.
pub const WINDOW: usize = 64;
/// How long a clean stop waits for the broker to take the `offline` status.
const STOP_GRACE: Duration = Duration::from_millis(1200);

/// Home Assistant's migration to device-based discovery was made: the state directory's marker.
const MIGRATED: &str = "ha-migrated";

/// How often `<id>/health` is published while connected (and on every connect).
pub const HEALTH_EVERY: Duration = Duration::from_secs(60);
/// While metrics are on, how often the device loop copies its figures for them.
const METRICS_EVERY: Duration = Duration::from_secs(1);

/// Runs the device until `shutdown` completes; returns after a clean stop.
///
/// # Errors
/// The queue directory, the sensor or the LED cannot be opened.
pub async fn run(cfg: Config, security: Security, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (sensor, simulated) = sensor::open(&cfg)?;
    let led = led::open(&cfg)?;
    run_with(cfg, security, Io { sensor, simulated, led, wall: clock::Wall::System }, shutdown).await
}

/// What the device reads and drives, and the wall clock it trusts: opened from the
/// configuration by [`run`]; given by the demo (a silent virtual LED) and by in-process tests (a
/// clock they set).
pub struct Io {
    pub sensor: Box<dyn Sensor>,
    /// The virtual sensor's control (`<id>/virtual/light`), if it is one.
    pub simulated: Option<SimulatedControl>,
    pub led: Box<dyn Led>,
    pub wall: clock::Wall,
}

/// As [`run`], with what it reads and drives given.
///
/// # Errors
/// The queue directory cannot be opened.
pub async fn run_with(
    cfg: Config,
    security: Security,
    io: Io,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let Io { sensor, simulated, led, wall } = io;
    // One state directory, handed to every part that keeps a file there ([`StateDir`]); a
    // directory in RAM believes it is durable and is not: said at start and in health.
    let state = StateDir::open(Path::new(&cfg.queue.dir))
        .with_context(|| format!("cannot start the state directory's writer (queue.dir = {})", cfg.queue.dir))?;
    // The queue first: its lock is the whole directory's.
    let queue = DiskQueue::open(state.path(), cfg.queue.max_bytes, Duration::from_millis(cfg.queue.spill_ms))
        .with_context(|| format!("cannot open the offline queue (queue.dir = {})", cfg.queue.dir))?;
    let live = remote::Live::open(cfg, &state);
    let cfg = live.cfg().clone();
    // Before any network: the LED as `led.power_on` says.
    let led = KeptLed::start(led, cfg.led.power_on, cfg.server.threshold, state.path());
    let topics = Topics::new(&cfg.id);
    let mut spec = Spec::new(&cfg.mqtt, cfg.client_id().to_owned(), cfg.mqtt.clean_session);
    spec.will = Some((topics.status.clone(), OFFLINE.as_bytes().to_vec()));
    let (client, eventloop) = link::build(&cfg.mqtt, &security, &spec);
    let counters = Arc::new(Counters::default());
    metrics::start(&cfg.metrics, &counters);
    let interval = Duration::from_millis(cfg.sensor.interval_ms);
    let sampler = Sampler::new(sensor, simulated, interval, counters.clone(), wall.clone());
    info!(id = %cfg.id, broker = %cfg.mqtt.broker(), queued = queue.stats().readings,
        "nightlight started");
    // Configuration loaded, queue, sensor and LED open: ready as far as systemd is concerned.
    let notifier = Notifier::new(cfg.mqtt.broker());
    notifier.ready();
    let cfg_local = (cfg.led.local_after_s, cfg.server.threshold, cfg.server.hysteresis);
    let run = queue.run();
    let updates = start_updates(&cfg, state.path());
    let requests = request::Requests::new(&cfg.id, Duration::from_millis(cfg.sensor.min_request_ms));
    let backoff = (Duration::from_millis(cfg.mqtt.reconnect_min_ms), Duration::from_millis(cfg.mqtt.reconnect_max_ms));
    let reading_qos = if cfg.mqtt.qos == 0 { Qos::AtMostOnce } else { Qos::AtLeastOnce };
    let mut device = Device {
        conn: Connection::new(Backoff::new(backoff.0, backoff.1), cfg.mqtt.clean_session),
        topics,
        queue,
        out: outbox::Outbox::new(client, reading_qos),
        poller: Poller::new(eventloop),
        counters,
        denial: Denial::new(backoff.0, backoff.1),
        started: Started::new(now()),
        notifier,
        lamp: lamp::Lamp::new(led, LocalRule::new(cfg_local.0, cfg_local.1, cfg_local.2, now())),
        live,
        sampler,
        restamp: clock::Restamp::new(run),
        wall,
        state,
        subs: subscriptions::Subscriptions::default(),
        requests,
        updates,
        // The unit's ProcSubset=pid hides /proc/device-tree; sysfs has the same file.
        ha: discovery::Discovery::new(
            ["/sys/firmware/devicetree/base/model", "/proc/device-tree/model"]
                .iter()
                .find_map(|p| homeassistant::board_model(Path::new(p))),
        ),
    };
    device.run(shutdown).await
}

struct Device {
    topics: Topics,
    queue: DiskQueue,
    /// What is handed to the MQTT client, and what each packet id stands for ([`outbox`]).
    out: outbox::Outbox,
    poller: Poller,
    counters: Arc<Counters>,
    /// Up or down, the backoff, and the recovery from an oversized message ([`connection`]).
    conn: Connection,
    /// Readings the broker refused: held, rewound, retried.
    denial: Denial,
    /// When this run started, for health's `uptime_s` and `started`.
    started: Started,
    /// READY, the watchdog and the status line systemd shows.
    notifier: Notifier,
    /// The LED, and whether a controller or the device itself switches it ([`lamp`]).
    lamp: lamp::Lamp,
    /// Live configuration: what was set, the last refusal.
    live: remote::Live,
    /// The sensor, read every `sensor.interval_ms`.
    sampler: Sampler,
    /// Readings taken before the clock was synchronized: marked, then re-stamped.
    restamp: clock::Restamp,
    /// The wall clock: the system's, or a test's ([`clock::Wall`]).
    wall: clock::Wall,
    /// `queue.dir`: where the discovery marker is kept, and whether it is on storage.
    state: StateDir,
    /// Home Assistant: what to announce, and when.
    ha: discovery::Discovery,
    /// The SUBSCRIBEs in flight and what each asked for; filters left out for a retained
    /// message too large to read ([`subscriptions`]).
    subs: subscriptions::Subscriptions,
    /// Readings on request ([`request`]).
    requests: request::Requests,
    /// Updates over MQTT, while a release key is trusted ([`crate::update`]).
    updates: Option<update::agent::Handle>,
}

/// The update agent, while `update.keys` trusts a key.
fn start_updates(cfg: &Config, state_dir: &Path) -> Option<update::agent::Handle> {
    if cfg.update.keys.is_empty() {
        return None;
    }
    let settings = update::agent::Settings {
        keys: cfg.update.public_keys(),
        state_dir: state_dir.to_owned(),
        running: crate::VERSION.to_owned(),
        arch: update::state::architecture().to_owned(),
        stall: Duration::from_secs(cfg.update.stall_s),
        retry: Duration::from_secs(1),
    };
    match update::agent::start(settings) {
        Ok(h) => Some(h),
        Err(e) => {
            warn!(error = %e, "updates are off: cannot start their thread");
            None
        }
    }
}

/// The next state of the update, if updates are on.
async fn update_changed(updates: &mut Option<update::agent::Handle>) -> update::state::UpdateState {
    match updates {
        Some(h) => h.changed().await,
        None => std::future::pending().await,
    }
}

impl Device {
    async fn run(&mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        // systemd's watchdog (WatchdogSec=) is fed from this loop, so a hung loop gets restarted.
        let watchdog = self.notifier.watchdog();
        let mut feed = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |d| d / 2));
        feed.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut health = tokio::time::interval_at(tokio::time::Instant::now() + HEALTH_EVERY, HEALTH_EVERY);
        health.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let metrics_on = self.live.cfg().metrics.enabled();
        let mut snapshot = tokio::time::interval(METRICS_EVERY);
        snapshot.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.poller.start(); // connect
        let (mut queue_alarm, mut denied_alarm, mut save_alarm, mut request_alarm) =
            (Alarm::default(), Alarm::default(), Alarm::default(), Alarm::default());
        let (mut ha_alarm, mut clock_alarm) = (Alarm::default(), Alarm::default());
        loop {
            queue_alarm.set(self.queue.next_deadline().map(tokio::time::Instant::from_std));
            denied_alarm.set(self.denial.deadline().map(tokio::time::Instant::from_std));
            save_alarm.set(self.live.saver().deadline());
            request_alarm.set(self.requests.deadline().map(tokio::time::Instant::from_std));
            ha_alarm.set(self.ha.due().map(tokio::time::Instant::from_std));
            if let Some(sim) = self.sampler.simulated() {
                sim.set_queued(self.queue.stats().readings); // for the demo's page
            }
            clock_alarm.set(self.conn.clock_check().map(tokio::time::Instant::from_std));
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                // First after a stop: nothing the device does may starve the watchdog.
                _ = feed.tick(), if watchdog.is_some() => {
                    self.notifier.feed_watchdog();
                }
                // Before the link: ready once an interval, it cannot starve it, and a backlog
                // draining as fast as the broker acknowledges must not delay a reading.
                sample = self.sampler.next() => self.on_sample(sample),
                events = self.poller.next() => {
                    self.on_events(events);
                    self.poller.start(); // unless a reconnect waits its backoff
                }
                _ = queue_alarm.ring(), if queue_alarm.is_set() => {
                    self.queue.tick(now());
                    self.pump(); // a backlog read that failed is retried now
                }
                _ = denied_alarm.ring(), if denied_alarm.is_set() => {
                    self.denial.retry(now());
                    self.pump(); // the refused readings, again
                }
                _ = save_alarm.ring(), if save_alarm.is_set() => {
                    self.live.saver().write_due();
                }
                _ = ha_alarm.ring(), if ha_alarm.is_set() => {
                    self.ha.answered_birth();
                    self.publish_discovery();
                    self.publish_state();
                    if let Some(out) = self.ha.last_reading(self.live.cfg(), Qos::AtLeastOnce) {
                        self.publish_retained(out);
                    }
                }
                _ = request_alarm.ring(), if request_alarm.is_set() => {
                    debug!("a reading on request");
                    self.requests.fire(now());
                    self.sampler.request();
                }
                _ = clock_alarm.ring(), if clock_alarm.is_set() => {
                    if self.conn.clock_checked(self.wall.now().1, now()) {
                        info!("the clock is synchronized: connecting again now");
                        self.poller.start_after(Duration::ZERO);
                    }
                }
                _ = snapshot.tick(), if metrics_on => self.snapshot(),
                state = update_changed(&mut self.updates) => self.publish_update(&state),
                _ = health.tick() => {
                    if self.conn.is_up() {
                        self.publish_health();
                    }
                }
            }
        }
        self.notifier.stopping();
        self.stop().await
    }

    /// A reading (or a failed read on request): handled, and its answer to whoever asked.
    fn on_sample(&mut self, sample: sampler::Sample) {
        let taken = sample.result.map(|reading| self.on_reading(reading, sample.stamp));
        if sample.stamp.requested {
            let waiting = self.requests.taken();
            if !self.conn.is_up() || waiting.is_empty() {
                return; // no one to answer, or asked over a connection that is gone
            }
            // Only an answer is serialized here: a scheduled reading costs no JSON of its own.
            let answer = match taken {
                Ok(t) => t.to_json(),
                Err(e) => serde_json::json!({ "error": e.to_string() }).to_string().into_bytes(),
            };
            for reply in waiting {
                self.out.reply(reply, answer.clone());
            }
        }
    }

    /// A request on `<id>/read` ([`request`]).
    fn on_read_request(&mut self, p: &Message) {
        let verdict = self.requests.request(now(), p.retain, p.payload.len(), p.reply());
        match verdict {
            request::Verdict::Read => {
                debug!("a reading on request");
                self.sampler.request();
            }
            request::Verdict::Later(_) => debug!("a request inside sensor.min_request_ms: read at the window's end"),
            request::Verdict::Joined => debug!("a request joins the reading asked for"),
            request::Verdict::Dropped => {
                debug!(limited_total = self.requests.limited(), "a request dropped: too many wait for one reading")
            }
            request::Verdict::Refused(why) => {
                let n = self.counters.reject(Reject::Request);
                let to = p.response_topic.as_deref().map(|t| payload::printable(t, 80));
                warn!(topic = %p.topic, reply_to = ?to, reason = why, rejected_total = n, "ignored a request for a reading");
            }
        }
    }

    /// A reading: the local rule, the state when it changed, then queued and sent. Returns it
    /// as telemetry.
    fn on_reading(&mut self, reading: Reading, stamp: sampler::Stamp) -> payload::Telemetry {
        trace!(light = reading.light, "reading taken");
        self.counters.readings.fetch_add(1, Ordering::Relaxed);
        let ts = stamp.ts;
        let ts_ok = self.restamp.observe(ts, stamp.mono_ms, stamp.synced);
        if self.lamp.reading(reading.light, now()) {
            self.publish_state();
        }
        if let Some(out) = self.ha.reading(self.live.cfg(), payload::reading_json(reading.light, reading.lux, ts)) {
            self.publish_retained(out);
        }
        let seq = self.queue.push_stamped(now(), reading.light, ts, ts_ok, reading.lux);
        self.pump();
        payload::Telemetry { light: reading.light, ts, seq, run: self.queue.run(), lux: reading.lux, ts_ok }
    }

    /// A retained message of Home Assistant's part ([`discovery`]), when connected.
    fn publish_retained(&mut self, out: discovery::Out) {
        if self.conn.is_up() {
            self.publish_at(&out.topic, out.qos, true, out.payload);
        }
    }

    fn on_events(&mut self, events: Vec<Result<Event, LinkError>>) {
        for ev in events {
            self.on_event(ev);
        }
        self.pump();
    }

    fn on_event(&mut self, ev: Result<Event, LinkError>) {
        match ev {
            Ok(Event::Connected { session_present }) => self.on_connected(session_present),
            Ok(Event::Answered { pkid, refused }) => {
                let what = self.out.answered(pkid);
                self.on_answered(what, refused);
            }
            Ok(Event::Written { pkid }) => {
                let done = self.out.written(pkid);
                self.on_answered(done, None);
            }
            Ok(Event::Message(m)) => self.on_message(&m),
            Ok(Event::Subscribed { refused }) => match self.subs.answered(&refused) {
                subscriptions::Answer::Topics { refused } if !refused.is_empty() => {
                    warn!(topics = ?refused, "the broker refused subscriptions (check its ACL): nothing arrives on these");
                }
                subscriptions::Answer::LookUpRefused => {
                    debug!("the broker does not let us look up old discovery configs: migrating every old topic");
                    self.ha.look_up_refused();
                }
                _ => {}
            },
            Ok(Event::Unsubscribed) => {
                if let Some(out) = self.ha.looked_up(self.live.cfg()) {
                    self.migrated(out);
                }
            }
            Ok(_) => {}
            Err(e) => self.on_disconnected(&e),
        }
    }

    /// The broker answered a publish (or a QoS 0 one was written): delivered, or refused.
    fn on_answered(&mut self, what: Option<Sent>, refused: Option<String>) {
        match (what, refused) {
            (Some(Sent::Telemetry(seq, ts)), None) => {
                self.queue.ack(seq);
                self.counters.acked.fetch_add(1, Ordering::Relaxed);
                // By the wall clock: a reading queued through an outage waited that long.
                let waited = self.wall.now().0.saturating_sub(ts);
                self.counters.delivery.observe(Duration::from_millis(waited));
                self.notifier.delivered();
                if self.denial.accepted() {
                    info!(topic = %self.topics.telemetry, "the broker takes readings again");
                }
            }
            (Some(Sent::Telemetry(seq, _)), Some(reason)) if self.denial.refused() => {
                warn!(topic = %self.topics.telemetry, seq, reason = %reason, denied_total = self.denial.count(),
                    "the broker refused a reading (check its ACL): it stays queued and is sent again with backoff");
                self.publish_health(); // so `denied` shows now, not at the next minute
            }
            (Some(Sent::Telemetry(seq, _)), Some(_)) => debug!(seq, "a reading refused again"),
            (Some(Sent::Other(topic)), Some(reason)) if self.out.first_refusal(&topic) => {
                warn!(topic = %topic, reason = %reason, "the broker refused a message (check its ACL)");
            }
            _ => {}
        }
        // Counting what is in flight only matters while refused readings are held.
        if self.denial.holds() && self.denial.settle(self.out.readings_pending(), now()) == Settle::Rewind {
            self.queue.resend();
        }
    }

    fn on_connected(&mut self, session_present: bool) {
        let reads_oversized = self.conn.up(now());
        self.queue.connected();
        // This connection gets past the message; the next one is as configured again (set
        // when this one ends, with the event loop in hand).
        if let Some(limit) = reads_oversized {
            info!(limit, "reconnected to the same session to read the oversized message and reject it");
        }
        info!(broker = %self.live.cfg().mqtt.broker(), session_present,
            backlog = self.queue.stats().readings, "connected");
        self.notifier.connected(self.queue.stats().readings);
        // A session the broker kept still has our subscriptions; re-subscribing would make it
        // deliver retained messages again.
        self.subs.connected();
        if !session_present {
            let ha_status =
                self.live.cfg().homeassistant.enabled.then(|| homeassistant::ha_status_topic(self.live.cfg()));
            let simulated = self.live.cfg().sensor.kind == SensorKind::Virtual;
            let wanted = inbox::wanted(&self.topics, simulated, ha_status.as_deref(), self.updates.is_some());
            for packet in self.subs.packets(wanted, now()) {
                match self.out.client().subscribe(&packet) {
                    Ok(()) => self.subs.sent(packet),
                    Err(e) => warn!(error = %e, "cannot subscribe to commands"),
                }
            }
        }
        self.lamp.link(true, session_present, now());
        if self.lamp.must_ask() {
            // A restart that resumed the session: the controllers' retained statuses come only
            // with a new SUBSCRIBE (the other subscriptions stand).
            let topics = vec![crate::topics::CONTROLLERS.to_owned()];
            match self.out.client().subscribe(&topics) {
                Ok(()) => {
                    self.subs.sent(topics);
                    self.lamp.asking();
                }
                Err(e) => warn!(error = %e, "cannot subscribe to the controllers' statuses"),
            }
        }
        self.publish_other(&self.topics.status.clone(), ONLINE.as_bytes().to_vec(), true);
        self.publish_state();
        self.publish_config();
        if let Some(u) = &self.updates {
            self.publish_update(&u.state());
        }
        self.publish_discovery();
        if let Some(out) = self.ha.last_reading(self.live.cfg(), Qos::AtLeastOnce) {
            self.publish_retained(out);
        }
        self.publish_health();
    }

    /// Home Assistant discovery ([`discovery`]): on every connect and Home Assistant's birth.
    fn publish_discovery(&mut self) {
        let migrated = self.state.has(MIGRATED);
        match self.ha.announce(self.live.cfg(), migrated) {
            discovery::Announce::Publish(out) => out.into_iter().for_each(|o| self.publish_retained(o)),
            discovery::Announce::LookUp(filter) => match self.out.client().look_up_retained(&filter) {
                Ok(()) => self.subs.look_up_sent(),
                Err(e) => {
                    warn!(error = %e, "cannot look up old discovery configs: migrating every old topic");
                    let out = self.ha.look_up_failed(self.live.cfg());
                    self.migrated(out);
                }
            },
        }
    }

    /// The migration's messages published, noted in the state directory.
    fn migrated(&mut self, out: Vec<discovery::Out>) {
        if out.len() > 1 {
            info!(
                messages = out.len(),
                "migrating Home Assistant's per-entity discovery configs of an earlier release"
            );
        }
        out.into_iter().for_each(|o| self.publish_retained(o));
        self.state.keep(MIGRATED, b"1\n".to_vec(), "the discovery migration runs again at the next connect");
    }

    /// The figures only the loop knows, for the metrics ([`metrics::Snapshot`]).
    fn snapshot(&mut self) {
        let queue = self.queue.stats();
        self.counters.set_snapshot(metrics::Snapshot {
            run: self.queue.run(),
            protocol: self.out.client().protocol().as_str(),
            connected: self.conn.is_up(),
            queue,
            oldest_ts: self.queue.oldest_ts(),
            queue_durable: self.state.on_storage() && queue.seq_durable,
            denied: self.denial.count(),
            requests_limited: self.requests.limited(),
            clock_synced: self.wall.now().1,
            clock_jump_ms: self.restamp.shift(),
        });
    }

    fn publish_health(&mut self) {
        let (uptime, started) = self.started.now(now(), self.wall.now());
        let h = health::health(
            &self.counters,
            uptime,
            started,
            health::Figures {
                queue: self.queue.stats(),
                oldest_age_s: self.queue.oldest_ts().map_or(0, |ts| self.wall.now().0.saturating_sub(ts) / 1000),
                queue_on_storage: self.state.on_storage(),
                denied: self.denial.count(),
                requests_limited: self.requests.limited(),
                mode: self.lamp.mode().as_str(),
                protocol: self.out.client().protocol(),
            },
        );
        // Serializing a struct of numbers and an optional string cannot fail.
        let payload = serde_json::to_vec(&h).expect("health serializes");
        self.publish_other(&self.topics.health.clone(), payload, true);
    }

    fn on_disconnected(&mut self, e: &LinkError) {
        self.lamp.link(false, false, now());
        let mut reason = e.describe(&self.live.cfg().mqtt.host);
        if e.certificate_dates() && !self.wall.now().1 {
            // A Pi without a real-time clock boots on its last saved time: until NTP answers, a
            // certificate looks not yet valid (or expired). Name the clock, and connect again the
            // moment it is synchronized rather than at the end of a long backoff.
            reason = format!(
                "{reason}: this machine's clock is not synchronized (no NTP answer yet), so the certificate's dates \
                 cannot be trusted; connecting again as soon as it is"
            );
            self.conn.wait_for_clock(now());
        }
        if !self.conn.is_up()
            && self.live.cfg().mqtt.protocol == crate::config::Protocol::V5
            && e.v5_refused_at_connect() == 1
        {
            reason = format!(
                "{reason} at our MQTT 5 CONNECT: if the broker speaks only MQTT 3.1.1, remove mqtt.protocol (the \
                 default tries MQTT 5, then 3.1.1) or set it to \"3.1.1\""
            );
        }
        let down = self.conn.down(now(), &reason, e.oversized());
        match down.ended {
            Ended::Dropped => {
                self.counters.reconnected(e.lost());
                warn!(reason = %reason, backlog = self.queue.stats().readings, "disconnected");
                self.notifier.unreachable(&reason);
            }
            Ended::CannotConnect => {
                warn!(broker = %self.live.cfg().mqtt.broker(), reason = %reason, "cannot connect; retrying with backoff");
                self.notifier.unreachable(&reason);
            }
            Ended::Still => debug!(reason = %reason, "still cannot connect"),
        }
        self.counters.set_last_error(format!("mqtt: {reason}"));
        self.poller.forget_unsent();
        if let Some(el) = self.poller.eventloop() {
            if let Some(bytes) = down.max_incoming {
                el.set_max_incoming(bytes);
            }
            if let Some(clean) = down.clean {
                el.set_clean(clean);
            }
        }
        match (down.oversize, e.oversized()) {
            (Some(Oversize::Read(_)), Some(size)) => {
                // Back at once to the same session, reading up to this size: the broker sends
                // the message again (or, retained, at the subscription) and the command handler
                // rejects it. Commands sent meanwhile wait in the session.
                warn!(
                    bytes = size,
                    limit = link::MAX_INCOMING_BYTES,
                    "the broker sent a message larger than the limit; reading it once to reject it"
                );
            }
            (Some(Oversize::Discard), Some(size)) => {
                let n = self.counters.reject(Reject::Oversized);
                warn!(
                    bytes = size,
                    limit = link::MAX_RECOVERY_BYTES,
                    rejected_total = n,
                    "the broker sent a message too large even to reject; starting a new session without it"
                );
                if let Some(filter) = self.subs.too_large(now()) {
                    let why = format!(
                        "the broker holds a retained message larger than {} MiB for the subscription {filter}: left out \
                         for an hour (clear it: mosquitto_pub -r -n -t <its topic>)",
                        link::MAX_RECOVERY_BYTES >> 20
                    );
                    error!(filter = %filter, left_out_total = self.subs.left_out(), "{why}");
                    self.counters.set_last_error(format!("mqtt: {why}"));
                }
            }
            _ => {}
        }
        self.out.disconnected();
        self.subs.disconnected();
        self.ha.disconnected(); // a look-up under way is made again at the next connect
        self.denial.disconnected();
        self.queue.disconnected(now());
        self.poller.start_after(down.delay);
    }

    fn on_message(&mut self, p: &Message) {
        if self.ha.message(self.live.cfg(), &p.topic, &p.payload) {
            return; // an old discovery config, looked up
        }
        let ha_status = self.live.cfg().homeassistant.enabled.then(|| homeassistant::ha_status_topic(self.live.cfg()));
        match inbox::classify(&self.topics, ha_status.as_deref(), &p.topic) {
            inbox::Kind::Command => self.on_command(p),
            inbox::Kind::ControllerStatus => self.on_controller_status(p),
            inbox::Kind::ConfigSet => self.on_config_set(&p.payload, p.retain),
            inbox::Kind::ReadRequest => self.on_read_request(p),
            inbox::Kind::VirtualLight => self.on_virtual_light(p),
            inbox::Kind::HomeAssistantStatus => self.on_ha_status(p),
            inbox::Kind::Update => {
                if let Some(u) = &self.updates {
                    if !p.payload.is_empty() {
                        u.offer(&p.payload);
                    }
                }
            }
            inbox::Kind::UpdateInstall => {
                if let Some(u) = &self.updates {
                    info!("asked to install the update again");
                    u.retry();
                }
            }
            inbox::Kind::Other => {}
        }
    }

    /// A command: obeyed unless it is invalid, retained or stale (counted and logged).
    fn on_command(&mut self, p: &Message) {
        let taken = Instant::now();
        let (wall, synced) = self.wall.now();
        let now_ms = synced.then_some(wall);
        let max_age_s = self.live.cfg().led.command_max_age_s;
        match payload::parse_command(&p.payload) {
            Ok(cmd) => match payload::check_fresh(&cmd, p.retain, now_ms, max_age_s) {
                Ok(()) => {
                    self.lamp.command(cmd.led_on, now());
                    self.counters.command_led.observe(taken.elapsed());
                    self.publish_state();
                }
                Err(why) => {
                    let n = self.counters.reject(Reject::Stale);
                    warn!(topic = %p.topic, led_on = cmd.led_on, reason = %why, rejected_total = n,
                        "ignored a stale command");
                }
            },
            Err(e) => {
                let n = self.counters.reject(Reject::Invalid);
                warn!(topic = %p.topic, bytes = p.payload.len(), error = %e, rejected_total = n,
                    "ignored an invalid command");
            }
        }
    }

    /// A controller's `online` or `offline` ([`local`]).
    fn on_controller_status(&mut self, p: &Message) {
        if self.lamp.controller_status(&p.topic, &p.payload, now()) {
            self.publish_state();
        }
    }

    /// Home Assistant's birth message: discovery, state and the last reading again, soon.
    fn on_ha_status(&mut self, p: &Message) {
        // A fleet must not answer in one burst.
        let delay = Duration::from_millis(fastrand::u64(500..=5000));
        if let Some(delay) = self.ha.ha_status(&p.payload, now(), delay) {
            info!(in_ms = delay.as_millis() as u64, "Home Assistant is online: discovery follows");
        }
    }

    /// The simulated sensor's control topic (virtual sensor only).
    fn on_virtual_light(&mut self, p: &Message) {
        match (payload::parse_simulated_light(&p.payload), self.sampler.simulated()) {
            (Some(v), Some(ctl)) => {
                info!(?v, "simulated light set");
                ctl.set(v);
            }
            (None, _) if p.payload.is_empty() => {}
            _ => warn!(topic = %p.topic, bytes = p.payload.len(), "ignored: expected 0-1000 or `fail`"),
        }
    }

    /// Publishes queued readings, oldest first, while the window has room.
    fn pump(&mut self) {
        if !self.conn.is_up() || self.out.is_closing() || self.denial.holds() {
            return;
        }
        while self.queue.in_flight() < WINDOW {
            let Some(rec) = self.queue.peek_unsent() else { break };
            let rec = self.restamp.apply(rec);
            if !self.out.publish_reading(&self.topics.telemetry, rec.to_json(), rec.seq, rec.ts) {
                break; // the request channel is full; PUBACKs will make room
            }
            self.queue.mark_sent();
        }
    }

    /// A live change: applied and kept, or refused (counted) with nothing changed; reported.
    fn on_config_set(&mut self, payload: &[u8], retained: bool) {
        let interval = self.live.cfg().sensor.interval_ms;
        match self.live.set(payload, retained, tokio::time::Instant::now()) {
            Ok(cfg) => {
                info!(changed = %crate::payload::printable(&String::from_utf8_lossy(payload), 400), "live configuration applied");
                if cfg.sensor.interval_ms != interval {
                    self.sampler.set_interval(Duration::from_millis(cfg.sensor.interval_ms));
                }
                self.lamp.reconfigure(cfg.led.local_after_s, cfg.server.threshold, cfg.server.hysteresis);
            }
            Err(refusal) => {
                let n = self.counters.reject(Reject::Config);
                warn!(topic = %self.topics.config_set, bytes = payload.len(), retained, refused = %refusal,
                    rejected_total = n, "refused a live configuration change");
            }
        }
        self.publish_config();
    }

    /// `<id>/config`, retained: the effective settable values and the last refusal.
    fn publish_config(&mut self) {
        if !self.conn.is_up() {
            return;
        }
        let report = self.live.report();
        self.publish_other(&self.topics.config.clone(), report, true);
    }

    /// `<id>/update/state`, retained ([`update::state`]).
    fn publish_update(&mut self, state: &update::state::UpdateState) {
        if self.conn.is_up() {
            self.publish_other(&self.topics.update_state.clone(), state.to_json(), true);
        }
    }

    /// `<id>/state`, retained: the LED and who switches it.
    fn publish_state(&mut self) {
        if !self.conn.is_up() {
            return; // sent on the next connection
        }
        let state = self.lamp.state();
        self.publish_other(&self.topics.state.clone(), state, true);
    }

    fn publish_other(&mut self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.publish_at(topic, Qos::AtLeastOnce, retain, payload);
    }

    /// Anything but a reading ([`outbox`]).
    fn publish_at(&mut self, topic: &str, qos: Qos, retain: bool, payload: Vec<u8>) {
        self.out.publish(topic, qos, retain, payload);
    }

    /// A clean stop: `offline`, disconnect, everything unacknowledged to disk.
    ///
    /// # Errors
    /// Readings could not be written (a full or failing disk): how many are lost.
    async fn stop(&mut self) -> anyhow::Result<()> {
        info!("stopping");
        if self.conn.is_up() {
            self.publish_other(&self.topics.status.clone(), OFFLINE.as_bytes().to_vec(), true);
            self.out.close();
            // Acknowledgements that arrive before the DISCONNECT is written still count.
            for ev in self.poller.close(self.out.client(), STOP_GRACE).await {
                self.on_event(ev);
            }
        }
        self.live.saver().flush();
        let closed = self.queue.close(now());
        let st = self.queue.stats();
        match closed {
            Ok(()) => {
                info!(queued = st.readings, dropped = st.dropped.total(), "stopped");
                Ok(())
            }
            Err(e) => {
                error!(
                    lost = e.lost,
                    queued = st.readings,
                    dropped = st.dropped.total(),
                    "stopped, with readings lost"
                );
                Err(e.into())
            }
        }
    }
}

/// The device's clock: tokio's, so a test with paused time drives the queue's deadlines, the
/// local rule and the backoff alike (outside tests it is the monotonic clock).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
