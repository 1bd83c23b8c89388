//! The readings' path through the loop: a reading taken (the lamp, Home Assistant's last reading,
//! the queue), an answer to whoever asked for it, the queue pumped into the window, and the
//! broker's answer to each publish (acknowledged, or refused and held by [`super::denial`]).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{debug, info, trace, warn};

use super::denial::Settle;
use super::{now, request, sampler, Device, WINDOW};
use crate::link::{Message, Sent};
use crate::metrics::Reject;
use crate::payload;
use crate::sensor::Reading;

impl Device {
    /// A reading (or a failed read on request): handled, and its answer to whoever asked.
    pub(super) fn on_sample(&mut self, sample: sampler::Sample) {
        let taken = sample.result.map(|reading| self.on_reading(reading, sample.stamp));
        if sample.stamp.requested {
            let waiting = self.requests.taken();
            if !self.conn.is_up() || waiting.is_empty() {
                return; // no one to answer, or asked over a connection that is gone
            }
            // Only an answer is serialized here: a scheduled reading costs no JSON of its own.
            let answer = match taken {
                Ok(t) => t.to_json(),
                Err(e) => serde_json::json!({ "error": e.to_string() }).to_string().into_bytes(),
            };
            for reply in waiting {
                self.out.reply(reply, answer.clone());
            }
        }
    }

    /// A request on `<id>/read` ([`request`]).
    pub(super) fn on_read_request(&mut self, p: &Message) {
        let verdict = self.requests.request(now(), p.retain, p.payload.len(), p.reply());
        match verdict {
            request::Verdict::Read => {
                debug!("a reading on request");
                self.sampler.request();
            }
            request::Verdict::Later(_) => debug!("a request inside sensor.min_request_ms: read at the window's end"),
            request::Verdict::Joined => debug!("a request joins the reading asked for"),
            request::Verdict::Dropped => {
                debug!(limited_total = self.requests.limited(), "a request dropped: too many wait for one reading")
            }
            request::Verdict::Refused(why) => {
                let n = self.counters.reject(Reject::Request);
                let to = p.response_topic.as_deref().map(|t| payload::printable(t, 80));
                warn!(topic = %p.topic, reply_to = ?to, reason = why, rejected_total = n, "ignored a request for a reading");
            }
        }
    }

    /// A reading: the local rule, the state when it changed, then queued and sent. Returns it
    /// as telemetry.
    pub(super) fn on_reading(&mut self, reading: Reading, stamp: sampler::Stamp) -> payload::Telemetry {
        trace!(light = reading.light, "reading taken");
        self.counters.readings.fetch_add(1, Ordering::Relaxed);
        let ts = stamp.ts;
        let ts_ok = stamp.ts_ok;
        if self.lamp.reading(reading.light, now()) {
            self.publish_state();
        }
        if let Some(out) = self.ha.reading(self.live.cfg(), payload::reading_json(reading.light, reading.lux, ts)) {
            self.publish_retained(out);
        }
        let seq = self.queue.push_stamped(now(), reading.light, ts, ts_ok, reading.lux);
        self.pump();
        payload::Telemetry { light: reading.light, ts, seq, run: self.queue.run(), lux: reading.lux, ts_ok }
    }

    /// Publishes queued readings, oldest first, while the window has room.
    pub(super) fn pump(&mut self) {
        if !self.conn.is_up() || self.out.is_closing() || self.denial.holds() {
            return;
        }
        while self.queue.in_flight() < WINDOW {
            let Some(rec) = self.queue.peek_unsent() else { break };
            let rec = self.sampler.restamped(rec);
            if !self.out.publish_reading(&self.topics.telemetry, rec.to_json(), rec.seq, rec.ts) {
                break; // the request channel is full; PUBACKs will make room
            }
            self.queue.mark_sent();
        }
    }

    /// The broker answered a publish (or a QoS 0 one was written): delivered, or refused.
    pub(super) fn on_answered(&mut self, what: Option<Sent>, refused: Option<String>) {
        match (what, refused) {
            (Some(Sent::Telemetry(seq, ts)), None) => {
                self.queue.ack(seq);
                self.counters.acked.fetch_add(1, Ordering::Relaxed);
                // By the wall clock: a reading queued through an outage waited that long.
                let waited = self.wall.now().0.saturating_sub(ts);
                self.counters.delivery.observe(Duration::from_millis(waited));
                self.notifier.delivered();
                if self.denial.accepted() {
                    info!(topic = %self.topics.telemetry, "the broker takes readings again");
                }
            }
            (Some(Sent::Telemetry(seq, _)), Some(reason)) if self.denial.refused() => {
                warn!(topic = %self.topics.telemetry, seq, reason = %reason, denied_total = self.denial.count(),
                    "the broker refused a reading (check its ACL): it stays queued and is sent again with backoff");
                self.publish_health(); // so `denied` shows now, not at the next minute
            }
            (Some(Sent::Telemetry(seq, _)), Some(_)) => debug!(seq, "a reading refused again"),
            (Some(Sent::Other(topic)), Some(reason)) if self.out.first_refusal(&topic) => {
                warn!(topic = %topic, reason = %reason, "the broker refused a message (check its ACL)");
            }
            _ => {}
        }
        // Counting what is in flight only matters while refused readings are held.
        if self.denial.holds() && self.denial.settle(self.out.readings_pending(), now()) == Settle::Rewind {
            self.queue.resend();
        }
    }
}
