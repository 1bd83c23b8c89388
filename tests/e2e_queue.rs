//! End to end: the offline queue of the real binary through outages, `kill -9`, a torn write and
//! a full disk, against a real Mosquitto.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nightlight::DiskQueue;

/// One reading's frame on disk (`src/queue/frame.rs`): 5 bytes of header, a 27-byte body.
const FRAME: u64 = 32;

#[test]
fn kill_9_while_offline_loses_nothing_that_reached_the_disk() {
    let mut broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 50, "");
    broker.stop();
    // Each run is killed once it has stored some readings: every one of them must arrive.
    let mut d = dev.spawn();
    wait_readings_on_disk(&dev.queue(), 25, 20 * S);
    d.kill9();
    let first = readings_on_disk(&dev.queue());
    let mut d = dev.spawn();
    wait_readings_on_disk(&dev.queue(), first + 10, 20 * S);
    d.kill9();
    let second = readings_on_disk(&dev.queue()) - first;
    broker.restart();
    let obs = Observer::new(broker.port, &dev.topic("telemetry"));
    let d = dev.spawn();
    let topic = dev.topic("telemetry");
    obs.wait_on(&topic, 20 * S, |_| obs.runs(&topic).values().nth(2).is_some_and(|r| r.len() >= 5));
    let runs: Vec<Vec<u64>> = obs.runs(&topic).into_values().collect();
    let (run1, run2) = (&runs[0], &runs[1]);
    assert_contiguous(run1);
    assert_contiguous(run2);
    // Written at push: a kill -9 loses none of what was on disk.
    assert_eq!(run1.len() as u64, first, "the first run's readings on disk, all delivered: {run1:?}");
    assert_eq!(run2.len() as u64, second, "the second run's readings on disk, all delivered: {run2:?}");
    assert!(run2[0] > *run1.last().unwrap(), "seq is never reused after a crash");
    drop(d);
}

fn obs_seqs(m: &[Msg]) -> Vec<u64> {
    m.iter().filter_map(|m| m.json()["seq"].as_u64()).collect()
}

#[test]
fn kill_9_while_draining_a_backlog_then_restart_delivers_all_of_it_in_order() {
    const BACKLOG: u64 = 30_000;
    let broker = Mosquitto::start("max_queued_messages 0\nmax_inflight_messages 0");
    let dev = DeviceDir::new(broker.port, 1000, "");
    let backlog: BTreeSet<u64> = {
        let mut q = DiskQueue::open(&dev.queue(), 64 << 20, Duration::from_secs(1)).unwrap();
        let seqs =
            (0..BACKLOG).map(|i| q.push(Instant::now(), (i % 1000) as u16, 1_700_000_000_000 + i, None)).collect();
        q.close(Instant::now()).unwrap();
        seqs
    };
    let first_seq = *backlog.first().unwrap();
    let obs = Observer::new(broker.port, &dev.topic("telemetry"));
    let mut d = dev.spawn();
    obs.wait_on(&dev.topic("telemetry"), 20 * S, |m| m.len() >= 3000);
    d.kill9();
    let seen_at_kill = obs.on(&dev.topic("telemetry")).len();
    let _d = dev.spawn();
    obs.wait_on(&dev.topic("telemetry"), 60 * S, |m| {
        let s: BTreeSet<u64> = obs_seqs(m).into_iter().collect();
        backlog.iter().all(|x| s.contains(x))
    });
    let arrivals = obs.seqs(&dev.topic("telemetry"));
    let drained: Vec<u64> = arrivals.iter().copied().filter(|s| backlog.contains(s)).collect();
    let descents = drained.windows(2).filter(|w| w[1] <= w[0]).count();
    assert!(descents <= 1, "in order within each connection (one restart): {descents} descents");
    assert!(seen_at_kill < BACKLOG as usize, "the kill came before the drain finished");
    // Readings carry the time they were taken, not the time they were sent.
    let first = obs.on(&dev.topic("telemetry"))[0].json();
    assert_eq!(first["ts"], 1_700_000_000_000u64 + first["seq"].as_u64().unwrap() - first_seq);
}

#[test]
fn a_power_cut_that_tears_the_last_record_loses_only_that_record() {
    let mut broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 50, "");
    broker.stop();
    let mut d = dev.spawn();
    wait_readings_on_disk(&dev.queue(), 12, 20 * S);
    d.kill9();
    let segs = segments(&dev.queue());
    assert_eq!(segs.len(), 1);
    let len = std::fs::metadata(&segs[0]).unwrap().len();
    let records = len / FRAME;
    assert!(records >= 10 && len % FRAME == 0, "{len} bytes");
    let cut = 1 + fastrand::u64(0..FRAME - 1);
    std::fs::OpenOptions::new().write(true).open(&segs[0]).unwrap().set_len(len - cut).unwrap();
    broker.restart();
    let obs = Observer::new(broker.port, &dev.topic("telemetry"));
    let d = dev.spawn();
    let topic = dev.topic("telemetry");
    obs.wait_on(&topic, 20 * S, |_| obs.runs(&topic).len() >= 2);
    let run1 = obs.runs(&topic).into_values().next().unwrap();
    assert_contiguous(&run1);
    assert_eq!(run1.len() as u64, records - 1, "every record but the torn one (cut {cut} bytes of {len}): {run1:?}");
    d.wait_stderr("torn record", 5 * S);
}

/// A 64 KiB tmpfs as the queue's disk, so the test can fill it. Needs root (CI runs as root).
struct TinyDisk(tempfile::TempDir);

impl TinyDisk {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mounting a tmpfs failed: this test fills a disk and needs root (scripts/test.sh runs as root in CI)"
        );
        TinyDisk(dir)
    }
}

impl TinyDisk {
    /// Starts `dev`'s device with its queue on this disk (and `env` besides).
    fn spawn(&self, dev: &DeviceDir, env: &[(&str, &str)]) -> Daemon {
        let queue = self.0.path().join("queue");
        let mut all = vec![("NIGHTLIGHT__QUEUE__DIR", queue.to_str().unwrap())];
        all.extend_from_slice(env);
        dev.spawn_with(&all)
    }

    /// Fills the disk to the last byte; returns the file that does it.
    fn fill(&self) -> PathBuf {
        let filler = self.0.path().join("filler");
        let _ = Command::new("dd").arg("if=/dev/zero").arg(format!("of={}", filler.display())).arg("bs=1k").status();
        filler
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_disk_is_survived_and_nothing_is_lost_once_there_is_room() {
    let disk = TinyDisk::mount();
    let mut broker = Mosquitto::start("persistence true");
    let dev = DeviceDir::new(broker.port, 50, "");
    let obs = Observer::persistent(broker.port, &dev.topic("telemetry"));
    broker.stop();
    let d = disk.spawn(&dev, &[("RUST_LOG", "info,nightlight::device=trace")]);
    wait_readings_on_disk(&disk.0.path().join("queue"), 3, 10 * S);
    let filler = disk.fill();
    d.wait_stderr("cannot write to disk", 10 * S);
    // Readings taken while the disk is full wait in memory.
    let taken = d.stderr().matches("reading taken").count();
    d.wait_stderr_count("reading taken", taken + 10, 10 * S);
    std::fs::remove_file(&filler).unwrap();
    d.wait_stderr("writing to disk again", 10 * S);
    broker.restart();
    obs.wait_on(&dev.topic("telemetry"), 20 * S, |m| m.len() >= 50);
    let runs = obs.runs(&dev.topic("telemetry"));
    assert_eq!(runs.len(), 1, "{runs:?}");
    let (run, seqs) = runs.iter().next().unwrap();
    assert_eq!(seqs[0], *run, "the run's first reading (taken before the disk filled) arrived");
    assert_contiguous(seqs);
    assert_eq!(d.stderr().matches("cannot write to disk").count(), 1, "said once:\n{}", d.stderr());
}

#[test]
fn a_second_device_on_the_same_queue_directory_exits_1_naming_it() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 200, "");
    let mut first = dev.spawn();
    first.wait_stderr("nightlight started", 10 * S);
    let mut second = dev.spawn();
    let status = second.wait_exit(10 * S).expect("a second device on the same queue directory kept running");
    second.wait_stderr("in use", 5 * S);
    let err = second.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(dev.queue().to_str().unwrap()) && err.contains("in use"), "{err}");
    assert!(first.is_running(), "the first device goes on");
}

#[test]
fn a_clean_stop_that_cannot_write_its_readings_exits_1_and_says_how_many() {
    let disk = TinyDisk::mount();
    let mut broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 50, "");
    broker.stop();
    let mut d = disk.spawn(&dev, &[("RUST_LOG", "info,nightlight::device=trace")]);
    d.wait_stderr("nightlight started", 10 * S);
    // Readings now wait in memory.
    disk.fill();
    d.wait_stderr("cannot write to disk", 10 * S);
    let taken = d.stderr().matches("reading taken").count();
    d.wait_stderr_count("reading taken", taken + 10, 10 * S);
    let (status, _) = d.stop_with(libc::SIGTERM, 10 * S);
    assert_eq!(status.code(), Some(1), "{}", d.stderr());
    let err = d.stderr();
    assert!(err.contains("readings could not be written") && err.contains("are lost"), "{err}");
    assert!(!err.contains("stopped queued"), "the stop line must not claim they are queued: {err}");
}

#[test]
fn the_watchdog_is_fed_while_the_disk_refuses_every_write() {
    let disk = TinyDisk::mount();
    let mut broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 10, "");
    broker.stop();
    let sock_dir = tempfile::tempdir().unwrap();
    let path = sock_dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    // Read the notifications as systemd does, at once (a full socket would block the sender).
    let feeds = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let sink = feeds.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                sink.lock().unwrap().push(Instant::now());
            }
        }
    });
    let d = disk.spawn(&dev, &[("NOTIFY_SOCKET", path.to_str().unwrap()), ("WATCHDOG_USEC", "200000")]);
    d.wait_stderr("nightlight started", 10 * S);
    disk.fill();
    d.wait_stderr("cannot write to disk", 10 * S);
    // A disk that refuses every write, readings every 10 ms: the watchdog is fed every 100 ms
    // all the same (a device spinning on its spill deadline would send none) ...
    let (start, cpu0) = (Instant::now(), d.cpu_s());
    let fed_since = || feeds.lock().unwrap().iter().filter(|t| **t >= start).count();
    wait_until(20 * S, || fed_since() >= 20, "20 watchdog feeds on a failing disk");
    let (cpu, wall) = (d.cpu_s() - cpu0, start.elapsed().as_secs_f64());
    let mut gaps: Vec<Duration> = feeds.lock().unwrap().windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let median = gaps[gaps.len() / 2];
    assert!(median < Duration::from_millis(200), "fed every {median:?} (the watchdog wants 200 ms)");
    // ... and waits between retries: a loop that spins on a past deadline burns a whole core.
    assert!(cpu < wall / 4.0, "{cpu:.2} CPU-s in {wall:.2} s on a failing disk: a busy loop:\n{}", d.stderr());
}

/// The retained health of `dev` once it satisfies `done`.
fn health_where(broker: &Mosquitto, dev: &DeviceDir, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let obs = Observer::new(broker.port, &dev.topic("health"));
    obs.wait_on(&dev.topic("health"), 10 * S, |m| m.last().is_some_and(|m| done(&m.json()))).last().unwrap().json()
}

#[test]
fn a_state_directory_that_cannot_be_used_at_all_still_lets_the_nightlight_run_on_memory_and_says_so() {
    let broker = Mosquitto::start("");
    let mut dev = DeviceDir::new(broker.port, 100, "");
    // What a failing card can look like: the path is there, but no directory can be made in it.
    let blocker = dev.dir.path().join("not-a-dir");
    std::fs::write(&blocker, "").unwrap();
    let text = std::fs::read_to_string(dev.config()).unwrap();
    let q = dev.queue();
    std::fs::write(dev.config(), text.replace(q.to_str().unwrap(), blocker.join("queue").to_str().unwrap())).unwrap();
    dev.set_id("unusable");
    let obs = Observer::new(broker.port, &dev.topic("telemetry"));
    // With a synchronized clock, which keeps seq unique with nothing on disk (below).
    let d = dev.spawn_with(&[("NIGHTLIGHT_CLOCK_SYNCED", "1")]);
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= 3);
    let h = health_where(&broker, &dev, |h| h["queue_durable"] == false);
    assert_eq!(h["seq_durable"], false, "{h}");
    assert!(h["queue_errors"].as_u64().unwrap() >= 1, "counted: {h}");
    assert!(d.stderr().contains("not-a-dir"), "names the directory: {}", d.stderr());
    assert_contiguous(&obs.seqs(&dev.topic("telemetry")));
}

#[test]
fn bad_entries_in_the_state_directory_are_skipped_never_followed_and_never_stop_the_start() {
    let broker = Mosquitto::start("");
    let dev = DeviceDir::new(broker.port, 100, "");
    let q = dev.queue();
    std::fs::create_dir_all(&q).unwrap();
    // Another user's file, which a planted symlink points at.
    let victim = dev.dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, q.join("00000000000000000001.seg")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", q.join("led")).unwrap();
    let fifo = std::ffi::CString::new(q.join("config.json").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::fs::create_dir(q.join("meta")).unwrap(); // not a file at all
    let run = |synced: &str| dev.spawn_with(&[("NIGHTLIGHT_CLOCK_SYNCED", synced)]);
    // Without the meta file's last run and seq, only a synchronized clock keeps them from
    // repeating an earlier run's: until NTP answers, the start fails (and systemd retries).
    let mut early = run("0");
    assert_eq!(early.wait_exit(10 * S).and_then(|s| s.code()), Some(1));
    assert!(early.stderr().contains("clock is not synchronized"), "{}", early.stderr());
    let obs = Observer::new(broker.port, &dev.topic("telemetry"));
    let mut d = run("1");
    obs.wait_on(&dev.topic("telemetry"), 10 * S, |m| m.len() >= 3);
    let h = health_where(&broker, &dev, |h| h["queue_errors"].as_u64().is_some_and(|n| n >= 1));
    assert_eq!(h["seq_durable"], false, "no meta can be written over a directory: {h}");
    assert_eq!(d.stop_with(libc::SIGTERM, 5 * S).0.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "the symlink was followed");
}
