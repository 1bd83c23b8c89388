//! End to end: updates over MQTT against a real Mosquitto and a file server of the test's own
//! (which logs every `Range` asked for, and cuts or stalls connections when told to). The
//! device's part: manifests taken or refused, the package fetched, resumed and verified, handed
//! to the installer (`ready.deb` and `ready.json`), and `<id>/update/state` all along. The
//! installer's part runs as root in the emulated Pi (cross/update-test.sh).

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nightlight::update::manifest::{Manifest, SigningKey};
use nightlight::update::state::architecture;

/// What the server does with one request, in order; the default is to serve it all.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Send this many bytes of the body, then close.
    CutAfter(usize),
    /// Send this many bytes, then hold the connection open, silent.
    StallAfter(usize),
}

/// A file server: one file at `/pkg.deb`, `Range: bytes=N-` honoured.
struct FileServer {
    port: u16,
    file: Arc<Mutex<Vec<u8>>>,
    plans: Arc<Mutex<VecDeque<Plan>>>,
    /// Each request's range start and how many body bytes were sent for it.
    log: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl FileServer {
    fn start(file: Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let s = FileServer { port, file: Arc::new(Mutex::new(file)), plans: Arc::default(), log: Arc::default() };
        let (file, plans, log) = (s.file.clone(), s.plans.clone(), s.log.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (file, plans, log) = (file.clone(), plans.clone(), log.clone());
                std::thread::spawn(move || serve(conn, &file, &plans, &log));
            }
        });
        s
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/pkg.deb", self.port)
    }

    fn plan(&self, p: Plan) {
        self.plans.lock().unwrap().push_back(p);
    }

    fn log(&self) -> Vec<(u64, u64)> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(mut conn: TcpStream, file: &Mutex<Vec<u8>>, plans: &Mutex<VecDeque<Plan>>, log: &Mutex<Vec<(u64, u64)>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut start = 0u64;
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if first {
            assert!(line.starts_with("GET /pkg.deb HTTP/1.1"), "{line}");
            first = false;
        }
        if let Some(r) = line.strip_prefix("Range: bytes=") {
            start = r.trim().trim_end_matches('-').parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let body = file.lock().unwrap().clone();
    let from = start.min(body.len() as u64) as usize;
    let head = if start > 0 {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\n\r\n",
            body.len() - from,
            from,
            body.len() - 1,
            body.len()
        )
    } else {
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
    };
    let plan = plans.lock().unwrap().pop_front();
    let rest = &body[from..];
    let (send, stall) = match plan {
        None => (rest.len(), false),
        Some(Plan::CutAfter(n)) => (n.min(rest.len()), false),
        Some(Plan::StallAfter(n)) => (n.min(rest.len()), true),
    };
    let _ = conn.write_all(head.as_bytes());
    let sent = conn.write_all(&rest[..send]).map(|()| send as u64).unwrap_or(0);
    log.lock().unwrap().push((start, sent));
    if stall {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A package of `n` bytes that is not all the same.
fn package(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn sha256(bytes: &[u8]) -> String {
    nightlight::update::manifest::to_hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// A manifest for `bytes` at `url`, signed by `key`.
fn manifest(key: &SigningKey, version: &str, bytes: &[u8], url: &str) -> Manifest {
    key.sign(Manifest {
        version: version.into(),
        arch: architecture().into(),
        size: bytes.len() as u64,
        sha256: sha256(bytes),
        url: url.into(),
        key: String::new(),
        sig: String::new(),
    })
}

fn json(m: &Manifest) -> Vec<u8> {
    serde_json::to_vec(m).unwrap()
}

/// A device trusting `keys`, with a short stall bound.
fn device(port: u16, keys: &[&SigningKey]) -> DeviceDir {
    let keys: Vec<String> = keys.iter().map(|k| format!("\"{}\"", k.public())).collect();
    DeviceDir::new(port, 200, &format!("[update]\nkeys = [{}]\nstall_s = 1\n", keys.join(", ")))
}

fn update_dir(dev: &DeviceDir) -> PathBuf {
    dev.queue().join("update")
}

/// Waits until the retained update state says `state`; the states seen so far.
fn update_state(obs: &Observer, dev: &DeviceDir, state: &str, timeout: Duration) -> Vec<serde_json::Value> {
    let msgs =
        obs.wait_on(&dev.topic("update/state"), timeout, |m| m.last().is_some_and(|m| m.json()["state"] == state));
    msgs.iter().map(Msg::json).collect()
}

fn wait_file_len(path: &Path, at_least: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::fs::metadata(path).map_or(0, |m| m.len()) < at_least {
        assert!(Instant::now() < deadline, "{} never reached {at_least} bytes", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_signed_update_published_while_the_device_was_offline_is_fetched_through_cuts_verified_and_handed_over() {
    let broker = Mosquitto::start("");
    let obs = Observer::new(broker.port, "#");
    let key = SigningKey::generate().unwrap();
    let pkg = package(1 << 20);
    let server = FileServer::start(pkg.clone());
    // The server cuts the first five connections at odd places.
    for n in [100_000, 1, 70_001, 250_000, 33] {
        server.plan(Plan::CutAfter(n));
    }
    let dev = device(broker.port, &[&key]);
    let m = manifest(&key, "99.0.0", &pkg, &server.url());
    // Published before the device ever connected: retained, it is there when the device comes.
    obs.publish(&dev.topic("update"), json(&m), true);
    let d = dev.spawn();
    let states = update_state(&obs, &dev, "installing", 30 * S);

    let last = states.last().unwrap();
    assert_eq!(last["to"], "99.0.0");
    assert_eq!(last["version"], nightlight::VERSION);
    assert!(states.iter().any(|s| s["state"] == "downloading"), "{states:?}");
    assert!(states.iter().any(|s| s["state"] == "verifying"), "{states:?}");
    assert_eq!(
        std::fs::read(update_dir(&dev).join("ready.deb")).unwrap(),
        pkg,
        "the package handed over is the one signed"
    );
    let ready: Manifest = serde_json::from_slice(&std::fs::read(update_dir(&dev).join("ready.json")).unwrap()).unwrap();
    assert_eq!(ready, m);
    assert!(!update_dir(&dev).join("download.part").exists());
    // Each cut was resumed exactly where it stopped: nothing fetched twice.
    let log = server.log();
    assert_eq!(log.len(), 6, "{log:?}");
    let mut next = 0;
    for (start, sent) in &log {
        assert_eq!(*start, next, "resumed from {start}, had {next}: {log:?}");
        next = start + sent;
    }
    assert_eq!(next, pkg.len() as u64);
    assert!(d.stderr().contains("the update's download was interrupted; resuming"));
}

#[test]
fn a_restart_in_the_middle_of_a_download_fetches_again_at_most_64_kib() {
    let broker = Mosquitto::start("");
    let obs = Observer::new(broker.port, "#");
    let key = SigningKey::generate().unwrap();
    let pkg = package(2 << 20);
    let server = FileServer::start(pkg.clone());
    // The first connection sends 700 KiB and then goes silent.
    server.plan(Plan::StallAfter(700 * 1024 + 123));
    let dev = device(broker.port, &[&key]);
    obs.publish(&dev.topic("update"), json(&manifest(&key, "99.0.0", &pkg, &server.url())), true);
    let mut d = dev.spawn();
    wait_file_len(&update_dir(&dev).join("download.part"), 700 * 1024 + 123, 20 * S);
    d.kill9();
    let _d = dev.spawn();
    update_state(&obs, &dev, "installing", 30 * S);
    assert_eq!(std::fs::read(update_dir(&dev).join("ready.deb")).unwrap(), pkg);
    let log = server.log();
    let (first, resumed) = (log[0], log[1]);
    assert_eq!(first.0, 0);
    let refetched = (first.0 + first.1).saturating_sub(resumed.0);
    assert!(refetched <= 64 * 1024, "fetched {refetched} bytes again after the restart: {log:?}");
    assert!(resumed.0 > 0, "started over: {log:?}");
}

#[test]
fn a_server_that_goes_silent_is_left_after_stall_s_and_the_download_resumes() {
    let broker = Mosquitto::start("");
    let obs = Observer::new(broker.port, "#");
    let key = SigningKey::generate().unwrap();
    let pkg = package(300_000);
    let server = FileServer::start(pkg.clone());
    server.plan(Plan::StallAfter(100_000));
    let dev = device(broker.port, &[&key]);
    let d = dev.spawn();
    obs.wait_on(&dev.topic("update/state"), 10 * S, |m| !m.is_empty());
    obs.publish(&dev.topic("update"), json(&manifest(&key, "99.0.0", &pkg, &server.url())), false);
    update_state(&obs, &dev, "installing", 30 * S);
    assert!(d.stderr().contains("stalled"), "{}", d.stderr());
    assert_eq!(server.log()[1].0, 100_000, "{:?}", server.log());
}

#[test]
fn manifests_that_must_not_be_installed_are_refused_each_with_its_reason_and_nothing_is_handed_over() {
    let broker = Mosquitto::start("");
    let obs = Observer::new(broker.port, "#");
    let (key, stranger) = (SigningKey::generate().unwrap(), SigningKey::generate().unwrap());
    let pkg = package(200_000);
    let server = FileServer::start(pkg.clone());
    let dev = device(broker.port, &[&key]);
    let d = dev.spawn();
    let first = update_state(&obs, &dev, "idle", 10 * S);
    assert_eq!(first.last().unwrap()["version"], nightlight::VERSION);

    let good = manifest(&key, "99.0.0", &pkg, &server.url());
    let mut bad_sig = good.clone();
    bad_sig.url = format!("{}?evil", server.url());
    let other_arch = key.sign(Manifest { arch: "s390x".into(), ..good.clone() });
    let older = manifest(&key, "0.0.1", &pkg, &server.url());
    let mut altered = pkg.clone();
    altered[1000] ^= 1;
    let wrong_hash = key.sign(Manifest { sha256: sha256(&altered), version: "99.0.1".into(), ..good.clone() });
    let truncated = key.sign(Manifest { size: pkg.len() as u64 + 10, version: "99.0.2".into(), ..good.clone() });
    let cases: [(&str, Vec<u8>, &str); 7] = [
        ("a bad signature", json(&bad_sig), "signature does not match"),
        ("an untrusted key", json(&manifest(&stranger, "99.0.0", &pkg, &server.url())), "does not trust"),
        ("another architecture", json(&other_arch), "the package is for s390x"),
        ("an older version", json(&older), "older than the running"),
        ("not a manifest", b"{\"version\": 1}".to_vec(), "not valid"),
        ("a wrong hash", json(&wrong_hash), "SHA-256"),
        ("a truncated file", json(&truncated), "truncated"),
    ];
    for (what, payload, reason) in cases {
        obs.clear();
        obs.publish(&dev.topic("update"), payload, false);
        let states = update_state(&obs, &dev, "failed", 20 * S);
        let r = states.last().unwrap()["reason"].as_str().unwrap_or_default().to_owned();
        assert!(r.contains(reason), "{what}: reason {r:?}");
        assert!(!update_dir(&dev).join("ready.deb").exists(), "{what}: a package was handed over");
        assert!(!update_dir(&dev).join("ready.json").exists(), "{what}");
        assert!(!update_dir(&dev).join("download.part").exists(), "{what}: its download was kept");
    }
    assert!(d.stderr().matches("refused an update manifest").count() >= 5, "{}", d.stderr());
    // Still a working device.
    obs.clear();
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| !m.is_empty());
}

#[test]
fn the_same_manifest_again_after_a_failure_is_not_fetched_again_until_asked_to_install() {
    let broker = Mosquitto::start("");
    let obs = Observer::new(broker.port, "#");
    let key = SigningKey::generate().unwrap();
    let pkg = package(50_000);
    let server = FileServer::start(pkg[..40_000].to_vec());
    let dev = device(broker.port, &[&key]);
    let _d = dev.spawn();
    update_state(&obs, &dev, "idle", 10 * S);
    let m = json(&manifest(&key, "99.0.0", &pkg, &server.url()));
    obs.publish(&dev.topic("update"), m.clone(), false);
    update_state(&obs, &dev, "failed", 20 * S);
    let fetched = server.log().len();
    obs.publish(&dev.topic("update"), m, false);
    // Home Assistant's button: the whole package is there now.
    *server.file.lock().unwrap() = pkg.clone();
    obs.clear();
    obs.publish(&dev.topic("update/install"), "install", false);
    update_state(&obs, &dev, "installing", 20 * S);
    assert_eq!(server.log().len(), fetched + 1, "the same manifest again fetched: {:?}", server.log());
}

#[test]
fn the_installers_result_becomes_the_update_state_and_home_assistant_reads_it() {
    let broker = Mosquitto::start("");
    let obs = Observer::new(broker.port, "#");
    let key = SigningKey::generate().unwrap();
    let pkg = package(10_000);
    let server = FileServer::start(pkg.clone());
    let dev = device(broker.port, &[&key]);
    let _d = dev.spawn();
    update_state(&obs, &dev, "idle", 10 * S);
    obs.publish(&dev.topic("update"), json(&manifest(&key, "99.0.0", &pkg, &server.url())), false);
    update_state(&obs, &dev, "installing", 20 * S);
    // What the installer writes (as root, in the emulated Pi): gating, then rolled back.
    let write = |state: &str, reason: Option<&str>| {
        let mut v =
            serde_json::json!({"state": state, "version": "0.0.0", "from": nightlight::VERSION, "to": "99.0.0"});
        if let Some(r) = reason {
            v["reason"] = r.into();
        }
        std::fs::write(update_dir(&dev).join("result.json.new"), v.to_string()).unwrap();
        std::fs::rename(update_dir(&dev).join("result.json.new"), update_dir(&dev).join("result.json")).unwrap();
    };
    write("gating", None);
    update_state(&obs, &dev, "gating", 10 * S);
    write("rolled_back", Some("the new version did not deliver within 60 s"));
    let states = update_state(&obs, &dev, "rolled_back", 10 * S);
    let last = states.last().unwrap();
    assert_eq!(last["reason"], "the new version did not deliver within 60 s");
    assert_eq!(last["version"], nightlight::VERSION, "the running version, whatever the file says");

    // Home Assistant's update entity, from the discovery message and the template in it.
    let config = obs.wait_on(&format!("homeassistant/device/{}/config", dev.id), 10 * S, |m| !m.is_empty());
    let fw = config.last().unwrap().json()["cmps"]["firmware"].clone();
    assert_eq!(fw["p"], "update");
    assert_eq!(fw["state_topic"], dev.topic("update/state"));
    assert_eq!(fw["command_topic"], dev.topic("update/install"));
    let render = |payload: &serde_json::Value| -> serde_json::Value {
        let env = minijinja::Environment::new();
        let out = env
            .render_str(fw["value_template"].as_str().unwrap(), minijinja::context! { value_json => payload })
            .unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{out}: {e}"))
    };
    let ha = render(&serde_json::json!({"state": "downloading", "version": "0.1.0", "to": "0.2.0", "percent": 42}));
    assert_eq!(
        ha,
        serde_json::json!({"installed_version": "0.1.0", "latest_version": "0.2.0", "in_progress": true, "update_percentage": 42})
    );
    let ha = render(last);
    assert_eq!(ha["in_progress"], false);
    assert_eq!(ha["latest_version"], "99.0.0", "a rolled-back update stays on offer: {ha}");
    let ha = render(&serde_json::json!({"state": "idle", "version": "0.1.0"}));
    assert_eq!(ha["latest_version"], "0.1.0");
    assert_eq!(ha["update_percentage"], serde_json::Value::Null);
}

#[test]
fn release_keys_cannot_be_set_over_mqtt() {
    let broker = Mosquitto::start("");
    let obs = Observer::new(broker.port, "#");
    let (key, attacker) = (SigningKey::generate().unwrap(), SigningKey::generate().unwrap());
    let dev = device(broker.port, &[&key]);
    let _d = dev.spawn();
    update_state(&obs, &dev, "idle", 10 * S);
    let set = format!(r#"{{"update": {{"keys": ["{}"]}}}}"#, attacker.public());
    obs.publish(&dev.topic("config/set"), set, false);
    let cfg = obs.wait_on(&dev.topic("config"), 10 * S, |m| m.last().is_some_and(|m| !m.json()["refused"].is_null()));
    let refused = cfg.last().unwrap().json()["refused"].clone();
    assert_eq!(refused["key"], "update.keys", "{refused}");
}

#[test]
fn a_device_without_release_keys_takes_no_manifest() {
    let broker = Mosquitto::start("");
    let obs = Observer::new(broker.port, "#");
    let key = SigningKey::generate().unwrap();
    let pkg = package(10_000);
    let server = FileServer::start(pkg.clone());
    let dev = DeviceDir::new(broker.port, 200, "");
    let _d = dev.spawn();
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| !m.is_empty());
    obs.publish(&dev.topic("update"), json(&manifest(&key, "99.0.0", &pkg, &server.url())), false);
    // Telemetry goes on; nothing was fetched and no state is reported.
    let n = obs.on(&dev.topic("telemetry")).len();
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= n + 5);
    assert!(server.log().is_empty());
    assert!(obs.on(&dev.topic("update/state")).is_empty());
}

#[test]
fn under_the_readme_acl_only_the_release_user_can_offer_a_device_a_manifest() {
    // The observer stands for the README's `release` user (and reads everything to watch).
    let acl = readme_acl("user observer\ntopic write +/update\ntopic read #\n");
    let (broker, _pw) = password_broker(Some(acl.path().to_str().unwrap()));
    let key = SigningKey::generate().unwrap();
    let pkg = package(20_000);
    let server = FileServer::start(pkg.clone());
    let dev = porch(broker.port, "5");
    let text = std::fs::read_to_string(dev.config()).unwrap();
    std::fs::write(dev.config(), format!("{text}\n[update]\nkeys = [\"{}\"]\n", key.public())).unwrap();
    let obs = Observer::with_login(broker.port, "#", Some(("observer", "obs-pass-3")));
    let _d = dev.spawn();
    update_state(&obs, &dev, "idle", 10 * S);
    // Another device cannot offer one (the broker drops it): nothing is fetched.
    let garage = Observer::with_login(broker.port, "garage/#", Some(("garage", "garage-pass-4")));
    garage.publish_nowait("porch/update", json(&manifest(&key, "99.0.0", &pkg, &server.url())));
    // The release user can: the device fetches it and says so, under its own ACL lines.
    obs.publish("porch/update", json(&manifest(&key, "99.0.1", &pkg, &server.url())), false);
    let states = update_state(&obs, &dev, "installing", 20 * S);
    assert!(states.iter().all(|s| s["to"] != "99.0.0"), "a device's manifest was taken: {states:?}");
    assert_eq!(server.log().len(), 1, "{:?}", server.log());
}
