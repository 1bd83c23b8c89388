//! Offline-queue figures for the README (not a test: it asserts nothing and prints a table).
//!
//! `cargo bench --no-default-features --features virtual --bench queue [-- BACKLOG]`
//!
//! Measures, in `target/queue-bench` (on the same disk as the checkout): append throughput with
//! the default sync policy, bytes on disk per reading, bytes written to the block layer per day
//! online and offline (from `/proc/self/io` `write_bytes`), reopen time and RSS with a large
//! backlog, and, with the release binary and a private mosquitto, the drain rate at QoS 1 and
//! how fast a command switches the LED while that backlog drains.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nightlight::led::monotonic_ns;
use nightlight::DiskQueue;

const DAY_AT_5S: u64 = 86_400 / 5;

fn write_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn status_kib(pid: &str, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes of the queue's files, without the spare (a fixed 1 MiB kept for a clean stop on a
/// full disk, not a cost per reading).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name() != "spare")
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn fresh(dir: &Path) -> DiskQueue {
    let _ = std::fs::remove_dir_all(dir);
    DiskQueue::open(dir, 1 << 30, Duration::from_millis(1000)).unwrap()
}

/// Pushes `n` readings offline as fast as possible (each written at push), ticking whenever the
/// queue asks (a sync at most every 100 ms), and returns readings per second.
fn append(dir: &Path, n: u64) -> f64 {
    let mut q = fresh(dir);
    let start = Instant::now();
    for i in 0..n {
        let now = Instant::now();
        q.push(now, (i % 1000) as u16, 1_700_000_000_000 + i, None);
        if q.next_deadline().is_some_and(|d| d <= now) {
            q.tick(now);
        }
    }
    q.close(Instant::now()).unwrap();
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--reopen") {
        // Child: open the backlog and report the time and memory it took.
        let start = Instant::now();
        let q = DiskQueue::open(Path::new(&args[2]), 1 << 30, Duration::from_secs(1)).unwrap();
        let took = start.elapsed();
        println!("{} {} {}", took.as_micros(), q.stats().readings, status_kib("self", "VmHWM:"));
        return;
    }
    let backlog: u64 = args.iter().skip(1).find_map(|a| a.parse().ok()).unwrap_or(1_000_000);
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("queue-bench");
    std::fs::create_dir_all(&root).unwrap();
    let dir = root.join("q");
    let mut rows: Vec<(String, String)> = Vec::new();

    // Append throughput and bytes per reading.
    let rate = append(&dir, backlog);
    rows.push(("append offline, written at push, synced every 100 ms".into(), format!("{rate:.0} readings/s")));
    let per = dir_bytes(&dir) as f64 / backlog as f64;
    rows.push(("bytes on disk per reading (incl. meta)".into(), format!("{per:.1} B")));

    // Reopen in a fresh process: time, readings found, peak RSS.
    let out = Command::new(&args[0]).arg("--reopen").arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<u64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if f.len() == 3 {
        rows.push((format!("reopen with {} readings on disk", f[1]), format!("{:.0} ms", f[0] as f64 / 1000.0)));
        rows.push(("peak RSS of a process that reopened it".into(), format!("{:.1} MiB", f[2] as f64 / 1024.0)));
    }

    // Online at the default interval: every reading acknowledged within spill_ms.
    let mut q = fresh(&root.join("online"));
    q.connected();
    let w0 = write_bytes();
    for i in 0..DAY_AT_5S {
        let seq = q.push(Instant::now(), (i % 1000) as u16, i, None);
        q.peek_unsent();
        q.mark_sent();
        q.ack(seq);
        q.tick(Instant::now());
    }
    let online = write_bytes() - w0;
    rows.push(("written per day online at 5 s (17,280 readings)".into(), format!("{:.1} KiB", online as f64 / 1024.0)));

    // Offline at the default interval: every reading is its own synced batch (5 s apart).
    let mut q = fresh(&root.join("offline"));
    let sample = 1000;
    let w0 = write_bytes();
    for i in 0..sample {
        let now = Instant::now();
        q.push(now, (i % 1000) as u16, i, None);
        q.tick(now + Duration::from_millis(100));
    }
    let per_hour = 720.0;
    let offline = (write_bytes() - w0) as f64 * per_hour / sample as f64;
    rows.push((
        "written per hour offline at 5 s (720 readings, each synced within 100 ms)".into(),
        format!("{:.1} MiB ({:.0} KiB of records)", offline / 1048576.0, per_hour * 32.0 / 1024.0),
    ));

    // Drain to a local mosquitto at QoS 1, and commands during the drain.
    if let Some((drain, rss, lat)) = drain(&root, &dir, backlog) {
        rows.push((format!("drain of {backlog} readings to local mosquitto, QoS 1"), format!("{drain:.0} readings/s")));
        rows.push(("device peak RSS while draining".into(), format!("{:.1} MiB", rss as f64 / 1024.0)));
        rows.push(("command -> LED during the drain, p50 / max of 20".into(), lat));
    }

    println!("\n| queue figure | value |\n| --- | --- |");
    for (k, v) in rows {
        println!("| {k} | {v} |");
    }
}

fn drain(root: &Path, backlog_dir: &Path, n: u64) -> Option<(f64, u64, String)> {
    let mosquitto = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"].into_iter().find(|p| Path::new(p).exists())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let conf = root.join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")).ok()?;
    let mut broker = Command::new(mosquitto).arg("-c").arg(&conf).stderr(Stdio::null()).spawn().ok()?;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = Instant::now();
    let mut dev = Command::new(env!("CARGO_BIN_EXE_nightlight"))
        .arg("run")
        .env("NIGHTLIGHT__ID", "bench")
        .env("NIGHTLIGHT__MQTT__HOST", "127.0.0.1")
        .env("NIGHTLIGHT__MQTT__PORT", port.to_string())
        .env("NIGHTLIGHT__SENSOR__KIND", "virtual")
        .env("NIGHTLIGHT__LED__KIND", "virtual")
        .env("NIGHTLIGHT__SENSOR__INTERVAL_MS", "5000")
        .env("NIGHTLIGHT__QUEUE__DIR", backlog_dir)
        .env("NIGHTLIGHT_CONFIG", "/dev/null")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let pid = dev.id().to_string();
    let stamps = Arc::new(Mutex::new(Vec::new()));
    let sink = stamps.clone();
    let stdout = dev.stdout.take()?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(ns) = line.split(' ').nth(2).and_then(|v| v.parse::<u64>().ok()) {
                sink.lock().unwrap().push(ns);
            }
        }
    });
    // Commands while draining: publish with mosquitto_pub, stamp just before it starts.
    let mut latencies = Vec::new();
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..20 {
        if dir_has_segments(backlog_dir) {
            let before = stamps.lock().unwrap().len();
            let payload = if i % 2 == 0 { r#"{"led_on":true}"# } else { r#"{"led_on":false}"# };
            let sent = monotonic_ns();
            let _ = Command::new("mosquitto_pub")
                .args(["-p", &port.to_string(), "-q", "1", "-t", "bench/commands", "-m", payload])
                .status();
            let deadline = Instant::now() + Duration::from_secs(2);
            while stamps.lock().unwrap().len() == before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Some(at) = stamps.lock().unwrap().get(before) {
                latencies.push(at.saturating_sub(sent));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    while dir_has_segments(backlog_dir) && start.elapsed() < Duration::from_secs(600) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = start.elapsed().as_secs_f64();
    let rss = status_kib(&pid, "VmHWM:");
    let _ = dev.kill();
    let _ = broker.kill();
    latencies.sort_unstable();
    let lat = if latencies.is_empty() {
        "drain finished before a command was sent".to_string()
    } else {
        format!(
            "{:.1} / {:.1} ms (incl. starting mosquitto_pub)",
            latencies[latencies.len() / 2] as f64 / 1e6,
            *latencies.last().unwrap() as f64 / 1e6
        )
    };
    Some((n as f64 / took, rss, lat))
}

fn dir_has_segments(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).any(|e| e.path().extension().is_some_and(|x| x == "seg")))
        .unwrap_or(false)
}
