//! The device's side of an update: takes manifests, fetches and verifies the package, hands it
//! to the installer, and keeps `<id>/update/state` up to date.
//!
//! Rules:
//! - It runs on a thread and runtime of its own: fetching, syncing and hashing a package never
//!   delay a reading or a command on the device loop. The loop hands it manifests
//!   ([`Handle::offer`]) and publishes what it reports ([`Handle::changed`]).
//! - A manifest is checked by [`Manifest::accept`]; a refusal is one log line and `failed` with
//!   the reason (while another update is under way, only the log line). A newer manifest replaces
//!   the one being fetched; the same one again changes nothing; a version that failed (here, or
//!   at the installer: rolled back) is not tried again (a retained manifest comes back at every
//!   connect and start) unless asked ([`Handle::retry`]).
//! - Fetching (see [`super::fetch`]) checks free space first (the package twice: the installer
//!   copies it), retries with backoff, and gives up after [`MAX_FAILURES`] attempts in a row
//!   that brought nothing; progress at most once a second. A restart resumes what
//!   `download.json` names.
//! - The package is verified whole (size and SHA-256) before `ready.deb` and then `ready.json`
//!   appear for the installer; from there the installer's `result.json` is the state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::fetch::{self, FetchError, Fetcher, Url};
use super::manifest::{Manifest, PublicKey, MAX_MANIFEST_BYTES};
use super::state::{self, Phase, UpdateState};
use crate::statefile;

/// Attempts in a row that fetch nothing before the update fails.
pub const MAX_FAILURES: u32 = 8;
/// How often the installer's `result.json` is read while it works.
const INSTALLER_POLL: Duration = Duration::from_secs(1);

/// What the agent needs to know.
#[derive(Debug, Clone)]
pub struct Settings {
    pub keys: Vec<PublicKey>,
    /// The state directory (`queue.dir`); the agent's files are in its `update/`.
    pub state_dir: PathBuf,
    pub running: String,
    pub arch: String,
    /// No byte for this long ends an attempt.
    pub stall: Duration,
    /// The first retry's delay; doubled up to a minute.
    pub retry: Duration,
}

/// The device loop's end.
pub struct Handle {
    offers: mpsc::Sender<Offer>,
    state: watch::Receiver<UpdateState>,
}

enum Offer {
    Manifest(Vec<u8>),
    Retry,
}

impl Handle {
    /// A message on `<id>/update`.
    pub fn offer(&self, payload: &[u8]) {
        if self.offers.try_send(Offer::Manifest(payload.to_vec())).is_err() {
            warn!("ignored an update manifest: the previous ones are still being looked at");
        }
    }

    /// Try the last manifest again (Home Assistant's install button).
    pub fn retry(&self) {
        let _ = self.offers.try_send(Offer::Retry);
    }

    /// The state now.
    pub fn state(&self) -> UpdateState {
        self.state.borrow().clone()
    }

    /// Resolves when the state changed (never, once the agent is gone).
    pub async fn changed(&mut self) -> UpdateState {
        if self.state.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.state.borrow_and_update().clone()
    }
}

/// Starts the agent on its own thread.
///
/// # Errors
/// The thread cannot be started.
pub fn start(settings: Settings) -> std::io::Result<Handle> {
    let (offers, rx) = mpsc::channel(8);
    let initial = Agent::initial(&settings);
    let failed = matches!(initial.state, Phase::Failed | Phase::RolledBack).then(|| initial.to.clone()).flatten();
    let (tx, state) = watch::channel(initial);
    std::thread::Builder::new().name("update".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return warn!(error = %e, "updates are off: cannot start their runtime"),
        };
        rt.block_on(
            Agent { settings: Arc::new(settings), tx: Arc::new(tx), last: None, failed: Arc::new(failed.into()) }
                .run(rx),
        );
    })?;
    Ok(Handle { offers, state })
}

struct Agent {
    settings: Arc<Settings>,
    tx: Arc<watch::Sender<UpdateState>>,
    /// The last manifest accepted, for a retry.
    last: Option<Vec<u8>>,
    /// The version whose update failed or was rolled back last (in this run, or by the
    /// installer before it): the same manifest again (retained, at every connect and start) is
    /// not tried again unless asked.
    failed: Arc<std::sync::Mutex<Option<String>>>,
}

impl Agent {
    fn dir(s: &Settings) -> PathBuf {
        s.state_dir.join(state::DIR)
    }

    /// What the files say at start: the installer's result, a package waiting for it, or idle.
    fn initial(s: &Settings) -> UpdateState {
        let dir = Self::dir(s);
        if let Some(r) = read_result(&dir, &s.running) {
            return r;
        }
        match read_manifest(&dir.join(state::READY_MANIFEST)) {
            Some(m) => UpdateState::toward(Phase::Installing, &s.running, &m.version),
            None => UpdateState::idle(&s.running),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Offer>) {
        let mut job: Option<(String, tokio::task::JoinHandle<()>)> = None;
        // A download a restart interrupted goes on, if its manifest is still good.
        let dir = Self::dir(&self.settings);
        if let Ok(Some(bytes)) = statefile::read_small(&dir.join(state::DOWNLOAD_MANIFEST), MAX_MANIFEST_BYTES as u64) {
            match Manifest::accept(&bytes, &self.settings.keys, &self.settings.arch, &self.settings.running) {
                Ok(Some(m)) => {
                    info!(version = %m.version, "resuming the update's download");
                    self.last = Some(bytes);
                    job = Some((m.sha256.clone(), self.spawn(m)));
                }
                _ => clear_download(&dir),
            }
        }
        let mut poll = tokio::time::interval(INSTALLER_POLL);
        loop {
            tokio::select! {
                offer = rx.recv() => {
                    let (payload, retry) = match offer {
                        None => return,
                        Some(Offer::Manifest(p)) => (p, false),
                        Some(Offer::Retry) => match self.last.clone() {
                            Some(p) => (p, true),
                            None => continue,
                        },
                    };
                    let busy = job.as_ref().is_some_and(|(_, h)| !h.is_finished()) || self.tx.borrow().state.in_progress();
                    self.on_manifest(&payload, busy, retry, &mut job);
                }
                _ = poll.tick() => {
                    // The installer at work: its result file is the state.
                    if matches!(self.tx.borrow().state, Phase::Installing | Phase::Gating) {
                        if let Some(r) = read_result(&dir, &self.settings.running) {
                            self.tx.send_if_modified(|s| if *s == r { false } else { *s = r; true });
                        }
                    }
                }
            }
        }
    }

    fn on_manifest(
        &mut self,
        payload: &[u8],
        busy: bool,
        retry: bool,
        job: &mut Option<(String, tokio::task::JoinHandle<()>)>,
    ) {
        let s = &self.settings;
        match Manifest::accept(payload, &s.keys, &s.arch, &s.running) {
            Ok(None) => {} // running it already
            Ok(Some(m)) => {
                let failed_before = self.failed.lock().expect("not poisoned").as_deref() == Some(m.version.as_str());
                if job.as_ref().is_some_and(|(sha, h)| *sha == m.sha256 && !h.is_finished())
                    || (failed_before && !retry)
                {
                    return; // under way, or failed in this run already
                }
                if matches!(self.tx.borrow().state, Phase::Installing | Phase::Gating) {
                    info!(version = %m.version, "an update manifest waits: the installer is at work");
                    return;
                }
                if let Some((_, h)) = job.take() {
                    h.abort();
                }
                info!(version = %m.version, url = %m.url, bytes = m.size, "updating");
                self.last = Some(payload.to_vec());
                *job = Some((m.sha256.clone(), self.spawn(m)));
            }
            Err(why) => {
                warn!(bytes = payload.len(), reason = %why, "refused an update manifest");
                if !busy {
                    let failed = UpdateState { state: Phase::Failed, ..UpdateState::idle(&s.running) };
                    self.tx.send_replace(failed.with_reason(why.to_string()));
                }
            }
        }
    }

    fn spawn(&self, m: Manifest) -> tokio::task::JoinHandle<()> {
        let (s, tx, failed) = (self.settings.clone(), self.tx.clone(), self.failed.clone());
        *failed.lock().expect("not poisoned") = None;
        tokio::spawn(async move {
            if let Err(reason) = fetch_and_hand_over(&s, &m, &tx).await {
                warn!(version = %m.version, reason = %reason, "the update failed");
                *failed.lock().expect("not poisoned") = Some(m.version.clone());
                tx.send_replace(UpdateState::toward(Phase::Failed, &s.running, &m.version).with_reason(reason));
            }
        })
    }
}

/// Fetches, verifies and hands the package to the installer.
async fn fetch_and_hand_over(s: &Settings, m: &Manifest, tx: &watch::Sender<UpdateState>) -> Result<(), String> {
    let dir = s.state_dir.join(state::DIR);
    let io = |what: &str, e: std::io::Error| format!("{what} in {}: {e}", dir.display());
    std::fs::create_dir_all(&dir).map_err(|e| io("cannot make the update's directory", e))?;
    for stale in [state::RESULT, state::READY_MANIFEST] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let manifest_json = serde_json::to_vec(m).expect("a manifest serializes");
    let part = dir.join(state::DOWNLOAD_PART);
    // A part of another package is not resumed.
    let same =
        statefile::read_small(&dir.join(state::DOWNLOAD_MANIFEST), MAX_MANIFEST_BYTES as u64).ok().flatten().as_deref()
            == Some(manifest_json.as_slice());
    if !same {
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(dir.join(state::READY_DEB));
        statefile::write_atomic(&dir, state::DOWNLOAD_MANIFEST, &manifest_json)
            .map_err(|e| io("cannot note the download", e))?;
    }
    // A cut between the rename to ready.deb and ready.json: the whole package is there.
    let ready = dir.join(state::READY_DEB);
    if same && !part.exists() && ready.exists() {
        std::fs::rename(&ready, &part).map_err(|e| io("cannot take the download back", e))?;
    }
    let (mut file, mut have) = Fetcher::open_after_restart(&part).map_err(|e| io("cannot open the download", e))?;
    if have > m.size {
        file.set_len(0).map_err(|e| io("cannot restart the download", e))?;
        have = 0;
    }
    let need = (m.size - have) + m.size + 1024 * 1024;
    let free = fetch::free_bytes(&dir).map_err(|e| io("cannot see the free space", e))?;
    if free < need {
        clear_download(&dir);
        return Err(format!("not enough free space: {need} bytes needed in {}, {free} free", dir.display()));
    }
    let url = Url::parse(&m.url)?;
    let tls = if url.https {
        Some(crate::tls::client_config(&crate::config::TlsConfig::default()).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let fetcher = Fetcher { url, size: m.size, stall: s.stall, tls };
    let report = |have: u64| UpdateState {
        percent: Some((have * 100 / m.size.max(1)) as u8),
        ..UpdateState::toward(Phase::Downloading, &s.running, &m.version)
    };
    tx.send_replace(report(have));
    let mut last_report = Instant::now();
    let (mut failures, mut delay) = (0u32, s.retry);
    loop {
        let before = have;
        let result = fetcher
            .attempt(&mut file, &mut have, &mut |h| {
                if last_report.elapsed() >= Duration::from_secs(1) {
                    last_report = Instant::now();
                    tx.send_replace(report(h));
                }
            })
            .await;
        match result {
            Ok(()) => break,
            Err(FetchError::Fatal(why)) => {
                clear_download(&dir);
                return Err(why);
            }
            Err(FetchError::Transient(why)) => {
                if have > before {
                    failures = 0;
                    delay = s.retry;
                }
                failures += 1;
                if failures >= MAX_FAILURES {
                    let _ = std::fs::remove_file(dir.join(state::DOWNLOAD_MANIFEST));
                    return Err(format!("the download failed {failures} times in a row: {why}"));
                }
                warn!(at = have, of = m.size, reason = %why, retry_in_ms = delay.as_millis() as u64,
                    "the update's download was interrupted; resuming");
                tx.send_replace(report(have));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
    drop(file);
    tx.send_replace(report(m.size));
    tx.send_replace(UpdateState::toward(Phase::Verifying, &s.running, &m.version));
    let sha = {
        let part = part.clone();
        tokio::task::spawn_blocking(move || fetch::sha256_of(&part)).await.map_err(|e| e.to_string())?
    }
    .map_err(|e| io("cannot read the download", e))?;
    if sha != m.sha256 {
        clear_download(&dir);
        return Err(format!("the package's SHA-256 is {sha}, the manifest says {}: altered or corrupt", m.sha256));
    }
    std::fs::rename(&part, dir.join(state::READY_DEB)).map_err(|e| io("cannot hand the package over", e))?;
    statefile::write_atomic(&dir, state::READY_MANIFEST, &manifest_json)
        .map_err(|e| io("cannot hand the package over", e))?;
    let _ = std::fs::remove_file(dir.join(state::DOWNLOAD_MANIFEST));
    info!(version = %m.version, "the update is fetched and verified; the installer takes it from here");
    tx.send_replace(UpdateState::toward(Phase::Installing, &s.running, &m.version));
    Ok(())
}

fn clear_download(dir: &Path) {
    for name in [state::DOWNLOAD_PART, state::DOWNLOAD_MANIFEST] {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

fn read_manifest(path: &Path) -> Option<Manifest> {
    let bytes = statefile::read_small(path, MAX_MANIFEST_BYTES as u64).ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// The installer's result, as the state (the running version filled in).
fn read_result(dir: &Path, running: &str) -> Option<UpdateState> {
    let bytes = statefile::read_small(&dir.join(state::RESULT), 4096).ok()??;
    let mut r: UpdateState = serde_json::from_slice(&bytes).ok()?;
    r.version = running.to_owned();
    Some(r)
}
