//! `nightlight update apply`: the installer, run as root by `nightlight-update.service` when the
//! device has handed a package over (`nightlight-update.path` watches `ready.json`). The service
//! itself stays unprivileged; this is the only part of an update that runs as root.
//!
//! Rules:
//! - **It trusts nothing the service wrote.** It reads the manifest, verifies its signature with
//!   the keys in the configuration file (root's copy, not the service's environment), checks the
//!   architecture against `dpkg --print-architecture` and the version against the installed
//!   package (newer only), copies the package into its own directory (`/var/lib/nightlight-update`,
//!   root only) and checks the copy's size and SHA-256: what is installed is what was verified.
//! - Installs as `cross/deploy.sh` does (`--force-confdef --force-confold`: an edited
//!   `device.toml` stays, the queue stays), then runs the same health gate
//!   (`/usr/lib/nightlight/health-gate`): READY, 10 s without a restart, delivering when the old
//!   version was. A failed install or gate reinstalls the version before (the `.deb` kept in
//!   `/var/cache/nightlight/deploy/current.deb`, shared with deploy.sh) and gates it.
//! - Every step is written to a journal first, so a power cut at any moment resumes at boot
//!   (the path unit fires again while `ready.json` is there): `dpkg --configure -a`, then the
//!   step again. `ready.json` goes last, when the update is done or undone.
//! - Each phase and the outcome go to the device's `update/result.json` (0644), which the
//!   device reports as `<id>/update/state`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use serde::{Deserialize, Serialize};

use super::manifest::{to_hex, Manifest, PublicKey, MAX_MANIFEST_BYTES};
use super::state::{self, Phase, UpdateState};
use crate::statefile;

/// Where the installer keeps its own files and finds the others.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The device's `queue.dir/update`.
    pub handover: PathBuf,
    /// Root's own: the journal, the package being installed, the one before.
    pub work: PathBuf,
    /// The `.deb`s kept for a rollback (shared with cross/deploy.sh).
    pub kept: PathBuf,
    pub gate: PathBuf,
}

impl Paths {
    pub fn system(state_dir: &Path) -> Self {
        Paths {
            handover: state_dir.join(state::DIR),
            work: PathBuf::from("/var/lib/nightlight-update"),
            kept: PathBuf::from("/var/cache/nightlight/deploy"),
            gate: PathBuf::from("/usr/lib/nightlight/health-gate"),
        }
    }
}

/// The step an install is at, written before it is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    Install,
    Gate,
    Rollback,
    GatePrevious,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Journal {
    step: Step,
    manifest: Manifest,
    /// The version installed when it began.
    from: String,
    /// Whether the gate asks for delivery (the old version was delivering).
    need_delivery: bool,
    /// The service's run before the step, and when the step began (for the gate).
    old_run: String,
    since: u64,
    /// Why the new version was undone.
    #[serde(default)]
    reason: Option<String>,
}

/// How long the gate waits for READY and delivery.
pub const GATE_WAIT_S: u64 = 60;
const GATE_SETTLE_S: u64 = 10;
const JOURNAL: &str = "journal.json";
/// The longest reason written for the device (escaped, it stays under 4 KiB).
pub(crate) const REASON_CHARS: usize = 300;
const INCOMING: &str = "incoming.deb";
const PREVIOUS: &str = "previous.deb";

/// Runs the installer: exit 0 when there was nothing to do or the update is done, 1 when it
/// was refused, failed or rolled back.
pub fn apply(keys: &[PublicKey], paths: &Paths, gate_wait_s: u64) -> ExitCode {
    let mut i = Installer { keys, paths, gate_wait_s };
    match i.run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(crate::EXIT_FAILURE),
        Err(e) => {
            eprintln!("nightlight update: {e}");
            ExitCode::from(crate::EXIT_FAILURE)
        }
    }
}

struct Installer<'a> {
    keys: &'a [PublicKey],
    paths: &'a Paths,
    gate_wait_s: u64,
}

impl Installer<'_> {
    /// `Ok(true)`: done or nothing to do.
    fn run(&mut self) -> io::Result<bool> {
        fs::create_dir_all(&self.paths.work)?;
        set_mode(&self.paths.work, 0o700)?;
        let mut j = match self.read_journal() {
            Some(j) => {
                say(&format!("resuming the update to {} at its {:?} step (interrupted)", j.manifest.version, j.step));
                // A cut inside dpkg leaves packages half-configured.
                let _ = run("dpkg", &["--configure", "-a"]);
                j
            }
            None => match self.begin()? {
                Some(j) => j,
                None => return Ok(true),
            },
        };
        loop {
            self.write_journal(&j)?;
            let to = j.manifest.version.clone();
            match j.step {
                Step::Install => {
                    self.result(UpdateState::toward(Phase::Installing, &j.from, &to));
                    (j.old_run, j.since) = (service_prop("InvocationID"), now_s());
                    match self.dpkg_install(&self.paths.work.join(INCOMING), &j.old_run) {
                        Ok(()) => j.step = Step::Gate,
                        Err(why) => {
                            j.reason = Some(format!("dpkg could not install {to}: {why}"));
                            j.step = Step::Rollback;
                        }
                    }
                }
                Step::Gate => {
                    self.result(UpdateState::toward(Phase::Gating, &j.from, &to));
                    match self.gate(&j) {
                        Ok(status) => {
                            say(&format!("nightlight {to} passed the health gate: {status}"));
                            self.keep()?;
                            self.finish(UpdateState::toward(Phase::Done, &j.from, &to));
                            return Ok(true);
                        }
                        Err(why) => {
                            j.reason = Some(format!("the new version failed the health gate: {why}"));
                            j.step = Step::Rollback;
                        }
                    }
                }
                Step::Rollback => {
                    let reason = j.reason.clone().unwrap_or_default();
                    say(&format!("{reason}; rolling back to {}", j.from));
                    let previous = self.paths.work.join(PREVIOUS);
                    if !previous.exists() {
                        self.finish(
                            UpdateState::toward(Phase::Failed, &j.from, &to)
                                .with_reason(format!("{reason}; no package of {} kept to roll back to", j.from)),
                        );
                        return Ok(false);
                    }
                    (j.old_run, j.since) = (service_prop("InvocationID"), now_s());
                    if let Err(why) = self.dpkg_install(&previous, &j.old_run) {
                        self.finish(
                            UpdateState::toward(Phase::Failed, &j.from, &to)
                                .with_reason(format!("{reason}; reinstalling {} failed too: {why}", j.from)),
                        );
                        return Ok(false);
                    }
                    j.step = Step::GatePrevious;
                }
                Step::GatePrevious => {
                    let reason = j.reason.clone().unwrap_or_default();
                    match self.gate(&j) {
                        Ok(_) => {
                            say(&format!("rolled back: nightlight {} is running again", j.from));
                            self.finish(UpdateState::toward(Phase::RolledBack, &j.from, &to).with_reason(reason));
                        }
                        Err(why) => self.finish(UpdateState::toward(Phase::Failed, &j.from, &to).with_reason(format!(
                            "{reason}; {} failed its gate too after the rollback: {why}",
                            j.from
                        ))),
                    }
                    return Ok(false);
                }
            }
        }
    }

    /// Checks what was handed over; `None` when there is nothing (or it was refused).
    fn begin(&mut self) -> io::Result<Option<Journal>> {
        let Some(bytes) =
            statefile::read_small(&self.paths.handover.join(state::READY_MANIFEST), MAX_MANIFEST_BYTES as u64)?
        else {
            return Ok(None);
        };
        let installed = installed_version().unwrap_or_default();
        let arch = run("dpkg", &["--print-architecture"]).unwrap_or_default();
        let refuse = |this: &mut Self, why: String| {
            say(&format!("refused the update: {why}"));
            let to = serde_json::from_slice::<Manifest>(&bytes).map(|m| m.version).unwrap_or_default();
            this.finish(UpdateState::toward(Phase::Failed, &installed, &to).with_reason(why));
            Ok(None)
        };
        let m = match Manifest::accept(&bytes, self.keys, &arch, &installed) {
            Ok(Some(m)) => m,
            Ok(None) => return refuse(self, format!("{installed} is installed already")),
            Err(why) => return refuse(self, why.to_string()),
        };
        // The copy is what gets checked and installed: the service cannot change it after.
        let incoming = self.paths.work.join(INCOMING);
        match copy_checked(&self.paths.handover.join(state::READY_DEB), &incoming, m.size) {
            Ok(sha) if sha == m.sha256 => {}
            Ok(sha) => return refuse(self, format!("the package's SHA-256 is {sha}, the manifest says {}", m.sha256)),
            Err(e) => return refuse(self, format!("cannot take the package: {e}")),
        }
        // The version running now, to go back to (deploy.sh's kept .deb, when it is that one).
        let kept = self.paths.kept.join("current.deb");
        let previous = self.paths.work.join(PREVIOUS);
        let _ = fs::remove_file(&previous);
        if run("dpkg-deb", &["-f", &kept.to_string_lossy(), "Version"]).is_ok_and(|v| v == installed) {
            fs::copy(&kept, &previous)?;
            File::open(&previous)?.sync_all()?;
        } else {
            say(&format!("warning: no .deb of the installed {installed} is kept: a failed update cannot be undone"));
        }
        let need_delivery = service_prop("StatusText").starts_with("delivering to ");
        say(&format!("installing nightlight {} (from {installed}), verified with key {}", m.version, m.key));
        Ok(Some(Journal {
            step: Step::Install,
            manifest: m,
            from: installed,
            need_delivery,
            old_run: String::new(),
            since: now_s(),
            reason: None,
        }))
    }

    fn dpkg_install(&self, deb: &Path, old_run: &str) -> Result<(), String> {
        let _ = run("systemctl", &["reset-failed", "nightlight"]);
        let out = Command::new("dpkg")
            .args(["--force-confdef", "--force-confold", "-i"])
            .arg(deb)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .map_err(|e| format!("cannot run dpkg: {e}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("dpkg failed").to_owned());
        }
        // The package restarts the service on an upgrade; a reinstall of one version may not.
        let run_now = service_prop("InvocationID");
        if run_now.is_empty() || run_now == old_run {
            let _ = run("systemctl", &["restart", "--no-block", "nightlight"]);
        }
        Ok(())
    }

    /// The health gate; `Err` holds its one-line reason.
    fn gate(&self, j: &Journal) -> Result<String, String> {
        let old = if j.old_run.is_empty() { "-".to_owned() } else { j.old_run.clone() };
        let out = Command::new(&self.paths.gate)
            .args([
                self.gate_wait_s.to_string(),
                GATE_SETTLE_S.to_string(),
                u8::from(j.need_delivery).to_string(),
                old,
                j.since.to_string(),
            ])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.paths.gate.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            eprint!("{err}");
            Err(err.lines().next().unwrap_or("the gate failed").trim_end_matches("; its journal:").to_owned())
        }
    }

    /// The new version passed: its `.deb` is what a later failure goes back to.
    fn keep(&self) -> io::Result<()> {
        fs::create_dir_all(&self.paths.kept)?;
        let current = self.paths.kept.join("current.deb");
        let incoming = self.paths.work.join(INCOMING);
        // Kept already (a power cut came after this, before the journal was cleared).
        if fs::read(&current).ok() == fs::read(&incoming).ok() {
            return Ok(());
        }
        if current.exists() {
            fs::rename(&current, self.paths.kept.join("previous.deb"))?;
        }
        fs::copy(&incoming, &current)?;
        File::open(&current)?.sync_all()
    }

    /// The outcome reported, the hand-over and the journal cleared (the journal last).
    fn finish(&self, outcome: UpdateState) {
        self.result(outcome);
        for name in [state::READY_MANIFEST, state::READY_DEB] {
            let _ = fs::remove_file(self.paths.handover.join(name));
        }
        for name in [INCOMING, PREVIOUS] {
            let _ = fs::remove_file(self.paths.work.join(name));
        }
        let _ = fs::remove_file(self.paths.work.join(JOURNAL));
        let _ = File::open(&self.paths.work).and_then(|d| d.sync_all());
    }

    /// The phase for the device to report.
    fn result(&self, mut s: UpdateState) {
        if let Some(r) = &s.reason {
            say(&format!("{:?}: {r}", s.state));
        }
        // The reason quotes dpkg and the service's status line: bounded and printable, so the
        // file stays far inside what the device reads (4 KiB); the journal has it whole.
        s.reason = s.reason.map(|r| crate::payload::printable(&r, REASON_CHARS));
        if let Err(e) = statefile::write_atomic_mode(&self.paths.handover, state::RESULT, &s.to_json(), 0o644) {
            say(&format!("cannot write {}: {e}", state::RESULT));
        }
    }

    fn read_journal(&self) -> Option<Journal> {
        let bytes = statefile::read_small(&self.paths.work.join(JOURNAL), 16 * 1024).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    fn write_journal(&self, j: &Journal) -> io::Result<()> {
        statefile::write_atomic(&self.paths.work, JOURNAL, &serde_json::to_vec(j).expect("a journal serializes"))
    }
}

/// Copies `from` (a regular file, not through a link, at most `size` bytes) to `to`, synced;
/// the copy's SHA-256.
fn copy_checked(from: &Path, to: &Path, size: u64) -> io::Result<String> {
    let src = statefile::open_regular(from, OpenOptions::new().read(true))?;
    let _ = fs::remove_file(to);
    let mut dst = OpenOptions::new().write(true).create_new(true).open(to)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut src, mut n_total) = (src.take(size + 1), 0u64);
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        ctx.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
    }
    if n_total != size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("it is {n_total} bytes, the manifest says {size}"),
        ));
    }
    dst.sync_all()?;
    Ok(to_hex(ctx.finish().as_ref()))
}

fn installed_version() -> Option<String> {
    let v = run("dpkg-query", &["-W", "-f", "${db:Status-Status} ${Version}", "nightlight"]).ok()?;
    v.strip_prefix("installed ").map(str::to_owned)
}

fn service_prop(name: &str) -> String {
    run("systemctl", &["show", "nightlight", "-p", name, "--value"]).unwrap_or_default()
}

/// A command's trimmed stdout, or why it failed.
fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

fn say(line: &str) {
    eprintln!("nightlight update: {line}");
}
