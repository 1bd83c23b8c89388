//! Why a connection failed or ended, under either protocol, in words a person can act on.

use rumqttc::mqttbytes::Error as V4Bytes;
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5Code;
use rumqttc::v5::mqttbytes::Error as V5Bytes;
use rumqttc::v5::StateError as V5State;
use rumqttc::{ConnectReturnCode as V4Code, StateError as V4State};

/// A connection that failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    V4(Box<rumqttc::ConnectionError>),
    #[error(transparent)]
    V5(Box<rumqttc::v5::ConnectionError>),
}

impl From<rumqttc::ConnectionError> for LinkError {
    fn from(e: rumqttc::ConnectionError) -> Self {
        LinkError::V4(Box::new(e))
    }
}

impl From<rumqttc::v5::ConnectionError> for LinkError {
    fn from(e: rumqttc::v5::ConnectionError) -> Self {
        LinkError::V5(Box::new(e))
    }
}

/// Why a connection ended, in a few words fit for a metric's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// The broker (or something between) closed it.
    Closed,
    /// The broker stopped answering pings.
    KeepAlive,
    /// TLS failed.
    Tls,
    /// A message larger than the client reads.
    Oversized,
    /// The broker said no, or broke the protocol.
    Protocol,
    /// Any other I/O error or timeout.
    Io,
}

impl Lost {
    pub const ALL: [Lost; 6] = [Lost::Closed, Lost::KeepAlive, Lost::Tls, Lost::Oversized, Lost::Protocol, Lost::Io];

    pub fn as_str(self) -> &'static str {
        match self {
            Lost::Closed => "closed",
            Lost::KeepAlive => "keepalive",
            Lost::Tls => "tls",
            Lost::Oversized => "oversized",
            Lost::Protocol => "protocol",
            Lost::Io => "io",
        }
    }
}

/// A request the client could not take: its channel is full, or the event loop is gone.
#[derive(Debug, thiserror::Error)]
#[error("the MQTT client cannot take the request: {0}")]
pub struct RequestError(String);

impl RequestError {
    pub(crate) fn new(e: impl std::fmt::Display) -> Self {
        RequestError(e.to_string())
    }
}

impl LinkError {
    /// A short, human description; `host` for TLS name errors.
    pub fn describe(&self, host: &str) -> String {
        // A TLS alert can surface inside the MQTT codec's I/O error (TLS 1.3: a refused client
        // certificate is only learned at the first read after the handshake).
        let tls = crate::tls::explain(self, host).or_else(|| self.io().and_then(|io| crate::tls::explain(io, host)));
        if let Some(why) = tls {
            return why;
        }
        if let Some(io) = self.io() {
            return io.to_string();
        }
        let refused = |what: &str| format!("the broker refused the connection: {what}");
        match self {
            LinkError::V4(e) => {
                use rumqttc::ConnectionError as C;
                match &**e {
                    C::ConnectionRefused(V4Code::BadUserNamePassword) => bad_login(),
                    C::ConnectionRefused(V4Code::NotAuthorized) => not_authorized(),
                    C::ConnectionRefused(code) => refused(&format!("{code:?}")),
                    C::NetworkTimeout => "timed out connecting".into(),
                    C::MqttState(V4State::ConnectionAborted) => "connection closed by the broker".into(),
                    C::MqttState(V4State::AwaitPingResp) => "broker stopped answering pings".into(),
                    other => other.to_string(),
                }
            }
            LinkError::V5(e) => {
                use rumqttc::v5::ConnectionError as C;
                match &**e {
                    C::ConnectionRefused(V5Code::BadUserNamePassword) => bad_login(),
                    C::ConnectionRefused(V5Code::NotAuthorized) => not_authorized(),
                    C::ConnectionRefused(V5Code::UnsupportedProtocolVersion | V5Code::RefusedProtocolVersion) => {
                        "the broker does not speak MQTT 5: remove mqtt.protocol (the default tries MQTT 5, then 3.1.1) or set it to \"3.1.1\"".into()
                    }
                    C::ConnectionRefused(code) => refused(&format!("{code:?}")),
                    C::Timeout(_) => "timed out connecting".into(),
                    C::MqttState(V5State::ConnectionAborted) => "connection closed by the broker".into(),
                    C::MqttState(V5State::AwaitPingResp) => "broker stopped answering pings".into(),
                    C::MqttState(V5State::ServerDisconnect { reason_code, reason_string }) => match reason_string {
                        // The broker's own words: they go to the journal and systemd's status.
                        Some(s) => format!(
                            "the broker ended the connection: {reason_code:?} ({})",
                            crate::payload::printable(s, 200)
                        ),
                        None => format!("the broker ended the connection: {reason_code:?}"),
                    },
                    other => other.to_string(),
                }
            }
        }
    }

    /// A TLS certificate refused for its dates (not valid yet, expired): a clock problem when
    /// the clock is not synchronized.
    pub fn certificate_dates(&self) -> bool {
        crate::tls::is_date_error(self) || self.io().is_some_and(|io| crate::tls::is_date_error(io))
    }

    /// How strongly this failure of an MQTT 5 connection, before any CONNACK, says the broker
    /// does not speak MQTT 5: 2 for a CONNACK refusing the protocol version, 1 for a connection
    /// closed by the broker after our CONNECT (what 3.1.1-only brokers do), 0 for anything else
    /// (a refused login, TLS, no route, a timeout).
    pub fn v5_refused_at_connect(&self) -> u8 {
        use rumqttc::v5::ConnectionError as C;
        let LinkError::V5(e) = self else { return 0 };
        match &**e {
            C::ConnectionRefused(V5Code::UnsupportedProtocolVersion | V5Code::RefusedProtocolVersion) => 2,
            C::MqttState(V5State::ConnectionAborted) => 1,
            _ => match self.io() {
                Some(io)
                    if crate::tls::rustls_error(io).is_none()
                        && matches!(
                            io.kind(),
                            std::io::ErrorKind::UnexpectedEof
                                | std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::ConnectionAborted
                        ) =>
                {
                    1
                }
                _ => 0,
            },
        }
    }

    /// Why it ended, as a label.
    pub fn lost(&self) -> Lost {
        use std::io::ErrorKind as K;
        if self.oversized().is_some() {
            return Lost::Oversized;
        }
        let state = match self {
            LinkError::V4(e) => match &**e {
                rumqttc::ConnectionError::MqttState(V4State::AwaitPingResp) => Some(Lost::KeepAlive),
                rumqttc::ConnectionError::MqttState(V4State::ConnectionAborted) => Some(Lost::Closed),
                rumqttc::ConnectionError::Tls(_) => Some(Lost::Tls),
                rumqttc::ConnectionError::NetworkTimeout | rumqttc::ConnectionError::FlushTimeout => Some(Lost::Io),
                _ => None,
            },
            LinkError::V5(e) => match &**e {
                rumqttc::v5::ConnectionError::MqttState(V5State::AwaitPingResp) => Some(Lost::KeepAlive),
                rumqttc::v5::ConnectionError::MqttState(
                    V5State::ConnectionAborted | V5State::ServerDisconnect { .. },
                ) => Some(Lost::Closed),
                rumqttc::v5::ConnectionError::Tls(_) => Some(Lost::Tls),
                rumqttc::v5::ConnectionError::Timeout(_) => Some(Lost::Io),
                _ => None,
            },
        };
        if let Some(lost) = state {
            return lost;
        }
        match self.io() {
            // A TLS alert can surface inside the MQTT codec's I/O error.
            Some(io) if crate::tls::rustls_error(io).is_some() => Lost::Tls,
            Some(io)
                if matches!(
                    io.kind(),
                    K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
                ) =>
            {
                Lost::Closed
            }
            Some(_) => Lost::Io,
            None => Lost::Protocol,
        }
    }

    /// The I/O error underneath, wherever rumqttc put it.
    fn io(&self) -> Option<&std::io::Error> {
        match self {
            LinkError::V4(e) => match &**e {
                rumqttc::ConnectionError::Io(io)
                | rumqttc::ConnectionError::MqttState(V4State::Io(io))
                | rumqttc::ConnectionError::MqttState(V4State::Deserialization(V4Bytes::Io(io))) => Some(io),
                _ => None,
            },
            LinkError::V5(e) => match &**e {
                rumqttc::v5::ConnectionError::Io(io)
                | rumqttc::v5::ConnectionError::MqttState(V5State::Io(io))
                | rumqttc::v5::ConnectionError::MqttState(V5State::Deserialization(V5Bytes::Io(io))) => Some(io),
                _ => None,
            },
        }
    }

    /// The size of an incoming message larger than the client's limit, if that ended the
    /// connection.
    pub fn oversized(&self) -> Option<usize> {
        match self {
            LinkError::V4(e) => match &**e {
                rumqttc::ConnectionError::MqttState(V4State::Deserialization(V4Bytes::PayloadSizeLimitExceeded(n))) => {
                    Some(*n)
                }
                _ => None,
            },
            LinkError::V5(e) => match &**e {
                rumqttc::v5::ConnectionError::MqttState(V5State::Deserialization(
                    V5Bytes::PayloadSizeLimitExceeded { pkt_size, .. },
                )) => Some(*pkt_size),
                _ => None,
            },
        }
    }
}

fn bad_login() -> String {
    "the broker refused the username or password (check mqtt.username and the password)".into()
}

fn not_authorized() -> String {
    "the broker refused the connection: not authorized (wrong username or password, or not allowed)".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_close_at_connect_or_a_refused_version_says_the_broker_lacks_mqtt_5() {
        use rumqttc::v5::ConnectionError as C;
        let v5 = |e: C| LinkError::from(e).v5_refused_at_connect();
        assert_eq!(v5(C::ConnectionRefused(V5Code::UnsupportedProtocolVersion)), 2);
        assert_eq!(v5(C::MqttState(V5State::ConnectionAborted)), 1);
        assert_eq!(v5(C::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset))), 1);
        assert_eq!(v5(C::ConnectionRefused(V5Code::BadUserNamePassword)), 0, "a login");
        assert_eq!(v5(C::ConnectionRefused(V5Code::NotAuthorized)), 0, "a login or an ACL");
        assert_eq!(v5(C::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))), 0, "nothing listens");
        let tls = std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(v5(C::Io(tls)), 0, "TLS");
        let v4 = LinkError::from(rumqttc::ConnectionError::MqttState(V4State::ConnectionAborted));
        assert_eq!(v4.v5_refused_at_connect(), 0, "a 3.1.1 connection says nothing about MQTT 5");
    }

    #[test]
    fn a_broker_s_reason_string_cannot_add_a_line_to_the_journal_or_an_assignment_to_the_status() {
        use rumqttc::v5::mqttbytes::v5::DisconnectReasonCode;
        let e = LinkError::from(rumqttc::v5::ConnectionError::MqttState(V5State::ServerDisconnect {
            reason_code: DisconnectReasonCode::ServerShuttingDown,
            reason_string: Some("maintenance\nWATCHDOG=trigger\u{1b}[2J".into()),
        }));
        let d = e.describe("h");
        assert!(!d.contains('\n') && !d.contains('\u{1b}'), "{d:?}");
        assert!(d.contains("maintenance\\nWATCHDOG=trigger\\u{1b}[2J"), "{d}");
    }

    #[test]
    fn a_tls_alert_inside_the_mqtt_codec_is_explained_like_one_at_the_handshake() {
        let alert = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
            )
        };
        let v5: LinkError =
            rumqttc::v5::ConnectionError::MqttState(V5State::Deserialization(V5Bytes::Io(alert()))).into();
        let v4: LinkError = rumqttc::ConnectionError::MqttState(V4State::Deserialization(V4Bytes::Io(alert()))).into();
        for e in [v5, v4] {
            assert!(e.describe("h").contains("requires a client certificate"), "{}", e.describe("h"));
        }
    }

    #[test]
    fn a_lost_connection_is_labelled_by_what_ended_it() {
        use std::io::{Error, ErrorKind};
        let v4 = |e: rumqttc::ConnectionError| LinkError::from(e).lost();
        let v5 = |e: rumqttc::v5::ConnectionError| LinkError::from(e).lost();
        assert_eq!(v4(rumqttc::ConnectionError::Io(Error::from(ErrorKind::ConnectionReset))), Lost::Closed);
        assert_eq!(v4(rumqttc::ConnectionError::MqttState(V4State::ConnectionAborted)), Lost::Closed);
        assert_eq!(v4(rumqttc::ConnectionError::MqttState(V4State::AwaitPingResp)), Lost::KeepAlive);
        assert_eq!(
            v4(rumqttc::ConnectionError::MqttState(V4State::Deserialization(V4Bytes::PayloadSizeLimitExceeded(
                1 << 20
            )))),
            Lost::Oversized
        );
        assert_eq!(v4(rumqttc::ConnectionError::Io(Error::from(ErrorKind::HostUnreachable))), Lost::Io);
        assert_eq!(v4(rumqttc::ConnectionError::NetworkTimeout), Lost::Io);
        assert_eq!(v4(rumqttc::ConnectionError::ConnectionRefused(V4Code::NotAuthorized)), Lost::Protocol);
        assert_eq!(
            v5(rumqttc::v5::ConnectionError::MqttState(V5State::ServerDisconnect {
                reason_code: rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::AdministrativeAction,
                reason_string: None,
            })),
            Lost::Closed
        );
        assert_eq!(v5(rumqttc::v5::ConnectionError::MqttState(V5State::AwaitPingResp)), Lost::KeepAlive);
    }
}
