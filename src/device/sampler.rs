//! The sampler task: reads the sensor every `sensor.interval_ms` and hands each reading, with
//! when it was taken, to the device loop.
//!
//! Its clock is a [`Ticker`]: a fixed-rate tick (a late tick delays the ones after it, never a
//! burst) that keeps the *next two* deadlines armed in tokio's timer. Re-arming the only timer
//! that is due makes tokio wake its own driver (an eventfd write and one more `epoll_wait` per
//! tick, measured with `strace`) because the new deadline is earlier than anything the driver
//! knows of; with the following deadline already armed, the new one is later than the driver's
//! next wake-up and costs no system call.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tracing::{info, warn};

use super::Counters;
use crate::clock;
use crate::sensor::{Reading, Sensor};

/// When a reading was taken: the wall clock, the monotonic clock, and whether the wall clock
/// was known to be synchronized.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamp {
    pub ts: u64,
    pub mono_ms: u64,
    pub synced: bool,
}

/// Reads the sensor every `interval` and hands readings to the device loop.
pub(super) async fn sample(
    mut sensor: Box<dyn Sensor>,
    mut interval: watch::Receiver<Duration>,
    readings_tx: mpsc::Sender<(Reading, Stamp)>,
    counters: Arc<Counters>,
) {
    let mut clock = clock::Reader::default();
    let mut tick = Ticker::new(Instant::now(), *interval.borrow_and_update());
    let mut failed_reads = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = interval.changed() => {
                if changed.is_ok() {
                    // A live change of sensor.interval_ms: the next reading comes one new interval on.
                    let d = *interval.borrow_and_update();
                    tick = Ticker::new(Instant::now() + d, d);
                }
                continue;
            }
        }
        let (ts, synced) = clock.now();
        let stamp = Stamp { ts, mono_ms: clock::monotonic_ms(), synced };
        let res = if sensor.blocks() {
            // Panics abort the process, so the blocking task always hands the sensor back.
            let (s, r) = tokio::task::spawn_blocking(move || {
                let r = sensor.read();
                (sensor, r)
            })
            .await
            .expect("sensor thread");
            sensor = s;
            r
        } else {
            sensor.read()
        };
        match res {
            Ok(reading) => {
                if failed_reads > 0 {
                    info!(failed_reads, "sensor recovered");
                    failed_reads = 0;
                }
                if readings_tx.send((reading, stamp)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                counters.sensor_errors.fetch_add(1, Ordering::Relaxed);
                counters.set_last_error(format!("sensor: {e}"));
                if failed_reads == 0 {
                    warn!(error = %e, "sensor read failed; skipping readings until it recovers");
                }
                failed_reads += 1;
            }
        }
    }
}

/// A tick every `period` from `first`; a tick that comes late (the task was busy for more than
/// a period) moves the ones after it, like `MissedTickBehavior::Delay`. Keeps two deadlines
/// armed; see the module doc for why.
pub struct Ticker {
    period: Duration,
    /// Fires first.
    next: Pin<Box<Sleep>>,
    /// One period after `next`.
    after: Pin<Box<Sleep>>,
}

impl Ticker {
    /// Ticks at `first`, `first + period`, ... (`period` at least 1 ms).
    pub fn new(first: Instant, period: Duration) -> Self {
        let period = period.max(Duration::from_millis(1));
        Ticker {
            period,
            next: Box::pin(tokio::time::sleep_until(first)),
            after: Box::pin(tokio::time::sleep_until(first + period)),
        }
    }

    /// Waits for the next tick and returns its deadline. Cancel-safe: nothing happens after the
    /// wait, so a tick is either taken whole or still due.
    pub async fn tick(&mut self) -> Instant {
        self.next.as_mut().await;
        let due = self.next.deadline();
        let now = Instant::now();
        std::mem::swap(&mut self.next, &mut self.after);
        if self.next.deadline() <= now {
            // Late by a period or more: the next tick is one period from now, not at once.
            self.next.as_mut().reset(now + self.period);
        }
        // Later than the armed `next`, so tokio's driver need not wake to learn of it.
        let following = self.next.deadline() + self.period;
        self.after.as_mut().reset(following);
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_millis(100);

    #[tokio::test(start_paused = true)]
    async fn ticks_come_one_period_apart_from_the_first() {
        let t0 = Instant::now();
        let mut t = Ticker::new(t0, P);
        for k in 0..5u32 {
            assert_eq!(t.tick().await, t0 + P * k);
            assert_eq!(Instant::now(), t0 + P * k, "tick {k} is not early or late");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_tick_delays_the_next_ones_instead_of_bursting() {
        let t0 = Instant::now();
        let mut t = Ticker::new(t0, P);
        t.tick().await;
        // Busy for three and a half periods (a slow sensor read, say).
        tokio::time::advance(P * 7 / 2).await;
        let late = Instant::now();
        assert_eq!(t.tick().await, t0 + P, "the missed tick is taken at once, once");
        assert_eq!(t.tick().await, late + P, "then one period from when it was taken");
        assert_eq!(Instant::now(), late + P);
        assert_eq!(t.tick().await, late + P * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tick_cancelled_while_waiting_is_still_due() {
        let t0 = Instant::now();
        let mut t = Ticker::new(t0 + P, P);
        let cut = tokio::time::timeout(P / 2, t.tick()).await;
        assert!(cut.is_err());
        assert_eq!(t.tick().await, t0 + P);
        assert_eq!(t.tick().await, t0 + P * 2);
    }
}
