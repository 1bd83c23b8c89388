//! The send window: readings handed to the broker and not yet acknowledged, oldest first.
//!
//! Rules:
//! - Readings are sent strictly in `seq` order, so the window is a prefix of what is queued.
//! - An acknowledgement may arrive out of order; the reading is forgotten only once every
//!   older one is acknowledged too (the queue frees storage from the front only).
//! - When the connection drops, the window is emptied and everything in it is sent again,
//!   except readings that were already acknowledged: those are remembered as `done` and skipped
//!   (counted as sent and acknowledged) when the queue reaches them again.
//!
//! It knows nothing of storage: each entry carries an opaque location `L` that the queue uses
//! to free the reading once it leaves the window.

use std::collections::{BTreeSet, VecDeque};

#[derive(Debug)]
struct Entry<L> {
    seq: u64,
    acked: bool,
    loc: L,
}

/// See the module docs.
#[derive(Debug)]
pub struct Window<L> {
    entries: VecDeque<Entry<L>>,
    /// Acknowledged before a reconnect while an older reading was not.
    done: BTreeSet<u64>,
}

impl<L> Default for Window<L> {
    fn default() -> Self {
        Window { entries: VecDeque::new(), done: BTreeSet::new() }
    }
}

impl<L: Copy> Window<L> {
    /// Readings in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Acknowledged readings still held (in the window behind an unacknowledged one, or `done`).
    pub fn acked_held(&self) -> usize {
        self.entries.iter().filter(|e| e.acked).count() + self.done.len()
    }

    /// `seq` was sent; it is newer than everything in the window.
    pub fn sent(&mut self, seq: u64, loc: L) {
        debug_assert!(self.entries.back().is_none_or(|e| e.seq < seq), "sent out of order");
        self.entries.push_back(Entry { seq, acked: false, loc });
    }

    /// Whether `seq` was acknowledged before the last reconnect (and so must not be sent again).
    /// Forgets it: the caller treats it as sent and acknowledged now. Readings come up in `seq`
    /// order, so an acknowledged one below `seq` never will (its storage was dropped at the cap,
    /// or damaged): it is forgotten too, or health would count it as held for ever.
    pub fn take_done(&mut self, seq: u64) -> bool {
        self.done = self.done.split_off(&seq);
        self.done.remove(&seq)
    }

    /// The broker acknowledged `seq`. Unknown seqs (from an older connection) are ignored.
    pub fn ack(&mut self, seq: u64) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.seq == seq) {
            e.acked = true;
        }
    }

    /// Takes the oldest reading if it is acknowledged: it can be freed.
    pub fn pop_acked(&mut self) -> Option<(u64, L)> {
        if self.entries.front().is_some_and(|e| e.acked) {
            self.entries.pop_front().map(|e| (e.seq, e.loc))
        } else {
            None
        }
    }

    /// The reading moved (from memory to disk): updates where it is.
    pub fn relocate(&mut self, seq: u64, loc: L) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.seq == seq) {
            e.loc = loc;
        }
    }

    /// Forgets every entry whose location matches: its storage is gone (dropped at the cap).
    pub fn forget_where(&mut self, gone: impl Fn(&L) -> bool) {
        self.entries.retain(|e| !gone(&e.loc));
    }

    /// The connection dropped: empties the window, remembering what was acknowledged.
    pub fn rewind(&mut self) {
        self.done.extend(self.entries.iter().filter(|e| e.acked).map(|e| e.seq));
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(seqs: &[u64]) -> Window<()> {
        let mut w = Window::default();
        for &s in seqs {
            w.sent(s, ());
        }
        w
    }

    #[test]
    fn an_acknowledged_reading_is_freed_once_every_older_one_is() {
        let mut w = window(&[1, 2, 3]);
        w.ack(2);
        assert_eq!(w.pop_acked(), None, "1 is still in flight");
        w.ack(1);
        assert_eq!(w.pop_acked(), Some((1, ())));
        assert_eq!(w.pop_acked(), Some((2, ())));
        assert_eq!(w.pop_acked(), None);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn a_reading_acknowledged_before_a_reconnect_is_not_sent_again() {
        let mut w = window(&[1, 2, 3]);
        w.ack(2);
        w.rewind();
        assert!(w.is_empty());
        assert_eq!(w.acked_held(), 1);
        assert!(!w.take_done(1));
        assert!(w.take_done(2));
        assert!(!w.take_done(2), "skipped once, then forgotten");
    }

    #[test]
    fn an_acknowledged_reading_that_never_comes_up_again_is_forgotten_when_a_newer_one_does() {
        let mut w = window(&[1, 2, 3, 4]);
        w.ack(2);
        w.ack(3);
        w.rewind();
        assert_eq!(w.acked_held(), 2);
        // 1-3 were dropped at the cap while offline: the queue next comes to 4.
        assert!(!w.take_done(4));
        assert_eq!(w.acked_held(), 0, "2 and 3 will never come up");
    }

    #[test]
    fn an_acknowledgement_from_an_older_connection_changes_nothing() {
        let mut w = window(&[5]);
        w.ack(4);
        assert_eq!(w.pop_acked(), None);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn a_relocated_reading_is_freed_from_its_new_place() {
        let mut w: Window<char> = Window::default();
        w.sent(1, 'm');
        w.relocate(1, 'd');
        w.ack(1);
        assert_eq!(w.pop_acked(), Some((1, 'd')));
    }
}
