//! nightlight: firmware for an internet-connected nightlight on a Raspberry Pi.
//!
//! The device reads a light sensor, publishes `{"light", "ts", "seq"}` to `<id>/telemetry`, and
//! switches an LED on `{"led_on": bool}` from `<id>/commands`, over MQTT. Readings are owned by a
//! durable queue until the broker acknowledges them, so a broker outage, a crash or a power cut
//! loses nothing. The interface (commands, configuration, topics, payloads, exit codes) is in the
//! README and `docs/`.
//!
//! # Layout
//! - [`cli`]: command-line parsing and logging set-up (`main.rs` only calls it); the exit codes
//!   every command shares are [`EXIT_CONFIG`] and [`EXIT_FAILURE`], here at the root.
//! - [`clock`]: the wall clock a device is given, whether it is synchronized; re-stamping.
//! - [`config`]: the configuration schema, layered loading and validation.
//! - [`device`]: the device loop over its parts (sampler, lamp, connection, inbox, subscriptions,
//!   outbox, health, readings on request, refused readings, Home Assistant discovery), its
//!   handlers by concern, and the clean stop.
//! - [`local`]: the local rule: the device switches the LED itself when unattended.
//! - [`link`]: one MQTT client for MQTT 5 and 3.1.1 (the protocol chosen per broker), reconnect
//!   backoff, the cancel-safe poller around rumqttc, request/response.
//! - [`tls`]: rustls client configuration and plain-words TLS errors.
//! - [`remote`]: live configuration from `<id>/config/set`.
//! - [`metrics`]: counters shared by the device's parts; the Prometheus endpoint and textfile.
//! - [`queue`]: the durable offline queue (segments, checksums, group commit, byte cap).
//! - [`statefile`]: the state directory ([`statefile::StateDir`]): its files, its lock, one writer.
//! - [`topics`]: every topic and topic filter.
//! - [`payload`]: JSON payloads (telemetry, state, health); defensive command decoding.
//! - [`homeassistant`]: MQTT discovery configs.
//! - [`status`]: `nightlight status`, a device's retained status, state and health, and
//!   `status --read`, a reading asked for now.
//! - [`sensor`]: the `Sensor` trait, I2C chip drivers and the simulated sensor.
//! - [`led`]: the `Led` trait, the GPIO LED and the virtual LED.
//! - [`controller`]: the controller's decisions (threshold, hysteresis, late readings).
//! - [`server`]: `nightlight server`, the controller over MQTT.
//! - [`update`]: updates over MQTT: signed manifests, the device's agent, the root installer,
//!   and `nightlight release` (keys, signing, rollouts in waves).
//! - [`demo`]: `nightlight demo` (virtual builds): broker, device, controller and a view.
//! - [`fleet`]: `nightlight fleet` (virtual builds): many simulated devices in one process.
//! - [`broker`]: the demo's small embedded MQTT broker (virtual builds).
//! - [`shutdown`]: the SIGINT/SIGTERM future.
//! - [`systemd`]: READY, the watchdog and the status line systemd shows.

#[cfg(feature = "virtual")]
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod controller;
#[cfg(feature = "virtual")]
pub mod demo;
pub mod device;
#[cfg(feature = "virtual")]
pub mod fleet;
pub mod homeassistant;
pub mod led;
pub mod link;
pub mod local;
pub mod metrics;
pub mod payload;
pub mod queue;
pub mod remote;
pub mod sensor;
pub mod server;
pub mod shutdown;
pub mod statefile;
pub mod status;
pub mod systemd;
pub mod tls;
pub mod topics;
pub mod update;

/// The version this build reports (health, status, Home Assistant, updates): the package's,
/// `NIGHTLIGHT_VERSION` at build time when set (a release's Debian version), else Cargo's.
pub const VERSION: &str = match option_env!("NIGHTLIGHT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Exit status for bad usage or a bad configuration (systemd: `RestartPreventExitStatus=2`).
pub const EXIT_CONFIG: u8 = 2;
/// Exit status for any other fatal error.
pub const EXIT_FAILURE: u8 = 1;

pub use config::{Config, ConfigError};
pub use queue::{DiskQueue, QueueError};
pub use sensor::SensorError;
