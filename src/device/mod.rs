//! The device: wires the sensor, the LED, the queue and the MQTT link together.
//!
//! ```text
//!  sampler ───readings──────▶ ┌──────────── device loop ────────────┐
//!  (sampler.rs: a Ticker,     │ queue.push ─▶ pump ─▶ client.publish ──▶ link (rumqttc)
//!   sensor.read; part of      │ poller batch ◀──────── events ◀──────────── link
//!   the loop's task)          │ PUBACK ─▶ queue.ack (refused: denial)│
//!  shutdown future ─────────▶ │ commands ─▶ lamp ─▶ state           │
//!                             └─────────────────────────────────────┘
//! ```
//! The loop is the only owner of the queue, the LED and the client, so ordering is simple: a
//! reading is published only after every older one, and a connection error (or a reading the
//! broker refused, [`denial`]) rewinds the queue before anything else is sent. The link
//! ([`crate::link`]) is the same under MQTT 5 and 3.1.1; what differs is in its module doc.
//!
//! Where each concern lives: this file holds the start ([`run_with`]), the loop's `select!` and
//! the clean stop. The loop's handlers are `impl Device` blocks by what they handle:
//! [`readings`] (a reading's way to the broker and its answer), [`session`] (connect and drop),
//! [`messages`] (what arrives) and [`reports`] (what the device says about itself). The
//! decisions are made by parts with rules of their own and time passed in, each tested alone:
//! [`connection`], [`denial`], [`lamp`], [`discovery`], [`inbox`], [`subscriptions`],
//! [`oversized`], [`request`], [`health`], [`outbox`]; the sensor's pace is [`sampler`]'s.

mod alarm;
mod connection;
mod denial;
mod discovery;
mod health;
mod inbox;
mod lamp;
mod messages;
mod outbox;
mod oversized;
mod readings;
mod reports;
mod request;
mod sampler;
mod session;
mod subscriptions;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::time::MissedTickBehavior;
use tracing::{debug, error, info, warn};

use crate::clock;
use crate::config::Config;
use crate::homeassistant;
use crate::led::power_on::KeptLed;
use crate::led::{self, Led};
use crate::link::{self, Backoff, Poller, Qos, Security, Spec};
use crate::local::LocalRule;
use crate::metrics;
use crate::payload::OFFLINE;
use crate::queue::DiskQueue;
use crate::remote;
use crate::sensor::{self, Sensor, SimulatedControl};
use crate::statefile::StateDir;
use crate::systemd::Notifier;
use crate::topics::Topics;
use crate::update;
use alarm::Alarm;
use connection::Connection;
use denial::Denial;
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
    let sampler = Sampler::new(sensor, simulated, interval, counters.clone(), wall.clone(), queue.run());
    info!(id = %cfg.id, broker = %cfg.mqtt.broker(), queued = queue.stats().readings,
        "nightlight started");
    // Configuration loaded, queue, sensor and LED open: ready as far as systemd is concerned.
    let notifier = Notifier::new(cfg.mqtt.broker());
    notifier.ready();
    let cfg_local = (cfg.led.local_after_s, cfg.server.threshold, cfg.server.hysteresis);
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

/// The device loop's state: one part per concern (see the module doc).
struct Device {
    /// Every topic of this device ([`crate::topics`]).
    topics: Topics,
    /// The offline queue: every reading, until the broker acknowledged it.
    queue: DiskQueue,
    /// What is handed to the MQTT client, and what each packet id stands for ([`outbox`]).
    out: outbox::Outbox,
    /// Drives the MQTT event loop: connects, reads events in batches, waits out the backoff.
    poller: Poller,
    /// The figures health and metrics report, shared with the metrics thread.
    counters: Arc<Counters>,
    /// Up or down, the backoff, the recovery from an oversized message, the wait for the
    /// clock ([`connection`]).
    conn: Connection,
    /// Readings the broker refused: held, rewound, retried ([`denial`]).
    denial: Denial,
    /// When this run started, for health's `uptime_s` and `started`.
    started: Started,
    /// READY, the watchdog and the status line systemd shows.
    notifier: Notifier,
    /// The LED, and whether a controller or the device itself switches it ([`lamp`]).
    lamp: lamp::Lamp,
    /// The configuration in effect, what was set live, the last refusal ([`remote::Live`]).
    live: remote::Live,
    /// The sensor, read every `sensor.interval_ms` and stamped ([`sampler`]).
    sampler: Sampler,
    /// The wall clock: the system's, or a test's ([`clock::Wall`]).
    wall: clock::Wall,
    /// `queue.dir`: where the discovery marker is kept, and whether it is on storage.
    state: StateDir,
    /// Home Assistant: what to announce, and when ([`discovery`]).
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
