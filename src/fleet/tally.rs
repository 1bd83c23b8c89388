//! What the fleet counts, and how lost and duplicated readings are told apart (pure).
//!
//! Rules:
//! - A device numbers its readings `seq` 1, 2, 3, ... in this run; it sends them oldest first and,
//!   after a reconnect, again from the oldest one not acknowledged. So what the observer sees of
//!   one device is in order but for those resends.
//! - **Duplicated**: a `seq` the observer had already seen (a resend of a reading the broker took
//!   before the connection dropped: QoS 1's at-least-once, allowed by the device contract).
//! - **Lost**: a reading the device let go of (a PUBACK took it off the device's queue) that the
//!   observer never saw. A reading still queued or in flight at the end is not lost: the device
//!   still holds it. One the queue's cap dropped is counted as dropped, not lost.
//! - Per device the observer keeps everything below the first gap as one number and only the
//!   seqs above it as a list, which is empty but for resends in flight.

/// What the observer saw of one device's readings.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Every seq below this was seen.
    below: u64,
    /// Seqs seen above `below`, sorted.
    above: Vec<u64>,
    /// Seen more than once.
    pub duplicated: u64,
}

impl Seen {
    /// A reading `seq` (from 1) arrived.
    pub fn saw(&mut self, seq: u64) {
        if seq < self.below.max(1) || self.above.binary_search(&seq).is_ok() {
            self.duplicated += 1;
            return;
        }
        if seq == self.below.max(1) {
            self.below = seq + 1;
            // Close the gap the list may now continue.
            let run = self.above.iter().zip(self.below..).take_while(|(s, want)| **s == *want).count();
            if run > 0 {
                self.below += run as u64;
                self.above.drain(..run);
            }
        } else {
            let at = self.above.partition_point(|s| *s < seq);
            self.above.insert(at, seq);
        }
    }

    /// Every copy delivered: the distinct readings and their duplicates.
    pub fn copies(&self) -> u64 {
        self.below.saturating_sub(1) + self.above.len() as u64 + self.duplicated
    }

    /// How many of the readings 1..=`acked` (those the device let go of) were never seen.
    pub fn lost(&self, acked: u64) -> u64 {
        let seen_below = self.below.saturating_sub(1).min(acked);
        let seen_above = self.above.iter().filter(|s| **s <= acked).count() as u64;
        acked - seen_below - seen_above.min(acked - seen_below)
    }
}

/// Reading-to-PUBACK latencies: 1 ms buckets up to 10 s, then one bucket.
#[derive(Debug, Clone)]
pub struct Latency {
    buckets: Vec<u64>,
    count: u64,
}

const BUCKETS: usize = 10_000;

impl Default for Latency {
    fn default() -> Self {
        Latency { buckets: vec![0; BUCKETS + 1], count: 0 }
    }
}

impl Latency {
    pub fn observe(&mut self, ms: u64) {
        self.buckets[(ms as usize).min(BUCKETS)] += 1;
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Latency) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
    }

    /// The `q` quantile (0-1) in ms; 0 with no samples.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count as f64 * q).ceil() as u64).clamp(1, self.count);
        let mut n = 0;
        for (ms, c) in self.buckets.iter().enumerate() {
            n += c;
            if n >= rank {
                return ms as u64;
            }
        }
        BUCKETS as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_seen_in_order_are_neither_lost_nor_duplicated() {
        let mut s = Seen::default();
        (1..=100).for_each(|q| s.saw(q));
        assert_eq!((s.lost(100), s.duplicated), (0, 0));
        assert_eq!(s.above.len(), 0, "nothing kept but one number");
    }

    #[test]
    fn a_resend_after_a_reconnect_is_duplicated_not_lost() {
        let mut s = Seen::default();
        [1, 2, 3, 4, 3, 4, 5].iter().for_each(|q| s.saw(*q));
        assert_eq!((s.lost(5), s.duplicated, s.copies()), (0, 2, 7));
    }

    #[test]
    fn an_acknowledged_reading_never_seen_is_lost_and_one_still_held_is_not() {
        let mut s = Seen::default();
        [1, 2, 4, 5].iter().for_each(|q| s.saw(*q));
        assert_eq!(s.lost(5), 1, "3 was acknowledged and never arrived");
        assert_eq!(s.lost(2), 0);
        assert_eq!(Seen::default().lost(0), 0);
        assert_eq!(Seen::default().lost(7), 7);
    }

    #[test]
    fn a_gap_filled_late_by_a_resend_closes() {
        let mut s = Seen::default();
        [1, 3, 4, 2, 5].iter().for_each(|q| s.saw(*q));
        assert_eq!((s.lost(5), s.duplicated, s.above.len()), (0, 0, 0));
    }

    #[test]
    fn quantiles_come_from_the_buckets() {
        let mut l = Latency::default();
        (1..=100).for_each(|ms| l.observe(ms));
        assert_eq!((l.quantile(0.5), l.quantile(0.99)), (50, 99));
        l.observe(60_000);
        assert_eq!(l.quantile(1.0), BUCKETS as u64, "past the last bucket: the last bucket");
        assert_eq!(Latency::default().quantile(0.5), 0);
    }
}
