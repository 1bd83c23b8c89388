//! `nightlight release`: keys and signed manifests, made offline on the laptop.
//!
//! - `keygen DIR` writes `DIR/release.key` (the private key, mode 0600, never overwritten) and
//!   `DIR/release.pub` (one line, for `update.keys`).
//! - `sign --key FILE --url URL DEB` prints the signed manifest of `DEB`: its size and SHA-256
//!   measured here, its version and architecture from its control file (`dpkg-deb`), or given.
//!
//! - `rollout --broker HOST:PORT --manifest FILE --devices PATTERN ...` sends it to a fleet in
//!   waves that halt themselves ([`super::rollout`]).
//!
//! Exit codes: 0 done, 2 bad usage or input (named), 1 anything else (a rollout that halted).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::fetch::{sha256_of, Url};
use super::manifest::{Manifest, SigningKey};
use crate::{EXIT_CONFIG, EXIT_FAILURE};

/// What to do (`nightlight release ...`).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Make an Ed25519 key pair: DIR/release.key (private, 0600) and DIR/release.pub (for update.keys)
    Keygen {
        /// Where to write the two files (made if missing; existing keys are never overwritten)
        dir: PathBuf,
    },
    /// Print a signed manifest (JSON) for a .deb; publish it retained on <id>/update
    Sign {
        /// The private key from `release keygen`
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Where devices fetch the .deb (http:// or https://)
        #[arg(long)]
        url: String,
        /// The package's version [default: its control file's, through dpkg-deb]
        #[arg(long)]
        version: Option<String>,
        /// The package's Debian architecture [default: its control file's, through dpkg-deb]
        #[arg(long)]
        arch: Option<String>,
        /// The .deb
        deb: PathBuf,
    },
    /// Send a signed manifest to matching devices in growing waves; halt when too many fail
    Rollout(super::rollout::Args),
}

/// Runs it; prints what it made or why not.
pub fn run(cmd: Command) -> ExitCode {
    let result = match cmd {
        Command::Keygen { dir } => keygen(&dir),
        Command::Sign { key, url, version, arch, deb } => sign(&key, &url, version, arch, &deb),
        Command::Rollout(a) => return super::rollout::run(&a),
    };
    match result {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err((code, why)) => {
            eprintln!("nightlight: {why}");
            ExitCode::from(code)
        }
    }
}

type Outcome = Result<String, (u8, String)>;

fn keygen(dir: &Path) -> Outcome {
    let fail = |e: std::io::Error, what: &Path| (EXIT_FAILURE, format!("{}: {e}", what.display()));
    std::fs::create_dir_all(dir).map_err(|e| fail(e, dir))?;
    let (private, public) = (dir.join("release.key"), dir.join("release.pub"));
    let key = SigningKey::generate().map_err(|e| (EXIT_FAILURE, e))?;
    // create_new: an existing key is someone's whole fleet; never replaced.
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&private).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            (
                EXIT_CONFIG,
                format!("{} exists: a release key is never overwritten (move it away first)", private.display()),
            )
        } else {
            fail(e, &private)
        }
    })?;
    f.write_all(key.to_file().as_bytes()).and_then(|()| f.sync_all()).map_err(|e| fail(e, &private))?;
    std::fs::write(&public, format!("{}\n", key.public())).map_err(|e| fail(e, &public))?;
    Ok(format!(
        "wrote {} (private: keep it off the devices) and {}\nkey id {}: add this line to update.keys:\n{}",
        private.display(),
        public.display(),
        key.public().id(),
        key.public()
    ))
}

fn sign(key: &Path, url: &str, version: Option<String>, arch: Option<String>, deb: &Path) -> Outcome {
    let usage = |why: String| (EXIT_CONFIG, why);
    let text = std::fs::read_to_string(key).map_err(|e| usage(format!("--key {}: {e}", key.display())))?;
    let key = SigningKey::parse(&text).map_err(|e| usage(format!("--key {}: {e}", key.display())))?;
    Url::parse(url).map_err(|e| usage(format!("--url {e}")))?;
    let size = std::fs::metadata(deb).map_err(|e| usage(format!("{}: {e}", deb.display())))?.len();
    let field = |given: Option<String>, name: &str| -> Result<String, (u8, String)> {
        if let Some(v) = given {
            return Ok(v);
        }
        let out = std::process::Command::new("dpkg-deb").arg("-f").arg(deb).arg(name).output().map_err(|e| {
            usage(format!(
                "cannot run dpkg-deb to read {}'s {name} ({e}): give --{} instead",
                deb.display(),
                name.to_lowercase()
            ))
        })?;
        if !out.status.success() {
            return Err(usage(format!(
                "{}: not a .deb ({})",
                deb.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let unsigned = Manifest {
        version: field(version, "Version")?,
        arch: field(arch, "Architecture")?,
        size,
        sha256: sha256_of(deb).map_err(|e| (EXIT_FAILURE, format!("{}: {e}", deb.display())))?,
        url: url.to_owned(),
        key: String::new(),
        sig: String::new(),
    };
    let signed = key.sign(unsigned);
    let json = serde_json::to_string(&signed).expect("a manifest serializes");
    // What a device will parse: refuse to print one it would refuse.
    Manifest::parse(json.as_bytes()).map_err(|e| usage(format!("{e}")))?;
    Ok(json)
}
