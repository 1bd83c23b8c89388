//! What the device says about itself, retained: `<id>/state`, `<id>/config`, `<id>/health`,
//! `<id>/update/state`, Home Assistant's discovery (and the migration from per-entity configs),
//! and the metrics' snapshot. Each is sent only while connected; a connect sends them all again.

use tracing::{info, warn};

use super::{discovery, health, now, Device, MIGRATED};
use crate::link::Qos;
use crate::metrics;
use crate::update;

impl Device {
    /// A retained message of Home Assistant's part ([`discovery`]), when connected.
    pub(super) fn publish_retained(&mut self, out: discovery::Out) {
        if self.conn.is_up() {
            self.publish_at(&out.topic, out.qos, true, out.payload);
        }
    }

    /// Home Assistant discovery ([`discovery`]): on every connect and Home Assistant's birth.
    pub(super) fn publish_discovery(&mut self) {
        let migrated = self.state.has(MIGRATED);
        match self.ha.announce(self.live.cfg(), migrated) {
            discovery::Announce::Publish(out) => out.into_iter().for_each(|o| self.publish_retained(o)),
            discovery::Announce::LookUp(filter) => match self.out.client().look_up_retained(&filter) {
                Ok(()) => self.subs.look_up_sent(),
                Err(e) => {
                    warn!(error = %e, "cannot look up old discovery configs: migrating every old topic");
                    let out = self.ha.look_up_failed(self.live.cfg());
                    self.migrated(out);
                }
            },
        }
    }

    /// The migration's messages published, noted in the state directory.
    pub(super) fn migrated(&mut self, out: Vec<discovery::Out>) {
        if out.len() > 1 {
            info!(
                messages = out.len(),
                "migrating Home Assistant's per-entity discovery configs of an earlier release"
            );
        }
        out.into_iter().for_each(|o| self.publish_retained(o));
        self.state.keep(MIGRATED, b"1\n".to_vec(), "the discovery migration runs again at the next connect");
    }

    /// The figures only the loop knows, for the metrics ([`metrics::Snapshot`]).
    pub(super) fn snapshot(&mut self) {
        let queue = self.queue.stats();
        self.counters.set_snapshot(metrics::Snapshot {
            run: self.queue.run(),
            protocol: self.out.client().protocol().as_str(),
            connected: self.conn.is_up(),
            queue,
            oldest_ts: self.queue.oldest_ts(),
            queue_durable: self.state.on_storage() && queue.seq_durable,
            denied: self.denial.count(),
            requests_limited: self.requests.limited(),
            clock_synced: self.wall.now().1,
            clock_jump_ms: self.sampler.clock_jump_ms(),
        });
    }

    pub(super) fn publish_health(&mut self) {
        let (uptime, started) = self.started.now(now(), self.wall.now());
        let h = health::health(
            &self.counters,
            uptime,
            started,
            health::Figures {
                queue: self.queue.stats(),
                oldest_age_s: self.queue.oldest_ts().map_or(0, |ts| self.wall.now().0.saturating_sub(ts) / 1000),
                queue_on_storage: self.state.on_storage(),
                denied: self.denial.count(),
                requests_limited: self.requests.limited(),
                mode: self.lamp.mode().as_str(),
                protocol: self.out.client().protocol(),
            },
        );
        // Serializing a struct of numbers and an optional string cannot fail.
        let payload = serde_json::to_vec(&h).expect("health serializes");
        self.publish_other(&self.topics.health.clone(), payload, true);
    }

    /// `<id>/config`, retained: the effective settable values and the last refusal.
    pub(super) fn publish_config(&mut self) {
        if !self.conn.is_up() {
            return;
        }
        let report = self.live.report();
        self.publish_other(&self.topics.config.clone(), report, true);
    }

    /// `<id>/update/state`, retained ([`update::state`]).
    pub(super) fn publish_update(&mut self, state: &update::state::UpdateState) {
        if self.conn.is_up() {
            self.publish_other(&self.topics.update_state.clone(), state.to_json(), true);
        }
    }

    /// `<id>/state`, retained: the LED and who switches it.
    pub(super) fn publish_state(&mut self) {
        if !self.conn.is_up() {
            return; // sent on the next connection
        }
        let state = self.lamp.state();
        self.publish_other(&self.topics.state.clone(), state, true);
    }

    pub(super) fn publish_other(&mut self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.publish_at(topic, Qos::AtLeastOnce, retain, payload);
    }

    /// Anything but a reading ([`outbox`]).
    pub(super) fn publish_at(&mut self, topic: &str, qos: Qos, retain: bool, payload: Vec<u8>) {
        self.out.publish(topic, qos, retain, payload);
    }
}
