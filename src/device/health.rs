//! What the device says about itself on `<id>/health`: the counters its parts share, when the
//! run started, and the health message put together from them and the queue's figures.
//!
//! Rules:
//! - Counters only rise within a run; `last_error` is the last connection or sensor error.
//! - `started` is worked out from the wall clock at the first health message, and again once
//!   the clock is synchronized (a Pi boots on its last saved time): it never goes stale the way
//!   an uptime does between two messages.
//! - `queue_durable` is false while the queue is in memory or its `seq` is not durable.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::clock;
use crate::config::Protocol;
pub use crate::metrics::Counters;
use crate::payload::Health;
use crate::queue::QueueStats;

/// When the run started: by the monotonic clock, and by the wall clock as health reports it.
#[derive(Debug)]
pub(super) struct Started {
    at: Instant,
    /// Unix seconds, and whether the wall clock was synchronized when they were worked out.
    wall: Option<(u64, bool)>,
}

impl Started {
    pub fn new(at: Instant) -> Self {
        Started { at, wall: None }
    }

    /// The uptime at `now`, and the start in RFC 3339: worked out at the first call, and again
    /// once the wall clock (`(unix ms, synchronized)`) is synchronized.
    pub fn now(&mut self, now: Instant, (wall_ms, synced): (u64, bool)) -> (Duration, String) {
        let uptime = now.duration_since(self.at);
        if self.wall.is_none_or(|(_, was_synced)| synced && !was_synced) {
            self.wall = Some((wall_ms.saturating_sub(uptime.as_millis() as u64) / 1000, synced));
        }
        let (unix_s, _) = self.wall.expect("set above");
        (uptime, clock::rfc3339_utc(unix_s))
    }
}

/// The figures health takes from the device's other parts.
pub(super) struct Figures {
    pub queue: QueueStats,
    /// How long the oldest queued reading has waited (seconds, by its `ts`).
    pub oldest_age_s: u64,
    /// `queue.dir` is on storage, not in memory.
    pub queue_on_storage: bool,
    pub denied: u64,
    pub requests_limited: u64,
    pub mode: &'static str,
    pub protocol: Protocol,
}

/// The health message.
pub(super) fn health(c: &Counters, uptime: Duration, started: String, f: Figures) -> Health {
    let q = f.queue;
    Health {
        uptime_s: uptime.as_secs(),
        started: Some(started),
        queue_readings: q.readings,
        queue_bytes: q.bytes,
        dropped: q.dropped.total(),
        queue_errors: q.errors,
        seq_durable: q.seq_durable,
        queue_durable: f.queue_on_storage && q.seq_durable,
        sensor_errors: c.sensor_errors.load(Ordering::Relaxed),
        rejected_commands: c.rejected_total(),
        reconnects: c.reconnects_total(),
        queue_oldest_age_s: f.oldest_age_s,
        storage_written_bytes: q.written_bytes,
        storage_syncs: q.syncs,
        denied: f.denied,
        requests_limited: f.requests_limited,
        // A poisoned lock means a panic elsewhere, and panics abort this program.
        last_error: c.last_error.lock().expect("lock").clone(),
        mode: f.mode.into(),
        // What the link speaks: never `auto` (the link's protocol is 5 until it falls back).
        protocol: f.protocol.as_str().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: u64 = 3_600_000;

    #[test]
    fn the_start_is_worked_out_again_once_the_clock_is_synchronized_and_then_kept() {
        let t0 = Instant::now();
        let mut s = Started::new(t0);
        // Booted on a clock an hour behind: 2026-12-02T11:00:00Z instead of 12:00.
        let noon = 1_796_212_800_000;
        let (_, first) = s.now(t0, (noon - HOUR_MS, false));
        assert_eq!(first, "2026-12-02T11:00:00Z");
        let ten_s = Duration::from_secs(10);
        let (uptime, synced) = s.now(t0 + ten_s, (noon + 10_000, true));
        assert_eq!((uptime, synced.as_str()), (ten_s, "2026-12-02T12:00:00Z"));
        let (_, later) = s.now(t0 + ten_s * 2, (noon + 20_000 + 900, true));
        assert_eq!(later, "2026-12-02T12:00:00Z", "worked out once synchronized, then kept");
    }

    #[test]
    fn the_queue_counts_as_durable_only_on_storage_with_a_durable_seq() {
        let figures = |on_storage, seq_durable| Figures {
            queue: QueueStats { readings: 3, bytes: 96, seq_durable, ..QueueStats::default() },
            oldest_age_s: 0,
            queue_on_storage: on_storage,
            denied: 0,
            requests_limited: 0,
            mode: "remote",
            protocol: Protocol::V5,
        };
        let c = Counters::default();
        let h = |on, seq| health(&c, Duration::ZERO, String::new(), figures(on, seq)).queue_durable;
        assert!(h(true, true));
        assert!(!h(false, true), "in memory");
        assert!(!h(true, false), "seq from the wall clock");
    }
}
