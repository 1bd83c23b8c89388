//! The demo device's network: a TCP relay between the device and the embedded broker, with a
//! switch. Off, it closes the device's connections and every new one at once, as an unplugged
//! cable would; the broker then sees the device vanish (its Last Will fires) and the device
//! queues its readings until the switch is back on.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The switch; clones share it.
#[derive(Debug, Clone)]
pub struct Network(watch::Sender<bool>);

impl Network {
    pub fn set(&self, up: bool) {
        self.0.send_replace(up);
    }

    pub fn is_up(&self) -> bool {
        *self.0.borrow()
    }
}

/// Binds the relay on 127.0.0.1 (a free port) in front of `broker`; serves until dropped.
///
/// # Errors
/// No port can be bound.
pub async fn bind(broker: SocketAddr) -> std::io::Result<(SocketAddr, Network, impl std::future::Future<Output = ()>)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = watch::channel(true);
    Ok((addr, Network(tx), serve(listener, broker, rx)))
}

async fn serve(listener: TcpListener, broker: SocketAddr, up: watch::Receiver<bool>) {
    loop {
        let (device, _) = crate::broker::accept(&listener).await;
        if !*up.borrow() {
            drop(device); // unplugged: the connection closes at once
            continue;
        }
        tokio::spawn(pipe(device, broker, up.clone()));
    }
}

/// Copies both ways until either side closes or the switch goes off.
async fn pipe(mut device: TcpStream, broker: SocketAddr, mut up: watch::Receiver<bool>) {
    let Ok(mut upstream) = TcpStream::connect(broker).await else { return };
    let _ = device.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut device, &mut upstream) => {}
        _ = up.wait_for(|u| !*u) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn off_cuts_the_open_connection_and_refuses_new_ones_until_on() {
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        let _ = s.write_all(&buf[..n]).await;
                    }
                });
            }
        });
        let (addr, net, relay) = bind(echo_addr).await.unwrap();
        tokio::spawn(relay);
        let roundtrip = |mut s: TcpStream| async move {
            s.write_all(b"ping").await.ok()?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.ok()?;
            Some((s, buf))
        };

        let open = TcpStream::connect(addr).await.unwrap();
        let (mut open, got) = roundtrip(open).await.expect("through the relay");
        assert_eq!(&got, b"ping");

        net.set(false);
        let mut buf = [0u8; 4];
        assert_eq!(open.read(&mut buf).await.unwrap_or(0), 0, "the open connection is closed");
        let refused = TcpStream::connect(addr).await.unwrap();
        assert!(roundtrip(refused).await.is_none(), "a new connection is closed at once");

        net.set(true);
        let again = TcpStream::connect(addr).await.unwrap();
        assert!(roundtrip(again).await.is_some(), "on again: through");
    }
}
