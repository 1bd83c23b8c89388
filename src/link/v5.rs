//! MQTT 5, through rumqttc's `v5` module: the options a [`Spec`] becomes, each request (with
//! the properties 3.1.1 lacks: message expiry, response topic, correlation data), the events
//! translated into [`Event`] (a PUBACK's reason code, a message's response topic), and every
//! touch of rumqttc's internals.
//!
//! Internals touched (checked against rumqttc 0.25.1; each has a test in [`super`]'s tests):
//! `EventLoop::state.events` ([`pop_buffered`]), `EventLoop::pending` and
//! `EventLoop::state.collision` ([`forget_unsent`]), `EventLoop::options` (how the next
//! connection starts).

use rumqttc::v5::mqttbytes::v5 as p;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, EventLoop};
use rumqttc::{Outgoing, TlsConfiguration, Transport};

use super::client::{network_options, request_error, Spec, MAX_INFLIGHT, SESSION_EXPIRY_S};
use super::{Event, Message, Qos, Reply, RequestError, Security, MAX_INCOMING_BYTES};
use crate::config::MqttConfig;

pub(super) fn build(mqtt: &MqttConfig, security: &Security, spec: &Spec) -> (AsyncClient, EventLoop) {
    let mut o = rumqttc::v5::MqttOptions::new(&spec.client_id, &mqtt.host, mqtt.port);
    o.set_keep_alive(spec.keep_alive)
        .set_clean_start(spec.clean)
        // The broker drops what we could not read (Maximum Packet Size), instead of sending it
        // and losing the connection.
        .set_max_packet_size(Some(MAX_INCOMING_BYTES as u32))
        .set_outgoing_inflight_upper_limit(MAX_INFLIGHT)
        .set_network_options(network_options());
    // Under MQTT 5 a session ends with the connection unless it has an expiry.
    o.set_session_expiry_interval((!spec.clean).then_some(SESSION_EXPIRY_S));
    if let Some((topic, payload)) = &spec.will {
        o.set_last_will(p::LastWill::new(topic, payload.clone(), QoS::AtLeastOnce, true, None));
    }
    if let Some((u, pass)) = &security.login {
        o.set_credentials(u, pass);
    }
    if let Some(tls) = security.tls.clone() {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    AsyncClient::new(o, spec.channel)
}

fn qos(q: Qos) -> QoS {
    if q == Qos::AtMostOnce {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// A publish; the broker discards it if it cannot deliver it within `expiry_s`.
pub(super) fn publish(
    c: &AsyncClient,
    topic: &str,
    q: Qos,
    retain: bool,
    payload: Vec<u8>,
    expiry_s: Option<u32>,
) -> Result<(), RequestError> {
    match expiry_s {
        None => c.try_publish(topic, qos(q), retain, payload),
        Some(s) => {
            let props = p::PublishProperties { message_expiry_interval: Some(s), ..Default::default() };
            c.try_publish_with_properties(topic, qos(q), retain, payload, props)
        }
    }
    .map_err(request_error)
}

/// A request: QoS 1, asking for the answer on `reply`'s topic with its correlation data.
pub(super) fn publish_request(
    c: &AsyncClient,
    topic: &str,
    reply: &Reply,
    payload: Vec<u8>,
) -> Result<(), RequestError> {
    let props = p::PublishProperties {
        response_topic: Some(reply.topic.clone()),
        correlation_data: reply.correlation.clone(),
        ..Default::default()
    };
    c.try_publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props).map_err(request_error)
}

/// An answer: to the request's Response Topic with its Correlation Data, QoS 1, not retained.
pub(super) fn publish_reply(c: &AsyncClient, reply: &Reply, payload: Vec<u8>) -> Result<(), RequestError> {
    let props = p::PublishProperties { correlation_data: reply.correlation.clone(), ..Default::default() };
    c.try_publish_with_properties(reply.topic.as_str(), QoS::AtLeastOnce, false, payload, props).map_err(request_error)
}

pub(super) fn subscribe(c: &AsyncClient, filters: &[String]) -> Result<(), RequestError> {
    c.try_subscribe_many(filters.iter().map(|f| p::Filter::new(f.clone(), QoS::AtLeastOnce))).map_err(request_error)
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

/// Forgets everything rumqttc would replay or still send (see [`super::v4::forget_unsent`]).
pub(super) fn forget_unsent(el: &mut EventLoop) {
    el.clean();
    el.pending.clear();
    el.state.collision = None;
}

pub(super) fn set_clean(el: &mut EventLoop, clean: bool) {
    el.options.set_clean_start(clean);
    el.options.set_session_expiry_interval((!clean).then_some(SESSION_EXPIRY_S));
}

/// The largest message the next connection reads, told to the broker in CONNECT.
pub(super) fn set_max_incoming(el: &mut EventLoop, bytes: usize) {
    el.options.set_max_packet_size(Some(bytes.min(u32::MAX as usize) as u32));
}

pub(super) fn translate(ev: rumqttc::v5::Event) -> Event {
    use p::{PubAckReason as A, SubscribeReasonCode as R};
    use rumqttc::v5::{Event as E, Incoming as I};
    match ev {
        E::Incoming(I::ConnAck(a)) => Event::Connected { session_present: a.session_present },
        E::Incoming(I::Publish(m)) => {
            let (response_topic, correlation) =
                m.properties.map_or((None, None), |props| (props.response_topic, props.correlation_data));
            Event::Message(Message {
                topic: String::from_utf8_lossy(&m.topic).into_owned(),
                payload: m.payload,
                retain: m.retain,
                response_topic,
                correlation,
            })
        }
        E::Incoming(I::PubAck(a)) => Event::Answered {
            pkid: a.pkid,
            refused: (!matches!(a.reason, A::Success | A::NoMatchingSubscribers)).then(|| format!("{:?}", a.reason)),
        },
        E::Incoming(I::SubAck(a)) => {
            Event::Subscribed { refused: a.return_codes.iter().map(|c| !matches!(c, R::Success(_))).collect() }
        }
        E::Incoming(I::UnsubAck(_)) => Event::Unsubscribed,
        E::Outgoing(Outgoing::Publish(pkid)) => Event::Written { pkid },
        E::Outgoing(Outgoing::Disconnect) => Event::DisconnectWritten,
        _ => Event::Other,
    }
}
