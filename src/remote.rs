//! Live configuration: a JSON object on `<id>/config/set`, shaped like `device.toml` and
//! partial (`{"sensor": {"interval_ms": 200}}`), changes the running device.
//!
//! Rules:
//! - Only [`SETTABLE`] keys can be set. `id`, anything under `mqtt` (host, port, credentials,
//!   TLS) and `queue.dir` never can: a message must not be able to send the device to another
//!   broker. Any other key is refused as unknown or not settable.
//! - The result is checked with the rules of `nightlight check` (types, ranges). One bad key
//!   refuses the whole message: a refusal changes nothing.
//! - `null` removes a key that was set (JSON merge patch, RFC 7396): the file's or the
//!   environment's value holds again.
//! - A retained message is refused (the device applies it; a retained one would be applied again
//!   at every new session, long after whoever sent it changed their mind).
//! - What was set is kept in the state directory (`queue.dir/config.json`, written atomically)
//!   and applied at every start on top of the file and the environment: the latest intent wins.
//! - The device reports the effective settable values and the last refusal on the retained
//!   `<id>/config`.
//!
//! - Kept only when a message changed something, at most once per [`SAVE_AFTER`] and never on
//!   the device loop ([`Saver`]): a flood of `config/set` costs no SD-card writes beyond one per
//!   [`SAVE_AFTER`], and no sync stalls the loop.
//!
//! Pure but for [`Overrides::load`] and [`Saver`] (which writes through [`StateDir::keep`]).

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::payload;
use crate::statefile::StateDir;

/// What a kept file adds to `base`, for `nightlight check`: `(key, value)` of each kept setting.
pub fn kept_lines(kept: &Overrides) -> Vec<(String, String)> {
    kept.0.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()
}

/// The keys `<id>/config/set` may change.
pub const SETTABLE: [&str; 6] = [
    "sensor.interval_ms",
    "led.power_on",
    "led.local_after_s",
    "led.command_max_age_s",
    "server.threshold",
    "server.hysteresis",
];

/// Why a message changed nothing: the key (dotted, or `(message)`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

fn refuse(key: impl Into<String>, reason: impl Into<String>) -> Refusal {
    // The key and serde's reason quote what the peer sent: logged, reported, made printable.
    Refusal { key: payload::printable(&key.into(), 100), reason: payload::printable(&reason.into(), 300) }
}

/// The settable values set remotely so far, as dotted keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides(Map<String, Value>);

impl Overrides {
    const FILE: &'static str = "config.json";

    /// Reads the kept overrides from `dir`; none when there is no file. A file that cannot be
    /// read or holds anything not settable is ignored whole (the caller logs it).
    ///
    /// # Errors
    /// The file exists but is unreadable or not what [`Overrides::save`] writes.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path: PathBuf = dir.join(Self::FILE);
        let text = match crate::statefile::read_small(&path, 64 * 1024) {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(Overrides::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        match serde_json::from_slice::<Map<String, Value>>(&text) {
            Ok(m) if m.keys().all(|k| SETTABLE.contains(&k.as_str())) => Ok(Overrides(m)),
            _ => Err(format!("{}: not a live configuration this version wrote", path.display())),
        }
    }

    /// As `config.json` holds them.
    fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).expect("a JSON map serializes")
    }

    /// `base` with these overrides applied, checked like `nightlight check`.
    ///
    /// # Errors
    /// A value does not fit (a newer file from another version, or a changed file underneath).
    pub fn apply_to(&self, base: &Config) -> Result<Config, Refusal> {
        let mut v = serde_json::to_value(base).expect("a config serializes");
        for (key, value) in &self.0 {
            set_dotted(&mut v, key, value.clone());
        }
        let cfg: Config = serde_json::from_value(v).map_err(|e| refuse("(kept configuration)", e.to_string()))?;
        cfg.validate_from("set remotely on <id>/config/set").map_err(|e| refuse(invalid_key(&e), e.to_string()))?;
        Ok(cfg)
    }
}

/// How long after a change the kept file is written (changes meanwhile go in the same write).
pub const SAVE_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Writes the kept settings off the device loop: the latest of them, [`SAVE_AFTER`] after the
/// first change not yet written, one write at a time.
#[derive(Debug)]
pub struct Saver {
    state: StateDir,
    /// Set and not yet handed to a write.
    pending: Option<Overrides>,
    /// When to write `pending`.
    due: Option<tokio::time::Instant>,
    /// Writes handed to the disk since start.
    writes: u64,
}

/// What a failed write of the kept settings costs.
const SAVE_FAILING: &str = "the live configuration holds until the next start";

impl Saver {
    pub fn new(state: StateDir) -> Self {
        Saver { state, pending: None, due: None, writes: 0 }
    }

    /// The settings changed to `kept`.
    pub fn changed(&mut self, kept: &Overrides, now: tokio::time::Instant) {
        self.pending = Some(kept.clone());
        self.due.get_or_insert(now + SAVE_AFTER);
    }

    /// Writes handed to the disk since start.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// When [`Saver::write_due`] should run.
    pub fn deadline(&self) -> Option<tokio::time::Instant> {
        self.due
    }

    /// Hands the pending settings to the state directory's writer.
    pub fn write_due(&mut self) {
        self.due = None;
        if let Some(kept) = self.pending.take() {
            self.writes += 1;
            self.state.keep(Overrides::FILE, kept.to_bytes(), SAVE_FAILING);
        }
    }

    /// At a stop: what is pending handed over, and everything handed on disk (blocks).
    pub fn flush(&mut self) {
        self.write_due();
        self.state.flush();
    }
}

/// The device's side of it: the configuration in effect, what was set, the last refusal, and
/// the [`Saver`] that keeps what was set.
#[derive(Debug)]
pub struct Live {
    /// In effect: `base` with what was set live.
    cfg: Config,
    /// The configuration of the file and the environment, which the kept settings apply to
    /// (`null` goes back to it).
    base: Config,
    kept: Overrides,
    refusal: Option<Refusal>,
    saver: Saver,
}

impl Live {
    /// `base` (the file and the environment) with what was set live before, kept in the state
    /// directory `dir`: the latest intent wins. A kept file that cannot be read or applied is
    /// ignored (logged): the device starts on `base`.
    pub fn open(base: Config, state: &StateDir) -> Self {
        let kept = Overrides::load(state.path()).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "ignored the kept live configuration");
            Overrides::default()
        });
        let (cfg, kept) = match kept.apply_to(&base) {
            Ok(c) => (c, kept),
            Err(r) => {
                tracing::warn!(refused = %r, "ignored the kept live configuration");
                (base.clone(), Overrides::default())
            }
        };
        Live { cfg, base, kept, refusal: None, saver: Saver::new(state.clone()) }
    }

    /// The configuration in effect.
    pub fn cfg(&self) -> &Config {
        &self.cfg
    }

    /// One `<id>/config/set` message at `now` (`retained` as the broker marked it): applied and
    /// kept (the [`Saver`] writes it later), or refused with nothing changed. Either way the
    /// next [`Live::report`] says so.
    ///
    /// # Errors
    /// The refusal: retained, or what [`set`] refuses.
    pub fn set(&mut self, payload: &[u8], retained: bool, now: tokio::time::Instant) -> Result<&Config, &Refusal> {
        let outcome = if retained {
            // Applied again at every new session, long after its sender changed their mind.
            Err(refuse("(message)", "retained: live configuration is applied once, as sent; publish it without retain"))
        } else {
            set(&self.base, &self.kept, payload)
        };
        match outcome {
            Ok((cfg, kept)) => {
                if kept != self.kept {
                    self.saver.changed(&kept, now);
                }
                (self.cfg, self.kept, self.refusal) = (cfg, kept, None);
                Ok(&self.cfg)
            }
            Err(refusal) => Err(self.refusal.insert(refusal)),
        }
    }

    /// The retained `<id>/config` ([`report`]).
    pub fn report(&self) -> Vec<u8> {
        report(&self.cfg, self.refusal.as_ref())
    }

    /// What keeps the settings on disk: its deadline and writes are the loop's.
    pub fn saver(&mut self) -> &mut Saver {
        &mut self.saver
    }
}

/// Applies one `<id>/config/set` message: `base` (the file and the environment) with `kept`
/// and the message's changes.
///
/// # Errors
/// The message is hostile or malformed, names a key that cannot be set remotely, or a value
/// `nightlight check` would refuse; nothing changes.
pub fn set(base: &Config, kept: &Overrides, payload: &[u8]) -> Result<(Config, Overrides), Refusal> {
    let patch = parse_object(payload)?;
    let mut leaves = Vec::new();
    flatten("", &Value::Object(patch), &mut leaves);
    if leaves.is_empty() {
        return Err(refuse("(message)", "sets nothing"));
    }
    let mut next = kept.clone();
    for (key, value) in leaves {
        if !SETTABLE.contains(&key.as_str()) {
            let why = if key == "id"
                || key == "queue.dir"
                || key == "mqtt"
                || key.starts_with("mqtt.")
                || key == "update"
                || key.starts_with("update.")
            {
                "cannot be set remotely (it could move the device to another broker or identity, or make it trust another release key)".to_owned()
            } else {
                format!("is not a key that can be set remotely (those are {})", SETTABLE.join(", "))
            };
            return Err(refuse(key, why));
        }
        if value.is_null() {
            next.0.remove(&key);
        } else {
            next.0.insert(key, value);
        }
    }
    let cfg = next.apply_to(base).map_err(|r| {
        // serde names the field, not its table: say which of the message's keys it was.
        if r.key == "(kept configuration)" {
            refuse("(message)", r.reason)
        } else {
            r
        }
    })?;
    Ok((cfg, next))
}

/// The retained `<id>/config`: the effective settable values and the last refusal.
pub fn report(cfg: &Config, refusal: Option<&Refusal>) -> Vec<u8> {
    let v = json!({
        "sensor": { "interval_ms": cfg.sensor.interval_ms },
        "led": {
            "power_on": cfg.led.power_on,
            "local_after_s": cfg.led.local_after_s,
            "command_max_age_s": cfg.led.command_max_age_s,
        },
        "server": { "threshold": cfg.server.threshold, "hysteresis": cfg.server.hysteresis },
        "refused": refusal,
    });
    serde_json::to_vec(&v).expect("a JSON value serializes")
}

fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, Refusal> {
    let text = payload::bounded_text(payload).map_err(|e| refuse("(message)", e.to_string()))?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(refuse("(message)", "not a JSON object shaped like device.toml")),
        Err(e) => Err(refuse("(message)", format!("not JSON: {e}"))),
    }
}

/// `{"a": {"b": 1}}` as `[("a.b", 1)]`; an empty object is a leaf (it names a key too).
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, out);
            }
        }
        _ if prefix.is_empty() => {}
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

fn set_dotted(v: &mut Value, key: &str, value: Value) {
    let mut node = v;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            node[part] = value;
            return;
        }
        node = &mut node[part];
    }
}

fn invalid_key(e: &crate::ConfigError) -> String {
    match e {
        crate::ConfigError::Invalid { key, .. } => (*key).to_owned(),
        _ => "(message)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config { id: "porch".into(), ..Config::default() }
    }

    #[test]
    fn a_partial_object_changes_just_the_keys_it_names() {
        let (c, kept) = set(&cfg(), &Overrides::default(), br#"{"sensor": {"interval_ms": 2000}}"#).unwrap();
        assert_eq!(c.sensor.interval_ms, 2000);
        assert_eq!(c.server, cfg().server);
        let (c, kept) = set(&c, &kept, br#"{"server": {"threshold": 250}, "led": {"power_on": "auto"}}"#).unwrap();
        assert_eq!((c.sensor.interval_ms, c.server.threshold), (2000, 250), "earlier settings stay");
        assert_eq!(kept.0.len(), 3);
    }

    #[test]
    fn the_broker_the_identity_and_the_queue_can_never_be_set() {
        for (msg, key) in [
            (r#"{"mqtt": {"host": "evil.example"}}"#, "mqtt.host"),
            (r#"{"mqtt": {"tls": {"enabled": false}}}"#, "mqtt.tls.enabled"),
            (r#"{"id": "garage"}"#, "id"),
            (r#"{"queue": {"dir": "/tmp"}}"#, "queue.dir"),
        ] {
            let r = set(&cfg(), &Overrides::default(), msg.as_bytes()).unwrap_err();
            assert_eq!(r.key, key);
            assert!(r.reason.contains("cannot be set remotely"), "{r}");
        }
    }

    #[test]
    fn one_bad_key_refuses_the_whole_message() {
        let msg = br#"{"sensor": {"interval_ms": 500}, "mqtt": {"port": 1}}"#;
        assert_eq!(set(&cfg(), &Overrides::default(), msg).unwrap_err().key, "mqtt.port");
        let r = set(&cfg(), &Overrides::default(), br#"{"sensor": {"interval_ms": 0}}"#).unwrap_err();
        assert_eq!(r.key, "sensor.interval_ms", "the rules of nightlight check: {r}");
        let r = set(&cfg(), &Overrides::default(), br#"{"led": {"power_on": "sometimes"}}"#).unwrap_err();
        assert!(r.reason.contains("sometimes"), "{r}");
        let r = set(&cfg(), &Overrides::default(), br#"{"sensor": {"pattern": "x"}}"#).unwrap_err();
        assert!(r.reason.contains("not a key that can be set remotely"), "{r}");
    }

    #[test]
    fn hostile_and_malformed_messages_are_refused() {
        for bad in [&b"[1]"[..], b"\xff", b"{", br#"{"sensor": 5}"#, b"{}", b"null"] {
            assert!(set(&cfg(), &Overrides::default(), bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = format!("{}{}", "{\"a\":".repeat(50), "}".repeat(50));
        assert!(set(&cfg(), &Overrides::default(), deep.as_bytes()).is_err());
        let big = format!(r#"{{"sensor": {{"interval_ms": 500}}, "pad": "{}"}}"#, "x".repeat(10_000));
        assert!(set(&cfg(), &Overrides::default(), big.as_bytes()).is_err());
    }

    #[test]
    fn what_was_set_survives_a_restart_on_top_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_, kept) = set(&cfg(), &Overrides::default(), br#"{"sensor": {"interval_ms": 1500}}"#).unwrap();
        crate::statefile::write_atomic(dir.path(), Overrides::FILE, &kept.to_bytes()).unwrap();
        let again = Overrides::load(dir.path()).unwrap();
        assert_eq!(again.apply_to(&cfg()).unwrap().sensor.interval_ms, 1500);
        std::fs::write(dir.path().join("config.json"), br#"{"mqtt.host": "x"}"#).unwrap();
        assert!(Overrides::load(dir.path()).is_err(), "a kept file may only hold settable keys");
    }

    #[test]
    fn the_report_holds_the_settable_values_and_the_refusal() {
        let r = refuse("mqtt.host", "cannot be set remotely");
        let v: Value = serde_json::from_slice(&report(&cfg(), Some(&r))).unwrap();
        assert_eq!(v["sensor"]["interval_ms"], cfg().sensor.interval_ms);
        assert_eq!(v["led"]["power_on"], "last");
        assert_eq!(v["refused"]["key"], "mqtt.host");
        assert!(v.get("mqtt").is_none(), "nothing else, no secrets");
    }

    #[test]
    fn null_removes_a_kept_key_and_the_files_value_holds_again() {
        let (_, kept) =
            set(&cfg(), &Overrides::default(), br#"{"sensor": {"interval_ms": 2000}, "server": {"threshold": 250}}"#)
                .unwrap();
        let (c, kept) = set(&cfg(), &kept, br#"{"sensor": {"interval_ms": null}}"#).unwrap();
        assert_eq!(c.sensor.interval_ms, cfg().sensor.interval_ms, "the file's value");
        assert_eq!(c.server.threshold, 250, "the other kept key stays");
        assert_eq!(kept_lines(&kept), [("server.threshold".to_owned(), "250".to_owned())]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_write_of_the_last_one_save_after_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut saver = Saver::new(StateDir::open(dir.path()).unwrap());
        let t0 = tokio::time::Instant::now();
        let mut kept = Overrides::default();
        for ms in 0..100u64 {
            kept =
                set(&cfg(), &kept, format!(r#"{{"sensor": {{"interval_ms": {}}}}}"#, 1000 + ms).as_bytes()).unwrap().1;
            saver.changed(&kept, t0 + std::time::Duration::from_millis(ms * 10));
        }
        assert_eq!(saver.deadline(), Some(t0 + SAVE_AFTER), "due SAVE_AFTER after the first change");
        assert_eq!(saver.writes(), 0, "nothing written before");
        saver.write_due();
        saver.flush();
        assert_eq!(saver.writes(), 1, "one write for the burst");
        assert_eq!(Overrides::load(dir.path()).unwrap(), kept, "the last of them");
        saver.flush();
        assert_eq!(saver.writes(), 1, "nothing pending, nothing written");
    }
}
