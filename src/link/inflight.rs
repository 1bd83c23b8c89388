//! Which publish a packet id stands for, so a PUBACK can be mapped back to a reading.
//!
//! Rules:
//! - rumqttc assigns packet ids when it writes a publish, in the order the publishes were
//!   handed to it; [`InFlight::handed`] records that order, [`InFlight::written`] pairs the
//!   oldest handed publish with the id it was written under.
//! - A QoS 0 publish is written with id 0 and never acknowledged: it counts as done when
//!   written.
//! - A connection that ends forgets everything: the queue sends again what was not
//!   acknowledged, under new ids.
//!
//! Pure: no MQTT, no clock.

use std::collections::{HashMap, VecDeque};

/// What a publish handed to the client was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// A reading: its seq, and its `ts` (for the time to its PUBACK).
    Telemetry(u64, u64),
    /// Status, state, health, discovery, configuration, by topic: nothing is re-sent.
    Other(String),
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct InFlight {
    /// Handed to the client, waiting for their packet id, oldest first.
    handed: VecDeque<Sent>,
    /// Written with QoS 1, waiting for PUBACK.
    by_pkid: HashMap<u16, Sent>,
}

impl InFlight {
    /// A publish was handed to the client.
    pub fn handed(&mut self, what: Sent) {
        self.handed.push_back(what);
    }

    /// The oldest handed publish was written with `pkid`. Returns it if it is done already
    /// (QoS 0: `pkid` 0).
    pub fn written(&mut self, pkid: u16) -> Option<Sent> {
        let what = self.handed.pop_front()?;
        if pkid == 0 {
            return Some(what);
        }
        self.by_pkid.insert(pkid, what);
        None
    }

    /// The broker answered the publish written with `pkid`.
    pub fn answered(&mut self, pkid: u16) -> Option<Sent> {
        self.by_pkid.remove(&pkid)
    }

    /// Readings handed or written and not yet answered.
    pub fn telemetry_pending(&self) -> usize {
        let is_reading = |s: &&Sent| matches!(s, Sent::Telemetry(..));
        self.handed.iter().filter(is_reading).count() + self.by_pkid.values().filter(is_reading).count()
    }

    /// The connection ended: nothing in flight will be answered.
    pub fn clear(&mut self) {
        self.handed.clear();
        self.by_pkid.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_puback_finds_the_reading_written_under_its_packet_id() {
        let mut f = InFlight::default();
        f.handed(Sent::Telemetry(7, 0));
        f.handed(Sent::Other("t/state".into()));
        f.handed(Sent::Telemetry(8, 0));
        assert_eq!(f.written(1), None);
        assert_eq!(f.written(2), None);
        assert_eq!(f.written(3), None);
        assert_eq!(f.answered(3), Some(Sent::Telemetry(8, 0)), "acknowledged out of order");
        assert_eq!(f.answered(1), Some(Sent::Telemetry(7, 0)));
        assert_eq!(f.answered(2), Some(Sent::Other("t/state".into())));
        assert_eq!(f.answered(2), None, "answered once");
    }

    #[test]
    fn a_qos0_reading_is_done_when_written() {
        let mut f = InFlight::default();
        f.handed(Sent::Telemetry(1, 0));
        assert_eq!(f.written(0), Some(Sent::Telemetry(1, 0)));
        assert_eq!(f.telemetry_pending(), 0);
    }

    #[test]
    fn packet_ids_reused_after_a_reconnect_do_not_find_old_readings() {
        let mut f = InFlight::default();
        f.handed(Sent::Telemetry(1, 0));
        f.written(1);
        f.handed(Sent::Telemetry(2, 0));
        assert_eq!(f.telemetry_pending(), 2);
        f.clear();
        assert_eq!(f.telemetry_pending(), 0);
        f.handed(Sent::Telemetry(1, 0));
        f.written(1);
        assert_eq!(f.answered(1), Some(Sent::Telemetry(1, 0)));
        assert_eq!(f.written(5), None, "nothing handed: nothing to pair");
    }
}
