//! End to end: a reading on request (`<id>/read`), against a real Mosquitto, asked with
//! Mosquitto's own MQTT 5 clients (`mosquitto_pub`'s Response Topic and Correlation Data,
//! `mosquitto_rr`) and with an MQTT 3.1.1 client.

mod common;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The rig's device speaking MQTT 5, its subscriptions in place (it
/// publishes its state after sending SUBSCRIBE; the broker handles a connection's packets in
/// order).
fn device(rig: &Rig) -> Daemon {
    device_with(rig, &[])
}

fn device_with(rig: &Rig, env: &[(&str, &str)]) -> Daemon {
    let mut env = env.to_vec();
    env.push(("NIGHTLIGHT__MQTT__PROTOCOL", "5"));
    let d = rig.dev.spawn_with(&env);
    rig.obs.wait_on(&rig.dev.topic("state"), 10 * S, |m| !m.is_empty());
    d
}

/// `mosquitto_sub -V 5` on `topic`, printing each message as `correlation|payload`, subscribed
/// when this returns (its `-d` output shows the SUBACK); killed on drop.
struct Answers {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Answers {
    fn on(port: u16, topic: &str) -> Self {
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub", "-d", "-V", "5", "-p", &port.to_string(), "-t", topic, "-F", "%D|%p"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub runs");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        out.by_ref().map_while(Result::ok).find(|l| l.contains("received SUBACK")).expect("mosquitto_sub subscribed");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in out.map_while(Result::ok) {
                if !l.starts_with("Client ") && !l.starts_with("Subscribed ") {
                    sink.lock().unwrap().push(l);
                }
            }
        });
        Answers { child, lines }
    }

    fn wait(&self, n: usize) -> Vec<String> {
        wait_until(10 * S, || self.lines.lock().unwrap().len() >= n, &format!("{n} answers"));
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An MQTT 5 request on `<id>/read` with a Response Topic and Correlation Data.
fn request(port: u16, id: &str, reply_to: &str, correlation: &str, retain: bool) {
    let mut args = vec!["-V", "5", "-q", "1", "-t"];
    let (port, topic) = (port.to_string(), format!("{id}/read"));
    args.extend([topic.as_str(), "-p", port.as_str(), "-m", "read"]); // (an empty retained one deletes)
    args.extend(["-D", "publish", "response-topic", reply_to, "-D", "publish", "correlation-data", correlation]);
    if retain {
        args.push("-r");
    }
    assert!(Command::new("mosquitto_pub").args(&args).status().unwrap().success());
}

#[test]
fn a_request_with_a_response_topic_is_answered_there_once_with_its_correlation_data_and_a_fresh_reading() {
    let rig = Rig::new(60_000); // one reading at start, the next in a minute
                                // (The shortest window, so that the second request below is not inside the first's.)
    let d = device_with(&rig, &[("NIGHTLIGHT__SENSOR__MIN_REQUEST_MS", "10")]);
    let answers = Answers::on(rig.broker.port, "laptop/answers");
    let asked = now_ms();
    request(rig.broker.port, &rig.dev.id, "laptop/answers", "q-17", false);
    let got = answers.wait(1);
    let (correlation, json) = got[0].split_once('|').unwrap();
    assert_eq!(correlation, "q-17", "the asker's correlation data comes back");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["light"], 123, "{v}");
    assert!(v["ts"].as_u64().unwrap() >= asked, "taken after the request, not the minute-old one: {v}");
    // The reading also went through the queue, with its own seq, to telemetry.
    let seq = v["seq"].as_u64().unwrap();
    rig.obs.wait_on(&rig.dev.topic("telemetry"), 5 * S, |m| m.iter().any(|m| m.json()["seq"] == seq));

    // A second request is answered with its own correlation data: the first was answered once.
    request(rig.broker.port, &rig.dev.id, "laptop/answers", "q-18", false);
    let got = answers.wait(2);
    assert!(got[1].starts_with("q-18|"), "{got:?}");
    let later: serde_json::Value = serde_json::from_str(got[1].split_once('|').unwrap().1).unwrap();
    assert!(later["seq"].as_u64() > Some(seq), "a new reading: {later}");
    assert_eq!(got.len(), 2, "one answer per request: {got:?}");
    drop(d);
}

#[test]
fn mosquitto_rr_prints_a_fresh_reading() {
    let rig = Rig::new(60_000);
    let _d = device(&rig);
    let asked = now_ms();
    let out = Command::new("mosquitto_rr")
        .args(["-V", "5", "-p", &rig.broker.port.to_string(), "-t", &rig.dev.topic("read")])
        .args(["-e", "laptop/rr", "-m", "", "-W", "10"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["ts"].as_u64().unwrap() >= asked && v["light"] == 123, "{v}");
}

#[test]
fn a_flood_of_requests_gives_at_most_one_reading_per_window_and_the_schedule_keeps_its_pace() {
    let rig = Rig::new(500);
    // The device's own count of readings on request: its debug line for each.
    let d = device_with(&rig, &[("RUST_LOG", "info,nightlight::device=debug")]);
    let topic = rig.dev.topic("telemetry");
    rig.obs.wait_on(&topic, 10 * S, |m| m.len() >= 2);
    // 100 requests spread over one second (MQTT 3.1.1, no response topic: to telemetry).
    let (start, t0) = (now_ms(), Instant::now());
    for k in 0..100u32 {
        let due = t0 + Duration::from_millis(10) * k;
        while Instant::now() < due {
            std::thread::yield_now();
        }
        rig.obs.publish_nowait(&rig.dev.topic("read"), "read");
    }
    rig.obs.publish(&rig.dev.topic("read"), "read", false); // and all of them are at the broker
    let end = now_ms();
    // Five scheduled readings after the flood: its on-demand readings have all arrived.
    rig.obs.wait_on(&topic, 10 * S, |m| m.iter().filter(|m| m.json()["ts"].as_u64() > Some(end + 250)).count() >= 5);
    let ts: Vec<u64> = rig.obs.on(&topic).iter().map(|m| m.json()["ts"].as_u64().unwrap()).collect();
    let during = ts.iter().filter(|t| (start..=end).contains(*t)).count() as u64;
    // The device's own line for each reading on request, with its time: one per 200 ms window
    // means consecutive ones at least 200 ms apart (a bound on the count alone would depend on
    // where the flood's first and last requests fall in their windows).
    let stderr = d.stderr();
    let at: Vec<f64> = stderr.lines().filter(|l| l.contains("a reading on request")).map(log_seconds).collect();
    let asked = at.len() as u64;
    let elapsed = end - start;
    assert!(asked >= 2, "requests were answered: {asked} in {elapsed} ms");
    let closest = at.windows(2).map(|w| (w[1] - w[0]).rem_euclid(86_400.0)).fold(f64::MAX, f64::min);
    assert!(closest >= 0.199, "readings on request {closest:.3} s apart (one per 200 ms): {at:?}");
    let scheduled = during.saturating_sub(asked);
    assert!(scheduled.abs_diff(elapsed / 500) <= 1, "{scheduled} scheduled readings in {elapsed} ms: {ts:?}");
    // And after it, one reading every 500 ms as before (the median gap: one late tick on a busy
    // machine, or the flood's last reading on request, does not move it).
    let after: Vec<u64> = ts.iter().copied().filter(|t| *t > end + 250).collect();
    let mut gaps: Vec<u64> = after.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    assert!(gaps[gaps.len() / 2].abs_diff(500) <= 100, "the schedule kept its pace: {after:?}");
    drop(d);
}

/// The time of day of a log line (`2026-12-02T19:07:26.980887Z DEBUG ...`) in seconds.
fn log_seconds(line: &str) -> f64 {
    let time = line.split_once('T').and_then(|(_, rest)| rest.split_once('Z')).map(|(t, _)| t).unwrap();
    let parts: Vec<f64> = time.split(':').map(|p| p.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

#[test]
fn a_sensor_that_fails_on_request_answers_with_the_error() {
    let rig = Rig::new(60_000);
    let d = device(&rig);
    rig.obs.publish(&rig.dev.topic("virtual/light"), "fail", false);
    d.wait_stderr("simulated light set", 5 * S);
    let answers = Answers::on(rig.broker.port, "laptop/answers");
    request(rig.broker.port, &rig.dev.id, "laptop/answers", "q-1", false);
    let got = answers.wait(1);
    let v: serde_json::Value = serde_json::from_str(got[0].split_once('|').unwrap().1).unwrap();
    assert_eq!(v["error"], "simulated failure", "{got:?}");
    d.wait_stderr("sensor read failed", 5 * S);
}

#[test]
fn retained_requests_and_answers_aimed_at_the_devices_own_topics_are_ignored() {
    let rig = Rig::new(60_000);
    let answers = Answers::on(rig.broker.port, "laptop/answers");
    let commands = rig.dev.topic("commands");
    let on_commands = Answers::on(rig.broker.port, &commands);
    // Retained before the device starts: it comes with the subscription and is not a request.
    request(rig.broker.port, &rig.dev.id, "laptop/answers", "old", true);
    let d = device(&rig);
    d.wait_stderr("ignored a request for a reading", 10 * S);
    assert!(d.stderr().contains("retained"), "{}", d.stderr());
    // A request whose answer would land on the device's own commands.
    request(rig.broker.port, &rig.dev.id, &commands, "evil", false);
    // A good request after both (the device handles its messages in order): the only answer.
    request(rig.broker.port, &rig.dev.id, "laptop/answers", "good", false);
    let got = answers.wait(1);
    assert!(got[0].starts_with("good|"), "{got:?}");
    assert_eq!(d.stderr().matches("ignored a request for a reading").count(), 2, "{}", d.stderr());
    assert!(on_commands.lines.lock().unwrap().is_empty(), "an answer went to the device's commands");
    assert!(d.stdout().is_empty(), "nothing reached the LED: {:?}", d.stdout());
    assert_eq!(answers.lines.lock().unwrap().len(), 1, "{:?}", answers.lines.lock().unwrap());
}

/// `nightlight status` with the device's own config and `args`.
fn status(dev: &DeviceDir, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nightlight"))
        .args(["status", "--config", dev.config().to_str().unwrap()])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn status_read_asks_the_device_and_prints_a_fresh_reading_or_says_none_came() {
    let rig = Rig::new(60_000);
    // Nobody answers yet: a clear message, exit 1, after the time asked for.
    let out = status(&rig.dev, &["--read", "--timeout-s", "1"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("no reading from {} within 1 s", rig.dev.id)), "{err}");

    let _d = device(&rig);
    let out = status(&rig.dev, &["--read"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("light 123 (0-1000), taken 20") && text.contains(", seq "), "{text}");
    let asked = now_ms();
    let out = status(&rig.dev, &["--read", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["ts"].as_u64().unwrap() + 1000 > asked, "fresh: {v}");

    // MQTT 3.1.1 has no response topic: the first reading after asking, said so.
    let out = status(&rig.dev, &["--read", "--json"], &[("NIGHTLIGHT__MQTT__PROTOCOL", "3.1.1")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("3.1.1 has no response topic"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["light"], 123, "{v}");
}
