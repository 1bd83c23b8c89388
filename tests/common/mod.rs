//! Test harness: a private Mosquitto per test, the real `nightlight` binary, and an MQTT
//! observer. Every guard stops what it started when dropped.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};

/// One second: the unit of the end-to-end tests' time-outs.
pub const S: Duration = Duration::from_secs(1);

/// Where Debian puts the broker (not on a normal user's PATH).
const MOSQUITTO_PATHS: [&str; 3] = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "mosquitto"];

fn mosquitto_bin() -> PathBuf {
    for p in MOSQUITTO_PATHS {
        let path = PathBuf::from(p);
        if path.is_absolute() && path.is_file() {
            return path;
        }
    }
    if Command::new("mosquitto").arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
        return PathBuf::from("mosquitto");
    }
    panic!("mosquitto is not installed: run the README's test command (scripts/test.sh), which installs it");
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A Mosquitto broker on 127.0.0.1 with its own config, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    pub dir: tempfile::TempDir,
    text: String,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts an anonymous broker; `extra` is appended to its config (persistence, limits, ...).
    pub fn start(extra: &str) -> Self {
        Self::start_with(|port, dir| {
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence_location {}/\n{extra}\n",
                dir.display()
            )
        })
    }

    /// Starts a broker whose whole config is `text(port, dir)`.
    pub fn start_with(text: impl Fn(u16, &Path) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // Started as root, mosquitto switches to its own user and cannot read the test's private
        // temporary files (keys, password and ACL files); keep the invoking user.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let text = format!("{}{}", if root { "user root\n" } else { "" }, text(port, dir.path()));
        let mut m = Mosquitto { port, dir, text, child: None };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let text = self.text.clone();
        std::fs::write(&conf, text).unwrap();
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen on {}: {}", self.port, self.log());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker (SIGTERM, as an operator would), keeping its port and config.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The broker's process id (to send it SIGHUP: reload the config, ACL and passwords).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and have not yet reaped.
    unsafe { libc::kill(pid as i32, sig) };
}

/// One message seen by the [`Observer`].
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// An MQTT client that records everything on `filter` and can publish; reconnects by itself.
pub struct Observer {
    client: Client,
    msgs: Arc<Mutex<Vec<Msg>>>,
    /// PUBACKs received: the broker has routed each of this observer's messages by then.
    acks: Arc<std::sync::atomic::AtomicUsize>,
}

impl Observer {
    pub fn new(port: u16, filter: &str) -> Self {
        Self::with_login(port, filter, None)
    }

    /// An observer with a persistent session: on a broker with `persistence true`, it misses
    /// nothing published while the broker restarts and it reconnects.
    pub fn persistent(port: u16, filter: &str) -> Self {
        Self::build(port, filter, None, false)
    }

    /// An observer that logs in with `(username, password)`.
    pub fn with_login(port: u16, filter: &str, login: Option<(&str, &str)>) -> Self {
        Self::build(port, filter, login, true)
    }

    fn build(port: u16, filter: &str, login: Option<(&str, &str)>, clean: bool) -> Self {
        let mut opts = MqttOptions::new(format!("observer-{}", fastrand::u64(..)), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(1 << 20, 1 << 20).set_clean_session(clean);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        let (client, mut conn) = Client::new(opts, 100);
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (sub_client, sink, filter, acked) = (client.clone(), msgs.clone(), filter.to_string(), acks.clone());
        thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = sub_client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => sink.lock().unwrap().push(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    }),
                    Ok(_) => {}
                    Err(_) => thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("observer subscribed");
        Observer { client, msgs, acks }
    }

    /// Publishes at QoS 1 and returns once the broker has acknowledged it: Mosquitto routes a
    /// message (retains it, queues it for offline sessions) before it sends the PUBACK, so what
    /// comes next in the test sees it there.
    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        let before = self.acks.load(std::sync::atomic::Ordering::SeqCst);
        self.client.publish(topic, QoS::AtLeastOnce, retain, payload.into()).unwrap();
        let deadline = Instant::now() + 10 * S;
        while self.acks.load(std::sync::atomic::Ordering::SeqCst) <= before {
            assert!(Instant::now() < deadline, "the broker did not acknowledge a message on {topic}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Publishes at QoS 1 without waiting for the broker (for a flood at a given rate).
    pub fn publish_nowait(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.into()).unwrap();
    }

    pub fn all(&self) -> Vec<Msg> {
        self.msgs.lock().unwrap().clone()
    }

    pub fn on(&self, topic: &str) -> Vec<Msg> {
        self.all().into_iter().filter(|m| m.topic == topic).collect()
    }

    pub fn clear(&self) {
        self.msgs.lock().unwrap().clear();
    }

    /// Waits until `done(messages on topic)` holds; panics with what was seen after `timeout`.
    pub fn wait_on(&self, topic: &str, timeout: Duration, done: impl Fn(&[Msg]) -> bool) -> Vec<Msg> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.on(topic);
            if done(&seen) {
                return seen;
            }
            if Instant::now() > deadline {
                let texts: Vec<String> = seen.iter().map(Msg::text).collect();
                panic!("timed out waiting on {topic}; saw {} messages: {texts:?}", seen.len());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until at least `n` messages under `prefix` have arrived; returns those.
    pub fn wait_on_prefix(&self, prefix: &str, timeout: Duration, n: usize) -> Vec<Msg> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen: Vec<Msg> = self.all().into_iter().filter(|m| m.topic.starts_with(prefix)).collect();
            if seen.len() >= n {
                return seen;
            }
            assert!(Instant::now() < deadline, "wanted {n} messages under {prefix}, got {}", seen.len());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Telemetry `seq` values seen on `topic`, in arrival order.
    pub fn seqs(&self, topic: &str) -> Vec<u64> {
        self.on(topic).iter().filter_map(|m| m.json()["seq"].as_u64()).collect()
    }

    /// Telemetry seen on `topic` as `run -> seqs` (distinct, ascending), runs in start order.
    pub fn runs(&self, topic: &str) -> std::collections::BTreeMap<u64, Vec<u64>> {
        let mut runs: std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>> = Default::default();
        for m in self.on(topic) {
            let v = m.json();
            if let (Some(r), Some(s)) = (v["run"].as_u64(), v["seq"].as_u64()) {
                runs.entry(r).or_default().insert(s);
            }
        }
        runs.into_iter().map(|(r, s)| (r, s.into_iter().collect())).collect()
    }
}

/// A device config written to a temporary directory, with its queue inside.
pub struct DeviceDir {
    pub dir: tempfile::TempDir,
    pub id: String,
}

impl DeviceDir {
    /// A virtual device talking to `port`; `extra` is appended to the TOML.
    pub fn new(port: u16, interval_ms: u64, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let id = format!("dev-{}", fastrand::u32(..));
        let text = format!(
            "id = \"{id}\"\n[mqtt]\nport = {port}\nhost = \"127.0.0.1\"\nreconnect_min_ms = 50\nreconnect_max_ms = 400\n\
             [sensor]\nkind = \"virtual\"\ninterval_ms = {interval_ms}\n[sensor.virtual]\npattern = \"constant\"\nvalue = 123\n\
             [led]\nkind = \"virtual\"\n[queue]\ndir = \"{}\"\n{extra}\n",
            dir.path().join("queue").display()
        );
        std::fs::write(dir.path().join("device.toml"), text).unwrap();
        DeviceDir { dir, id }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("device.toml")
    }

    /// Gives the device the id `id` (an ACL's `%u`, for instance) in place of the random one.
    pub fn set_id(&mut self, id: &str) {
        let text = std::fs::read_to_string(self.config()).unwrap();
        std::fs::write(self.config(), text.replacen(&format!("id = \"{}\"", self.id), &format!("id = \"{id}\""), 1))
            .unwrap();
        self.id = id.to_owned();
    }

    pub fn queue(&self) -> PathBuf {
        self.dir.path().join("queue")
    }

    pub fn topic(&self, leaf: &str) -> String {
        format!("{}/{leaf}", self.id)
    }

    pub fn spawn(&self) -> Daemon {
        self.spawn_with(&[])
    }

    /// `nightlight run` on this directory's config, with `env` set besides.
    pub fn spawn_with(&self, env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(&["run", "--config", self.config().to_str().unwrap()], env)
    }
}

/// The usual end-to-end set-up: a fresh mosquitto, a virtual device's directory for it
/// (reading every `interval_ms`), and an observer of everything on the broker.
pub struct Rig {
    pub broker: Mosquitto,
    pub dev: DeviceDir,
    pub obs: Observer,
}

impl Rig {
    pub fn new(interval_ms: u64) -> Self {
        let broker = Mosquitto::start("");
        let dev = DeviceDir::new(broker.port, interval_ms, "");
        let obs = Observer::new(broker.port, "#");
        Rig { broker, dev, obs }
    }
}

/// Waits until `dev`'s retained state says `mode` and the LED `on`; the states seen so far.
pub fn state_is(obs: &Observer, dev: &DeviceDir, mode: &str, on: bool) -> Vec<Msg> {
    obs.wait_on(&dev.topic("state"), 10 * S, |m| {
        m.last().is_some_and(|m| m.json()["mode"] == mode && m.json()["led_on"] == on)
    })
}

/// The `nightlight` binary, its stdout and stderr captured line by line; killed on drop.
pub struct Daemon {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nightlight")
}

impl Daemon {
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin());
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.env_remove("RUST_LOG").env_remove("NIGHTLIGHT_CONFIG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn nightlight");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        pump_lines(child.stdout.take().unwrap(), stdout.clone());
        pump_lines(child.stderr.take().unwrap(), stderr.clone());
        Daemon { child, stdout, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until stdout has `n` lines; panics with the daemon's output otherwise.
    pub fn wait_stdout_lines(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.stdout();
            if lines.len() >= n {
                return lines;
            }
            assert!(Instant::now() < deadline, "wanted {n} stdout lines, got {lines:?}\nstderr:\n{}", self.stderr());
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until stderr contains `needle`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(needle) {
            assert!(Instant::now() < deadline, "stderr never said {needle:?}:\n{}", self.stderr());
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until stderr holds `n` lines containing `needle` (more than `n` is fine).
    pub fn wait_stderr_count(&self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.stderr().matches(needle).count() < n {
            assert!(Instant::now() < deadline, "stderr never said {needle:?} {n} times:\n{}", self.stderr());
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `sig` and waits up to `timeout` for the exit.
    pub fn stop_with(&mut self, sig: i32, timeout: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        signal(self.child.id(), sig);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            assert!(start.elapsed() < timeout, "nightlight did not stop within {timeout:?}:\n{}", self.stderr());
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// CPU seconds the process has used (user + system, from /proc).
    pub fn cpu_s(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name, which is in parentheses: utime and stime are 12 and 13.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).expect("utime and stime in /proc/PID/stat");
        // SAFETY: sysconf has no preconditions.
        let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (field(11) + field(12)) / tick
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pump_lines(r: impl std::io::Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
}

/// Runs the binary to completion: (exit code, stdout, stderr).
pub fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove("RUST_LOG").env_remove("NIGHTLIGHT_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `text` to `name` in `dir` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().write_all(text.as_bytes()).unwrap();
    p
}

/// A throwaway PKI made with the `openssl` command: a CA, and certificates it signs.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// A new CA named `name` (files `<name>.pem`, `<name>.key`).
    pub fn new(name: &str) -> Self {
        let pki = Pki { dir: tempfile::tempdir().unwrap() };
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "30",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ]);
        pki
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    /// A certificate `<name>.pem` / `<name>.key` signed by CA `ca`, with subjectAltName `san`
    /// (e.g. `DNS:localhost,IP:127.0.0.1`); `rsa` picks an RSA key instead of ECDSA.
    pub fn issue(&self, ca: &str, name: &str, san: &str, rsa: bool) {
        let newkey: &[&str] =
            if rsa { &["-newkey", "rsa:2048"] } else { &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] };
        let mut args = vec!["req", "-nodes", "-subj"];
        let subj = format!("/CN={name}");
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        args.push(&subj);
        args.extend_from_slice(newkey);
        args.extend_from_slice(&["-keyout", &key, "-out", &csr]);
        self.openssl(&args);
        std::fs::write(self.dir.path().join(format!("{name}.ext")), format!("subjectAltName={san}\n")).unwrap();
        self.sign(ca, &csr, &pem, &["-extfile", &format!("{name}.ext")]);
    }

    /// `openssl x509 -req -in CSR -CA <ca>.pem -CAkey <ca>.key -CAcreateserial -out PEM -days 30`,
    /// then `extra` (nothing: the `mosquitto-tls(7)` recipe as written).
    fn sign(&self, ca: &str, csr: &str, pem: &str, extra: &[&str]) {
        let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            pem,
            "-days",
            "30",
        ];
        args.extend_from_slice(extra);
        self.openssl(&args);
    }

    /// `<name>.pem` / `<name>.key` made exactly as `mosquitto-tls(7)` says (an RSA key, a CSR,
    /// `openssl x509 -req ... -CAcreateserial`, no extensions): OpenSSL 3 makes it an X.509 v1
    /// certificate. Returns openssl's `Version:` line, so a test can show it met that case.
    pub fn issue_as_mosquitto_tls(&self, ca: &str, name: &str) -> String {
        let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
        self.openssl(&["genrsa", "-out", &key, "2048"]);
        self.openssl(&["req", "-out", &csr, "-key", &key, "-new", "-subj", &format!("/CN={name}")]);
        self.sign(ca, &csr, &pem, &[]);
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in", &pem])
            .current_dir(self.dir.path())
            .output()
            .expect("openssl is installed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines().find(|l| l.trim_start().starts_with("Version:")).unwrap_or_default().trim().to_owned()
    }

    fn openssl(&self, args: &[&str]) {
        let out =
            Command::new("openssl").args(args).current_dir(self.dir.path()).output().expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Asserts that `seqs` rise by exactly one at each step.
pub fn assert_contiguous(seqs: &[u64]) {
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "gap or reorder in seq: {seqs:?}");
    }
}

/// A broker with passwords (porch, controller, observer, garage; see the source) and, if given,
/// an ACL file.
pub fn password_broker(acl: Option<&str>) -> (Mosquitto, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwd");
    for (i, (user, pass)) in [
        ("porch", "porch-pass-1"),
        ("controller", "ctl-pass-2"),
        ("observer", "obs-pass-3"),
        ("garage", "garage-pass-4"),
    ]
    .iter()
    .enumerate()
    {
        let mut cmd = std::process::Command::new(mosquitto_passwd());
        if i == 0 {
            cmd.arg("-c");
        }
        assert!(cmd.args(["-b", pw.to_str().unwrap(), user, pass]).status().unwrap().success());
    }
    let acl_line = acl.map(|a| format!("acl_file {a}\n")).unwrap_or_default();
    let m = Mosquitto::start_with(|port, _| {
        format!("listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n{acl_line}", pw.display())
    });
    (m, dir)
}

pub fn mosquitto_passwd() -> &'static str {
    ["/usr/bin/mosquitto_passwd", "/usr/sbin/mosquitto_passwd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto_passwd")
}

/// A device with the id `porch` (its ACL username), logging in with its password, speaking
/// `protocol`, reading every 200 ms; the local rule off, so only commands switch the LED.
pub fn porch(port: u16, protocol: &str) -> DeviceDir {
    let mut d = DeviceDir::new(port, 200, "");
    d.set_id("porch");
    let pw = write_file(d.dir.path(), "porch.pw", "porch-pass-1\n");
    let text = std::fs::read_to_string(d.config()).unwrap();
    let text = text.replacen(
        "[mqtt]\n",
        &format!("[mqtt]\nprotocol = \"{protocol}\"\nusername = \"porch\"\npassword_file = {pw:?}\n"),
        1,
    );
    let text = text.replacen("[led]\n", "[led]\nlocal_after_s = 0\n", 1);
    std::fs::write(d.config(), text).unwrap();
    d
}

/// The README's ACL (`docs/mosquitto.acl`) plus `extra`, written to a temporary file.
pub fn readme_acl(extra: &str) -> tempfile::NamedTempFile {
    let acl = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/mosquitto.acl");
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), format!("{}\n{extra}\n", std::fs::read_to_string(acl).unwrap())).unwrap();
    f
}

/// A gate on its own port in front of a real Mosquitto that reads each CONNECT's protocol level
/// and counts it (`v5`: level 5, `v311`: level 4). [`V311Only::new`] makes a broker that speaks
/// only MQTT 3.1.1, as old and small brokers do: it closes every MQTT 5 CONNECT (what such brokers
/// do) and relays the rest untouched; [`V311Only::counting`] relays everything.
pub struct V311Only {
    pub port: u16,
    pub v5: Arc<std::sync::atomic::AtomicUsize>,
    pub v311: Arc<std::sync::atomic::AtomicUsize>,
}

impl V311Only {
    pub fn new(upstream: u16) -> Self {
        Self::start(upstream, true)
    }

    pub fn counting(upstream: u16) -> Self {
        Self::start(upstream, false)
    }

    fn start(upstream: u16, refuse_v5: bool) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (v5, v311): (Arc<std::sync::atomic::AtomicUsize>, Arc<std::sync::atomic::AtomicUsize>) = Default::default();
        let counters = (Arc::clone(&v5), Arc::clone(&v311));
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let counters = (counters.0.clone(), counters.1.clone());
                std::thread::spawn(move || gate(conn, upstream, refuse_v5, &counters.0, &counters.1));
            }
        });
        V311Only { port, v5, v311 }
    }

    pub fn seen(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        (self.v5.load(SeqCst), self.v311.load(SeqCst))
    }
}

/// Reads a CONNECT up to its protocol level byte and counts it; closes level 5 when told to,
/// relays everything else.
fn gate(
    mut client: std::net::TcpStream,
    upstream: u16,
    refuse_v5: bool,
    v5: &std::sync::atomic::AtomicUsize,
    v311: &std::sync::atomic::AtomicUsize,
) {
    use std::io::{Read, Write};
    let mut head = Vec::new();
    let mut byte = |head: &mut Vec<u8>| -> Option<u8> {
        let mut b = [0u8];
        client.read_exact(&mut b).ok()?;
        head.push(b[0]);
        Some(b[0])
    };
    let Some(_fixed) = byte(&mut head) else { return };
    for _ in 0..4 {
        match byte(&mut head) {
            Some(b) if b & 0x80 != 0 => continue,
            Some(_) => break,
            None => return,
        }
    }
    let (Some(hi), Some(lo)) = (byte(&mut head), byte(&mut head)) else { return };
    for _ in 0..u16::from_be_bytes([hi, lo]) {
        if byte(&mut head).is_none() {
            return;
        }
    }
    let Some(level) = byte(&mut head) else { return };
    match level {
        5 => v5.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        4 => v311.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        _ => 0,
    };
    if level == 5 && refuse_v5 {
        let _ = client.shutdown(std::net::Shutdown::Both);
        return;
    }
    let Ok(mut up) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else { return };
    if up.write_all(&head).is_err() {
        return;
    }
    let (Ok(mut client_r), Ok(mut up_w)) = (client.try_clone(), up.try_clone()) else { return };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_r, &mut up_w);
        let _ = up_w.shutdown(std::net::Shutdown::Both);
    });
    let _ = std::io::copy(&mut up, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Both);
}

/// The queue's segment files in `dir`, oldest first (none when `dir` does not exist yet).
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut segs: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "seg")).collect();
    segs.sort();
    segs
}

/// The flags byte of each reading the queue in `dir` holds on disk, segment by segment
/// (`src/queue/frame.rs`: a length byte, a 4-byte checksum, the body with its flags at 18; bit 1
/// set: taken by a clock not known to be synchronized), read without the device's lock.
pub fn flags_on_disk(dir: &Path) -> Vec<u8> {
    let mut flags = Vec::new();
    for seg in segments(dir) {
        let bytes = std::fs::read(seg).unwrap_or_default();
        let mut at = 0;
        while at < bytes.len() && bytes[at] > 18 && at + 5 + bytes[at] as usize <= bytes.len() {
            flags.push(bytes[at + 5 + 18]);
            at += 5 + bytes[at] as usize;
        }
    }
    flags
}

/// How many readings the queue in `dir` holds on disk. While the broker is away this only
/// grows, so a test waits on it for "the device has taken and stored n readings" instead of
/// sleeping for n intervals.
pub fn readings_on_disk(dir: &Path) -> u64 {
    flags_on_disk(dir).len() as u64
}

/// Waits until the queue in `dir` holds at least `n` readings on disk; returns how many it holds.
pub fn wait_readings_on_disk(dir: &Path, n: u64, timeout: Duration) -> u64 {
    wait_until(timeout, || readings_on_disk(dir) >= n, &format!("{n} readings on disk in {}", dir.display()));
    readings_on_disk(dir)
}

/// Polls `done` until it holds, failing the test after `timeout` (what the file system or a
/// process shows has no event to wait on).
pub fn wait_until(timeout: Duration, done: impl Fn() -> bool, what: &str) {
    let end = std::time::Instant::now() + timeout;
    while !done() {
        assert!(std::time::Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
