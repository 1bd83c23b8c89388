//! MQTT 3.1.1, through rumqttc's root module: the options a [`Spec`] becomes, each request, the
//! events translated into [`Event`], and every touch of rumqttc's internals.
//!
//! Internals touched (checked against rumqttc 0.25.1; each has a test in [`super`]'s tests):
//! `EventLoop::state.events` (events read and not handed out yet: [`pop_buffered`]),
//! `EventLoop::pending` and `EventLoop::state.collision` (what would be replayed or is parked:
//! [`forget_unsent`]), `EventLoop::mqtt_options` (how the next connection starts).

use rumqttc::{AsyncClient, EventLoop, Outgoing, QoS, TlsConfiguration, Transport};

use super::client::{network_options, request_error, Spec, MAX_INFLIGHT};
use super::{Event, Message, Qos, RequestError, Security, MAX_INCOMING_BYTES, MAX_OUTGOING_BYTES};
use crate::config::MqttConfig;

pub(super) fn build(mqtt: &MqttConfig, security: &Security, spec: &Spec) -> (AsyncClient, EventLoop) {
    let mut o = rumqttc::MqttOptions::new(&spec.client_id, &mqtt.host, mqtt.port);
    o.set_keep_alive(spec.keep_alive)
        .set_clean_session(spec.clean)
        .set_max_packet_size(MAX_INCOMING_BYTES, MAX_OUTGOING_BYTES)
        .set_inflight(MAX_INFLIGHT);
    if let Some((topic, payload)) = &spec.will {
        o.set_last_will(rumqttc::LastWill::new(topic, payload.clone(), QoS::AtLeastOnce, true));
    }
    if let Some((u, p)) = &security.login {
        o.set_credentials(u, p);
    }
    if let Some(tls) = security.tls.clone() {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    let (client, mut el) = AsyncClient::new(o, spec.channel);
    el.set_network_options(network_options());
    (client, el)
}

fn qos(q: Qos) -> QoS {
    if q == Qos::AtMostOnce {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// A publish (3.1.1 has no properties: no expiry, no response topic).
pub(super) fn publish(
    c: &AsyncClient,
    topic: &str,
    q: Qos,
    retain: bool,
    payload: Vec<u8>,
) -> Result<(), RequestError> {
    c.try_publish(topic, qos(q), retain, payload).map_err(request_error)
}

pub(super) fn subscribe(c: &AsyncClient, filters: &[String]) -> Result<(), RequestError> {
    c.try_subscribe_many(filters.iter().map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)))
        .map_err(request_error)
}

pub(super) fn look_up_retained(c: &AsyncClient, filter: &str) -> Result<(), RequestError> {
    c.try_subscribe(filter, QoS::AtMostOnce).map_err(request_error)?;
    c.try_unsubscribe(filter).map_err(request_error)
}

pub(super) fn disconnect(c: &AsyncClient) {
    let _ = c.try_disconnect();
}

/// An event rumqttc read and has not handed out yet.
pub(super) fn pop_buffered(el: &mut EventLoop) -> Option<Event> {
    el.state.events.pop_front().map(translate)
}

pub(super) fn has_buffered(el: &EventLoop) -> bool {
    !el.state.events.is_empty()
}

/// Forgets everything rumqttc would replay or still send.
pub(super) fn forget_unsent(el: &mut EventLoop) {
    el.clean();
    el.pending.clear();
    // `MqttState::clean` leaves a publish parked by an out-of-order PUBACK; while it is set the
    // event loop takes no new requests, so a new connection sends nothing.
    el.state.collision = None;
}

pub(super) fn set_clean(el: &mut EventLoop, clean: bool) {
    el.mqtt_options.set_clean_session(clean);
}

/// The largest message the next connection reads (3.1.1 cannot tell the broker).
pub(super) fn set_max_incoming(el: &mut EventLoop, bytes: usize) {
    el.mqtt_options.set_max_packet_size(bytes, MAX_OUTGOING_BYTES);
}

pub(super) fn translate(ev: rumqttc::Event) -> Event {
    use rumqttc::{Event as E, Incoming as I, SubscribeReasonCode as R};
    match ev {
        E::Incoming(I::ConnAck(a)) => Event::Connected { session_present: a.session_present },
        E::Incoming(I::Publish(p)) => Event::Message(Message {
            topic: p.topic,
            payload: p.payload,
            retain: p.retain,
            response_topic: None,
            correlation: None,
        }),
        E::Incoming(I::PubAck(a)) => Event::Answered { pkid: a.pkid, refused: None },
        E::Incoming(I::SubAck(a)) => {
            Event::Subscribed { refused: a.return_codes.iter().map(|c| matches!(c, R::Failure)).collect() }
        }
        E::Incoming(I::UnsubAck(_)) => Event::Unsubscribed,
        E::Outgoing(Outgoing::Publish(pkid)) => Event::Written { pkid },
        E::Outgoing(Outgoing::Disconnect) => Event::DisconnectWritten,
        _ => Event::Other,
    }
}
