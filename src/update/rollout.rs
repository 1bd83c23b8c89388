//! `nightlight release rollout`: a signed manifest to a fleet in waves that stop themselves.
//!
//! Rules:
//! - **Targets**: the devices whose retained `<id>/update/state` the broker holds (a device with
//!   updates on reports it at every connect) and whose id matches `--devices` (`*` any run of
//!   characters, `?` one), in id order. One already running the manifest's version counts as
//!   updated and is not sent anything.
//! - **Waves**: the first holds `--first` devices, each next one `--growth` times the last (AWS
//!   IoT Jobs' exponential rate). The manifest goes to each device of a wave, retained, on
//!   `<id>/update`; the next wave starts when every device of this one has finished: `done` on
//!   the new version (updated), or `rolled_back`/`failed` (failed, with its reason), or no answer
//!   within `--wave-timeout-s` (failed: "no answer").
//! - **Halt**: once at least `--abort-after` devices have finished, a failed share above
//!   `--abort-at` percent halts the rollout: no manifest is sent after that moment (devices
//!   already sent finish and are counted). The failed devices keep their previous version (the
//!   device's own rollback) and are listed.
//! - The last line: `rollout: T targeted, S sent, U updated, F failed, halted: yes|no`; exit 0
//!   when it completed, 1 when it halted (or the broker could not be reached), 2 for bad input.
//!
//! [`Rollout`] is the pure part (what to send, what a state means, when to halt); [`run`] its
//! MQTT shell.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::manifest::{compare_versions, Manifest};
use super::state::{Phase, UpdateState};
use crate::{topics, EXIT_CONFIG, EXIT_FAILURE};

/// `nightlight release rollout`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The broker, HOST:PORT
    #[arg(long, value_name = "HOST:PORT")]
    pub broker: String,
    /// The signed manifest (from `release sign`)
    #[arg(long, value_name = "FILE")]
    pub manifest: PathBuf,
    /// Which devices: a pattern over ids (`*`, `?`), e.g. 'fleet-*'
    #[arg(long, value_name = "PATTERN")]
    pub devices: String,
    /// Halt only once at least this many devices have finished
    #[arg(long, value_name = "N")]
    pub abort_after: u64,
    /// Halt when more than this share of the finished devices failed, in percent
    #[arg(long, value_name = "P", value_parser = percent)]
    pub abort_at: f64,
    /// Devices in the first wave
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub first: u64,
    /// Each wave this many times the last (1: a fixed rate)
    #[arg(long, default_value_t = 2.0, value_parser = growth)]
    pub growth: f64,
    /// A device of a wave that has not finished after this long counts as failed
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub wave_timeout_s: u64,
    /// A user the broker's ACL lets publish on <id>/update (the README's `release`)
    #[arg(long)]
    pub username: Option<String>,
    /// A file holding that user's password
    #[arg(long, value_name = "FILE", requires = "username")]
    pub password_file: Option<PathBuf>,
}

/// A share in percent, 0 to 100 (clap's parser for `--abort-at`, and `nightlight fleet`'s shares).
pub fn percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s} is not a percentage from 0 to 100")),
    }
}

fn growth(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(g) if (1.0..=100.0).contains(&g) => Ok(g),
        _ => Err(format!("{s} is not a growth factor from 1 to 100")),
    }
}

/// Whether `id` matches `pattern` (`*` any run of characters, `?` one character).
pub fn matches(pattern: &str, id: &str) -> bool {
    fn go(p: &[char], s: &[char]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], s) || (!s.is_empty() && go(p, &s[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &s[1..]),
            _ => false,
        }
    }
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), id.chars().collect());
    go(&p, &s)
}

/// Where one device stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Standing {
    /// Not sent yet.
    Waiting,
    /// Sent at this moment; no final answer yet.
    Sent(Instant),
    Updated,
    Failed(String),
}

/// The rollout's state (pure: time is passed in).
#[derive(Debug)]
pub struct Rollout {
    version: String,
    devices: BTreeMap<String, Standing>,
    /// Ids in the order they are sent.
    order: Vec<String>,
    next: usize,
    wave: u64,
    growth: f64,
    abort_after: u64,
    abort_at: f64,
    timeout: Duration,
    pub sent: u64,
    pub halted: bool,
}

impl Rollout {
    /// `targets`: each matching device and the version it reports running.
    pub fn new(manifest_version: &str, targets: BTreeMap<String, String>, a: &Args) -> Self {
        let mut devices = BTreeMap::new();
        let mut order = Vec::new();
        for (id, running) in targets {
            if compare_versions(&running, manifest_version).is_ge() {
                devices.insert(id, Standing::Updated);
            } else {
                order.push(id.clone());
                devices.insert(id, Standing::Waiting);
            }
        }
        Rollout {
            version: manifest_version.to_owned(),
            devices,
            order,
            next: 0,
            wave: a.first,
            growth: a.growth,
            abort_after: a.abort_after,
            abort_at: a.abort_at,
            timeout: Duration::from_secs(a.wave_timeout_s),
            sent: 0,
            halted: false,
        }
    }

    /// The next wave to send at `now`, if the last one finished and the rollout goes on.
    pub fn next_wave(&mut self, now: Instant) -> Vec<String> {
        if self.halted || self.in_flight() > 0 || self.next >= self.order.len() {
            return Vec::new();
        }
        let end = (self.next + self.wave as usize).min(self.order.len());
        let wave: Vec<String> = self.order[self.next..end].to_vec();
        self.next = end;
        self.wave = ((self.wave as f64) * self.growth).ceil() as u64;
        for id in &wave {
            self.devices.insert(id.clone(), Standing::Sent(now));
            self.sent += 1;
        }
        wave
    }

    /// A device's `<id>/update/state` arrived.
    pub fn state(&mut self, id: &str, s: &UpdateState) {
        let Some(Standing::Sent(_)) = self.devices.get(id) else { return };
        let finished = match s.state {
            Phase::Done if s.version == self.version => Some(Standing::Updated),
            Phase::RolledBack | Phase::Failed if s.to.as_deref().is_none_or(|t| t == self.version) => {
                Some(Standing::Failed(s.reason.clone().unwrap_or_else(|| format!("{:?}", s.state).to_lowercase())))
            }
            _ => None,
        };
        if let Some(f) = finished {
            self.devices.insert(id.to_owned(), f);
            self.judge();
        }
    }

    /// Devices sent before `now - timeout` that have not finished fail ("no answer").
    pub fn tick(&mut self, now: Instant) {
        let late: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, s)| matches!(s, Standing::Sent(at) if now.duration_since(*at) >= self.timeout))
            .map(|(id, _)| id.clone())
            .collect();
        for id in late {
            self.devices.insert(id, Standing::Failed(format!("no answer within {} s", self.timeout.as_secs())));
        }
        self.judge();
    }

    /// The halting rule, after any finish.
    fn judge(&mut self) {
        let (done, failed) = self.finished();
        if !self.halted
            && done + failed >= self.abort_after
            && failed as f64 * 100.0 > self.abort_at * (done + failed) as f64
        {
            self.halted = true;
        }
    }

    /// Devices updated (sent, or already on the version), and failed.
    fn finished(&self) -> (u64, u64) {
        self.devices.values().fold((0, 0), |(u, f), s| match s {
            Standing::Updated => (u + 1, f),
            Standing::Failed(_) => (u, f + 1),
            _ => (u, f),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.devices.values().filter(|s| matches!(s, Standing::Sent(_))).count()
    }

    /// Nothing more will happen: everything sent finished, and nothing is left to send (or it halted).
    pub fn over(&self) -> bool {
        self.in_flight() == 0 && (self.halted || self.next >= self.order.len())
    }

    pub fn failed(&self) -> impl Iterator<Item = (&String, &String)> {
        self.devices.iter().filter_map(|(id, s)| match s {
            Standing::Failed(why) => Some((id, why)),
            _ => None,
        })
    }

    /// `rollout: T targeted, S sent, U updated, F failed, halted: yes|no`.
    pub fn summary(&self) -> String {
        let (u, f) = self.finished();
        format!(
            "rollout: {} targeted, {} sent, {u} updated, {f} failed, halted: {}",
            self.devices.len(),
            self.sent,
            if self.halted { "yes" } else { "no" }
        )
    }
}

/// Runs a rollout; prints progress on stderr and the report on stdout.
pub fn run(a: &Args) -> ExitCode {
    let manifest_bytes = match crate::statefile::read_small(&a.manifest, super::manifest::MAX_MANIFEST_BYTES as u64) {
        Ok(Some(b)) => b,
        Ok(None) => return bad(format!("--manifest {}: no such file", a.manifest.display())),
        Err(e) => return bad(format!("--manifest {}: {e}", a.manifest.display())),
    };
    let manifest = match Manifest::parse(&manifest_bytes) {
        Ok(m) => m,
        Err(e) => return bad(format!("--manifest {}: {e}", a.manifest.display())),
    };
    let password = match &a.password_file {
        None => None,
        Some(p) => match std::fs::read_to_string(p) {
            Ok(s) => Some(s.trim_end_matches(['\n', '\r']).to_owned()),
            Err(e) => return bad(format!("--password-file {}: {e}", p.display())),
        },
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nightlight: rollout: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match rt.block_on(shell(a, &manifest, manifest_bytes, password)) {
        Ok(r) => {
            for (id, why) in r.failed() {
                println!("{}", failed_line(id, why));
            }
            println!("{}", r.summary());
            if r.halted {
                ExitCode::from(EXIT_FAILURE)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("nightlight: rollout: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The report's line for a failed device. Its id (a topic level) and its reason came from the
/// network: both are made printable and bounded, so neither can add a line to the report.
pub fn failed_line(id: &str, why: &str) -> String {
    use crate::payload::printable;
    format!("rollout: failed {}: {}", printable(id, 100), printable(why, super::install::REASON_CHARS))
}

fn bad(why: String) -> ExitCode {
    eprintln!("nightlight: {why}");
    ExitCode::from(EXIT_CONFIG)
}

/// How long the retained states may keep arriving, at most, before the targets are known.
const DISCOVER_MAX: Duration = Duration::from_secs(30);
/// The retained states are all in once none came for this long after the SUBACK.
const DISCOVER_QUIET: Duration = Duration::from_millis(1000);

async fn shell(a: &Args, manifest: &Manifest, bytes: Vec<u8>, password: Option<String>) -> anyhow::Result<Rollout> {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
    let (host, port) = a
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--broker {}: not HOST:PORT", a.broker))?;
    let mut opts = MqttOptions::new(format!("nightlight-rollout-{}", std::process::id()), host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    if let Some(user) = &a.username {
        opts.set_credentials(user.clone(), password.unwrap_or_default());
    }
    let (client, mut events) = AsyncClient::new(opts, 1024);
    client.subscribe(topics::ALL_UPDATE_STATES, QoS::AtLeastOnce).await?;
    let state_of = |topic: &str, payload: &[u8]| -> Option<(String, UpdateState)> {
        let id = topics::update_state_of(topic)?;
        let s: UpdateState = serde_json::from_slice(payload).ok()?;
        Some((id.to_owned(), s))
    };
    // The targets: every retained state, until they stop coming.
    let mut targets = BTreeMap::new();
    let start = Instant::now();
    let mut subscribed = false;
    loop {
        let wait = if subscribed { DISCOVER_QUIET } else { DISCOVER_MAX };
        match tokio::time::timeout(wait, events.poll()).await {
            Err(_) if subscribed => break,
            Err(_) => anyhow::bail!("no answer from {} within {} s", a.broker, DISCOVER_MAX.as_secs()),
            Ok(Err(e)) => anyhow::bail!("{}: {e}", a.broker),
            Ok(Ok(Event::Incoming(Incoming::SubAck(_)))) => subscribed = true,
            Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                if let Some((id, s)) = state_of(&p.topic, &p.payload) {
                    if matches(&a.devices, &id) {
                        targets.insert(id, s.version);
                    }
                }
            }
            Ok(Ok(_)) => {}
        }
        if start.elapsed() > DISCOVER_MAX {
            break;
        }
    }
    let mut r = Rollout::new(&manifest.version, targets, a);
    eprintln!("rollout: {} devices match {:?}; sending {} in waves", r.devices.len(), a.devices, manifest.version);
    // The event loop runs on its own from here: a wave larger than the client's request channel
    // is handed over while the loop writes it out (polled only between publishes, it deadlocked).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        loop {
            let ev = events.poll().await.map_err(|e| e.to_string());
            let end = ev.is_err() || matches!(ev, Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)));
            if tx.send(ev).is_err() || end {
                return;
            }
        }
    });
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut waves = 0;
    while !r.over() {
        let wave = r.next_wave(Instant::now());
        if !wave.is_empty() {
            waves += 1;
            eprintln!("rollout: wave {waves}: {} devices ({} sent in all)", wave.len(), r.sent);
            for id in wave {
                client.publish(topics::update(&id), QoS::AtLeastOnce, true, bytes.clone()).await?;
            }
        }
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(Ok(Event::Incoming(Incoming::Publish(p)))) => {
                    if let Some((id, s)) = state_of(&p.topic, &p.payload) {
                        let was = r.halted;
                        r.state(&id, &s);
                        if r.halted && !was {
                            eprintln!("rollout: halted: {}", r.summary());
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => anyhow::bail!("{}: {e}", a.broker),
                None => anyhow::bail!("{}: the connection ended", a.broker),
            },
            _ = tick.tick() => r.tick(Instant::now()),
        }
    }
    // Hand over what is still queued in the client before leaving.
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(abort_after: u64, abort_at: f64, first: u64) -> Args {
        Args {
            broker: String::new(),
            manifest: PathBuf::new(),
            devices: "*".into(),
            abort_after,
            abort_at,
            first,
            growth: 2.0,
            wave_timeout_s: 60,
            username: None,
            password_file: None,
        }
    }

    fn fleet(n: usize) -> BTreeMap<String, String> {
        (0..n).map(|i| (format!("d{i:03}"), "0.1.0".to_owned())).collect()
    }

    fn done(v: &str) -> UpdateState {
        UpdateState { version: v.into(), ..UpdateState::toward(Phase::Done, "0.1.0", v) }
    }

    fn rolled_back() -> UpdateState {
        UpdateState::toward(Phase::RolledBack, "0.1.0", "0.2.0").with_reason("gate")
    }

    #[test]
    fn a_devices_id_and_reason_cannot_forge_a_line_of_the_report() {
        let forged = "\nrollout: 1 targeted, 1 sent, 1 updated, 0 failed, halted: no";
        let line = failed_line(&format!("d1{forged}"), &format!("gate{forged}{}", "x".repeat(1000)));
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(line.starts_with("rollout: failed d1\\n"), "{line}");
        assert!(line.chars().count() < 500, "bounded: {} chars", line.chars().count());
    }

    #[test]
    fn patterns_match_as_a_shell_would() {
        assert!(matches("fleet-*", "fleet-00012"));
        assert!(matches("fleet-0001?", "fleet-00012"));
        assert!(!matches("fleet-0001?", "fleet-000123"));
        assert!(matches("*", "porch"));
        assert!(!matches("fleet-*", "porch"));
    }

    #[test]
    fn waves_grow_and_the_next_waits_for_the_last_to_finish() {
        let mut r = Rollout::new("0.2.0", fleet(100), &args(1000, 5.0, 10));
        let t = Instant::now();
        let w1 = r.next_wave(t);
        assert_eq!(w1.len(), 10);
        assert!(r.next_wave(t).is_empty(), "not while the first is out");
        w1.iter().for_each(|id| r.state(id, &done("0.2.0")));
        assert_eq!(r.next_wave(t).len(), 20, "twice the last");
    }

    #[test]
    fn failures_past_the_share_after_the_minimum_halt_it_and_nothing_more_is_sent() {
        let mut r = Rollout::new("0.2.0", fleet(400), &args(20, 5.0, 10));
        let t = Instant::now();
        // Wave 1: 10 with 1 failure (10 %), below the minimum of 20 finished: goes on.
        let w = r.next_wave(t);
        r.state(&w[0], &rolled_back());
        w[1..].iter().for_each(|id| r.state(id, &done("0.2.0")));
        assert!(!r.halted);
        // Wave 2: 20 more; 19 update, then 1 fails: 2 of 30 = 6.7 % > 5 %: halted.
        let w = r.next_wave(t);
        assert_eq!(w.len(), 20);
        w[1..].iter().for_each(|id| r.state(id, &done("0.2.0")));
        assert!(!r.halted);
        r.state(&w[0], &rolled_back());
        assert!(r.halted, "{}", r.summary());
        assert!(r.next_wave(t).is_empty(), "nothing is sent after a halt");
        assert!(r.over());
        assert_eq!(r.summary(), "rollout: 400 targeted, 30 sent, 28 updated, 2 failed, halted: yes");
        assert_eq!(r.failed().count(), 2);
    }

    #[test]
    fn a_share_at_the_threshold_does_not_halt_and_it_completes() {
        let mut r = Rollout::new("0.2.0", fleet(100), &args(10, 5.0, 20));
        let t = Instant::now();
        while !r.over() {
            let w = r.next_wave(t);
            for (i, id) in w.iter().enumerate() {
                // The last of every twenty: never more than 5 % so far.
                if i % 20 == 19 {
                    r.state(id, &rolled_back());
                } else {
                    r.state(id, &done("0.2.0"));
                }
            }
        }
        assert!(!r.halted, "{}", r.summary());
        assert_eq!(r.sent, 100);
    }

    #[test]
    fn a_device_already_on_the_version_is_updated_unsent_and_one_that_never_answers_fails() {
        let mut targets = fleet(3);
        targets.insert("d001".into(), "0.2.0".into());
        let mut r = Rollout::new("0.2.0", targets, &args(100, 50.0, 10));
        let t = Instant::now();
        assert_eq!(r.next_wave(t), ["d000", "d002"]);
        r.state("d000", &done("0.2.0"));
        r.state("d002", &UpdateState::toward(Phase::Downloading, "0.1.0", "0.2.0"));
        r.tick(t + Duration::from_secs(59));
        assert!(!r.over());
        r.tick(t + Duration::from_secs(60));
        assert!(r.over());
        assert_eq!(r.summary(), "rollout: 3 targeted, 2 sent, 2 updated, 1 failed, halted: no");
        assert_eq!(r.failed().next().unwrap().1, "no answer within 60 s");
    }

    #[test]
    fn states_of_devices_not_sent_or_of_another_version_change_nothing() {
        let mut r = Rollout::new("0.2.0", fleet(2), &args(1, 1.0, 1));
        r.state("d001", &rolled_back()); // not sent yet
        r.state("d009", &done("0.2.0")); // not targeted
        let t = Instant::now();
        let w = r.next_wave(t);
        r.state(&w[0], &done("0.1.5")); // another version's done
        r.state(&w[0], &UpdateState::toward(Phase::RolledBack, "0.1.0", "0.1.5"));
        assert_eq!(r.in_flight(), 1);
        assert!(!r.halted);
    }
}
