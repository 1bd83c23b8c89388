//! End to end: the metrics endpoint and textfile (`[metrics]`) of a running device, against a
//! real Mosquitto, checked by Prometheus's own `promtool`.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use common::*;

/// The rig's device with metrics on an ephemeral port and a textfile in `dir`; the port it bound.
fn device(rig: &Rig, dir: &Path) -> (Daemon, u16) {
    spawn(&rig.dev, dir)
}

fn spawn(dev: &DeviceDir, dir: &Path) -> (Daemon, u16) {
    spawn_with(dev, dir, &[])
}

/// As [`spawn`], with `env` besides.
fn spawn_with(dev: &DeviceDir, dir: &Path, env: &[(&str, &str)]) -> (Daemon, u16) {
    let textfile = dir.join("nightlight.prom");
    let mut all = vec![
        ("NIGHTLIGHT__METRICS__LISTEN", "127.0.0.1:0"),
        ("NIGHTLIGHT__METRICS__TEXTFILE", textfile.to_str().unwrap()),
        // A synchronized clock, whatever this machine's NTP says: stale commands are judged.
        ("NIGHTLIGHT_CLOCK_SYNCED", "1"),
    ];
    all.extend_from_slice(env);
    let d = dev.spawn_with(&all);
    d.wait_stderr("metrics: serving GET /metrics", 10 * S);
    let line = d.stderr().lines().find(|l| l.contains("metrics: serving")).unwrap().to_owned();
    let port = line.split("listen=127.0.0.1:").nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
    (d, port.trim_matches('"').parse().unwrap())
}

/// One HTTP/1.1 request: the status code and the body.
fn http(port: u16, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_owned(), body.to_owned())
}

/// The samples of an exposition: `name{labels}` to value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_owned(), if v == "+Inf" { f64::INFINITY } else { v.parse().unwrap() })
        })
        .collect()
}

fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (code, _, body) = http(port, "GET", "/metrics");
    assert_eq!(code, 200, "{body}");
    samples(&body)
}

/// Scrapes until `done` holds, once the device loop's first figures are in (before them the
/// queue's, the clock's and the link's families are absent); the last scrape.
fn wait_metrics(port: u16, what: &str, done: impl Fn(&BTreeMap<String, f64>) -> bool) -> BTreeMap<String, f64> {
    wait_until(
        20 * S,
        || {
            let m = scrape(port);
            m.contains_key("nightlight_connected") && done(&m)
        },
        what,
    );
    scrape(port)
}

fn promtool_bin() -> &'static str {
    ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("promtool (Debian's prometheus package) is installed by the test command")
}

/// `promtool check metrics` on `text`: its verdict and what it said.
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new(promtool_bin())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_scrape_is_what_promtool_accepts_and_the_textfile_says_the_same() {
    let rig = Rig::new(50);
    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = device(&rig, dir.path());
    let telemetry = rig.obs.wait_on(&rig.dev.topic("telemetry"), 10 * S, |m| m.len() >= 3);
    let run = telemetry[0].json()["run"].as_u64().unwrap();
    // The loop's figures are copied once a second: connected shows within it.
    let m = wait_metrics(port, "readings acknowledged", |m| {
        m["nightlight_readings_acked_total"] >= 3.0 && m["nightlight_connected"] == 1.0
    });

    let (code, head, body) = http(port, "GET", "/metrics");
    assert_eq!(code, 200);
    assert!(head.to_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    let (ok, said) = promtool(&body);
    assert!(ok && said.trim().is_empty(), "promtool: {said}\n{body}");

    assert!(m["nightlight_readings_total"] >= 3.0);
    assert_eq!(
        m[&format!("nightlight_info{{version=\"{}\",run=\"{run}\",protocol=\"5\"}}", env!("CARGO_PKG_VERSION"))],
        1.0
    );
    assert_eq!(m["nightlight_connected"], 1.0);
    assert!(m["nightlight_delivery_seconds_count"] >= 3.0, "every acknowledged reading is timed");
    assert!(m["nightlight_delivery_seconds_bucket{le=\"+Inf\"}"] == m["nightlight_delivery_seconds_count"]);
    assert_eq!(m["nightlight_dropped_readings_total{cause=\"cap\"}"], 0.0);
    assert_eq!(m["nightlight_clock_synchronized"], 1.0, "as the clock's seam says");

    // The textfile: the same families, written atomically, readable by node_exporter.
    let file = dir.path().join("nightlight.prom");
    wait_until(20 * S, || file.exists(), "the textfile");
    let text = std::fs::read_to_string(&file).unwrap();
    let (ok, said) = promtool(&text);
    assert!(ok && said.trim().is_empty(), "promtool on the textfile: {said}");
    let names = |m: &BTreeMap<String, f64>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&samples(&text)), names(&scrape(port)));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o644);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left beside it: {leftovers:?}");

    // Anything but GET /metrics.
    assert_eq!(http(port, "GET", "/").0, 404);
    assert_eq!(http(port, "POST", "/metrics").0, 405);
}

#[test]
fn a_scraper_keeps_its_connection_and_garbage_or_a_huge_head_ends_one() {
    let rig = Rig::new(1000);
    let dir = tempfile::tempdir().unwrap();
    // The endpoint says at debug level why it ended a connection.
    let (d, port) = spawn_with(&rig.dev, dir.path(), &[("RUST_LOG", "info,nightlight::metrics=debug")]);
    // Two requests in one write (pipelined), then a third: all answered on one connection.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\nHEAD /metrics HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    s.write_all(b"GET /nothing HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let statuses: Vec<&str> = out.lines().filter(|l| l.starts_with("HTTP/1.1 ")).collect();
    assert_eq!(statuses, ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK", "HTTP/1.1 404 Not Found"], "{out}");
    assert_eq!(out.matches("# TYPE nightlight_readings_total counter").count(), 1, "HEAD has no body");

    // Not HTTP: a 400, and closed.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"hello\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 400 "), "{out}");

    // A head that never ends: closed once it passes the bound, nothing answered.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let header = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(1000));
    s.set_write_timeout(Some(10 * S)).unwrap();
    let mut sent = 0;
    // The socket buffers take a few hundred kB after the endpoint closed; then writes fail.
    while sent < 64 << 20 && s.write_all(header.as_bytes()).is_ok() {
        sent += header.len();
    }
    assert!(sent < 64 << 20, "the endpoint took a 64 MiB head without closing");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"), "a head past the bound was answered");
    // Closed for its size, not at the head's time limit (which would also close it).
    d.wait_stderr("request head too large", 10 * S);
}

#[test]
fn a_broker_outage_ages_the_queue_counts_the_reconnect_and_the_card_writes() {
    let mut rig = Rig::new(50);
    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = device(&rig, dir.path());
    let before = wait_metrics(port, "connected", |m| m["nightlight_connected"] == 1.0);
    assert!(before["nightlight_queue_oldest_age_seconds"] < 1.0, "nothing waits long while connected: {before:?}");

    rig.broker.stop();
    let m = wait_metrics(port, "the oldest reading a second old", |m| {
        m["nightlight_queue_oldest_age_seconds"] >= 1.0 && m["nightlight_queue_readings"] >= 5.0
    });
    assert_eq!(m["nightlight_connected"], 0.0);
    assert_eq!(m["nightlight_reconnects_total{reason=\"closed\"}"], 1.0, "{m:?}");
    assert!(m["nightlight_storage_written_bytes_total"] > before["nightlight_storage_written_bytes_total"]);
    assert!(
        m["nightlight_storage_syncs_total"] > before["nightlight_storage_syncs_total"],
        "offline readings are synced"
    );
    let later = wait_metrics(port, "the age growing", |l| {
        l["nightlight_queue_oldest_age_seconds"] >= m["nightlight_queue_oldest_age_seconds"] + 1.0
    });
    assert!(later["nightlight_queue_oldest_age_seconds"] > m["nightlight_queue_oldest_age_seconds"]);

    rig.broker.restart();
    // Every reading taken before the broker came back is acknowledged, and nothing waits long.
    let after = wait_metrics(port, "the backlog delivered", |a| {
        a["nightlight_connected"] == 1.0
            && a["nightlight_readings_acked_total"] >= later["nightlight_readings_total"]
            && a["nightlight_queue_oldest_age_seconds"] < 1.0
    });
    assert!(
        after["nightlight_delivery_seconds_count"] - after["nightlight_delivery_seconds_bucket{le=\"1\"}"] >= 1.0,
        "readings that waited out the outage are timed as late: {after:?}"
    );
}

#[test]
fn a_reading_the_acl_refuses_raises_denied_and_no_secret_is_shown() {
    // The README's ACL without the line that lets a device publish its readings.
    let acl = readme_acl("");
    let full = std::fs::read_to_string(acl.path()).unwrap();
    std::fs::write(acl.path(), full.replace("pattern write %u/telemetry\n", "")).unwrap();
    let (broker, _pw) = password_broker(Some(acl.path().to_str().unwrap()));
    let dev = porch(broker.port, "5");
    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = spawn(&dev, dir.path());
    let m = wait_metrics(port, "a refused reading", |m| m["nightlight_readings_denied_total"] >= 1.0);
    assert_eq!(m["nightlight_readings_acked_total"], 0.0, "the ACL refuses every reading");
    assert!(m["nightlight_queue_readings"] >= 1.0, "a refused reading stays queued");
    let (_, _, body) = http(port, "GET", "/metrics");
    assert!(!body.contains("porch-pass-1"), "the password is nowhere in the metrics");
}

#[test]
fn rejected_commands_are_counted_by_reason_and_a_switch_is_timed() {
    let rig = Rig::new(1000);
    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = device(&rig, dir.path());
    let state = rig.dev.topic("state");
    rig.obs.wait_on(&state, 10 * S, |m| !m.is_empty()); // subscribed
    rig.obs.publish(&rig.dev.topic("commands"), "not json", false);
    rig.obs.publish(&rig.dev.topic("commands"), r#"{"led_on": true, "ts": 1}"#, false);
    rig.obs.publish(&rig.dev.topic("commands"), r#"{"led_on": true}"#, false);
    rig.obs.wait_on(&state, 10 * S, |m| m.last().is_some_and(|m| m.json()["led_on"] == true));
    let m = wait_metrics(port, "two rejections", |m| {
        m["nightlight_rejected_commands_total{reason=\"invalid\"}"]
            + m["nightlight_rejected_commands_total{reason=\"stale\"}"]
            >= 2.0
    });
    assert_eq!(m["nightlight_rejected_commands_total{reason=\"invalid\"}"], 1.0);
    assert_eq!(m["nightlight_rejected_commands_total{reason=\"stale\"}"], 1.0);
    assert_eq!(m["nightlight_rejected_commands_total{reason=\"config\"}"], 0.0);
    assert_eq!(m["nightlight_command_led_seconds_count"], 1.0, "the one command obeyed");
}

#[test]
fn connections_that_never_send_are_closed_and_a_scrape_still_answers() {
    let rig = Rig::new(1000);
    let dir = tempfile::tempdir().unwrap();
    let (_d, port) = device(&rig, dir.path());
    // More silent peers than the endpoint serves at once.
    let mut idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    for s in &mut idle {
        // Closed by the endpoint: at accept past its limit, or when the request head never came.
        s.set_read_timeout(Some(30 * S)).unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or_else(|e| panic!("the endpoint kept a silent connection open: {e}"));
        let _ = n; // 0 (closed) or hyper's 408 before closing
    }
    wait_until(10 * S, || std::panic::catch_unwind(|| scrape(port)).is_ok(), "a scrape after the silent peers");
    assert!(scrape(port)["nightlight_readings_total"] >= 0.0);
}

#[test]
fn a_metrics_port_in_use_is_said_and_the_device_runs_on() {
    let rig = Rig::new(50);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let d = rig.dev.spawn_with(&[("NIGHTLIGHT__METRICS__LISTEN", &addr)]);
    d.wait_stderr("cannot listen on metrics.listen", 10 * S);
    rig.obs.wait_on(&rig.dev.topic("telemetry"), 10 * S, |m| m.len() >= 3);
}

#[test]
fn a_bad_metrics_address_names_the_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(dir.path(), "device.toml", "[metrics]\nlisten = \"localhost\"\n");
    let (code, _, err) = run_to_end(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("metrics.listen") && err.contains("device.toml"), "{err}");
    let (code, _, err) =
        run_to_end(&["check", "--config", "/dev/null"], &[("NIGHTLIGHT__METRICS__TEXTFILE", "metrics.prom")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("metrics.textfile") && err.contains("NIGHTLIGHT__METRICS__TEXTFILE"), "{err}");
}

#[test]
fn the_documented_prometheus_config_is_valid_and_its_alert_fires_after_ten_minutes_of_waiting() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/prometheus");
    for args in [&["check", "config", "prometheus.yml"][..], &["test", "rules", "nightlight-alerts-test.yml"]] {
        let out = Command::new(promtool_bin()).args(args).current_dir(dir).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "promtool {args:?}: {said}");
    }
    // The alert's metric is one the device serves.
    let rules = std::fs::read_to_string(format!("{dir}/nightlight-alerts.yml")).unwrap();
    assert!(rules.contains("expr: nightlight_queue_oldest_age_seconds > 600"));
}
