//! The device's SUBSCRIBEs: which packets to send, what each one asked for, and what each SUBACK
//! answers.
//!
//! Rules:
//! - Every SUBSCRIBE sent is noted with what it asked for, in order; a SUBACK answers the oldest
//!   one not yet answered (a broker answers a connection's packets in order), so a refusal is
//!   paired with the filter that was subscribed, never with a list worked out again when the
//!   SUBACK arrives.
//! - The device's own subscriptions go in one SUBSCRIBE, or one filter per SUBSCRIBE while
//!   probing for a retained message too large to read ([`super::oversized`]); a filter left out
//!   for that is not subscribed.
//! - A connection that ends forgets what it had in flight (the next one subscribes again).
//!
//! Pure: time is passed in.

use std::collections::VecDeque;
use std::time::Instant;

use super::oversized::Oversized;

/// A SUBSCRIBE in flight.
#[derive(Debug, Clone, PartialEq)]
enum Subscribe {
    /// These filters, in this order.
    Topics(Vec<String>),
    /// The look-up of old discovery configs (one filter, at QoS 0, unsubscribed at once).
    LookUp,
}

/// What a SUBACK answered.
#[derive(Debug, PartialEq)]
pub(super) enum Answer {
    /// The device's filters the broker refused (empty: it took them all).
    Topics { refused: Vec<String> },
    /// The look-up of old discovery configs was refused.
    LookUpRefused,
    /// Nothing to act on (the look-up was taken, or no SUBSCRIBE was in flight).
    Nothing,
}

/// See the module doc.
#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    in_flight: VecDeque<Subscribe>,
    oversized: Oversized,
}

impl Subscriptions {
    /// A connection came up.
    pub fn connected(&mut self) {
        self.oversized.connected();
    }

    /// The connection ended.
    pub fn disconnected(&mut self) {
        self.in_flight.clear();
    }

    /// The SUBSCRIBE packets for `wanted` at `now`: the filters not left out, in one packet, or
    /// one per packet while probing.
    pub fn packets(&mut self, mut wanted: Vec<String>, now: Instant) -> Vec<Vec<String>> {
        wanted.retain(|f| self.oversized.keep(f, now));
        if self.oversized.probing() {
            wanted.into_iter().map(|f| vec![f]).collect()
        } else {
            vec![wanted]
        }
    }

    /// A SUBSCRIBE for `filters` was handed to the client.
    pub fn sent(&mut self, filters: Vec<String>) {
        self.in_flight.push_back(Subscribe::Topics(filters));
    }

    /// The look-up of old discovery configs was handed to the client.
    pub fn look_up_sent(&mut self) {
        self.in_flight.push_back(Subscribe::LookUp);
    }

    /// A SUBACK, with each filter's refusal in order.
    pub fn answered(&mut self, refused: &[bool]) -> Answer {
        match self.in_flight.pop_front() {
            Some(Subscribe::Topics(filters)) => {
                if let [only] = &filters[..] {
                    self.oversized.subacked(only);
                }
                let refused = refused.iter().zip(filters).filter(|(r, _)| **r).map(|(_, f)| f).collect();
                Answer::Topics { refused }
            }
            Some(Subscribe::LookUp) if refused.iter().any(|r| *r) => Answer::LookUpRefused,
            Some(Subscribe::LookUp) | None => Answer::Nothing,
        }
    }

    /// The connection ended with a message too large to read: the filter left out now, if the
    /// probe found it ([`Oversized::too_large`]).
    pub fn too_large(&mut self, now: Instant) -> Option<String> {
        self.oversized.too_large(now)
    }

    /// Filters left out since start.
    pub fn left_out(&self) -> u64 {
        self.oversized.count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_suback_is_paired_with_what_its_subscribe_asked_not_with_what_is_wanted_now() {
        let mut s = Subscriptions::default();
        s.sent(filters(&["porch/commands", "porch/config/set"]));
        s.look_up_sent();
        s.sent(filters(&["nightlight/controller/+/status"]));
        assert_eq!(s.answered(&[false, true]), Answer::Topics { refused: filters(&["porch/config/set"]) });
        assert_eq!(s.answered(&[true]), Answer::LookUpRefused);
        assert_eq!(s.answered(&[true]), Answer::Topics { refused: filters(&["nightlight/controller/+/status"]) });
        assert_eq!(s.answered(&[true]), Answer::Nothing, "nothing in flight");
    }

    #[test]
    fn a_connection_that_ends_forgets_its_subscribes() {
        let mut s = Subscriptions::default();
        s.sent(filters(&["porch/commands"]));
        s.disconnected();
        assert_eq!(s.answered(&[true]), Answer::Nothing);
    }

    #[test]
    fn while_probing_each_filter_goes_alone_and_the_one_that_brings_the_message_is_left_out() {
        let t0 = Instant::now();
        let mut s = Subscriptions::default();
        let wanted = filters(&["porch/commands", "nightlight/controller/+/status"]);
        assert_eq!(s.packets(wanted.clone(), t0), vec![wanted.clone()], "one SUBSCRIBE");
        assert_eq!(s.too_large(t0), None, "not found yet: probe the next session");
        s.connected();
        let packets = s.packets(wanted.clone(), t0);
        assert_eq!(packets, vec![filters(&["porch/commands"]), filters(&["nightlight/controller/+/status"])]);
        for p in packets {
            s.sent(p);
            s.answered(&[false]);
        }
        assert_eq!(s.too_large(t0).as_deref(), Some("nightlight/controller/+/status"));
        assert_eq!(s.packets(wanted, t0), vec![filters(&["porch/commands"])], "left out, one SUBSCRIBE again");
        assert_eq!(s.left_out(), 1);
    }
}
