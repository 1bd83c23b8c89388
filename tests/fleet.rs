//! `nightlight fleet` at 1,000 devices against a real Mosquitto: what someone sizing a broker or
//! a controller with it relies on. Every run must end with no reading lost (a reading the broker
//! acknowledged that never reached a subscriber); duplicates are allowed (QoS 1) and counted;
//! after a cut, every device is connected again. The 10,000-device figures are a benchmark
//! (`bench/fleet.sh`, docs/fleet.md), not a test.

mod common;

use std::time::Duration;

use common::{Daemon, Mosquitto};

const N: usize = 1000;
const S: Duration = Duration::from_secs(1);

/// A broker that keeps the observer's session through a restart, with no cap on what it queues.
fn broker() -> Mosquitto {
    Mosquitto::start("persistence true\nmax_queued_messages 0\nmax_inflight_messages 0\n")
}

fn fleet(port: u16, duration_s: u64, extra: &[&str]) -> Daemon {
    let broker = format!("127.0.0.1:{port}");
    let (n, d) = (N.to_string(), duration_s.to_string());
    let mut args = vec!["fleet", "--devices", &n, "--broker", &broker, "--duration-s", &d, "--interval-ms", "1000"];
    args.extend_from_slice(extra);
    Daemon::spawn(&args, &[])
}

/// The final line's figures.
#[derive(Debug)]
struct Report {
    devices: u64,
    sent: u64,
    acked: u64,
    lost: u64,
    duplicated: u64,
}

/// Waits for the run to end and reads its last line; the exit code says whether anything was lost.
fn finish(mut d: Daemon, duration_s: u64) -> (Report, Vec<String>) {
    let status = d.wait_exit(Duration::from_secs(duration_s) + 60 * S).expect("the fleet ends");
    let out = d.stdout();
    let last = out.last().cloned().unwrap_or_default();
    let n: Vec<u64> =
        last.split(|c: char| !c.is_ascii_digit() && c != '.').filter_map(|w| w.parse::<u64>().ok()).collect();
    assert!(last.starts_with("fleet: ") && n.len() >= 5, "not the contract's line: {last:?}\n{}", d.stderr());
    let r = Report { devices: n[0], sent: n[1], acked: n[2], lost: n[3], duplicated: n[4] };
    assert_eq!(status.success(), r.lost == 0, "exit {status:?} for {r:?}");
    (r, out)
}

fn reconverged(out: &[String]) -> Vec<u64> {
    out.iter().filter_map(|l| l.strip_prefix("fleet: reconverged in ")?.strip_suffix(" ms")?.parse().ok()).collect()
}

#[test]
fn a_thousand_devices_deliver_every_reading_even_with_clocks_an_hour_off() {
    let b = broker();
    let d = fleet(b.port, 12, &["--skew", "10"]);
    let (r, _) = finish(d, 12);
    assert_eq!(r.devices, N as u64);
    assert_eq!(r.lost, 0, "{r:?}");
    // One reading a second each for 12 s, the last in flight at the stop.
    assert!(r.acked >= (N * 10) as u64, "{r:?}");
    assert!(r.sent >= r.acked);
}

#[test]
fn after_a_reconnect_storm_every_device_is_back_within_the_backoff_and_nothing_is_lost() {
    let b = broker();
    let d = fleet(b.port, 15, &["--storm"]);
    d.wait_stderr("every device drops its connection", 30 * S);
    let (r, out) = finish(d, 15);
    assert_eq!(r.lost, 0, "{r:?}");
    let back = reconverged(&out);
    assert_eq!(back.len(), 1, "{out:?}");
    // The first retry waits the backoff's first step (1 s, with jitter); all are back soon after.
    assert!(back[0] <= 5_000, "{back:?}");
}

#[test]
fn a_partitioned_share_keeps_its_readings_and_delivers_them_when_the_partition_heals() {
    let b = broker();
    let d = fleet(b.port, 18, &["--partition", "30", "--partition-s", "5"]);
    d.wait_stderr("partitioned for 5 s", 30 * S);
    let (r, out) = finish(d, 18);
    assert_eq!(r.lost, 0, "{r:?}");
    let back = reconverged(&out);
    assert_eq!(back.len(), 1, "{out:?}");
    assert!((5_000..=40_000).contains(&back[0]), "held off 5 s, then back within the backoff: {back:?}");
    // Their backlog was delivered: as many acknowledged as the unpartitioned rest would have.
    assert!(r.acked >= (N * 15) as u64, "{r:?}");
}

#[test]
fn a_broker_restart_loses_no_reading_and_the_fleet_reconverges() {
    let mut b = broker();
    let d = fleet(b.port, 20, &[]);
    d.wait_stderr(&format!("all {N} devices connected after"), 30 * S);
    b.restart(); // SIGTERM, as an operator's restart: the observer's session is saved
    d.wait_stderr("reconverged: all", 60 * S);
    let (r, out) = finish(d, 20);
    assert_eq!(r.lost, 0, "{r:?}");
    assert_eq!(reconverged(&out).len(), 1, "{out:?}");
    // What was in flight when the broker went is sent again: counted, never more than a window each.
    assert!(r.duplicated <= (N * 16) as u64, "{r:?}");
}

/// A release key and a manifest of version 0.2.0 for any architecture, signed with it.
fn release() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (code, _, err) = common::run_to_end(&["release", "keygen", keys.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let deb = dir.path().join("nightlight_0.2.0_all.deb");
    std::fs::write(&deb, vec![7u8; 4096]).unwrap();
    let key = keys.join("release.key");
    let args =
        ["release", "sign", "--key", key.to_str().unwrap(), "--url", "http://127.0.0.1:9/x.deb", "--version", "0.2.0"];
    let (code, manifest, err) =
        common::run_to_end(&[&args[..], &["--arch", "all", deb.to_str().unwrap()]].concat(), &[]);
    assert_eq!(code, 0, "{err}");
    let path = dir.path().join("manifest.json");
    std::fs::write(&path, manifest.trim()).unwrap();
    let public = keys.join("release.pub").display().to_string();
    (dir, public, path.display().to_string())
}

/// `fleet: U updated, R rolled back`.
fn updates(out: &[String]) -> (u64, u64) {
    let line = out.iter().find(|l| l.ends_with(" rolled back")).expect("the update line");
    let n: Vec<u64> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
    (n[0], n[1])
}

/// `rollout: T targeted, S sent, U updated, F failed, halted: yes|no`.
fn rollout_line(out: &str) -> (Vec<u64>, bool) {
    let last = out.lines().last().unwrap_or_default();
    assert!(last.starts_with("rollout: "), "not the contract's line: {out}");
    (last.split(' ').filter_map(|w| w.trim_end_matches(',').parse().ok()).collect(), last.ends_with("halted: yes"))
}

fn rollout(port: u16, manifest: &str) -> (i32, String, String) {
    let broker = format!("127.0.0.1:{port}");
    common::run_to_end(
        &[
            "release",
            "rollout",
            "--broker",
            &broker,
            "--manifest",
            manifest,
            "--devices",
            "fleet-*",
            "--abort-after",
            "100",
            "--abort-at",
            "5",
        ],
        &[],
    )
}

#[test]
fn a_rollout_with_too_many_failed_installs_halts_and_sends_nothing_after() {
    let b = broker();
    let (_keys, public, manifest) = release();
    let d = fleet(b.port, 30, &["--update-keys", &public, "--fail-installs", "10"]);
    d.wait_stderr(&format!("all {N} devices connected after"), 30 * S);
    let (code, out, err) = rollout(b.port, &manifest);
    assert_eq!(code, 1, "a halt exits 1:\n{out}\n{err}");
    let (n, halted) = rollout_line(&out);
    let (targeted, sent, updated, failed) = (n[0], n[1], n[2], n[3]);
    assert!(halted && targeted == N as u64 && sent < targeted, "{out}");
    assert!(failed * 100 > 5 * (updated + failed) && updated + failed >= 100, "halted by the rule: {out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("rollout: failed fleet-")).count() as u64,
        failed,
        "each failed device listed"
    );
    let (r, fleet_out) = finish(d, 30);
    assert_eq!(r.lost, 0);
    // The devices that took the manifest are exactly those sent it: none after the halt.
    let (took, rolled_back) = updates(&fleet_out);
    assert_eq!((took + rolled_back, rolled_back), (sent, failed), "{fleet_out:?}\n{out}");
}

#[test]
fn a_rollout_with_good_installs_completes_and_every_device_runs_the_new_version() {
    let b = broker();
    let (_keys, public, manifest) = release();
    let d = fleet(b.port, 30, &["--update-keys", &public]);
    d.wait_stderr(&format!("all {N} devices connected after"), 30 * S);
    let (code, out, err) = rollout(b.port, &manifest);
    assert_eq!(code, 0, "{out}\n{err}");
    let (n, halted) = rollout_line(&out);
    assert!(!halted && n[..4] == [N as u64, N as u64, N as u64, 0], "{out}");
    let (r, fleet_out) = finish(d, 30);
    assert_eq!(r.lost, 0);
    assert_eq!(updates(&fleet_out), (N as u64, 0));
}
