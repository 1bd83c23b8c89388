//! End to end: TLS, mutual TLS, passwords and the README's broker ACL, against real Mosquitto
//! brokers configured by each test, with certificates made by `openssl`.

mod common;

use common::*;

/// A broker with a plain listener (for the observer) and a TLS listener (for the device).
fn tls_broker(pki: &Pki, server: &str, require_cert: bool) -> (Mosquitto, u16) {
    let tls_port = free_port();
    let (ca, cert, key) = (pki.path("ca.pem"), pki.path(&format!("{server}.pem")), pki.path(&format!("{server}.key")));
    let m = Mosquitto::start_with(|port, _| {
        format!(
            "per_listener_settings false\nallow_anonymous true\nlistener {port} 127.0.0.1\n\
             listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nrequire_certificate {require_cert}\n"
        )
    });
    (m, tls_port)
}

/// The `[mqtt.tls]` lines for mutual TLS: the CA, `<cert>.pem` and `<key>.key` from `pki`.
fn client_cert(pki: &Pki, cert: &str, key: &str) -> String {
    format!(
        "ca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
        pki.path("ca.pem"),
        pki.path(&format!("{cert}.pem")),
        pki.path(&format!("{key}.key"))
    )
}

fn tls_toml(tls_port: u16, host: &str, extra: &str) -> String {
    format!("[mqtt]\nport = {tls_port}\nhost = \"{host}\"\nreconnect_min_ms = 50\nreconnect_max_ms = 400\n[mqtt.tls]\nenabled = true\n{extra}")
}

/// A device config whose [mqtt] section is `mqtt_toml` (replacing the harness's plain one).
fn device_dir(mqtt_toml: &str) -> DeviceDir {
    let d = DeviceDir::new(1, 100, "");
    let text = std::fs::read_to_string(d.config()).unwrap();
    let rest = text.split("[sensor]").nth(1).unwrap();
    let id = text.lines().next().unwrap();
    std::fs::write(d.config(), format!("{id}\n{mqtt_toml}\n[sensor]{rest}")).unwrap();
    d
}

#[test]
fn tls_with_the_right_ca_delivers_telemetry() {
    let pki = Pki::new("ca");
    pki.issue("ca", "server", "DNS:localhost,IP:127.0.0.1", false);
    let (broker, tls_port) = tls_broker(&pki, "server", false);
    let obs = Observer::new(broker.port, "#");
    for host in ["127.0.0.1", "localhost"] {
        let dev = device_dir(&tls_toml(tls_port, host, &format!("ca_file = {:?}\n", pki.path("ca.pem"))));
        let _d = dev.spawn_with(&[]);
        obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= 3);
    }
}

#[test]
fn a_broker_certificate_from_an_untrusted_ca_is_refused_clearly_and_nothing_goes_out() {
    let pki = Pki::new("ca");
    pki.issue("ca", "server", "DNS:localhost,IP:127.0.0.1", false);
    let other = Pki::new("other");
    let (broker, tls_port) = tls_broker(&pki, "server", false);
    let obs = Observer::new(broker.port, "#");
    let dev = device_dir(&tls_toml(tls_port, "127.0.0.1", &format!("ca_file = {:?}\n", other.path("other.pem"))));
    let mut d = dev.spawn_with(&[("RUST_LOG", "info,nightlight::device=debug")]);
    d.wait_stderr("not signed by a trusted CA", 10 * S);
    // Two more tries, refused the same way (a debug line each).
    d.wait_stderr_count("still cannot connect", 2, 10 * S);
    assert!(obs.on(&dev.topic("telemetry")).is_empty(), "telemetry went out over an untrusted link");
    assert!(d.is_running(), "a TLS failure is never fatal");
    let said = d.stderr().lines().filter(|l| l.contains("not signed by a trusted CA") && !l.contains("DEBUG")).count();
    assert_eq!(said, 1, "said once, not per retry:\n{}", d.stderr());
}

#[test]
fn a_broker_certificate_for_another_host_is_refused_naming_the_host() {
    let pki = Pki::new("ca");
    pki.issue("ca", "server", "DNS:elsewhere.example", false);
    let (_broker, tls_port) = tls_broker(&pki, "server", false);
    let dev = device_dir(&tls_toml(tls_port, "127.0.0.1", &format!("ca_file = {:?}\n", pki.path("ca.pem"))));
    let d = dev.spawn_with(&[]);
    d.wait_stderr("not valid for 127.0.0.1", 10 * S);
    assert!(d.stderr().contains("subjectAltName=IP:127.0.0.1"), "says how to make one: {}", d.stderr());
}

#[test]
fn mutual_tls_works_with_a_client_certificate_and_is_refused_without_one() {
    let pki = Pki::new("ca");
    pki.issue("ca", "server", "DNS:localhost,IP:127.0.0.1", false);
    pki.issue("ca", "client", "DNS:client", true); // an RSA key, the ECDSA one is the server's
    let (broker, tls_port) = tls_broker(&pki, "server", true);
    let obs = Observer::new(broker.port, "#");
    let with_cert = device_dir(&tls_toml(tls_port, "127.0.0.1", &client_cert(&pki, "client", "client")));
    let _a = with_cert.spawn_with(&[]);
    obs.wait_on(&with_cert.topic("telemetry"), 10 * S, |m| m.len() >= 3);

    let without = device_dir(&tls_toml(tls_port, "127.0.0.1", &format!("ca_file = {:?}\n", pki.path("ca.pem"))));
    let b = without.spawn_with(&[("RUST_LOG", "info,nightlight::device=debug")]);
    b.wait_stderr("client certificate", 10 * S);
    b.wait_stderr_count("still cannot connect", 2, 10 * S);
    assert!(obs.on(&without.topic("telemetry")).is_empty());
}

#[test]
fn mutual_tls_works_with_a_client_certificate_made_by_the_mosquitto_tls_recipe() {
    let pki = Pki::new("ca");
    pki.issue("ca", "server", "DNS:localhost,IP:127.0.0.1", false);
    let version = pki.issue_as_mosquitto_tls("ca", "client");
    assert!(version.starts_with("Version: 1"), "the recipe makes a v1 certificate here: {version}");
    let (broker, tls_port) = tls_broker(&pki, "server", true);
    let obs = Observer::new(broker.port, "#");
    let dev = device_dir(&tls_toml(tls_port, "127.0.0.1", &client_cert(&pki, "client", "client")));
    let d = dev.spawn_with(&[]);
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= 3);
    assert!(!d.stderr().contains("WARN"), "{}", d.stderr());
}

#[test]
fn a_key_of_another_certificate_is_a_configuration_error_naming_the_key_file() {
    let pki = Pki::new("ca");
    pki.issue("ca", "client", "DNS:client", true);
    pki.issue("ca", "other", "DNS:other", true);
    let dev = device_dir(&tls_toml(1, "127.0.0.1", &client_cert(&pki, "client", "other")));
    let (code, _, err) = run_to_end(&["check", "--config", dev.config().to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("mqtt.tls.key_file") && err.contains("is not the key of the certificate"), "{err}");
}

#[test]
fn a_version_1_broker_certificate_is_refused_saying_so_and_how_to_make_one_that_works() {
    let pki = Pki::new("ca");
    let version = pki.issue_as_mosquitto_tls("ca", "server");
    assert!(version.starts_with("Version: 1"), "{version}");
    let (_broker, tls_port) = tls_broker(&pki, "server", false);
    let dev = device_dir(&tls_toml(tls_port, "127.0.0.1", &format!("ca_file = {:?}\n", pki.path("ca.pem"))));
    let d = dev.spawn_with(&[]);
    d.wait_stderr("X.509 version 1 certificate", 10 * S);
    assert!(d.stderr().contains("-extfile <(printf 'subjectAltName=IP:127.0.0.1')"), "{}", d.stderr());
}

#[test]
fn the_right_password_works_a_wrong_one_is_refused_clearly_and_never_printed() {
    let (broker, dir) = password_broker(None);
    let obs = Observer::with_login(broker.port, "#", Some(("observer", "obs-pass-3")));
    let pwfile = write_file(dir.path(), "porch.pw", "porch-pass-1\n");
    let mut dev = device_dir(&format!(
        "[mqtt]\nport = {}\nhost = \"127.0.0.1\"\nusername = \"porch\"\npassword_file = {:?}\n",
        broker.port, pwfile
    ));
    dev.set_id("porch");
    let good = dev.spawn_with(&[]);
    obs.wait_on("porch/telemetry", 10 * S, |m| m.len() >= 2);
    drop(good);

    let mut bad = dev.spawn_with(&[("NIGHTLIGHT__MQTT__PASSWORD", "wrong-secret-99")]);
    bad.wait_stderr("wrong username or password", 10 * S);
    assert!(bad.is_running());
    let all = format!("{}{:?}", bad.stderr(), bad.stdout());
    assert!(!all.contains("wrong-secret-99") && !all.contains("porch-pass-1"), "a password was printed:\n{all}");
}

#[test]
fn under_the_readme_acl_device_and_controller_do_their_job_and_a_device_cannot_speak_for_another() {
    let acl = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/mosquitto.acl");
    let test_acl = tempfile::NamedTempFile::new().unwrap();
    // The README's ACL, plus a test observer allowed to read everything.
    std::fs::write(
        test_acl.path(),
        format!("{}\nuser observer\ntopic read #\n", std::fs::read_to_string(acl).unwrap()),
    )
    .unwrap();
    let (broker, dir) = password_broker(Some(test_acl.path().to_str().unwrap()));
    let obs = Observer::with_login(broker.port, "#", Some(("observer", "obs-pass-3")));
    let port = broker.port.to_string();
    let _ctl = Daemon::spawn(
        &["server"],
        &[
            ("NIGHTLIGHT_CONFIG", "/dev/null"),
            ("NIGHTLIGHT__MQTT__HOST", "127.0.0.1"),
            ("NIGHTLIGHT__MQTT__PORT", port.as_str()),
            ("NIGHTLIGHT__MQTT__USERNAME", "controller"),
            ("NIGHTLIGHT__MQTT__PASSWORD", "ctl-pass-2"),
            ("NIGHTLIGHT__SENSOR__KIND", "virtual"),
            ("NIGHTLIGHT__LED__KIND", "virtual"),
        ],
    );
    let pwfile = write_file(dir.path(), "porch.pw", "porch-pass-1");
    let mqtt =
        format!("[mqtt]\nport = {port}\nhost = \"127.0.0.1\"\nusername = \"porch\"\npassword_file = {:?}\n", pwfile);
    let mut dev = device_dir(&mqtt);
    dev.set_id("porch");
    let d = dev.spawn_with(&[]);
    // The whole job: telemetry, discovery, health, the controller's command (123 is dark), state.
    obs.wait_on("porch/telemetry", 10 * S, |m| m.len() >= 3);
    assert!(d.wait_stdout_lines(1, 10 * S)[0].starts_with("led on"), "the controller's command arrived");
    obs.wait_on("porch/state", 5 * S, |m| m.iter().any(|m| m.json()["led_on"] == true));
    obs.wait_on("porch/health", 5 * S, |m| !m.is_empty());
    obs.wait_on("homeassistant/device/porch/config", 5 * S, |m| !m.is_empty());

    // The porch's credentials with the garage's id: the broker drops everything it publishes.
    let mut spoof = device_dir(&mqtt);
    spoof.set_id("garage");
    let s =
        spoof.spawn_with(&[("NIGHTLIGHT__MQTT__CLIENT_ID", "spoofer"), ("RUST_LOG", "info,nightlight::device=trace")]);
    s.wait_stderr("connected", 10 * S);
    // Under MQTT 5 Mosquitto 2.0 answers a denied publish with "not authorized"; under 3.1.1 it
    // drops it silently (and acknowledges it): then the proof is that nothing arrives of ten
    // readings taken while connected.
    let taken = s.stderr().matches("reading taken").count();
    let refused_or_ten = || {
        let err = s.stderr();
        err.contains("the broker refused a reading") || err.matches("reading taken").count() >= taken + 10
    };
    wait_until(10 * S, refused_or_ten, "a refused reading, or ten taken");
    assert!(obs.on("garage/telemetry").is_empty(), "a device published into another device's topics");
    assert!(obs.on("garage/status").is_empty());

    // The controller announces itself under the ACL (the devices' local rule counts it).
    let status = obs.wait_on_prefix("nightlight/controller/", 5 * S, 1);
    assert_eq!(status[0].text(), "online");
    // Another device cannot change the porch's settings; the controller's user can.
    let interval = |obs: &Observer| obs.on("porch/config").last().map(|m| m.json()["sensor"]["interval_ms"].clone());
    obs.wait_on("porch/config", 5 * S, |m| !m.is_empty());
    assert_eq!(interval(&obs), Some(serde_json::json!(100)));
    let garage = Observer::with_login(broker.port, "garage/#", Some(("garage", "garage-pass-4")));
    garage.publish("porch/config/set", r#"{"sensor": {"interval_ms": 5000}}"#, false);
    // The garage's message was handled by the broker (acknowledged) before the controller's is
    // sent, so the porch would see it first: once the controller's change shows, it is decided.
    let admin = Observer::with_login(broker.port, "porch/config", Some(("controller", "ctl-pass-2")));
    admin.publish("porch/config/set", r#"{"sensor": {"interval_ms": 250}}"#, false);
    obs.wait_on("porch/config", 5 * S, |m| m.last().is_some_and(|m| m.json()["sensor"]["interval_ms"] == 250));
    let seen: Vec<serde_json::Value> =
        obs.on("porch/config").iter().map(|m| m.json()["sensor"]["interval_ms"].clone()).collect();
    assert!(!seen.contains(&serde_json::json!(5000)), "a device changed another's settings: {seen:?}");
    assert_eq!(d.stderr().matches("live configuration applied").count(), 1, "{}", d.stderr());
}

#[test]
fn a_missing_certificate_file_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_file(dir.path(), "d.toml", "[mqtt.tls]\nenabled = true\nca_file = \"/nonexistent/ca.pem\"\n");
    let (code, _, err) = run_to_end(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/ca.pem") && err.contains("mqtt.tls.ca_file"), "{err}");
    let cfg = write_file(dir.path(), "e.toml", "[mqtt.tls]\nenabled = true\ncert_file = \"/etc/hostname\"\n");
    let (code, _, err) = run_to_end(&["check", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("mqtt.tls.key_file"), "{err}");
}

#[test]
fn a_certificate_refused_while_the_clock_is_behind_names_the_clock_and_connects_once_it_is_synchronized() {
    let pki = Pki::new("ca");
    pki.issue("ca", "server", "DNS:localhost,IP:127.0.0.1", false);
    let (broker, tls_port) = tls_broker(&pki, "server", false);
    let obs = Observer::new(broker.port, "#");
    let dev = device_dir(&tls_toml(tls_port, "127.0.0.1", &format!("ca_file = {:?}\n", pki.path("ca.pem"))));
    // A Pi that booted on a clock a year behind, not synchronized: the certificate is "not valid
    // yet". The backoff is a minute, so only the clock's own news can bring the link up sooner.
    let seam = dev.queue().with_file_name("clock-seam");
    std::fs::write(&seam, format!("-{}", 365 * 24 * 3600 * 1000u64)).unwrap();
    let d = dev.spawn_with(&[
        ("NIGHTLIGHT_CLOCK_SEAM", seam.to_str().unwrap()),
        ("NIGHTLIGHT__MQTT__RECONNECT_MIN_MS", "60000"),
        ("NIGHTLIGHT__MQTT__RECONNECT_MAX_MS", "60000"),
    ]);
    d.wait_stderr("clock is not synchronized", 10 * S);
    assert!(d.stderr().contains("not valid yet"), "{}", d.stderr());
    assert!(obs.on(&dev.topic("telemetry")).is_empty(), "nothing goes out while the certificate is refused");
    // NTP answers: the clock is right and synchronized.
    std::fs::remove_file(&seam).unwrap();
    d.wait_stderr("the clock is synchronized: connecting again now", 10 * S);
    obs.wait_on(&dev.topic("telemetry"), 20 * S, |m| !m.is_empty());
}
