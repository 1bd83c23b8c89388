//! What the device counts about itself, and the metrics an operator scrapes from it.
//!
//! ```text
//!  sampler, device loop ──increments──▶ Counters (atomics, histograms) ◀──read── scrape
//!  device loop, once a second ─────────▶ Snapshot (queue, clock, link)  ◀──read── (serve.rs)
//! ```
//! Rules:
//! - Counters only rise within a run; they are atomics the device loop and the sampler bump
//!   where the event happens: a reading, an acknowledgement, a rejected command, a reconnect.
//!   That is the whole cost per reading.
//! - What only the device loop knows (the queue's figures, the clock, the link) is copied into
//!   a [`Snapshot`] once a second, and only while metrics are on. The age of the oldest queued
//!   reading is worked out at the scrape, so it grows between two snapshots.
//! - Nothing here writes to storage: the endpoint answers from memory and the textfile is
//!   meant for `/run` (`nightlight check` warns when it is not in memory).
//! - Labels take a fixed set of values ([`Reject`], [`Lost`], the drop causes): a scrape is
//!   bounded whatever a broker or a peer sends.

mod serve;
pub mod text;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::link::Lost;
use crate::queue::QueueStats;
pub use serve::{start, textfile_warning};
use text::{Text, Value};

/// Why a command (or another message the device acts on) was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not a command: bad JSON, wrong fields, too large.
    Invalid,
    /// Retained, or older than `led.command_max_age_s`.
    Stale,
    /// Larger than the client reads: dropped with its session.
    Oversized,
    /// A live configuration change refused.
    Config,
    /// A request for a reading refused.
    Request,
}

impl Reject {
    pub const ALL: [Reject; 5] = [Reject::Invalid, Reject::Stale, Reject::Oversized, Reject::Config, Reject::Request];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Invalid => "invalid",
            Reject::Stale => "stale",
            Reject::Oversized => "oversized",
            Reject::Config => "config",
            Reject::Request => "request",
        }
    }
}

/// Counters shared by the device loop, the sampler and the metrics endpoint.
#[derive(Debug)]
pub struct Counters {
    pub sensor_errors: AtomicU64,
    /// Readings taken (every one is queued).
    pub readings: AtomicU64,
    /// Readings the broker acknowledged.
    pub acked: AtomicU64,
    rejected: [AtomicU64; Reject::ALL.len()],
    reconnects: [AtomicU64; Lost::ALL.len()],
    /// Reading taken (its `ts`) to PUBACK.
    pub delivery: Histogram,
    /// A command taken by the device loop to the LED switched.
    pub command_led: Histogram,
    /// The last connection or sensor error, for health.
    pub last_error: Mutex<Option<String>>,
    snapshot: Mutex<Option<Snapshot>>,
}

/// Delivery, from a few milliseconds on a LAN to a day-long outage.
const DELIVERY_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0, 3600.0, 86400.0];
/// Switching an LED: microseconds through the GPIO character device.
const COMMAND_BUCKETS: &[f64] = &[0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1];

impl Default for Counters {
    fn default() -> Self {
        Counters {
            sensor_errors: AtomicU64::new(0),
            readings: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            rejected: Default::default(),
            reconnects: Default::default(),
            delivery: Histogram::new(DELIVERY_BUCKETS),
            command_led: Histogram::new(COMMAND_BUCKETS),
            last_error: Mutex::new(None),
            snapshot: Mutex::new(None),
        }
    }
}

impl Counters {
    /// Counts a rejection; returns how many there were in all.
    pub fn reject(&self, why: Reject) -> u64 {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
        self.rejected_total()
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    /// Counts a connection that was up and ended.
    pub fn reconnected(&self, why: Lost) {
        self.reconnects[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn reconnects_total(&self) -> u64 {
        self.reconnects.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }

    pub fn set_last_error(&self, e: String) {
        // A poisoned lock means a panic elsewhere, and panics abort this program.
        *self.last_error.lock().expect("lock") = Some(e);
    }

    /// The device loop's figures, for the next scrapes.
    pub fn set_snapshot(&self, s: Snapshot) {
        *self.snapshot.lock().expect("lock") = Some(s);
    }

    /// Whether the device loop has given its figures yet.
    pub fn has_snapshot(&self) -> bool {
        self.snapshot.lock().expect("lock").is_some()
    }

    /// The exposition at wall-clock `wall_ms` (for the queue's age).
    pub fn render(&self, wall_ms: u64) -> String {
        let mut t = Text::default();
        let load = |n: &AtomicU64| Value::Int(n.load(Ordering::Relaxed));
        let snap = self.snapshot.lock().expect("lock").clone();
        if let Some(s) = &snap {
            t.family("nightlight_info", "gauge", "This nightlight: its version, this run's id and the MQTT protocol.");
            let run = s.run.to_string();
            t.sample(
                "nightlight_info",
                &[("version", crate::VERSION), ("run", &run), ("protocol", s.protocol)],
                Value::Int(1),
            );
            t.single(
                "nightlight_connected",
                "gauge",
                "1 while connected to the broker.",
                Value::Int(s.connected.into()),
            );
        }
        t.single("nightlight_readings_total", "counter", "Readings taken (each one queued).", load(&self.readings));
        t.single(
            "nightlight_readings_acked_total",
            "counter",
            "Readings the broker acknowledged (QoS 1 PUBACK).",
            load(&self.acked),
        );
        t.single("nightlight_sensor_errors_total", "counter", "Sensor reads that failed.", load(&self.sensor_errors));
        t.family(
            "nightlight_rejected_commands_total",
            "counter",
            "Messages the device refused to act on, by reason (invalid, stale, oversized, config, request).",
        );
        for r in Reject::ALL {
            t.sample("nightlight_rejected_commands_total", &[("reason", r.as_str())], load(&self.rejected[r as usize]));
        }
        t.family(
            "nightlight_reconnects_total",
            "counter",
            "Connections to the broker that were up and ended, by reason.",
        );
        for l in Lost::ALL {
            t.sample("nightlight_reconnects_total", &[("reason", l.as_str())], load(&self.reconnects[l as usize]));
        }
        self.delivery.render(
            &mut t,
            "nightlight_delivery_seconds",
            "Time from a reading taken to the broker's PUBACK.",
        );
        self.command_led.render(
            &mut t,
            "nightlight_command_led_seconds",
            "Time from a command taken by the device loop to the LED switched.",
        );
        if let Some(s) = &snap {
            s.render(&mut t, wall_ms);
        }
        t.finish()
    }
}

/// What only the device loop knows, copied once a second while metrics are on.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub run: u64,
    pub protocol: &'static str,
    pub connected: bool,
    pub queue: QueueStats,
    /// The `ts` (Unix ms) of the oldest reading not yet acknowledged.
    pub oldest_ts: Option<u64>,
    pub queue_durable: bool,
    /// Readings the broker refused (MQTT 5 reason codes).
    pub denied: u64,
    pub requests_limited: u64,
    pub clock_synced: bool,
    /// How far the clock moved when it was synchronized (ms; `None`: it has not been seen to).
    pub clock_jump_ms: Option<i64>,
}

impl Snapshot {
    fn render(&self, t: &mut Text, wall_ms: u64) {
        let q = &self.queue;
        let age = self.oldest_ts.map_or(0.0, |ts| wall_ms.saturating_sub(ts) as f64 / 1000.0);
        let (gauge, counter) = ("gauge", "counter");
        let one_each = [
            ("nightlight_queue_readings", gauge, "Readings queued, not yet acknowledged.", Value::Int(q.readings)),
            ("nightlight_queue_bytes", gauge, "Bytes of the queue's segment files.", Value::Int(q.bytes)),
            (
                "nightlight_queue_oldest_age_seconds",
                gauge,
                "Age of the oldest reading not yet acknowledged, by its timestamp (0 when none is queued).",
                Value::Float(age),
            ),
            (
                "nightlight_queue_durable",
                gauge,
                "1 when the queue is on storage with a durable seq; 0 when a power cut loses it.",
                Value::Int(self.queue_durable.into()),
            ),
            (
                "nightlight_queue_errors_total",
                counter,
                "Failed queue storage calls (full disk, I/O errors), each retried.",
                Value::Int(q.errors),
            ),
            (
                "nightlight_storage_written_bytes_total",
                counter,
                "Bytes the queue wrote to its storage in this run.",
                Value::Int(q.written_bytes),
            ),
            (
                "nightlight_storage_syncs_total",
                counter,
                "fdatasync and directory syncs the queue issued in this run.",
                Value::Int(q.syncs),
            ),
            (
                "nightlight_readings_denied_total",
                counter,
                "Readings the broker refused (they stay queued and are sent again).",
                Value::Int(self.denied),
            ),
            (
                "nightlight_requests_limited_total",
                counter,
                "Requests for a reading held back by sensor.min_request_ms.",
                Value::Int(self.requests_limited),
            ),
            (
                "nightlight_clock_synchronized",
                gauge,
                "1 when the wall clock is known to be synchronized (NTP).",
                Value::Int(self.clock_synced.into()),
            ),
            (
                "nightlight_clock_last_jump_seconds",
                gauge,
                "How far the wall clock moved when it was synchronized in this run (0 if it was from the start).",
                Value::Float(self.clock_jump_ms.unwrap_or(0) as f64 / 1000.0),
            ),
        ];
        for (name, kind, help, value) in one_each {
            t.single(name, kind, help, value);
        }
        t.family("nightlight_dropped_readings_total", counter, "Readings lost, by cause (cap, damage, memory, stop).");
        let d = q.dropped;
        for (cause, n) in [("cap", d.cap), ("damage", d.damage), ("memory", d.memory), ("stop", d.stop)] {
            t.sample("nightlight_dropped_readings_total", &[("cause", cause)], Value::Int(n));
        }
    }
}

/// A histogram with fixed buckets, in atomics.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), and one past the last bound.
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_us: AtomicU64::new(0) }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.iter().position(|b| s <= *b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, t: &mut Text, name: &str, help: &str) {
        t.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cum = 0;
        for (i, n) in self.counts.iter().enumerate() {
            cum += n.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or("+Inf".to_owned(), f64::to_string);
            t.sample(&bucket, &[("le", &le)], Value::Int(cum));
        }
        t.sample(&format!("{name}_sum"), &[], Value::Float(self.sum_us.load(Ordering::Relaxed) as f64 / 1e6));
        t.sample(&format!("{name}_count"), &[], Value::Int(cum));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    }

    #[test]
    fn a_histogram_s_buckets_are_cumulative_and_end_at_its_count() {
        let c = Counters::default();
        for ms in [3, 3, 40, 7_200_000] {
            c.delivery.observe(Duration::from_millis(ms));
        }
        let t = c.render(0);
        assert_eq!(
            line(&t, "nightlight_delivery_seconds_bucket{le=\"0.005\"}"),
            "nightlight_delivery_seconds_bucket{le=\"0.005\"} 2"
        );
        assert_eq!(
            line(&t, "nightlight_delivery_seconds_bucket{le=\"0.05\"}"),
            "nightlight_delivery_seconds_bucket{le=\"0.05\"} 3"
        );
        assert_eq!(
            line(&t, "nightlight_delivery_seconds_bucket{le=\"3600\"}"),
            "nightlight_delivery_seconds_bucket{le=\"3600\"} 3"
        );
        assert_eq!(
            line(&t, "nightlight_delivery_seconds_bucket{le=\"+Inf\"}"),
            "nightlight_delivery_seconds_bucket{le=\"+Inf\"} 4"
        );
        assert_eq!(line(&t, "nightlight_delivery_seconds_count"), "nightlight_delivery_seconds_count 4");
        assert_eq!(line(&t, "nightlight_delivery_seconds_sum"), "nightlight_delivery_seconds_sum 7200.046");
    }

    #[test]
    fn the_oldest_reading_ages_between_two_snapshots() {
        let c = Counters::default();
        c.set_snapshot(Snapshot { oldest_ts: Some(1_000_000), ..Snapshot::default() });
        let at = |wall| c.render(wall);
        assert!(at(1_000_500).contains("\nnightlight_queue_oldest_age_seconds 0.5\n"));
        assert!(at(1_090_000).contains("\nnightlight_queue_oldest_age_seconds 90\n"));
    }

    #[test]
    fn rejections_and_reconnects_are_counted_by_reason_and_in_all() {
        let c = Counters::default();
        c.reject(Reject::Stale);
        assert_eq!(c.reject(Reject::Config), 2);
        c.reconnected(Lost::KeepAlive);
        let t = c.render(0);
        assert!(t.contains("nightlight_rejected_commands_total{reason=\"stale\"} 1\n"));
        assert!(t.contains("nightlight_rejected_commands_total{reason=\"invalid\"} 0\n"));
        assert!(t.contains("nightlight_reconnects_total{reason=\"keepalive\"} 1\n"));
        assert_eq!(c.reconnects_total(), 1);
    }
}
