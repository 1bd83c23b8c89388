//! Configuration: built-in defaults, then the file, then `NIGHTLIGHT__*` environment variables.
//!
//! This module owns the schema (serde structs that mirror `device.toml`), where the file is looked
//! for, validation with messages that name the key and where its value came from, and the
//! redacted rendering that `nightlight check` prints. It does no I/O beyond reading the file:
//! the password and TLS files are read by the link ([`crate::link::Security`]), the live
//! settings kept in the state directory by [`crate::remote`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "NIGHTLIGHT_CONFIG";
/// Where the file is looked for when neither `--config` nor `$NIGHTLIGHT_CONFIG` names one.
pub const DEFAULT_PATHS: [&str; 2] = ["device.toml", "/etc/nightlight/device.toml"];
/// Stands in for a secret wherever the configuration is printed.
pub const REDACTED: &str = "<redacted>";

/// A configuration that cannot be used; the program exits with status 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The named file does not exist or cannot be read: fix the path or the permissions.
    #[error("cannot read config file {path}: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML, or a value has the wrong type or an unknown key.
    #[error("{0}")]
    Parse(String),
    /// A value parsed but is out of range.
    #[error("invalid value for `{key}` {origin}: {reason}")]
    Invalid { key: &'static str, origin: String, reason: String },
}

/// The whole configuration. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Topic prefix and default client id: `[A-Za-z0-9_-]{1,64}`.
    pub id: String,
    pub mqtt: MqttConfig,
    pub sensor: SensorConfig,
    pub led: LedConfig,
    pub homeassistant: HomeAssistantConfig,
    pub queue: QueueConfig,
    pub server: ServerConfig,
    pub metrics: MetricsConfig,
    pub update: UpdateConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Empty means "use `id`".
    pub client_id: String,
    /// MQTT 5 (the default) or 3.1.1 for brokers that speak nothing newer.
    pub protocol: Protocol,
    pub keep_alive_s: u64,
    pub clean_session: bool,
    pub qos: u8,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub username: String,
    pub password_file: String,
    /// Only ever set from `NIGHTLIGHT__MQTT__PASSWORD`; never printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    pub tls: TlsConfig,
}

/// The MQTT protocol version (`mqtt.protocol`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Protocol {
    /// The default: MQTT 5, and MQTT 3.1.1 with a broker that closes the connection at an MQTT 5
    /// CONNECT or refuses its protocol version ([`crate::link::client`]).
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

impl Protocol {
    /// As the configuration spells it (and health and metrics report it).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Auto => "auto",
            Protocol::V5 => "5",
            Protocol::V311 => "3.1.1",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub enabled: bool,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
}

/// Which light sensor to read.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SensorKind {
    Grove,
    Ads1115,
    Bh1750,
    Virtual,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SensorConfig {
    pub kind: SensorKind,
    pub interval_ms: u64,
    /// At most one reading on request (`<id>/read`) per this many ms.
    pub min_request_ms: u64,
    pub i2c_bus: u8,
    /// The chip's I2C address; `None` means the chip's default (grove probes 0x04 then 0x08).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<u8>,
    pub channel: u8,
    pub full_scale_lux: f64,
    #[serde(rename = "virtual")]
    pub simulated: SimulatedSensorConfig,
}

/// The shape of the simulated light level.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    Constant,
    Daylight,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatedSensorConfig {
    pub pattern: Pattern,
    pub value: u16,
    pub period_s: u64,
}

/// Which LED to drive.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LedKind {
    Gpio,
    Virtual,
}

/// The LED's state at start, before any network (`led.power_on`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PowerOn {
    Off,
    On,
    /// The state it had when the device stopped or lost power.
    Last,
    /// What the controller's rule says of the first reading.
    Auto,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LedConfig {
    pub kind: LedKind,
    pub pin: u8,
    pub active_low: bool,
    pub power_on: PowerOn,
    /// A command whose `ts` is older than this changes nothing (0: any age).
    pub command_max_age_s: u64,
    /// With no broker or no controller online this long, the device switches the LED itself
    /// (0: never).
    pub local_after_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HomeAssistantConfig {
    pub enabled: bool,
    pub prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub dir: String,
    pub max_bytes: u64,
    pub spill_ms: u64,
}

/// Updates over MQTT: off while no key is trusted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateConfig {
    /// The release keys whose signed manifests the device takes (`ed25519:<hex>`, each a
    /// `release.pub`); two let a key be rotated; empty: updates off. Never settable over MQTT.
    pub keys: Vec<String>,
    /// A download that brings no byte for this long is cut and resumed (1-3600).
    pub stall_s: u64,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig { keys: Vec::new(), stall_s: 30 }
    }
}

impl UpdateConfig {
    /// The trusted keys (validated).
    pub fn public_keys(&self) -> Vec<crate::update::manifest::PublicKey> {
        self.keys.iter().filter_map(|k| crate::update::manifest::PublicKey::parse(k).ok()).collect()
    }
}

/// Metrics: both off by default.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `HOST:PORT` to serve `GET /metrics` on (`127.0.0.1:9101`, say); empty: off.
    pub listen: String,
    /// A file written atomically every few seconds with the same text, for node_exporter's
    /// textfile collector (`/run/nightlight/nightlight.prom`, say: in memory); empty: off.
    pub textfile: String,
}

impl MetricsConfig {
    /// Whether either is on.
    pub fn enabled(&self) -> bool {
        !self.listen.is_empty() || !self.textfile.is_empty()
    }

    /// The address to listen on, if any (validated).
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub threshold: u16,
    pub hysteresis: u16,
    pub shared_group: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: "nightlight-01".into(),
            mqtt: MqttConfig::default(),
            sensor: SensorConfig::default(),
            led: LedConfig::default(),
            homeassistant: HomeAssistantConfig::default(),
            queue: QueueConfig::default(),
            server: ServerConfig::default(),
            metrics: MetricsConfig::default(),
            update: UpdateConfig::default(),
        }
    }
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        HomeAssistantConfig { enabled: true, prefix: "homeassistant".into() }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { dir: "state".into(), max_bytes: 64 * 1024 * 1024, spill_ms: 1000 }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { threshold: 300, hysteresis: 20, shared_group: String::new() }
    }
}

impl MqttConfig {
    /// `host:port` as logs and messages name the broker (`[::1]:1883` for an IPv6 address).
    pub fn broker(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "localhost".into(),
            port: 1883,
            client_id: String::new(),
            protocol: Protocol::Auto,
            keep_alive_s: 30,
            clean_session: false,
            qos: 1,
            reconnect_min_ms: 250,
            reconnect_max_ms: 30_000,
            username: String::new(),
            password_file: String::new(),
            password: None,
            tls: TlsConfig::default(),
        }
    }
}

impl Default for SensorConfig {
    fn default() -> Self {
        SensorConfig {
            kind: if cfg!(feature = "hardware") { SensorKind::Grove } else { SensorKind::Virtual },
            interval_ms: 5000,
            min_request_ms: 200,
            i2c_bus: 1,
            address: None,
            channel: 0,
            full_scale_lux: 1000.0,
            simulated: SimulatedSensorConfig::default(),
        }
    }
}

impl Default for SimulatedSensorConfig {
    fn default() -> Self {
        SimulatedSensorConfig { pattern: Pattern::Daylight, value: 400, period_s: 120 }
    }
}

impl Default for LedConfig {
    fn default() -> Self {
        LedConfig {
            kind: if cfg!(feature = "hardware") { LedKind::Gpio } else { LedKind::Virtual },
            pin: 5,
            active_low: false,
            power_on: PowerOn::Last,
            command_max_age_s: 300,
            local_after_s: 60,
        }
    }
}

/// Where the configuration came from, for messages and `nightlight check`.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    File(PathBuf),
    /// No file was named and none exists at the default paths.
    Defaults,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Defaults => write!(f, "built-in defaults (no file at {})", DEFAULT_PATHS.join(", ")),
        }
    }
}

/// A loaded, validated configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub source: Source,
    origins: Origins,
}

impl Loaded {
    /// Where `key`'s value came from ("in FILE", "from environment variable VAR", "built-in
    /// default"), for errors found after loading (the password and TLS files).
    pub fn origin_of(&self, key: &str) -> String {
        self.origins.of(key, &self.source)
    }
}

/// What is needed to say where a key's value came from.
#[derive(Debug, Clone, Default)]
struct Origins {
    file_table: toml::Table,
    env_vars: Vec<String>,
}

impl Origins {
    fn of(&self, key: &str, source: &Source) -> String {
        let var = format!("NIGHTLIGHT__{}", key.replace('.', "__").to_uppercase());
        if self.env_vars.contains(&var) {
            return format!("from environment variable {var}");
        }
        let mut node = Some(&self.file_table);
        let mut parts = key.split('.').peekable();
        while let (Some(table), Some(part)) = (node, parts.next()) {
            match table.get(part) {
                Some(_) if parts.peek().is_none() => return format!("in {source}"),
                Some(toml::Value::Table(t)) => node = Some(t),
                _ => node = None,
            }
        }
        "built-in default".to_owned()
    }
}

/// Picks the file: `--config`, else `$NIGHTLIGHT_CONFIG`, else the first default path that exists.
pub fn locate(explicit: Option<&Path>, env_value: Option<&str>) -> Source {
    if let Some(p) = explicit {
        return Source::File(p.to_path_buf());
    }
    if let Some(p) = env_value.filter(|v| !v.is_empty()) {
        return Source::File(PathBuf::from(p));
    }
    DEFAULT_PATHS.iter().map(PathBuf::from).find(|p| p.is_file()).map(Source::File).unwrap_or(Source::Defaults)
}

impl Config {
    /// Loads defaults, then `source`, then the process environment, and validates the result.
    ///
    /// # Errors
    /// A missing or unparsable file, an unknown key, a wrong type or an out-of-range value.
    pub fn load(source: &Source) -> Result<Loaded, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(source, &env)
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(source: &Source, env: &[(String, String)]) -> Result<Loaded, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::Config::try_from(&Config::default()).map_err(|e| ConfigError::Parse(e.to_string()))?);
        let mut file_table = toml::Table::new();
        if let Source::File(path) = source {
            let text =
                std::fs::read_to_string(path).map_err(|e| ConfigError::Unreadable { path: path.clone(), source: e })?;
            // Parse here first: toml's own error carries the line and column.
            file_table = text
                .parse::<toml::Table>()
                .map_err(|e| ConfigError::Parse(format!("{}: {}", path.display(), e.to_string().trim_end())))?;
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        let env_map: config::Map<String, String> =
            env.iter().filter(|(k, _)| k.starts_with("NIGHTLIGHT__")).cloned().collect();
        builder = builder.add_source(
            config::Environment::with_prefix("NIGHTLIGHT")
                .prefix_separator("__")
                .separator("__")
                .source(Some(env_map.clone())),
        );
        let merged = builder.build().map_err(|e| ConfigError::Parse(e.to_string()))?;
        let origins = Origins { file_table, env_vars: env_map.keys().cloned().collect() };
        let origin_of = |key: &str| origins.of(key, source);
        let config: Config = merged.try_deserialize().map_err(|e| {
            let msg = e.to_string();
            // Say where the offending value came from: config only knows the key. For an unknown
            // field it names the table the field is in, which the defaults have too: look up the
            // field itself, or an unknown NIGHTLIGHT__LED__X would be blamed on the defaults.
            let quoted = |after: &str| msg.split(after).nth(1).and_then(|rest| rest.split('`').next());
            let key = match (quoted("for key `"), quoted("unknown field `")) {
                (Some(table), Some(field)) => Some(format!("{table}.{field}")),
                (None, Some(field)) => Some(field.to_owned()),
                (key, None) => key.map(str::to_owned),
            };
            match key {
                Some(key) => ConfigError::Parse(format!("{msg} {}", origin_of(&key))),
                None => ConfigError::Parse(format!("{msg} (in {source} or a NIGHTLIGHT__* variable)")),
            }
        })?;
        config.validate(&origin_of)?;
        Ok(Loaded { config, source: source.clone(), origins })
    }

    /// Checks ranges and combinations with every value from `origin` (e.g. a live change).
    ///
    /// # Errors
    /// As `nightlight check`: the key, the origin and why.
    pub fn validate_from(&self, origin: &str) -> Result<(), ConfigError> {
        self.validate(&|_| origin.to_owned())
    }

    /// Checks ranges and combinations; `origin_of(key)` says where a key's value came from.
    fn validate(&self, origin_of: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        let bad = |key: &'static str, reason: String| ConfigError::Invalid { key, origin: origin_of(key), reason };
        if !valid_id(&self.id) {
            return Err(bad("id", format!("{:?} must be 1-64 of A-Z a-z 0-9 _ - (no '/', '+' or '#')", self.id)));
        }
        let m = &self.mqtt;
        if m.host.is_empty() {
            return Err(bad("mqtt.host", "must not be empty".into()));
        }
        if m.port == 0 {
            return Err(bad("mqtt.port", "must be 1-65535".into()));
        }
        if m.client_id.len() > 256 || m.client_id.contains(['+', '#']) {
            return Err(bad("mqtt.client_id", "at most 256 characters, no '+' or '#'".into()));
        }
        // rumqttc's MQTT 5 client asserts at least 5 s, and a value must work under both protocols.
        if m.keep_alive_s < 5 || m.keep_alive_s > 65_535 {
            return Err(bad("mqtt.keep_alive_s", format!("{} is not in 5-65535", m.keep_alive_s)));
        }
        if m.qos > 1 {
            return Err(bad("mqtt.qos", format!("{} is not 0 or 1", m.qos)));
        }
        if m.reconnect_min_ms == 0 {
            return Err(bad("mqtt.reconnect_min_ms", "must be at least 1".into()));
        }
        if m.reconnect_max_ms < m.reconnect_min_ms {
            return Err(bad(
                "mqtt.reconnect_max_ms",
                format!("{} is below mqtt.reconnect_min_ms ({})", m.reconnect_max_ms, m.reconnect_min_ms),
            ));
        }
        // The password file and the TLS files are read by the link ([`crate::link::Security`]).
        let s = &self.sensor;
        // Ranges no wider than Home Assistant's numbers offer: live configuration sets them too.
        if !(10..=3_600_000).contains(&s.interval_ms) {
            return Err(bad("sensor.interval_ms", format!("{} is not in 10-3600000 (an hour)", s.interval_ms)));
        }
        if !(10..=60_000).contains(&s.min_request_ms) {
            return Err(bad("sensor.min_request_ms", format!("{} is not in 10-60000", s.min_request_ms)));
        }
        if s.channel > 7 {
            return Err(bad("sensor.channel", format!("{} is not in 0-7", s.channel)));
        }
        if let Some(a) = s.address {
            if !(0x03..=0x77).contains(&a) {
                return Err(bad("sensor.address", format!("{a:#04x} is not a 7-bit I2C address (0x03-0x77)")));
            }
        }
        if !(s.full_scale_lux.is_finite() && s.full_scale_lux > 0.0) {
            return Err(bad("sensor.full_scale_lux", "must be a positive number".into()));
        }
        if s.simulated.value > 1000 {
            return Err(bad("sensor.virtual.value", format!("{} is not in 0-1000", s.simulated.value)));
        }
        if s.simulated.period_s == 0 {
            return Err(bad("sensor.virtual.period_s", "must be at least 1".into()));
        }
        if s.kind == SensorKind::Virtual && !cfg!(feature = "virtual") {
            return Err(bad("sensor.kind", "\"virtual\" needs a build with the `virtual` feature".into()));
        }
        if s.kind != SensorKind::Virtual && !cfg!(feature = "hardware") {
            return Err(bad("sensor.kind", "hardware sensors need a build with the `hardware` feature".into()));
        }
        if self.led.kind == LedKind::Virtual && !cfg!(feature = "virtual") {
            return Err(bad("led.kind", "\"virtual\" needs a build with the `virtual` feature".into()));
        }
        if self.led.kind == LedKind::Gpio && !cfg!(feature = "hardware") {
            return Err(bad("led.kind", "\"gpio\" needs a build with the `hardware` feature".into()));
        }
        if self.led.pin > 53 {
            return Err(bad("led.pin", format!("{} is not a BCM GPIO number (0-53)", self.led.pin)));
        }
        if self.queue.dir.is_empty() {
            return Err(bad("queue.dir", "must not be empty".into()));
        }
        if self.queue.max_bytes < 64 * 1024 {
            return Err(bad("queue.max_bytes", format!("{} is below the minimum of 65536", self.queue.max_bytes)));
        }
        if !(1..=3_600_000).contains(&self.queue.spill_ms) {
            return Err(bad("queue.spill_ms", format!("{} is not in 1-3600000", self.queue.spill_ms)));
        }
        if self.server.threshold > 1000 {
            return Err(bad("server.threshold", format!("{} is not in 0-1000", self.server.threshold)));
        }
        if self.server.hysteresis > 1000 {
            return Err(bad("server.hysteresis", format!("{} is not in 0-1000", self.server.hysteresis)));
        }
        if self.led.local_after_s > 86_400 {
            return Err(bad("led.local_after_s", format!("{} is not in 0-86400 (a day)", self.led.local_after_s)));
        }
        if self.led.command_max_age_s > 86_400 {
            return Err(bad(
                "led.command_max_age_s",
                format!("{} is not in 0-86400 (a day)", self.led.command_max_age_s),
            ));
        }
        if self.homeassistant.prefix.is_empty() || self.homeassistant.prefix.contains(['+', '#']) {
            return Err(bad("homeassistant.prefix", "must be a non-empty topic without '+' or '#'".into()));
        }
        let metrics = &self.metrics;
        if !metrics.listen.is_empty() && metrics.listen_addr().is_none() {
            return Err(bad(
                "metrics.listen",
                format!("{:?} is not an IP address and port, like \"127.0.0.1:9101\" (empty: off)", metrics.listen),
            ));
        }
        let textfile = std::path::Path::new(&metrics.textfile);
        if !metrics.textfile.is_empty() && (!textfile.is_absolute() || textfile.file_name().is_none()) {
            return Err(bad(
                "metrics.textfile",
                format!(
                    "{:?} must be an absolute path to a file, like \"/run/nightlight/nightlight.prom\" (empty: off)",
                    metrics.textfile
                ),
            ));
        }
        if !(1..=3600).contains(&self.update.stall_s) {
            return Err(bad("update.stall_s", format!("{} is not in 1-3600", self.update.stall_s)));
        }
        for (i, key) in self.update.keys.iter().enumerate() {
            if let Err(why) = crate::update::manifest::PublicKey::parse(key) {
                return Err(bad("update.keys", format!("entry {}: {why}", i + 1)));
            }
        }
        Ok(())
    }

    /// The MQTT client id: `mqtt.client_id`, or the device id when that is empty.
    pub fn client_id(&self) -> &str {
        if self.mqtt.client_id.is_empty() {
            &self.id
        } else {
            &self.mqtt.client_id
        }
    }

    /// The effective configuration as TOML, with every secret replaced by [`REDACTED`].
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.mqtt.password.is_some() {
            shown.mqtt.password = Some(REDACTED.into());
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

/// `[A-Za-z0-9_-]{1,64}`: safe as a topic level and a Home Assistant object id.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load_str(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(toml_text.as_bytes()).unwrap();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::load_with_env(&Source::File(f.path().to_path_buf()), &env).map(|l| l.config)
    }

    #[test]
    fn the_broker_is_named_host_colon_port_with_an_ipv6_address_in_brackets() {
        let m = |host: &str| MqttConfig { host: host.into(), port: 8883, ..MqttConfig::default() };
        assert_eq!(m("broker.lan").broker(), "broker.lan:8883");
        assert_eq!(m("::1").broker(), "[::1]:8883");
    }

    #[test]
    fn empty_file_gives_contract_defaults() {
        let c = load_str("", &[]).unwrap();
        assert_eq!(c.id, "nightlight-01");
        assert_eq!(c.mqtt.port, 1883);
        assert_eq!(c.mqtt.keep_alive_s, 30);
        assert!(!c.mqtt.clean_session);
        assert_eq!(c.mqtt.qos, 1);
        assert_eq!((c.mqtt.reconnect_min_ms, c.mqtt.reconnect_max_ms), (250, 30_000));
        assert_eq!(c.sensor.interval_ms, 5000);
        assert_eq!(c.led.pin, 5);
        assert_eq!(c.queue.max_bytes, 67_108_864);
        assert_eq!(c.queue.spill_ms, 1000);
        assert_eq!(c.client_id(), "nightlight-01");
    }

    #[test]
    fn file_values_override_defaults_and_env_overrides_file() {
        let c = load_str(
            "id = \"porch\"\n[mqtt]\nport = 1884\n[sensor.virtual]\nvalue = 10\n",
            &[("NIGHTLIGHT__MQTT__PORT", "1999"), ("NIGHTLIGHT__SENSOR__VIRTUAL__VALUE", "250")],
        )
        .unwrap();
        assert_eq!(c.id, "porch");
        assert_eq!(c.mqtt.port, 1999);
        assert_eq!(c.sensor.simulated.value, 250);
    }

    #[test]
    fn unknown_key_is_rejected_naming_it() {
        let e = load_str("[mqtt]\nprot = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("prot"), "{e}");
        let e = load_str("", &[("NIGHTLIGHT__MQTT__HOSTNAME", "x")]).unwrap_err().to_string();
        assert!(e.contains("hostname"), "{e}");
    }

    #[test]
    fn out_of_range_value_names_key_and_file() {
        let err = load_str("[mqtt]\nqos = 2\n", &[]).unwrap_err();
        let e = err.to_string();
        assert!(e.contains("mqtt.qos"), "{e}");
        assert!(e.contains("in /"), "names the file: {e}");
        let e = load_str("", &[("NIGHTLIGHT__MQTT__QOS", "7")]).unwrap_err().to_string();
        assert!(e.contains("NIGHTLIGHT__MQTT__QOS"), "names the variable: {e}");
    }

    #[test]
    fn every_live_setting_has_a_range_no_wider_than_home_assistant_offers() {
        for (toml, key) in [
            ("[sensor]\ninterval_ms = 3600001\n", "sensor.interval_ms"),
            ("[server]\nhysteresis = 1001\n", "server.hysteresis"),
            ("[led]\nlocal_after_s = 86401\n", "led.local_after_s"),
            ("[led]\ncommand_max_age_s = 86401\n", "led.command_max_age_s"),
        ] {
            let e = load_str(toml, &[]).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
        }
        let edge = "[sensor]\ninterval_ms = 3600000\n[server]\nhysteresis = 1000\n[led]\nlocal_after_s = 86400\n\
                    command_max_age_s = 86400\n";
        assert!(load_str(edge, &[]).is_ok(), "the top of each range is allowed");
        let d = crate::homeassistant::device_discovery(&Config::default(), None).payload;
        assert_eq!(d["cmps"]["interval"]["max"], 3600);
        assert_eq!(d["cmps"]["hysteresis"]["max"], 1000);
        assert_eq!(d["cmps"]["local_after"]["max"], 86_400);
        assert_eq!(d["cmps"]["command_max_age"]["max"], 86_400);
    }

    #[test]
    fn wrong_type_names_key() {
        let e = load_str("[mqtt]\nport = \"abc\"\n", &[]).unwrap_err().to_string();
        assert!(e.contains("mqtt.port"), "{e}");
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let e = load_str("id = \"a\"\n[mqtt\nport = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn bad_id_is_rejected() {
        for id in ["", "a/b", "a+b", "x#", &"a".repeat(65)] {
            let e = load_str(&format!("id = {id:?}\n"), &[]).unwrap_err().to_string();
            assert!(e.contains("`id`"), "{id}: {e}");
        }
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let e = Config::load_with_env(&Source::File("/nonexistent/x.toml".into()), &[]).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.toml"), "{e}");
    }

    fn password(c: &Config) -> Option<String> {
        crate::link::Security::load(&c.mqtt).unwrap().login.map(|(_, p)| p)
    }

    #[test]
    fn password_from_env_is_redacted_in_check_output() {
        let c = load_str("[mqtt]\nusername = \"dev\"\n", &[("NIGHTLIGHT__MQTT__PASSWORD", "hunter2")]).unwrap();
        assert_eq!(password(&c).as_deref(), Some("hunter2"));
        let shown = c.to_redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains(REDACTED));
    }

    #[test]
    fn password_file_trailing_newline_is_ignored() {
        let mut pw = tempfile::NamedTempFile::new().unwrap();
        pw.write_all(b"s3cret\n").unwrap();
        let c = load_str(&format!("[mqtt]\nusername = \"dev\"\npassword_file = {:?}\n", pw.path()), &[]).unwrap();
        assert_eq!(password(&c).as_deref(), Some("s3cret"));
        assert!(!c.to_redacted_toml().contains("s3cret"));
    }

    #[test]
    fn locate_prefers_flag_then_env() {
        assert_eq!(locate(Some(Path::new("a.toml")), Some("b.toml")), Source::File("a.toml".into()));
        assert_eq!(locate(None, Some("b.toml")), Source::File("b.toml".into()));
    }
}
