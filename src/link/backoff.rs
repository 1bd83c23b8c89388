//! Exponential backoff with jitter, for reconnecting and for retrying a refused publish.

use std::time::Duration;

/// Exponential backoff with jitter between a minimum and a maximum delay.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `min` and never waiting longer than `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max: max.max(min), attempt: 0 }
    }

    /// The delay before the next attempt: uniformly random in the upper half of
    /// `min * 2^attempt` (capped at `max`), never below `min`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.min.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        let jitter = Duration::from_nanos(fastrand::u64(0..=half.as_nanos() as u64));
        (half + jitter).max(self.min)
    }

    /// Back to the shortest delay, after an attempt that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_maximum_and_stays_within_bounds() {
        let (min, max) = (Duration::from_millis(250), Duration::from_millis(30_000));
        let mut b = Backoff::new(min, max);
        let delays: Vec<Duration> = (0..30).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= min && *d <= max), "{delays:?}");
        assert!(delays[0] <= Duration::from_millis(250));
        assert!(delays[29] >= max / 2, "reaches the cap: {delays:?}");
        b.reset();
        assert!(b.next_delay() <= min);
    }

    #[test]
    fn backoff_is_jittered() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
            b.next_delay();
            b.next_delay();
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 1, "twenty devices reconnecting at the same instant: {seen:?}");
    }
}
