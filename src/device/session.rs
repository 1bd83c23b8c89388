//! The connection's events: what a connect sets up (subscriptions, the retained reports,
//! discovery, health) and what a drop undoes (the window, the subscriptions in flight, the
//! oversized-message recovery that [`super::connection`] decides).

use tracing::{debug, error, info, warn};

use super::connection::{Ended, Oversize};
use super::{inbox, now, subscriptions, Device};
use crate::config::SensorKind;
use crate::homeassistant;
use crate::link::{self, Event, LinkError, Qos};
use crate::metrics::Reject;
use crate::payload::ONLINE;

impl Device {
    pub(super) fn on_events(&mut self, events: Vec<Result<Event, LinkError>>) {
        for ev in events {
            self.on_event(ev);
        }
        self.pump();
    }

    pub(super) fn on_event(&mut self, ev: Result<Event, LinkError>) {
        match ev {
            Ok(Event::Connected { session_present }) => self.on_connected(session_present),
            Ok(Event::Answered { pkid, refused }) => {
                let what = self.out.answered(pkid);
                self.on_answered(what, refused);
            }
            Ok(Event::Written { pkid }) => {
                let done = self.out.written(pkid);
                self.on_answered(done, None);
            }
            Ok(Event::Message(m)) => self.on_message(&m),
            Ok(Event::Subscribed { refused }) => match self.subs.answered(&refused) {
                subscriptions::Answer::Topics { refused } if !refused.is_empty() => {
                    warn!(topics = ?refused, "the broker refused subscriptions (check its ACL): nothing arrives on these");
                }
                subscriptions::Answer::LookUpRefused => {
                    debug!("the broker does not let us look up old discovery configs: migrating every old topic");
                    self.ha.look_up_refused();
                }
                _ => {}
            },
            Ok(Event::Unsubscribed) => {
                if let Some(out) = self.ha.looked_up(self.live.cfg()) {
                    self.migrated(out);
                }
            }
            Ok(_) => {}
            Err(e) => self.on_disconnected(&e),
        }
    }

    pub(super) fn on_connected(&mut self, session_present: bool) {
        let reads_oversized = self.conn.up(now());
        self.queue.connected();
        // This connection gets past the message; the next one is as configured again (set
        // when this one ends, with the event loop in hand).
        if let Some(limit) = reads_oversized {
            info!(limit, "reconnected to the same session to read the oversized message and reject it");
        }
        info!(broker = %self.live.cfg().mqtt.broker(), session_present,
            backlog = self.queue.stats().readings, "connected");
        self.notifier.connected(self.queue.stats().readings);
        // A session the broker kept still has our subscriptions; re-subscribing would make it
        // deliver retained messages again.
        self.subs.connected();
        if !session_present {
            let ha_status =
                self.live.cfg().homeassistant.enabled.then(|| homeassistant::ha_status_topic(self.live.cfg()));
            let simulated = self.live.cfg().sensor.kind == SensorKind::Virtual;
            let wanted = inbox::wanted(&self.topics, simulated, ha_status.as_deref(), self.updates.is_some());
            for packet in self.subs.packets(wanted, now()) {
                match self.out.client().subscribe(&packet) {
                    Ok(()) => self.subs.sent(packet),
                    Err(e) => warn!(error = %e, "cannot subscribe to commands"),
                }
            }
        }
        self.lamp.link(true, session_present, now());
        if self.lamp.must_ask() {
            // A restart that resumed the session: the controllers' retained statuses come only
            // with a new SUBSCRIBE (the other subscriptions stand).
            let topics = vec![crate::topics::CONTROLLERS.to_owned()];
            match self.out.client().subscribe(&topics) {
                Ok(()) => {
                    self.subs.sent(topics);
                    self.lamp.asking();
                }
                Err(e) => warn!(error = %e, "cannot subscribe to the controllers' statuses"),
            }
        }
        self.publish_other(&self.topics.status.clone(), ONLINE.as_bytes().to_vec(), true);
        self.publish_state();
        self.publish_config();
        if let Some(u) = &self.updates {
            self.publish_update(&u.state());
        }
        self.publish_discovery();
        if let Some(out) = self.ha.last_reading(self.live.cfg(), Qos::AtLeastOnce) {
            self.publish_retained(out);
        }
        self.publish_health();
    }

    pub(super) fn on_disconnected(&mut self, e: &LinkError) {
        self.lamp.link(false, false, now());
        let mut reason = e.describe(&self.live.cfg().mqtt.host);
        if e.certificate_dates() && !self.wall.now().1 {
            // A Pi without a real-time clock boots on its last saved time: until NTP answers, a
            // certificate looks not yet valid (or expired). Name the clock, and connect again the
            // moment it is synchronized rather than at the end of a long backoff.
            reason = format!(
                "{reason}: this machine's clock is not synchronized (no NTP answer yet), so the certificate's dates \
                 cannot be trusted; connecting again as soon as it is"
            );
            self.conn.wait_for_clock(now());
        }
        if !self.conn.is_up()
            && self.live.cfg().mqtt.protocol == crate::config::Protocol::V5
            && e.v5_refused_at_connect() == 1
        {
            reason = format!(
                "{reason} at our MQTT 5 CONNECT: if the broker speaks only MQTT 3.1.1, remove mqtt.protocol (the \
                 default tries MQTT 5, then 3.1.1) or set it to \"3.1.1\""
            );
        }
        let down = self.conn.down(now(), &reason, e.oversized());
        match down.ended {
            Ended::Dropped => {
                self.counters.reconnected(e.lost());
                warn!(reason = %reason, backlog = self.queue.stats().readings, "disconnected");
                self.notifier.unreachable(&reason);
            }
            Ended::CannotConnect => {
                warn!(broker = %self.live.cfg().mqtt.broker(), reason = %reason, "cannot connect; retrying with backoff");
                self.notifier.unreachable(&reason);
            }
            Ended::Still => debug!(reason = %reason, "still cannot connect"),
        }
        self.counters.set_last_error(format!("mqtt: {reason}"));
        self.poller.forget_unsent();
        if let Some(el) = self.poller.eventloop() {
            if let Some(bytes) = down.max_incoming {
                el.set_max_incoming(bytes);
            }
            if let Some(clean) = down.clean {
                el.set_clean(clean);
            }
        }
        match (down.oversize, e.oversized()) {
            (Some(Oversize::Read(_)), Some(size)) => {
                // Back at once to the same session, reading up to this size: the broker sends
                // the message again (or, retained, at the subscription) and the command handler
                // rejects it. Commands sent meanwhile wait in the session.
                warn!(
                    bytes = size,
                    limit = link::MAX_INCOMING_BYTES,
                    "the broker sent a message larger than the limit; reading it once to reject it"
                );
            }
            (Some(Oversize::Discard), Some(size)) => {
                let n = self.counters.reject(Reject::Oversized);
                warn!(
                    bytes = size,
                    limit = link::MAX_RECOVERY_BYTES,
                    rejected_total = n,
                    "the broker sent a message too large even to reject; starting a new session without it"
                );
                if let Some(filter) = self.subs.too_large(now()) {
                    let why = format!(
                        "the broker holds a retained message larger than {} MiB for the subscription {filter}: left out \
                         for an hour (clear it: mosquitto_pub -r -n -t <its topic>)",
                        link::MAX_RECOVERY_BYTES >> 20
                    );
                    error!(filter = %filter, left_out_total = self.subs.left_out(), "{why}");
                    self.counters.set_last_error(format!("mqtt: {why}"));
                }
            }
            _ => {}
        }
        self.out.disconnected();
        self.subs.disconnected();
        self.ha.disconnected(); // a look-up under way is made again at the next connect
        self.denial.disconnected();
        self.queue.disconnected(now());
        self.poller.start_after(down.delay);
    }
}
