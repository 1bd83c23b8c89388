//! The connection's life: up, down, how long to wait before the next try, what to say about
//! it, and the MQTT 3.1.1 recovery from a message larger than the device reads.
//!
//! Rules:
//! - A connection that lasted [`STABLE`] resets the backoff; each failure waits the next
//!   backoff delay.
//! - A drop of a live connection is said (and counted by the device); a failure to connect is
//!   said once per streak of the same reason, later ones only at debug level.
//! - A message over the limit ended the connection (3.1.1; under MQTT 5 the broker drops what
//!   is larger than the device's Maximum Packet Size): up to [`link::MAX_RECOVERY_BYTES`] the
//!   next connection goes back at once to the same session reading up to its size, so the
//!   message is read and rejected; a larger one starts a new session without it. The connection
//!   after that one is as configured again.
//!
//! - A certificate refused for its dates while the wall clock is not synchronized: the clock is
//!   looked at again every [`CLOCK_CHECK`], and the link connects the moment it is
//!   ([`Connection::wait_for_clock`]), not at the end of a long backoff. A connection ends the
//!   wait.
//!
//! Pure: time is passed in; the device applies what [`Connection::down`] returns to the event
//! loop and logs it.

use std::time::{Duration, Instant};

use crate::link::{self, Backoff};

/// A connection that lasted this long resets the reconnect backoff.
pub const STABLE: Duration = Duration::from_secs(5);
/// While a certificate waits for the clock, how often the clock is looked at.
pub const CLOCK_CHECK: Duration = Duration::from_secs(1);

/// How the connection after an oversized message gets past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Oversize {
    /// The same session, reading up to this many bytes: the message is read and rejected.
    Read(usize),
    /// A new session without it (too large even to read).
    Discard,
}

/// How a connection (or an attempt) ended, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// A live connection dropped.
    Dropped,
    /// The first failure to connect for this reason.
    CannotConnect,
    /// The same failure again.
    Still,
}

/// What to do after a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Down {
    pub ended: Ended,
    /// Before the next try.
    pub delay: Duration,
    /// For the next connection's event loop, where it changes: the largest packet read, and
    /// whether it starts a new session.
    pub max_incoming: Option<usize>,
    pub clean: Option<bool>,
    /// The recovery from an oversized message this failure starts.
    pub oversize: Option<Oversize>,
}

/// See the module doc.
#[derive(Debug)]
pub(super) struct Connection {
    /// When the current connection was acknowledged; `None` while disconnected.
    since: Option<Instant>,
    /// The last failure's reason, so a retry that fails the same way is not said again.
    last_failure: Option<String>,
    backoff: Backoff,
    /// A connection is being made to get past an oversized message.
    oversize: Option<Oversize>,
    /// `mqtt.clean_session`, what every other connection starts with.
    clean_session: bool,
    /// A certificate waits for the clock: it is looked at again at this moment.
    clock_check: Option<Instant>,
}

impl Connection {
    pub fn new(backoff: Backoff, clean_session: bool) -> Self {
        Connection { since: None, last_failure: None, backoff, oversize: None, clean_session, clock_check: None }
    }

    /// Whether a connection is up.
    pub fn is_up(&self) -> bool {
        self.since.is_some()
    }

    /// A certificate was refused for its dates and the clock is not synchronized: look at the
    /// clock again from `now` on.
    pub fn wait_for_clock(&mut self, now: Instant) {
        self.clock_check = Some(now + CLOCK_CHECK);
    }

    /// When the clock is to be looked at next, while a certificate waits for it.
    pub fn clock_check(&self) -> Option<Instant> {
        self.clock_check
    }

    /// The clock was looked at, at `now`: true when it is synchronized and the link is to
    /// connect at once (the wait ends); otherwise it is looked at again later.
    pub fn clock_checked(&mut self, synced: bool, now: Instant) -> bool {
        self.clock_check = (!synced).then(|| now + CLOCK_CHECK);
        synced
    }

    /// The broker acknowledged a connection at `now`; returns the limit it reads an oversized
    /// message with, if it was made for that.
    pub fn up(&mut self, now: Instant) -> Option<usize> {
        self.since = Some(now);
        self.clock_check = None;
        self.last_failure = None;
        match self.oversize.take() {
            Some(Oversize::Read(limit)) => Some(limit),
            _ => None,
        }
    }

    /// The connection (or an attempt) ended at `now` for `reason`; `oversized` is the size of a
    /// message over the limit that ended it.
    pub fn down(&mut self, now: Instant, reason: &str, oversized: Option<usize>) -> Down {
        let ended = match self.since.take() {
            Some(since) => {
                if now.duration_since(since) >= STABLE {
                    self.backoff.reset();
                }
                Ended::Dropped
            }
            None if self.last_failure.as_deref() != Some(reason) => Ended::CannotConnect,
            None => Ended::Still,
        };
        self.last_failure = Some(reason.to_owned());
        let mut down =
            Down { ended, delay: self.backoff.next_delay(), max_incoming: None, clean: None, oversize: None };
        if self.oversize.is_none() {
            // No connection is being made to get past an oversized message: as configured.
            (down.max_incoming, down.clean) = (Some(link::MAX_INCOMING_BYTES), Some(self.clean_session));
        }
        match oversized {
            Some(size) if size <= link::MAX_RECOVERY_BYTES => {
                let o = Oversize::Read(size + 64);
                (down.max_incoming, down.clean, down.delay, down.oversize) =
                    (Some(size + 64), Some(false), Duration::ZERO, Some(o));
                self.oversize = Some(o);
            }
            Some(_) => {
                (down.clean, down.oversize) = (Some(true), Some(Oversize::Discard));
                self.oversize = Some(Oversize::Discard);
            }
            None => {}
        }
        down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(100);

    fn conn() -> Connection {
        Connection::new(Backoff::new(MIN, Duration::from_secs(10)), false)
    }

    #[test]
    fn the_same_failure_again_is_said_once_and_a_new_one_again() {
        let (t0, mut c) = (Instant::now(), conn());
        assert_eq!(c.down(t0, "refused", None).ended, Ended::CannotConnect);
        assert_eq!(c.down(t0, "refused", None).ended, Ended::Still);
        assert_eq!(c.down(t0, "no route", None).ended, Ended::CannotConnect);
        c.up(t0);
        assert_eq!(c.down(t0, "no route", None).ended, Ended::Dropped, "a drop is always said");
    }

    #[test]
    fn a_connection_that_lasted_resets_the_backoff_a_short_one_does_not() {
        let (t0, mut c) = (Instant::now(), conn());
        let first = c.down(t0, "x", None).delay;
        c.down(t0, "x", None);
        c.up(t0);
        let short = c.down(t0 + Duration::from_secs(1), "x", None).delay;
        assert!(short > first, "backoff grows: {first:?} then {short:?}");
        c.up(t0);
        let after_stable = c.down(t0 + STABLE, "x", None).delay;
        assert!(after_stable <= MIN * 2, "reset after a stable connection: {after_stable:?}");
    }

    #[test]
    fn a_message_over_the_limit_is_read_at_once_on_the_same_session_then_all_is_as_configured() {
        let (t0, mut c) = (Instant::now(), conn());
        c.up(t0);
        let d = c.down(t0, "too large", Some(600 * 1024));
        assert_eq!((d.delay, d.max_incoming, d.clean), (Duration::ZERO, Some(600 * 1024 + 64), Some(false)));
        assert_eq!(c.up(t0), Some(600 * 1024 + 64), "this connection reads it");
        let d = c.down(t0, "x", None);
        assert_eq!((d.max_incoming, d.clean), (Some(link::MAX_INCOMING_BYTES), Some(false)), "as configured again");
    }

    #[test]
    fn a_message_too_large_even_to_read_starts_a_new_session_and_a_failed_attempt_keeps_the_plan() {
        let (t0, mut c) = (Instant::now(), conn());
        c.up(t0);
        let d = c.down(t0, "too large", Some(link::MAX_RECOVERY_BYTES + 1));
        assert_eq!((d.clean, d.oversize), (Some(true), Some(Oversize::Discard)));
        let retry = c.down(t0, "no route", None);
        assert_eq!((retry.max_incoming, retry.clean), (None, None), "the attempt to get past it is made again");
        assert_eq!(c.up(t0), None);
    }

    #[test]
    fn a_certificate_waiting_for_the_clock_is_looked_at_every_second_until_it_is_synchronized() {
        let (t0, mut c) = (Instant::now(), conn());
        assert_eq!(c.clock_check(), None);
        c.wait_for_clock(t0);
        assert_eq!(c.clock_check(), Some(t0 + CLOCK_CHECK));
        let t1 = t0 + CLOCK_CHECK;
        assert!(!c.clock_checked(false, t1), "not yet: no connect");
        assert_eq!(c.clock_check(), Some(t1 + CLOCK_CHECK), "and looked at again");
        assert!(c.clock_checked(true, t1 + CLOCK_CHECK), "synchronized: connect now");
        assert_eq!(c.clock_check(), None, "and the wait is over");
        c.wait_for_clock(t1);
        c.up(t1);
        assert_eq!(c.clock_check(), None, "a connection ends the wait");
    }
}
