//! The sampler: reads the sensor every `sensor.interval_ms` and hands each reading, with when
//! it was taken, to the device loop, which polls it beside the link ([`Sampler::next`], cancel-
//! safe). It is a part of the loop's task, not a task of its own: a reading costs no hand-over
//! between tasks. A sensor that blocks (I2C) is read on tokio's blocking pool.
//!
//! Every reading is stamped with the wall clock the device was given; readings taken before that
//! clock was synchronized are marked and re-stamped when sent, once it is ([`clock::Restamp`],
//! kept here with the stamps it judges).
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

use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use super::health::Counters;
use crate::clock;
use crate::sensor::{Reading, Sensor, SensorError, SimulatedControl};

/// When a reading was taken, by the wall clock.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamp {
    pub ts: u64,
    /// The `ts` can be trusted (false: marked, re-stamped when sent if this run learns how).
    pub ts_ok: bool,
    /// Taken on request.
    pub requested: bool,
}

/// What a read on the blocking pool hands back: the sensor, and what it read.
type BlockingRead = (Box<dyn Sensor>, Result<Reading, SensorError>);

/// The sensor, its clock, and a read in flight on the blocking pool.
pub(super) struct Sampler {
    /// In hand unless a blocking read has it.
    sensor: Option<Box<dyn Sensor>>,
    /// A blocking read in flight, with when it was taken.
    reading: Option<(JoinHandle<BlockingRead>, Stamp)>,
    ticker: Ticker,
    clock: clock::Reader,
    failed_reads: u64,
    counters: Arc<Counters>,
    /// A reading on request is due at once.
    requested: bool,
    /// The virtual sensor's control, if it is one.
    simulated: Option<SimulatedControl>,
    /// Readings of this `run` taken before the clock was synchronized: marked, then re-stamped.
    restamp: clock::Restamp,
}

/// What [`Sampler::next`] hands over: a reading, or a read on request that failed (a failed
/// scheduled read is counted and skipped).
pub(super) struct Sample {
    pub result: Result<Reading, SensorError>,
    /// When it was taken, and whether on request ([`Sampler::request`]).
    pub stamp: Stamp,
}

impl Sampler {
    /// Reads `sensor` every `interval`, the first reading at once, stamped by `wall`.
    /// `simulated`: the virtual sensor's control, if it is one.
    pub fn new(
        sensor: Box<dyn Sensor>,
        simulated: Option<SimulatedControl>,
        interval: Duration,
        counters: Arc<Counters>,
        wall: clock::Wall,
        run: u64,
    ) -> Self {
        Sampler {
            restamp: clock::Restamp::new(run),
            sensor: Some(sensor),
            reading: None,
            ticker: Ticker::new(Instant::now(), interval),
            clock: clock::Reader::new(wall),
            failed_reads: 0,
            counters,
            requested: false,
            simulated,
        }
    }

    /// A queued reading as it is to be sent: re-stamped if it was marked and the clock's error
    /// is now known ([`clock::Restamp::apply`]).
    pub fn restamped(&self, rec: crate::payload::Telemetry) -> crate::payload::Telemetry {
        self.restamp.apply(rec)
    }

    /// How far the wall clock jumped when it was synchronized, if it did in this run.
    pub fn clock_jump_ms(&self) -> Option<i64> {
        self.restamp.shift()
    }

    /// The virtual sensor's control, if it is one: `<id>/virtual/light` sets its light, and the
    /// demo's page reads the queue's length through it.
    pub fn simulated(&self) -> Option<&SimulatedControl> {
        self.simulated.as_ref()
    }

    /// A live change of `sensor.interval_ms`: the next reading comes one new interval on.
    pub fn set_interval(&mut self, interval: Duration) {
        self.ticker = Ticker::new(Instant::now() + interval, interval);
    }

    /// A reading now, outside the interval; the next scheduled one keeps its time. (A read
    /// already in flight finishes first: the requested one starts right after it.)
    pub fn request(&mut self) {
        self.requested = true;
    }

    /// The next reading. Failed reads are counted; a failed scheduled one is skipped, a failed
    /// one on request is handed over (someone waits for its answer). Cancel-safe: a tick is
    /// taken whole, and a blocking read in flight is kept for the next call.
    pub async fn next(&mut self) -> Sample {
        loop {
            let (result, stamp) = match self.reading.as_mut() {
                Some((handle, stamp)) => {
                    let stamp = *stamp;
                    // Panics abort the process, so the blocking task always hands the sensor back.
                    let (sensor, result) = handle.await.expect("sensor thread");
                    self.reading = None;
                    self.sensor = Some(sensor);
                    (result, stamp)
                }
                None => {
                    let requested = std::mem::take(&mut self.requested);
                    if !requested {
                        self.ticker.tick().await;
                    }
                    let (ts, synced) = self.clock.now();
                    let mono_ms = clock::monotonic_ms();
                    let ts_ok = self.restamp.observe(ts, mono_ms, synced);
                    let stamp = Stamp { ts, ts_ok, requested };
                    let mut sensor = self.sensor.take().expect("the sensor is in hand between reads");
                    if sensor.blocks() {
                        let handle = tokio::task::spawn_blocking(move || {
                            let r = sensor.read();
                            (sensor, r)
                        });
                        self.reading = Some((handle, stamp));
                        continue;
                    }
                    let result = sensor.read();
                    self.sensor = Some(sensor);
                    (result, stamp)
                }
            };
            let result = self.judge(result);
            if result.is_ok() || stamp.requested {
                return Sample { result, stamp };
            }
        }
    }

    /// Counts and logs a failed read.
    fn judge(&mut self, result: Result<Reading, SensorError>) -> Result<Reading, SensorError> {
        match result {
            Ok(reading) => {
                if self.failed_reads > 0 {
                    info!(failed_reads = self.failed_reads, "sensor recovered");
                    self.failed_reads = 0;
                }
                Ok(reading)
            }
            Err(e) => {
                self.counters.sensor_errors.fetch_add(1, Ordering::Relaxed);
                self.counters.set_last_error(format!("sensor: {e}"));
                if self.failed_reads == 0 {
                    warn!(error = %e, "sensor read failed; skipping readings until it recovers");
                } else {
                    debug!(failed_reads = self.failed_reads + 1, "sensor still failing");
                }
                self.failed_reads += 1;
                Err(e)
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

    /// A chip on a bus: each read takes 30 ms on its thread; every third one fails.
    struct SlowChip(u16);

    impl Sensor for SlowChip {
        fn read(&mut self) -> Result<Reading, SensorError> {
            std::thread::sleep(Duration::from_millis(30));
            self.0 += 1;
            if self.0 % 3 == 0 {
                return Err(SensorError::Timeout);
            }
            Ok(Reading { light: self.0, lux: None })
        }
    }

    #[tokio::test]
    async fn a_blocking_read_cut_short_by_the_loop_is_kept_and_failed_reads_are_counted() {
        let counters = Arc::new(Counters::default());
        let mut s = Sampler::new(
            Box::new(SlowChip(0)),
            None,
            Duration::from_millis(10),
            counters.clone(),
            clock::Wall::System,
            1,
        );
        // The loop has something else to do 5 ms into each read, every time.
        let mut lights = Vec::new();
        while lights.len() < 4 {
            if let Ok(Sample { result: Ok(r), .. }) = tokio::time::timeout(Duration::from_millis(5), s.next()).await {
                lights.push(r.light);
            }
        }
        assert_eq!(lights, [1, 2, 4, 5], "no reading lost to a cut, none twice; 3 failed");
        assert_eq!(counters.sensor_errors.load(Ordering::Relaxed), 1);
    }

    /// A sensor read at once (no bus): 1, 2, 3, ...; fails while `fail` is set.
    struct Counting(u16, bool);

    impl Sensor for Counting {
        fn read(&mut self) -> Result<Reading, SensorError> {
            if self.1 {
                return Err(SensorError::Simulated);
            }
            self.0 += 1;
            Ok(Reading { light: self.0, lux: None })
        }

        fn blocks(&self) -> bool {
            false
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reading_on_request_comes_at_once_and_the_next_scheduled_one_keeps_its_time() {
        let t0 = Instant::now();
        let mut s =
            Sampler::new(Box::new(Counting(0, false)), None, P, Arc::new(Counters::default()), clock::Wall::System, 1);
        assert!(!s.next().await.stamp.requested, "the first reading, at once");
        tokio::time::advance(P / 2).await;
        s.request();
        let asked = s.next().await;
        assert!(asked.stamp.requested);
        assert_eq!(Instant::now(), t0 + P / 2, "taken at once, not at the next tick");
        let next = s.next().await;
        assert!(!next.stamp.requested);
        assert_eq!(Instant::now(), t0 + P, "the schedule did not move");
        assert_eq!(next.result.unwrap().light, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_read_on_request_is_handed_over_a_failed_scheduled_one_is_skipped() {
        let counters = Arc::new(Counters::default());
        let mut s = Sampler::new(Box::new(Counting(0, true)), None, P, counters.clone(), clock::Wall::System, 1);
        s.request();
        let asked = s.next().await;
        assert!(asked.stamp.requested && asked.result.is_err(), "someone waits for the answer");
        let skipped = tokio::time::timeout(P * 3, s.next()).await;
        assert!(skipped.is_err(), "failed scheduled reads are not handed over");
        assert!(counters.sensor_errors.load(Ordering::Relaxed) >= 3, "every failure counted");
    }

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
