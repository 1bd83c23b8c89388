//! The embedded broker's wire: MQTT 3.1.1 and MQTT 5 packets, through rumqttc's two codecs,
//! to and from the few packets the broker handles. A connection speaks the version of its
//! CONNECT; MQTT 5 properties are read and dropped but for a PUBLISH's Response Topic and
//! Correlation Data (request/response: `<id>/read`), which go on to MQTT 5 subscribers, and
//! reason codes are only ever "success" or a refused subscription.
//!
//! Messages travel inside the broker as 3.1.1 [`Publish`]es whatever their sender spoke.

use bytes::BytesMut;
use rumqttc::mqttbytes::{self as m4, QoS};
use rumqttc::v5::mqttbytes::{self as m5, v5 as p5};
use rumqttc::{Packet, Publish, SubscribeReasonCode};

/// The largest packet accepted: the device's own limit for a command is 256 KiB.
pub const MAX_PACKET: usize = 1024 * 1024;

/// The protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// What the broker needs of a CONNECT.
#[derive(Debug)]
pub struct Connect {
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub will: Option<Publish>,
}

/// What of a PUBLISH's MQTT 5 properties the broker forwards: MQTT 5's request/response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Props {
    pub response_topic: Option<String>,
    pub correlation: Option<bytes::Bytes>,
}

/// A packet from a client.
#[derive(Debug)]
pub enum In {
    Connect(Connect),
    Publish(Publish, Props),
    PubRel(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, QoS)>,
    },
    Unsubscribe {
        pkid: u16,
        topics: Vec<String>,
    },
    PingReq,
    Disconnect,
    /// Acknowledgements of what the broker sent: nothing is retransmitted on loopback.
    Other,
}

/// A packet to a client.
#[derive(Debug)]
pub enum Out {
    /// `accepted: false` refuses the client id.
    ConnAck {
        accepted: bool,
    },
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
    SubAck {
        pkid: u16,
        codes: Vec<SubscribeReasonCode>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    Publish(Publish, Props),
}

/// A packet that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// More bytes are needed.
    #[error("incomplete packet")]
    Incomplete,
    #[error("{0}")]
    V311(m4::Error),
    #[error("{0}")]
    V5(m5::Error),
}

impl From<m4::Error> for WireError {
    fn from(e: m4::Error) -> Self {
        match e {
            m4::Error::InsufficientBytes(_) => WireError::Incomplete,
            e => WireError::V311(e),
        }
    }
}

impl From<m5::Error> for WireError {
    fn from(e: m5::Error) -> Self {
        match e {
            m5::Error::InsufficientBytes(_) => WireError::Incomplete,
            e => WireError::V5(e),
        }
    }
}

/// Reads the first packet, CONNECT, whose protocol level says the version (4: 3.1.1, 5: 5).
/// Consumes nothing while the packet is incomplete.
pub fn read_connect(buf: &mut BytesMut) -> Result<(Version, In), WireError> {
    // rumqttc's 3.1.1 codec would read an MQTT 5 CONNECT without its properties: look first.
    let version = match protocol_level(buf).ok_or(WireError::Incomplete)? {
        5 => Version::V5,
        _ => Version::V311,
    };
    Ok((version, read(version, buf)?))
}

/// The protocol level byte of a CONNECT (MQTT-v5.0 3.1.2.2; the same place in 3.1.1): after the
/// fixed header's type byte, its 1-4 byte remaining length and the protocol name `MQTT`.
fn protocol_level(buf: &[u8]) -> Option<u8> {
    let len_bytes = buf.iter().skip(1).take(4).position(|b| b & 0x80 == 0)? + 1;
    buf.get(1 + len_bytes + 6).copied()
}

/// Reads the next packet; consumes nothing while it is incomplete.
pub fn read(version: Version, buf: &mut BytesMut) -> Result<In, WireError> {
    match version {
        Version::V311 => Ok(from_v4(Packet::read(buf, MAX_PACKET)?)),
        Version::V5 => Ok(from_v5(p5::Packet::read(buf, Some(MAX_PACKET as u32))?)),
    }
}

/// Encodes `packet` into `out` (cleared first).
pub fn write(version: Version, out: &mut BytesMut, packet: Out) -> Result<(), WireError> {
    out.clear();
    match version {
        Version::V311 => {
            to_v4(packet).write(out, MAX_PACKET)?;
        }
        Version::V5 => {
            to_v5(packet).write(out, Some(MAX_PACKET as u32))?;
        }
    }
    Ok(())
}

fn from_v4(p: Packet) -> In {
    match p {
        Packet::Connect(c) => In::Connect(Connect {
            client_id: c.client_id,
            clean: c.clean_session,
            keep_alive: c.keep_alive,
            will: c.last_will.map(|w| {
                let mut p = Publish::from_bytes(w.topic, w.qos, w.message);
                p.retain = w.retain;
                p
            }),
        }),
        Packet::Publish(p) => In::Publish(p, Props::default()),
        Packet::PubRel(r) => In::PubRel(r.pkid),
        Packet::Subscribe(s) => {
            In::Subscribe { pkid: s.pkid, filters: s.filters.into_iter().map(|f| (f.path, f.qos)).collect() }
        }
        Packet::Unsubscribe(u) => In::Unsubscribe { pkid: u.pkid, topics: u.topics },
        Packet::PingReq => In::PingReq,
        Packet::Disconnect => In::Disconnect,
        _ => In::Other,
    }
}

fn to_v4(p: Out) -> Packet {
    use rumqttc::{ConnAck, ConnectReturnCode as C, PubAck, PubComp, PubRec, SubAck, UnsubAck};
    match p {
        Out::ConnAck { accepted: true } => Packet::ConnAck(ConnAck::new(C::Success, false)),
        Out::ConnAck { accepted: false } => Packet::ConnAck(ConnAck::new(C::BadClientId, false)),
        Out::PubAck(id) => Packet::PubAck(PubAck::new(id)),
        Out::PubRec(id) => Packet::PubRec(PubRec::new(id)),
        Out::PubComp(id) => Packet::PubComp(PubComp::new(id)),
        Out::SubAck { pkid, codes } => Packet::SubAck(SubAck::new(pkid, codes)),
        Out::UnsubAck { pkid, .. } => Packet::UnsubAck(UnsubAck::new(pkid)),
        Out::PingResp => Packet::PingResp,
        Out::Publish(p, _) => Packet::Publish(p), // 3.1.1 has no properties
    }
}

fn qos_from_v5(q: m5::QoS) -> QoS {
    match q {
        m5::QoS::AtMostOnce => QoS::AtMostOnce,
        m5::QoS::AtLeastOnce => QoS::AtLeastOnce,
        m5::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn qos_to_v5(q: QoS) -> m5::QoS {
    match q {
        QoS::AtMostOnce => m5::QoS::AtMostOnce,
        QoS::AtLeastOnce => m5::QoS::AtLeastOnce,
        QoS::ExactlyOnce => m5::QoS::ExactlyOnce,
    }
}

fn from_v5(p: p5::Packet) -> In {
    let topic = |b: &bytes::Bytes| String::from_utf8_lossy(b).into_owned();
    match p {
        p5::Packet::Connect(c, will, _) => In::Connect(Connect {
            client_id: c.client_id,
            clean: c.clean_start,
            keep_alive: c.keep_alive,
            will: will.map(|w| {
                let mut p = Publish::from_bytes(topic(&w.topic), qos_from_v5(w.qos), w.message);
                p.retain = w.retain;
                p
            }),
        }),
        p5::Packet::Publish(p) => {
            let mut out = Publish::from_bytes(topic(&p.topic), qos_from_v5(p.qos), p.payload);
            (out.retain, out.pkid, out.dup) = (p.retain, p.pkid, p.dup);
            let props = p.properties.map_or_else(Props::default, |pr| Props {
                response_topic: pr.response_topic,
                correlation: pr.correlation_data,
            });
            In::Publish(out, props)
        }
        p5::Packet::PubRel(r) => In::PubRel(r.pkid),
        p5::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| (f.path, qos_from_v5(f.qos))).collect(),
        },
        p5::Packet::Unsubscribe(u) => In::Unsubscribe { pkid: u.pkid, topics: u.filters },
        p5::Packet::PingReq(_) => In::PingReq,
        p5::Packet::Disconnect(_) => In::Disconnect,
        _ => In::Other,
    }
}

fn to_v5(p: Out) -> p5::Packet {
    match p {
        Out::ConnAck { accepted } => p5::Packet::ConnAck(p5::ConnAck {
            session_present: false,
            code: if accepted {
                p5::ConnectReturnCode::Success
            } else {
                p5::ConnectReturnCode::ClientIdentifierNotValid
            },
            properties: None,
        }),
        Out::PubAck(id) => p5::Packet::PubAck(p5::PubAck::new(id, None)),
        Out::PubRec(id) => p5::Packet::PubRec(p5::PubRec::new(id, None)),
        Out::PubComp(id) => p5::Packet::PubComp(p5::PubComp::new(id, None)),
        Out::SubAck { pkid, codes } => p5::Packet::SubAck(p5::SubAck {
            pkid,
            return_codes: codes
                .into_iter()
                .map(|c| match c {
                    SubscribeReasonCode::Success(q) => p5::SubscribeReasonCode::Success(qos_to_v5(q)),
                    SubscribeReasonCode::Failure => p5::SubscribeReasonCode::Unspecified,
                })
                .collect(),
            properties: None,
        }),
        Out::UnsubAck { pkid, count } => p5::Packet::UnsubAck(p5::UnsubAck {
            pkid,
            reasons: vec![p5::UnsubAckReason::Success; count],
            properties: None,
        }),
        Out::PingResp => p5::Packet::PingResp(p5::PingResp),
        Out::Publish(p, props) => {
            let props = (props != Props::default()).then(|| p5::PublishProperties {
                response_topic: props.response_topic,
                correlation_data: props.correlation,
                ..Default::default()
            });
            let mut out = p5::Publish::new(p.topic, qos_to_v5(p.qos), p.payload, props);
            (out.retain, out.pkid, out.dup) = (p.retain, p.pkid, p.dup);
            p5::Packet::Publish(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CONNECT for client id "c", clean, keep-alive 10 s, at protocol `level` (4: 3.1.1, 5: 5,
    /// with an empty property block), as MQTT-v3.1.1 section 3.1 and MQTT-v5.0 section 3.1 lay
    /// it out.
    fn connect_bytes(level: u8) -> Vec<u8> {
        let mut v = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02, 0x00, 0x0a];
        if level == 5 {
            v.push(0x00); // properties: none
        }
        v.extend([0x00, 0x01, b'c']);
        let mut p = vec![0x10, v.len() as u8];
        p.extend(v);
        p
    }

    #[test]
    fn the_connect_says_the_version_and_a_partial_one_consumes_nothing() {
        for (level, version) in [(4, Version::V311), (5, Version::V5)] {
            let bytes = connect_bytes(level);
            let mut partial = BytesMut::from(&bytes[..bytes.len() - 1]);
            assert!(matches!(read_connect(&mut partial), Err(WireError::Incomplete)));
            assert_eq!(partial.len(), bytes.len() - 1, "nothing consumed");
            let mut buf = BytesMut::from(&bytes[..]);
            let (v, p) = read_connect(&mut buf).unwrap();
            assert_eq!(v, version);
            assert!(
                matches!(p, In::Connect(Connect { ref client_id, clean: true, keep_alive: 10, will: None }) if client_id == "c")
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_message_crosses_between_versions_with_its_topic_qos_and_retain_flag() {
        let mut p = Publish::new("demo/state", QoS::AtLeastOnce, r#"{"led_on":true}"#);
        p.retain = true;
        p.pkid = 7;
        let mut out = BytesMut::new();
        let props = Props { response_topic: Some("laptop/answers".into()), correlation: Some("q-1".into()) };
        write(Version::V5, &mut out, Out::Publish(p.clone(), props.clone())).unwrap();
        let In::Publish(back, back_props) = read(Version::V5, &mut out).unwrap() else { panic!("not a publish") };
        assert_eq!(back, p);
        assert_eq!(back_props, props, "request/response goes on between MQTT 5 clients");
        write(Version::V311, &mut out, Out::Publish(p.clone(), props)).unwrap();
        let In::Publish(back, back_props) = read(Version::V311, &mut out).unwrap() else { panic!("not a publish") };
        assert_eq!((back, back_props), (p, Props::default()), "3.1.1 has no properties");
    }
}
