//! Retained messages too large even to read and reject (MQTT 3.1.1): finding the subscription
//! that brings one and leaving it out for a while, so a broker cannot keep a device
//! reconnecting for ever with nothing acknowledged.
//!
//! Rules:
//! - A connection ended by a message over [`crate::link::MAX_RECOVERY_BYTES`] makes the next new
//!   session subscribe one filter per SUBSCRIBE: it *probes*.
//! - A broker sends a subscription's retained messages after its SUBACK and before it answers
//!   the next SUBSCRIBE, so when a probing connection ends the same way, the filter of the last
//!   SUBACK received brings the message: that filter is left out for [`LEFT_OUT`], and counted.
//! - A filter left out comes back when its time is up (and is found again if the message is
//!   still there: one reconnect an hour, not one a second).
//!
//! Under MQTT 5 the device tells the broker its maximum packet size and the broker drops what
//! is larger, so none of this happens. Pure: time is passed in.

use std::time::{Duration, Instant};

/// How long a filter that brings a message too large to read is left out.
pub const LEFT_OUT: Duration = Duration::from_secs(3600);

/// See the module doc.
#[derive(Debug, Default)]
pub struct Oversized {
    probing: bool,
    /// The filter of the last SUBACK of this connection, while probing.
    last_subacked: Option<String>,
    /// Filters left out, and until when.
    left_out: Vec<(String, Instant)>,
    /// Filters left out since start.
    count: u64,
}

impl Oversized {
    /// Whether the next new session subscribes one filter at a time.
    pub fn probing(&self) -> bool {
        self.probing
    }

    /// A connection came up.
    pub fn connected(&mut self) {
        self.last_subacked = None;
    }

    /// The broker acknowledged the subscription to `filter` (alone in its SUBSCRIBE).
    pub fn subacked(&mut self, filter: &str) {
        if self.probing {
            self.last_subacked = Some(filter.to_owned());
        }
    }

    /// The connection ended with a message too large to read; returns the filter left out now,
    /// if the probe found it.
    pub fn too_large(&mut self, now: Instant) -> Option<String> {
        match (self.probing, self.last_subacked.take()) {
            (true, Some(filter)) => {
                self.probing = false;
                self.count += 1;
                self.left_out.push((filter.clone(), now + LEFT_OUT));
                Some(filter)
            }
            _ => {
                self.probing = true;
                None
            }
        }
    }

    /// Whether to subscribe to `filter` at `now`.
    pub fn keep(&mut self, filter: &str, now: Instant) -> bool {
        self.left_out.retain(|(_, until)| *until > now);
        !self.left_out.iter().any(|(f, _)| f == filter)
    }

    /// Filters left out since start.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_acknowledged_last_before_the_message_is_left_out_for_an_hour_then_back() {
        let t0 = Instant::now();
        let mut o = Oversized::default();
        assert_eq!(o.too_large(t0), None, "first time: probe the next session");
        assert!(o.probing());
        o.connected();
        o.subacked("porch/commands");
        o.subacked("nightlight/controller/+/status");
        assert_eq!(o.too_large(t0).as_deref(), Some("nightlight/controller/+/status"));
        assert!(!o.probing(), "found: the next session subscribes at once");
        assert!(!o.keep("nightlight/controller/+/status", t0 + Duration::from_secs(60)));
        assert!(o.keep("porch/commands", t0));
        assert!(o.keep("nightlight/controller/+/status", t0 + LEFT_OUT), "back after an hour");
        assert_eq!(o.count(), 1);
    }

    #[test]
    fn a_probe_that_ended_before_any_suback_probes_again() {
        let t0 = Instant::now();
        let mut o = Oversized::default();
        o.too_large(t0);
        o.connected();
        assert_eq!(o.too_large(t0), None);
        assert!(o.probing());
    }
}
