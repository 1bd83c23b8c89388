//! Command line, logging set-up and exit codes: `0` clean stop, `2` bad usage or configuration,
//! `1` any other fatal error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use clap::{Parser, Subcommand};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

use crate::config::{self, Config, Loaded};
use crate::link::Security;

use crate::{EXIT_CONFIG, EXIT_FAILURE};

/// Firmware for an internet-connected nightlight: light sensor, LED, MQTT, offline queue.
#[derive(Debug, Parser)]
#[command(name = "nightlight", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file [default: $NIGHTLIGHT_CONFIG, ./device.toml, /etc/nightlight/device.toml]
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone, Subcommand)]
enum Command {
    /// Run the device: read the sensor, publish telemetry, obey commands (the default)
    Run,
    /// Validate the configuration and print the effective one, secrets redacted
    Check,
    /// Connect, read the device's retained status, LED state and health, and print them
    Status {
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
        /// Ask the device for a reading now (`<id>/read`) and print it instead
        #[arg(long)]
        read: bool,
        /// With --read: how long to wait for the answer, in seconds
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout_s: u64,
    },
    /// The lesson's controller: send `led_on` commands to every device from its telemetry
    Server,
    /// Release signing, on the laptop: keys and signed update manifests
    #[command(subcommand)]
    Release(crate::update::release::Command),
    /// The update installer, run as root by nightlight-update.service (not by hand)
    #[command(subcommand)]
    Update(Update),
    /// Broker + virtual device + controller + a live view, in one process
    #[cfg(feature = "virtual")]
    Demo {
        /// Port of the embedded broker on 127.0.0.1
        #[arg(long, default_value_t = 1883)]
        port: u16,
        /// Port of the web page on 127.0.0.1 (0 picks a free one; the address is printed)
        #[arg(long, default_value_t = 8080)]
        web_port: u16,
    },
    /// Many simulated nightlights in one process against a broker; reports lost and duplicated readings
    #[cfg(feature = "virtual")]
    Fleet(FleetArgs),
}

#[cfg(feature = "virtual")]
#[derive(Debug, Clone, clap::Args)]
struct FleetArgs {
    /// How many devices (ids fleet-00000, fleet-00001, ...)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    devices: u64,
    /// The broker, HOST:PORT (MQTT 3.1.1 or 5, no TLS)
    #[arg(long, value_name = "HOST:PORT")]
    broker: String,
    /// How long to run, in seconds
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    duration_s: u64,
    /// A reading every this many ms, per device
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(50..=3_600_000))]
    interval_ms: u64,
    /// A release.pub the devices trust: they take signed manifests on <id>/update
    #[arg(long, value_name = "FILE")]
    update_keys: Option<PathBuf>,
    /// This share of the devices' simulated installs fail and roll back, in percent
    #[arg(long, default_value_t = 0.0, value_name = "PERCENT", value_parser = crate::update::rollout::percent)]
    fail_installs: f64,
    /// This share of the devices has a wall clock an hour ahead, in percent
    #[arg(long, default_value_t = 0.0, value_name = "PERCENT", value_parser = crate::update::rollout::percent)]
    skew: f64,
    /// A third into the run, this share of the fleet loses the broker (for --partition-s)
    #[arg(long, value_name = "PERCENT", value_parser = crate::update::rollout::percent, conflicts_with = "storm")]
    partition: Option<f64>,
    /// How long a partition lasts, in seconds
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    partition_s: u64,
    /// A third into the run, every device drops its connection at once and reconnects
    #[arg(long)]
    storm: bool,
}

#[cfg(feature = "virtual")]
fn fleet(a: &FleetArgs) -> ExitCode {
    use crate::fleet::{Options, Scenario};
    use std::time::Duration;
    let keys = match &a.update_keys {
        None => Vec::new(),
        Some(path) => match std::fs::read_to_string(path).map_err(|e| e.to_string()).and_then(|text| {
            text.lines().filter(|l| !l.trim().is_empty()).map(crate::update::manifest::PublicKey::parse).collect()
        }) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("nightlight: --update-keys {}: {e}", path.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let scenario = match (a.partition, a.storm) {
        (Some(percent), _) => Some(Scenario::Partition { percent, length: Duration::from_secs(a.partition_s) }),
        (None, true) => Some(Scenario::Storm),
        (None, false) => None,
    };
    let opts = Options {
        devices: a.devices as usize,
        broker: a.broker.clone(),
        duration: Duration::from_secs(a.duration_s),
        interval: Duration::from_millis(a.interval_ms),
        update_keys: keys,
        fail_installs: a.fail_installs,
        skew: a.skew,
        scenario,
    };
    match crate::fleet::run(&opts) {
        Ok(r) => {
            match r.connected_after {
                Some(t) => println!("fleet: all {} devices connected {} ms after the start", r.devices, t.as_millis()),
                None => println!("fleet: never were all {} devices connected at once", r.devices),
            }
            println!("fleet: {} connections lost, {} connects failed", r.drops, r.connect_failures);
            println!("fleet: {} readings delivered to the observer, {} commands obeyed", r.delivered, r.commands);
            for took in &r.reconverged {
                println!("fleet: reconverged in {} ms", took.as_millis());
            }
            if !opts.update_keys.is_empty() {
                println!("fleet: {} updated, {} rolled back", r.updated, r.rolled_back);
            }
            println!("{r}");
            if r.lost > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("nightlight: fleet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Subcommand)]
enum Update {
    /// Verify, install and health-gate the package the device handed over; roll back on failure
    Apply {
        /// How long the health gate waits for READY and delivery, in seconds
        #[arg(long, default_value_t = crate::update::install::GATE_WAIT_S,
            value_parser = clap::value_parser!(u64).range(1..=3600))]
        gate_wait_s: u64,
    },
}

/// Parses the command line, runs the command and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Release(r)) = &cli.command {
        // Release signing runs on a laptop, with no device configuration.
        return crate::update::release::run(r.clone());
    }
    #[cfg(feature = "virtual")]
    if let Some(Command::Demo { port, web_port }) = cli.command.clone() {
        // The demo needs no configuration; its info lines would scroll over the live view.
        init_logging(LevelFilter::WARN);
        return serve(|shutdown| crate::demo::run(port, web_port, shutdown));
    }
    #[cfg(feature = "virtual")]
    if let Some(Command::Fleet(a)) = &cli.command {
        // A fleet needs no device configuration: it is told its broker.
        init_logging(LevelFilter::WARN);
        return fleet(a);
    }
    init_logging(LevelFilter::INFO);
    let source = config::locate(cli.config.as_deref(), std::env::var(config::CONFIG_ENV).ok().as_deref());
    let loaded = match Config::load(&source) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("nightlight: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The password and TLS files, read once: a bad one is a configuration error too.
    let security = match Security::load(&loaded.config.mqtt) {
        Ok(s) => s,
        Err(e) => {
            let e = config::ConfigError::Invalid { key: e.key, origin: loaded.origin_of(e.key), reason: e.reason };
            eprintln!("nightlight: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&loaded),
        Command::Run => run(loaded, security),
        Command::Status { json, read: false, .. } => status(&loaded.config, &security, json),
        Command::Status { json, read: true, timeout_s } => read(&loaded.config, &security, json, timeout_s),
        Command::Server => serve(|shutdown| crate::server::run(loaded.config, security, shutdown)),
        #[cfg(feature = "virtual")]
        Command::Demo { .. } => unreachable!("handled before the configuration is loaded"),
        #[cfg(feature = "virtual")]
        Command::Fleet(_) => unreachable!("handled before the configuration is loaded"),
        Command::Release(_) => unreachable!("handled before the configuration is loaded"),
        Command::Update(Update::Apply { gate_wait_s }) => {
            let c = &loaded.config;
            let paths = crate::update::install::Paths::system(std::path::Path::new(&c.queue.dir));
            crate::update::install::apply(&c.update.public_keys(), &paths, gate_wait_s)
        }
    }
}

fn check(loaded: &Loaded) -> ExitCode {
    // What the device runs with: the file and the environment, then what was set live over
    // MQTT and kept in the state directory (it wins at every start).
    let dir = std::path::Path::new(&loaded.config.queue.dir);
    let mut live = String::new();
    let effective = match crate::remote::Overrides::load(dir) {
        Ok(kept) if kept == crate::remote::Overrides::default() => None,
        Ok(kept) => match kept.apply_to(&loaded.config) {
            Ok(c) => {
                for (key, value) in crate::remote::kept_lines(&kept) {
                    live += &format!("#   {key} = {value}\n");
                }
                Some(c)
            }
            Err(r) => {
                eprintln!("nightlight: warning: the device ignores the live settings kept in {}: {r}", dir.display());
                None
            }
        },
        Err(e) => {
            eprintln!("nightlight: warning: cannot read the live settings kept in the state directory ({e}); the device may run with other values than these");
            None
        }
    };
    let c = effective.as_ref().unwrap_or(&loaded.config);
    let live = if live.is_empty() {
        String::new()
    } else {
        format!(
            "# set live over MQTT and kept in {} (they win over the file; `null` on <id>/config/set removes one):\n{live}",
            dir.join("config.json").display()
        )
    };
    println!("# configuration OK\n# source: {}\n{live}{}", loaded.source, c.to_redacted_toml());
    let has_password = c.mqtt.password.is_some() || !c.mqtt.password_file.is_empty();
    if has_password && !c.mqtt.tls.enabled && !is_loopback(&c.mqtt.host) {
        eprintln!(
            "nightlight: warning: the MQTT password would travel unencrypted to {}; enable [mqtt.tls]",
            c.mqtt.host
        );
    }
    if let Some(w) = crate::queue::medium::of_dir(dir).warning(dir) {
        eprintln!("nightlight: warning: {w}");
    }
    if let Some(addr) = c.metrics.listen_addr().filter(|a| !a.ip().is_loopback()) {
        eprintln!(
            "nightlight: warning: metrics.listen {addr} is reachable from the network, without a password; \
             127.0.0.1 keeps it on this machine (a scraper elsewhere can reach it through node_exporter's textfile)"
        );
    }
    if !c.metrics.textfile.is_empty() {
        if let Some(w) = crate::metrics::textfile_warning(std::path::Path::new(&c.metrics.textfile)) {
            eprintln!("nightlight: warning: {w}");
        }
    }
    ExitCode::SUCCESS
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn status(cfg: &Config, security: &Security, json: bool) -> ExitCode {
    let broker = cfg.mqtt.broker();
    let snap =
        match runtime().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(crate::status::fetch(cfg, security))) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("nightlight: {e:#}");
                return ExitCode::from(EXIT_FAILURE);
            }
        };
    if json {
        // A struct of strings, numbers and options always serializes.
        println!("{}", serde_json::to_string_pretty(&snap).expect("snapshot serializes"));
    } else {
        print!("{}", crate::status::render(&snap, &broker));
    }
    if snap.status.is_none() && snap.state.is_none() && snap.health.is_none() {
        eprintln!("nightlight: the broker at {broker} holds nothing for {}: has the device ever connected?", cfg.id);
        return ExitCode::from(EXIT_FAILURE);
    }
    ExitCode::SUCCESS
}

fn read(cfg: &Config, security: &Security, json: bool, timeout_s: u64) -> ExitCode {
    let wait = std::time::Duration::from_secs(timeout_s);
    let answer =
        runtime().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(crate::status::read(cfg, security, wait)));
    let v = match answer {
        Ok(crate::status::Answer::Reply(v)) => v,
        Ok(crate::status::Answer::Telemetry(v)) => {
            eprintln!("nightlight: MQTT 3.1.1 has no response topic: this is the first reading after asking");
            v
        }
        Err(e) => {
            eprintln!("nightlight: {e:#}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    if json {
        println!("{v}");
    } else {
        print!("{}", crate::status::render_reading(&v));
    }
    if v.get("error").is_some() {
        return ExitCode::from(EXIT_FAILURE);
    }
    ExitCode::SUCCESS
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

fn run(loaded: Loaded, security: Security) -> ExitCode {
    tracing::info!(config = %loaded.source, "configuration loaded");
    serve(|shutdown| crate::device::run(loaded.config, security, shutdown))
}

/// Runs a long-lived command until SIGINT or SIGTERM; maps its outcome to an exit code.
fn serve<F, Fut>(command: F) -> ExitCode
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nightlight: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        let shutdown = crate::shutdown::signal_future()?;
        // Run the command as a task, not as block_on's own future: waking block_on's future
        // costs an eventfd write and an extra epoll_wait every time (measured: about a third
        // of the CPU per reading at a 10 ms interval), waking a task on this thread does not.
        tokio::spawn(command(Box::pin(shutdown))).await.map_err(|e| anyhow::anyhow!("{e}"))?
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("nightlight: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Logs to stderr; the level comes from `RUST_LOG` (default `default`); no timestamps under
/// journald, which adds its own.
fn init_logging(default: LevelFilter) {
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let filter = Targets::from_str(&spec)
        .ok()
        .filter(|_| !spec.trim().is_empty())
        .unwrap_or_else(|| Targets::new().with_default(default));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(false);
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        registry.with(fmt.without_time()).init();
    } else {
        registry.with(fmt).init();
    }
}
