//! `nightlight fleet`: many simulated nightlights in one process, against a real broker, to
//! answer what load tools cannot: what a fleet of *devices* (queue, seq, backoff, Last Will,
//! discovery, updates) does to a broker and its controllers, and what they do to it.
//!
//! Rules:
//! - Each device ([`device`]) keeps the device contract a broker and a controller see; ids are
//!   `fleet-00000`, `fleet-00001`, ... Each has one socket and rumqttc's packet codec, no client
//!   library state ([`conn`]): about 2 KiB a device, so 10,000 fit in well under 64 MiB.
//! - One runtime on one thread runs them all: the fleet's CPU is one number, and no device waits
//!   on another's thread.
//! - An observer ([`observer`]) counts what the broker delivered; lost and duplicated readings
//!   come from `seq` ([`tally`]): lost is a reading the device let go of (acknowledged) that
//!   never arrived; one still held at the end is not lost, one its queue's cap dropped neither. At the end the devices stop (DISCONNECT) and the observer gets
//!   a bounded time to see every acknowledged reading before anything is called lost.
//! - Scenarios cut connections from inside (a share of the fleet partitioned for a while, or
//!   every device at once: a reconnect storm); a broker restart is the operator's. Whatever
//!   took devices off the broker, the time until all are connected again is reported.
//! - Progress on stderr every few seconds; the report on stdout, its last line as the contract
//!   says: `fleet: N devices, S sent, A acked, L lost, D duplicated; ack p50 X ms, p99 Y ms; rss
//!   R MiB, cpu C %`.

mod conn;
mod device;
mod observer;
pub mod tally;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::update::manifest::PublicKey;
use tally::{Latency, Seen};

/// How long the observer may take, after the devices stopped, to see what was acknowledged.
const SETTLE: Duration = Duration::from_secs(15);
/// How often progress is said.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What `nightlight fleet` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub devices: usize,
    /// `host:port`.
    pub broker: String,
    pub duration: Duration,
    pub interval: Duration,
    /// Release keys the devices trust (updates off when empty).
    pub update_keys: Vec<PublicKey>,
    /// Share of devices whose simulated installs fail, in percent.
    pub fail_installs: f64,
    /// Share of devices whose wall clock is an hour off, in percent.
    pub skew: f64,
    pub scenario: Option<Scenario>,
}

/// A cut made from inside, a third of the way into the run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scenario {
    /// This share (percent) of the fleet loses the broker for this long.
    Partition { percent: f64, length: Duration },
    /// Every device drops its connection at once and reconnects.
    Storm,
}

/// What the fleet tells its devices: stop, or a cut.
#[derive(Debug, Clone, Copy, Default)]
pub struct Control {
    pub stop: bool,
    pub cut: Cut,
}

/// Which devices are held off the broker, and until when.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cut {
    /// Devices with an index below this are cut.
    below: usize,
    until: Option<Instant>,
}

impl Cut {
    /// Whether a new cut takes device `index` off the broker (then it stays off until
    /// [`Cut::until`]).
    pub fn takes(&self, index: usize) -> bool {
        index < self.below
    }

    /// Until when device `index` is held off the broker (`None`: it is not).
    pub fn until(&self, index: usize) -> Option<Instant> {
        self.until.filter(|_| self.takes(index))
    }
}

/// What every device and the report share.
pub struct Shared {
    broker: String,
    interval: Duration,
    run: u64,
    version: String,
    keys: Option<Arc<Vec<PublicKey>>>,
    taken: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    dropped: AtomicU64,
    commands: AtomicU64,
    updated: AtomicU64,
    rolled_back: AtomicU64,
    connect_failures: AtomicU64,
    /// Connections that ended without a cut or a stop.
    drops: AtomicU64,
    connected: AtomicUsize,
    /// Per device: it no longer holds any reading up to this seq (acknowledged, or dropped at
    /// the queue's cap).
    released_upto: Vec<AtomicU64>,
    /// Per device: readings dropped at the queue's cap (the contract allows it; not lost).
    dropped_by: Vec<AtomicU64>,
    latency: Mutex<Latency>,
}

impl Shared {
    fn observe_ack(&self, waited: Duration) {
        self.latency.lock().unwrap_or_else(std::sync::PoisonError::into_inner).observe(waited.as_millis() as u64);
    }
}

/// A device's id.
pub fn device_id(index: usize) -> String {
    format!("fleet-{index:05}")
}

/// What a run found.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub devices: usize,
    pub sent: u64,
    pub acked: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub rss_mib: f64,
    pub cpu_percent: f64,
    /// From the start until every device was connected (`None`: never all at once).
    pub connected_after: Option<Duration>,
    /// Each time devices were off the broker: how long until all were connected again.
    pub reconverged: Vec<Duration>,
    pub updated: u64,
    pub rolled_back: u64,
    /// Readings the observer was delivered (every copy), and commands the devices obeyed.
    pub delivered: u64,
    pub commands: u64,
    /// Connections lost (not cut by a scenario), and attempts that failed.
    pub drops: u64,
    pub connect_failures: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fleet: {} devices, {} sent, {} acked, {} lost, {} duplicated; ack p50 {} ms, p99 {} ms; rss {:.1} MiB, cpu {:.1} %",
            self.devices, self.sent, self.acked, self.lost, self.duplicated, self.p50_ms, self.p99_ms, self.rss_mib,
            self.cpu_percent
        )
    }
}

/// Runs the fleet for `opts.duration`, then reports.
///
/// # Errors
/// The runtime cannot start, or the observer never subscribed (no broker at `opts.broker`).
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    raise_fd_limit(opts.devices);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let cpu_start = cpu_time();
    let report = rt.block_on(run_async(opts))?;
    let wall = report.1.as_secs_f64();
    let mut report = report.0;
    report.cpu_percent = (cpu_time() - cpu_start).as_secs_f64() / wall * 100.0;
    report.rss_mib = peak_rss_kib() as f64 / 1024.0;
    Ok(report)
}

async fn run_async(opts: &Options) -> anyhow::Result<(Report, Duration)> {
    let n = opts.devices;
    let shared = Arc::new(Shared {
        broker: opts.broker.clone(),
        interval: opts.interval,
        run: crate::clock::unix_ms(),
        version: crate::VERSION.to_owned(),
        keys: (!opts.update_keys.is_empty()).then(|| Arc::new(opts.update_keys.clone())),
        taken: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        commands: AtomicU64::new(0),
        updated: AtomicU64::new(0),
        rolled_back: AtomicU64::new(0),
        connect_failures: AtomicU64::new(0),
        drops: AtomicU64::new(0),
        connected: AtomicUsize::new(0),
        released_upto: (0..n).map(|_| AtomicU64::new(0)).collect(),
        dropped_by: (0..n).map(|_| AtomicU64::new(0)).collect(),
        latency: Mutex::new(Latency::default()),
    });
    let seen: observer::Sightings = Arc::new(Mutex::new(vec![Seen::default(); n]));
    let (ready_tx, mut ready_rx) = watch::channel(false);
    // The observer outlives the devices: what they were acknowledged last is still on its way.
    let (obs_stop, obs_stop_rx) = watch::channel(false);
    let obs = tokio::spawn(observer::run(opts.broker.clone(), n, seen.clone(), ready_tx, obs_stop_rx));
    tokio::time::timeout(Duration::from_secs(10), ready_rx.wait_for(|r| *r))
        .await
        .map_err(|_| anyhow::anyhow!("no broker answered at {} within 10 s", opts.broker))?
        .map_err(|_| anyhow::anyhow!("the observer stopped"))?;

    let started = Instant::now();
    let (control, control_rx) = watch::channel(Control::default());
    let mut devices = Vec::with_capacity(n);
    for index in 0..n {
        let spec = device::Spec {
            index,
            skew_ms: if share(index, opts.skew, 1) { 3_600_000 } else { 0 },
            fail_installs: share(index, opts.fail_installs, 2),
        };
        devices.push(tokio::spawn(device::run(spec, shared.clone(), control_rx.clone())));
    }
    eprintln!("fleet: {n} devices starting against {}", opts.broker);

    let end = started + opts.duration;
    let mut scenario_at = opts.scenario.map(|_| started + opts.duration / 3);
    let mut progress = tokio::time::interval_at(started + PROGRESS_EVERY, PROGRESS_EVERY);
    let mut watch_every = tokio::time::interval(Duration::from_millis(50));
    let mut all_up = false;
    let mut down_since: Option<Instant> = None;
    let mut reconverged = Vec::new();
    let mut connected_after = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => break,
            _ = async { tokio::time::sleep_until(scenario_at.unwrap_or(end)).await }, if scenario_at.is_some() => {
                scenario_at = None;
                let cut = match opts.scenario {
                    Some(Scenario::Partition { percent, length }) => {
                        eprintln!("fleet: scenario: {percent} % of the fleet partitioned for {} s", length.as_secs());
                        Cut { below: (n as f64 * percent / 100.0).round() as usize, until: Some(Instant::now() + length) }
                    }
                    Some(Scenario::Storm) => {
                        eprintln!("fleet: scenario: every device drops its connection at once");
                        Cut { below: n, until: None }
                    }
                    None => Cut::default(),
                };
                control.send_modify(|c| c.cut = cut);
            }
            _ = watch_every.tick() => {
                let up = shared.connected.load(Relaxed);
                if up == n && !all_up {
                    all_up = true;
                    if let Some(since) = down_since.take() {
                        let took = since.elapsed();
                        eprintln!("fleet: reconverged: all {n} devices connected again {} ms after the first dropped", took.as_millis());
                        reconverged.push(took);
                    } else {
                        eprintln!("fleet: all {n} devices connected after {} ms", started.elapsed().as_millis());
                        connected_after = Some(started.elapsed());
                    }
                } else if up < n && all_up {
                    all_up = false;
                    down_since = Some(Instant::now());
                }
            }
            _ = progress.tick() => eprintln!(
                "fleet: {:>4} s: {} of {n} connected, {} taken, {} sent, {} acked, {} queued",
                started.elapsed().as_secs(),
                shared.connected.load(Relaxed),
                shared.taken.load(Relaxed),
                shared.sent.load(Relaxed),
                shared.acked.load(Relaxed),
                shared.taken.load(Relaxed).saturating_sub(shared.acked.load(Relaxed) + shared.dropped.load(Relaxed)),
            ),
        }
    }
    let wall = started.elapsed();
    // The devices stop; the observer gets a bounded time to see what they were told is acknowledged.
    control.send_modify(|c| c.stop = true);
    for d in devices {
        let _ = d.await;
    }
    // Lost: a reading the device let go of that never arrived, unless the queue's cap dropped it.
    let lost_by = |i: usize, s: &Seen| {
        s.lost(shared.released_upto[i].load(Relaxed)).saturating_sub(shared.dropped_by[i].load(Relaxed))
    };
    let lost = |seen: &[Seen]| -> u64 { seen.iter().enumerate().map(|(i, s)| lost_by(i, s)).sum() };
    let settle = Instant::now() + SETTLE;
    let mut lost_now = lost(&seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    while lost_now > 0 && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
        lost_now = lost(&seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
    let _ = obs_stop.send(true);
    let _ = obs.await;
    let seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // The first few devices that lost readings, and what was seen of them.
    let losers = seen.iter().enumerate().filter(|(i, s)| lost_by(*i, s) > 0);
    for (i, s) in losers.take(5) {
        let released = shared.released_upto[i].load(Relaxed);
        eprintln!("fleet: {} lost readings: it let go of 1 to {released}; seen: {s:?}", device_id(i));
    }
    let latency = shared.latency.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let report = Report {
        devices: n,
        sent: shared.sent.load(Relaxed),
        acked: shared.acked.load(Relaxed),
        lost: lost_now,
        duplicated: seen.iter().map(|s| s.duplicated).sum(),
        p50_ms: latency.quantile(0.5),
        p99_ms: latency.quantile(0.99),
        rss_mib: 0.0,
        cpu_percent: 0.0,
        connected_after,
        reconverged,
        updated: shared.updated.load(Relaxed),
        rolled_back: shared.rolled_back.load(Relaxed),
        drops: shared.drops.load(Relaxed),
        connect_failures: shared.connect_failures.load(Relaxed),
        delivered: seen.iter().map(Seen::copies).sum(),
        commands: shared.commands.load(Relaxed),
    };
    Ok((report, wall))
}

/// Whether device `index` is in the first `percent` of the fleet by a hash (`salt` keeps the
/// shares of different traits independent).
fn share(index: usize, percent: f64, salt: u64) -> bool {
    // splitmix64's finalizer over (salt, index).
    let mut h = (index as u64).wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    (h % 10_000) < (percent * 100.0).round() as u64
}

/// One descriptor per device and then some: raise the soft limit to the hard one.
fn raise_fd_limit(devices: usize) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < devices as u64 + 64 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// User and system CPU time of this process.
fn cpu_time() -> Duration {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The process's peak resident set (VmHWM), KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_picks_about_that_many_devices_and_each_trait_its_own() {
        let n = 10_000;
        let two = (0..n).filter(|i| share(*i, 2.0, 2)).count();
        assert!((150..=250).contains(&two), "{two}");
        assert_eq!((0..n).filter(|i| share(*i, 0.0, 2)).count(), 0);
        assert_eq!((0..n).filter(|i| share(*i, 100.0, 2)).count(), n);
        let both = (0..n).filter(|i| share(*i, 50.0, 1) && share(*i, 50.0, 2)).count();
        assert!((2000..=3000).contains(&both), "independent: {both}");
    }

    #[test]
    fn the_last_line_is_the_contracts() {
        let r = Report {
            devices: 3,
            sent: 10,
            acked: 9,
            lost: 0,
            duplicated: 1,
            p50_ms: 2,
            p99_ms: 7,
            rss_mib: 12.25,
            cpu_percent: 3.04,
            connected_after: None,
            reconverged: vec![],
            updated: 0,
            rolled_back: 0,
            drops: 0,
            connect_failures: 0,
            delivered: 0,
            commands: 0,
        };
        assert_eq!(
            r.to_string(),
            "fleet: 3 devices, 10 sent, 9 acked, 0 lost, 1 duplicated; ack p50 2 ms, p99 7 ms; rss 12.2 MiB, cpu 3.0 %"
        );
    }
}
