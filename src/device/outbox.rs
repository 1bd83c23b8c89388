//! What the device hands the MQTT client, and what each packet id stands for.
//!
//! Rules:
//! - Every publish handed to the client is noted ([`InFlight`]): a reading by its `seq` and
//!   `ts`, anything else by its topic; its PUBACK (or, at QoS 0, its write) says which it was.
//! - A publish the client cannot take (its channel is full) is not noted: a reading stays
//!   unsent in the queue and goes at the next PUBACK; anything else is logged.
//! - A topic whose message the broker refused is logged once per run, not at every message.
//! - Once a clean stop begins, no more readings are handed over.
//! - A connection that ends forgets everything in flight: the queue sends its readings again.

use std::collections::HashSet;

use tracing::warn;

use crate::link::{Client, InFlight, Qos, Reply, Sent};

pub(super) struct Outbox {
    client: Client,
    inflight: InFlight,
    /// Telemetry's QoS (`mqtt.qos`).
    reading_qos: Qos,
    /// Topics whose messages the broker refused, logged once each.
    refused_topics: HashSet<String>,
    /// A clean stop is under way: no more readings.
    closing: bool,
}

impl Outbox {
    pub fn new(client: Client, reading_qos: Qos) -> Self {
        Outbox { client, inflight: InFlight::default(), reading_qos, refused_topics: HashSet::new(), closing: false }
    }

    /// The client, for what is not a publish (subscriptions, the protocol, the clean stop).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Anything but a reading; a failure is logged.
    pub fn publish(&mut self, topic: &str, qos: Qos, retain: bool, payload: Vec<u8>) {
        match self.client.publish(topic, qos, retain, payload) {
            Ok(()) => self.inflight.handed(Sent::Other(topic.to_owned())),
            Err(e) => warn!(topic, error = %e, "cannot publish"),
        }
    }

    /// A reading (`seq`, `ts`) as `json`; false when the client cannot take it now (or a clean
    /// stop is under way).
    pub fn publish_reading(&mut self, topic: &str, json: Vec<u8>, seq: u64, ts: u64) -> bool {
        if self.closing || self.client.publish(topic, self.reading_qos, false, json).is_err() {
            return false;
        }
        self.inflight.handed(Sent::Telemetry(seq, ts));
        true
    }

    /// The answer to an MQTT 5 request; a failure is logged.
    pub fn reply(&mut self, reply: Reply, payload: Vec<u8>) {
        match self.client.publish_reply(&reply, payload) {
            Ok(()) => self.inflight.handed(Sent::Other(reply.topic)),
            Err(e) => warn!(error = %e, "cannot answer a request for a reading"),
        }
    }

    /// The broker answered the publish written as `pkid`.
    pub fn answered(&mut self, pkid: u16) -> Option<Sent> {
        self.inflight.answered(pkid)
    }

    /// The oldest publish handed over was written as `pkid`: what it was, when that is all
    /// there is to know (QoS 0).
    pub fn written(&mut self, pkid: u16) -> Option<Sent> {
        self.inflight.written(pkid)
    }

    /// Whether this is the first refusal of a message on `topic` in this run.
    pub fn first_refusal(&mut self, topic: &str) -> bool {
        self.refused_topics.insert(topic.to_owned())
    }

    /// Readings handed over or written and not yet answered.
    pub fn readings_pending(&self) -> usize {
        self.inflight.telemetry_pending()
    }

    /// A clean stop begins: no more readings.
    pub fn close(&mut self) {
        self.closing = true;
    }

    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// The connection ended.
    pub fn disconnected(&mut self) {
        self.inflight.clear();
    }
}
