//! The wire format: the JSON payloads of the contract (the topics are in [`crate::topics`]).
//!
//! Pure data and logic: encoding telemetry, state and health ([`Health`]), and decoding commands
//! defensively (size limit first, then JSON with serde_json's recursion limit, then the one
//! field that matters).

use serde::{Deserialize, Serialize};

/// Commands larger than this are rejected unread.
pub const MAX_COMMAND_BYTES: usize = 4096;

/// Payload of `<id>/status`.
pub const ONLINE: &str = "online";
/// Payload of `<id>/status` as the Last Will and on a clean stop.
pub const OFFLINE: &str = "offline";

/// One light reading as published on `<id>/telemetry`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    /// 0-1000: input over supply voltage in 0.1 %, the lesson's scale.
    pub light: u16,
    /// Unix time in milliseconds when the reading was taken.
    pub ts: u64,
    /// Never reused, also across restarts; within one run it rises by one per reading.
    pub seq: u64,
    /// The device's run: rises at every start, never reused (0: queued by a release before runs).
    #[serde(default)]
    pub run: u64,
    /// Lux, from lux-capable chips only.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lux: Option<f32>,
    /// False when `ts` came from a clock not known to be synchronized (sent as
    /// `"ts_ok": false`; absent means true).
    #[serde(skip_serializing_if = "is_true", default = "yes")]
    pub ts_ok: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Telemetry {
    /// The JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of plain numbers cannot fail.
        serde_json::to_vec(self).expect("telemetry serializes")
    }
}

/// The retained `<id>/reading`: the last reading, `{"light": 412, "ts": 1763776000123}` (and
/// `"lux"` from lux-capable chips).
pub fn reading_json(light: u16, lux: Option<f32>, ts: u64) -> Vec<u8> {
    let mut v = serde_json::json!({ "light": light, "ts": ts });
    if let Some(lux) = lux {
        v["lux"] = serde_json::json!(lux);
    }
    v.to_string().into_bytes()
}

/// The LED state, as commanded on `<id>/commands` and reported on `<id>/state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedState {
    pub led_on: bool,
}

/// A command on `<id>/commands`: `{"led_on": bool}`, and `"ts"` (Unix ms, when it was sent) if
/// the sender stamps it (the controller does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub led_on: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
}

impl Command {
    /// The JSON payload: `{"led_on":true,"ts":1764590000000}`.
    pub fn to_json(self) -> Vec<u8> {
        // A bool and an integer cannot fail to serialize.
        serde_json::to_vec(&self).expect("command serializes")
    }
}

/// Why a well-formed command changes nothing; logged once per message and counted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Stale {
    #[error("it is a retained message: the broker kept it from before this connection")]
    Retained,
    #[error("it was sent {age_s} s ago, more than led.command_max_age_s = {max_s}")]
    TooOld { age_s: u64, max_s: u64 },
}

/// Whether a command still stands.
///
/// A retained command never does: the broker hands it to every new subscription, so it would
/// switch the LED at every start ("ghost switching"). A stamped one does while it is at most
/// `max_age_s` old (0: any age), judged only by a clock known to be right: `now_ms` is `None`
/// when this machine's clock is not synchronized, and then `ts` says nothing. A `ts` ahead of
/// the clock (the sender's clock is fast) is a fresh command.
///
/// # Errors
/// Why it changes nothing.
pub fn check_fresh(cmd: &Command, retained: bool, now_ms: Option<u64>, max_age_s: u64) -> Result<(), Stale> {
    if retained {
        return Err(Stale::Retained);
    }
    let (Some(ts), Some(now)) = (cmd.ts, now_ms) else { return Ok(()) };
    let age_s = now.saturating_sub(ts) / 1000;
    if max_age_s > 0 && age_s > max_age_s {
        return Err(Stale::TooOld { age_s, max_s: max_age_s });
    }
    Ok(())
}

/// The `<id>/state` payload: `{"led_on":true,"mode":"remote"}`.
pub fn state_json(led_on: bool, mode: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "led_on": led_on, "mode": mode })).expect("state serializes")
}

/// Why a command was rejected; logged once per message, counted, and otherwise ignored.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CommandError {
    #[error("{0} bytes is more than the {MAX_COMMAND_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not UTF-8")]
    NotUtf8,
    #[error("not a JSON object with a boolean `led_on`: {0}")]
    Invalid(String),
}

/// Decodes a command; extra fields are ignored.
///
/// # Errors
/// Oversized, non-UTF-8, malformed or too deeply nested JSON, or no boolean `led_on`.
pub fn parse_command(payload: &[u8]) -> Result<Command, CommandError> {
    let text = bounded_text(payload)?;
    // serde would also accept `[true]` for a struct; the contract says an object.
    if !text.trim_start().starts_with('{') {
        return Err(CommandError::Invalid("not a JSON object".into()));
    }
    serde_json::from_str::<Command>(text).map_err(|e| CommandError::Invalid(e.to_string()))
}

/// The checks every message to the device passes before JSON parsing (commands, live
/// configuration): at most [`MAX_COMMAND_BYTES`], UTF-8, nested at most [`MAX_COMMAND_DEPTH`].
///
/// # Errors
/// Which of those it fails.
pub fn bounded_text(payload: &[u8]) -> Result<&str, CommandError> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(CommandError::TooLarge(payload.len()));
    }
    let text = std::str::from_utf8(payload).map_err(|_| CommandError::NotUtf8)?;
    if nesting_depth(text) > MAX_COMMAND_DEPTH {
        return Err(CommandError::Invalid(format!("nested deeper than {MAX_COMMAND_DEPTH} levels")));
    }
    Ok(text)
}

/// Text a peer sent (a broker's reason string, a key in a live configuration, a payload) made
/// safe for a log line or systemd's status line: control characters (newlines, escapes) are
/// written as escapes (`\n`, `\u{1b}`), so they can neither forge a journal line, drive a
/// terminal, nor add an assignment such as `WATCHDOG=trigger` to an sd_notify message; and at
/// most `max_chars` characters are kept, then `...`.
pub fn printable(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 2));
    for (i, c) in text.chars().enumerate() {
        if i == max_chars {
            out.push_str("...");
            break;
        }
        if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod printable_tests {
    use super::printable;

    #[test]
    fn control_characters_become_escapes_and_long_text_is_cut() {
        assert_eq!(printable("a\nb\r\u{1b}[31m\u{202e}c", 100), "a\\nb\\r\\u{1b}[31m\\u{202e}c");
        assert_eq!(printable("é ü 😀", 100), "é ü 😀");
        assert_eq!(printable("abcdef", 3), "abc...");
    }
}

/// Decodes a reported state (`<id>/state`), with the rules of [`parse_command`].
///
/// # Errors
/// As [`parse_command`].
pub fn parse_state(payload: &[u8]) -> Result<LedState, CommandError> {
    parse_command(payload).map(|c| LedState { led_on: c.led_on })
}

/// A command is a flat object; anything nested deeper than this is hostile or a mistake.
pub const MAX_COMMAND_DEPTH: usize = 8;

/// The deepest nesting of `{` and `[` outside strings (serde ignores unknown fields of any depth).
fn nesting_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        match (in_str, b) {
            (true, _) if escaped => escaped = false,
            (true, b'\\') => escaped = true,
            (true, b'"') | (false, b'"') => in_str = !in_str,
            (false, b'{' | b'[') => {
                depth += 1;
                max = max.max(depth);
            }
            (false, b'}' | b']') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// What `<id>/virtual/light` asks of the simulated sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimulatedLight {
    /// Hold this level (0-1000).
    Level(u16),
    /// Fail every read until the next level.
    Fail,
}

/// Decodes a `<id>/virtual/light` payload: a number 0-1000 or `fail`.
pub fn parse_simulated_light(payload: &[u8]) -> Option<SimulatedLight> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    if text.eq_ignore_ascii_case("fail") {
        return Some(SimulatedLight::Fail);
    }
    text.parse::<u16>().ok().filter(|v| *v <= 1000).map(SimulatedLight::Level)
}

fn yes() -> bool {
    true
}

/// The retained `<id>/health` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub uptime_s: u64,
    /// When this run started, RFC 3339 in UTC: by the clock as it was at the first health
    /// message, worked out again once the clock is synchronized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    pub queue_readings: u64,
    pub queue_bytes: u64,
    /// How long the oldest queued reading has waited, by its timestamp (0: none queued).
    #[serde(default)]
    pub queue_oldest_age_s: u64,
    /// Bytes written and syncs issued to the queue's storage in this run.
    #[serde(default)]
    pub storage_written_bytes: u64,
    #[serde(default)]
    pub storage_syncs: u64,
    pub dropped: u64,
    /// Failed queue storage calls (full disk, I/O errors); each is retried.
    #[serde(default)]
    pub queue_errors: u64,
    /// False while `seq` comes from the wall clock because the queue's meta cannot be written.
    #[serde(default = "yes")]
    pub seq_durable: bool,
    /// False while `queue.dir` is in memory (tmpfs, ramfs, zram, an overlay with its upper layer
    /// in memory) or unusable: a reboot loses what is queued.
    #[serde(default = "yes")]
    pub queue_durable: bool,
    pub sensor_errors: u64,
    pub rejected_commands: u64,
    pub reconnects: u64,
    /// Readings the broker refused (MQTT 5 PUBACK reason codes); each stays queued.
    #[serde(default)]
    pub denied: u64,
    /// Requests on `<id>/read` held back by `sensor.min_request_ms` (answered by a reading
    /// asked for earlier or at the window's end, or dropped when too many wait).
    #[serde(default)]
    pub requests_limited: u64,
    /// The last connection or sensor error, if any.
    pub last_error: Option<String>,
    /// Who switches the LED: `remote` (a controller's commands) or `local` (the local rule).
    #[serde(default = "remote")]
    pub mode: String,
    /// The MQTT protocol of the connection: `5` or `3.1.1`.
    #[serde(default = "five")]
    pub protocol: String,
}

fn five() -> String {
    "5".into()
}

fn remote() -> String {
    "remote".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_has_contract_fields() {
        let t = Telemetry { light: 412, ts: 1_763_776_000_123, seq: 1042, run: 7, lux: None, ts_ok: true };
        let v: serde_json::Value = serde_json::from_slice(&t.to_json()).unwrap();
        assert_eq!(v, serde_json::json!({"light": 412, "ts": 1_763_776_000_123u64, "seq": 1042, "run": 7}));
        let t = Telemetry { lux: Some(12.5), ..t };
        let v: serde_json::Value = serde_json::from_slice(&t.to_json()).unwrap();
        assert_eq!(v["lux"], 12.5);
    }

    #[test]
    fn valid_commands_parse_and_extra_fields_are_ignored() {
        assert_eq!(parse_command(br#"{"led_on": true}"#), Ok(Command { led_on: true, ts: None }));
        assert_eq!(parse_command(br#"{"led_on":false,"by":"server"}"#), Ok(Command { led_on: false, ts: None }));
        assert_eq!(parse_command(br#"{"led_on":true,"ts":17}"#), Ok(Command { led_on: true, ts: Some(17) }));
        assert!(parse_command(br#"{"led_on":true,"ts":"yesterday"}"#).is_err());
    }

    #[test]
    fn hostile_commands_are_rejected() {
        for bad in [
            &b"not json"[..],
            br#"{"led_on": "yes"}"#,
            br#"{"led_on": 1}"#,
            br#"{}"#,
            br#"[true]"#,
            b"\xff\xfe\x00",
            b"",
        ] {
            assert!(parse_command(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = format!("{{\"x\":{}1{}, \"led_on\": true}}", "[".repeat(500), "]".repeat(500));
        assert!(parse_command(deep.as_bytes()).is_err());
        assert!(parse_command(br#"{"led_on": true, "meta": {"a": [1, {"b": "[[[[[[[[[["}]}}"#).is_ok());
        let big = format!("{{\"led_on\":true,\"pad\":\"{}\"}}", "a".repeat(5000));
        assert_eq!(parse_command(big.as_bytes()), Err(CommandError::TooLarge(big.len())));
    }

    #[test]
    fn state_payload_round_trips() {
        for on in [true, false] {
            assert_eq!(parse_state(&state_json(on, "remote")), Ok(LedState { led_on: on }));
            let c = Command { led_on: on, ts: Some(1_764_590_000_000) };
            assert_eq!(parse_command(&c.to_json()), Ok(c));
        }
    }

    #[test]
    fn simulated_light_accepts_levels_and_fail() {
        assert_eq!(parse_simulated_light(b"250"), Some(SimulatedLight::Level(250)));
        assert_eq!(parse_simulated_light(b" 0\n"), Some(SimulatedLight::Level(0)));
        assert_eq!(parse_simulated_light(b"fail"), Some(SimulatedLight::Fail));
        assert_eq!(parse_simulated_light(b"1001"), None);
        assert_eq!(parse_simulated_light(b"-1"), None);
    }

    const HOUR_MS: u64 = 3_600_000;

    #[test]
    fn a_retained_command_never_stands_whatever_its_age() {
        let fresh = Command { led_on: true, ts: Some(10 * HOUR_MS) };
        assert_eq!(check_fresh(&fresh, true, Some(10 * HOUR_MS), 300), Err(Stale::Retained));
        assert_eq!(check_fresh(&Command { ts: None, ..fresh }, true, None, 300), Err(Stale::Retained));
    }

    #[test]
    fn an_hour_old_command_is_stale_by_a_synchronized_clock() {
        let old = Command { led_on: true, ts: Some(10 * HOUR_MS) };
        assert_eq!(check_fresh(&old, false, Some(11 * HOUR_MS), 300), Err(Stale::TooOld { age_s: 3600, max_s: 300 }));
    }

    #[test]
    fn a_clock_not_known_to_be_right_judges_no_command_by_its_ts() {
        let old = Command { led_on: true, ts: Some(10 * HOUR_MS) };
        assert_eq!(check_fresh(&old, false, None, 300), Ok(()));
    }

    #[test]
    fn skew_rejects_no_fresh_command() {
        let now = 10 * HOUR_MS;
        let ahead = Command { led_on: true, ts: Some(now + 90_000) };
        assert_eq!(check_fresh(&ahead, false, Some(now), 300), Ok(()), "the sender's clock runs fast");
        let behind = Command { led_on: true, ts: Some(now - 299_999) };
        assert_eq!(check_fresh(&behind, false, Some(now), 300), Ok(()), "just within the age");
        assert_eq!(check_fresh(&Command { ts: None, ..behind }, false, Some(now), 300), Ok(()), "unstamped");
    }

    #[test]
    fn max_age_0_turns_the_age_check_off() {
        let old = Command { led_on: true, ts: Some(0) };
        assert_eq!(check_fresh(&old, false, Some(10 * HOUR_MS), 0), Ok(()));
    }
}
