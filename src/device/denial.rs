//! Readings the broker refused (an MQTT 5 PUBACK reason code, such as an ACL's
//! `NotAuthorized`): they are not delivered, so they stay queued and are sent again later.
//!
//! Rules:
//! - A refusal holds telemetry: nothing more is sent until every reading in flight is answered,
//!   then the queue rewinds and the next attempt waits a backoff (the reconnect settings).
//! - The first refusal after an accepted reading is logged; the rest are only counted (`denied`
//!   in health), so a refusing broker costs one log line, not one per reading.
//! - An accepted reading resets the backoff; a lost connection drops the hold (the queue rewinds
//!   anyway and the reconnect has its own backoff).
//!
//! Pure: time is passed in, the deadline reported out.

use std::time::{Duration, Instant};

use crate::link::Backoff;

/// See the module docs.
#[derive(Debug)]
pub struct Denial {
    backoff: Backoff,
    held: bool,
    retry_at: Option<Instant>,
    quiet: bool,
    count: u64,
}

/// What the device does after [`Denial::settle`].
#[derive(Debug, PartialEq, Eq)]
pub enum Settle {
    /// Keep waiting (readings in flight, or the retry is not due).
    Wait,
    /// Everything in flight is answered: rewind the queue; the retry is at [`Denial::deadline`].
    Rewind,
}

impl Denial {
    /// Retries between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Denial { backoff: Backoff::new(min, max), held: false, retry_at: None, quiet: false, count: 0 }
    }

    /// The broker refused a reading. Returns whether to log it.
    pub fn refused(&mut self) -> bool {
        self.count += 1;
        self.held = true;
        !std::mem::replace(&mut self.quiet, true)
    }

    /// The broker took a reading. Returns whether it refused one since the last it took.
    pub fn accepted(&mut self) -> bool {
        self.backoff.reset();
        std::mem::replace(&mut self.quiet, false)
    }

    /// Whether telemetry must wait.
    pub fn holds(&self) -> bool {
        self.held
    }

    /// Readings refused so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Called with how many readings are still in flight.
    pub fn settle(&mut self, in_flight: usize, now: Instant) -> Settle {
        if !self.held || self.retry_at.is_some() || in_flight > 0 {
            return Settle::Wait;
        }
        self.retry_at = Some(now + self.backoff.next_delay());
        Settle::Rewind
    }

    /// When the held readings are sent again.
    pub fn deadline(&self) -> Option<Instant> {
        self.retry_at
    }

    /// The deadline passed: telemetry may be sent again.
    pub fn retry(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|t| t <= now) {
            self.retry_at = None;
            self.held = false;
        }
    }

    /// The connection ended.
    pub fn disconnected(&mut self) {
        self.held = false;
        self.retry_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial() -> Denial {
        Denial::new(Duration::from_millis(100), Duration::from_secs(10))
    }

    #[test]
    fn a_refusal_holds_telemetry_until_every_reading_in_flight_is_answered() {
        let (mut d, t0) = (denial(), Instant::now());
        assert!(!d.holds());
        d.refused();
        assert!(d.holds());
        assert_eq!(d.settle(3, t0), Settle::Wait, "three more answers to come");
        assert_eq!(d.settle(0, t0), Settle::Rewind);
        assert_eq!(d.settle(0, t0), Settle::Wait, "rewound once");
        let at = d.deadline().expect("a retry is scheduled");
        assert!(at > t0 && at <= t0 + Duration::from_millis(100));
        d.retry(at - Duration::from_millis(1));
        assert!(d.holds(), "not before the deadline");
        d.retry(at);
        assert!(!d.holds() && d.deadline().is_none());
    }

    #[test]
    fn retries_back_off_while_the_broker_keeps_refusing_and_reset_when_it_accepts() {
        let (mut d, mut now) = (denial(), Instant::now());
        let mut waits = Vec::new();
        for _ in 0..8 {
            d.refused();
            d.settle(0, now);
            let at = d.deadline().unwrap();
            waits.push(at - now);
            now = at;
            d.retry(now);
        }
        assert!(waits[7] >= Duration::from_secs(5), "grows towards the maximum: {waits:?}");
        d.accepted();
        d.refused();
        d.settle(0, now);
        assert!(d.deadline().unwrap() - now <= Duration::from_millis(100), "back to the minimum");
    }

    #[test]
    fn a_refusing_broker_is_logged_once_and_every_refusal_is_counted() {
        let mut d = denial();
        let logged: Vec<bool> = (0..5).map(|_| d.refused()).collect();
        assert_eq!(logged, [true, false, false, false, false]);
        assert_eq!(d.count(), 5);
        assert!(d.accepted(), "the recovery is worth a line");
        assert!(!d.accepted());
        assert!(d.refused(), "refusing again after accepting is logged again");
    }

    #[test]
    fn a_lost_connection_drops_the_hold() {
        let mut d = denial();
        d.refused();
        d.settle(0, Instant::now());
        d.disconnected();
        assert!(!d.holds() && d.deadline().is_none());
        assert_eq!(d.count(), 1);
    }
}
