//! One simulated device's MQTT 3.1.1 connection: rumqttc's own packet codec over a plain TCP
//! socket, nothing else (no event loop, no request channel, no state machine of rumqttc's: the
//! simulated device is its own state machine). What a broker sees is a standard client.
//!
//! Rules:
//! - Reads are cancel-safe: a packet leaves the read buffer only once it is whole.
//! - Buffers stay small: a device's read buffer starts at [`READ_START`] bytes and is given back
//!   when it grew past [`READ_KEEP`] and is empty again (10,000 devices hold their buffers for
//!   the whole run, so a few KiB each would be the fleet's memory).
//! - A packet over [`MAX_PACKET`] ends the connection (a device's commands and manifests are small).

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, LastWill};
use rumqttc::mqttbytes::QoS;
use rumqttc::{ConnectReturnCode, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest packet a simulated device reads.
pub const MAX_PACKET: usize = 16 * 1024;
/// A read buffer's first size.
const READ_START: usize = 256;
/// A read buffer larger than this is given back once empty.
const READ_KEEP: usize = 2048;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the broker closed the connection")]
    Closed,
    #[error("the broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
    #[error("not MQTT: {0}")]
    Protocol(String),
    #[error("no CONNACK within {0:?}")]
    Timeout(Duration),
}

/// A connected client.
pub struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// What a CONNECT says.
pub struct Hello<'a> {
    pub client_id: &'a str,
    pub keep_alive_s: u16,
    pub clean: bool,
    /// Topic and payload of the Last Will, sent retained at QoS 1.
    pub will: Option<(String, &'static [u8])>,
}

impl Conn {
    /// Connects to `broker` and waits for the CONNACK (at most `timeout`); returns whether the
    /// broker kept a session.
    ///
    /// # Errors
    /// Cannot connect, refused, or no answer in time.
    pub async fn open(broker: &str, hello: &Hello<'_>, timeout: Duration) -> Result<(Self, bool), ConnError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(broker))
            .await
            .map_err(|_| ConnError::Timeout(timeout))??;
        stream.set_nodelay(true)?;
        let mut conn = Conn { stream, rbuf: BytesMut::with_capacity(READ_START), wbuf: BytesMut::new() };
        let mut connect = Connect::new(hello.client_id);
        connect.keep_alive = hello.keep_alive_s;
        connect.clean_session = hello.clean;
        connect.last_will = hello.will.as_ref().map(|(t, p)| LastWill::new(t.clone(), *p, QoS::AtLeastOnce, true));
        conn.send(&Packet::Connect(connect)).await?;
        match tokio::time::timeout(timeout, conn.recv()).await.map_err(|_| ConnError::Timeout(timeout))?? {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok((conn, a.session_present)),
            Packet::ConnAck(a) => Err(ConnError::Refused(a.code)),
            other => Err(ConnError::Protocol(format!("{other:?} before CONNACK"))),
        }
    }

    /// Writes one packet.
    ///
    /// # Errors
    /// The socket failed.
    pub async fn send(&mut self, packet: &Packet) -> Result<(), ConnError> {
        self.wbuf.clear();
        packet.write(&mut self.wbuf, MAX_PACKET).map_err(|e| ConnError::Protocol(e.to_string()))?;
        self.stream.write_all(&self.wbuf).await?;
        if self.wbuf.capacity() > READ_KEEP {
            self.wbuf = BytesMut::new();
        }
        Ok(())
    }

    /// The next packet. Cancel-safe.
    ///
    /// # Errors
    /// The socket failed or closed, or the bytes are not MQTT.
    pub async fn recv(&mut self) -> Result<Packet, ConnError> {
        loop {
            match Packet::read(&mut self.rbuf, MAX_PACKET) {
                Ok(p) => {
                    if self.rbuf.is_empty() && self.rbuf.capacity() > READ_KEEP {
                        self.rbuf = BytesMut::with_capacity(READ_START);
                    }
                    return Ok(p);
                }
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => self.rbuf.reserve(n.max(READ_START / 2)),
                Err(e) => return Err(ConnError::Protocol(e.to_string())),
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ConnError::Closed);
            }
        }
    }
}
