//! The demo's web page: one page, embedded in the binary (no CDN, no build step), its live
//! updates pushed as Server-Sent Events, on 127.0.0.1 only.
//!
//! | request | does |
//! |---|---|
//! | `GET /` | the page (`page.html`) |
//! | `GET /events` | `text/event-stream`: one JSON [`snapshot`] per change of the [`Board`] |
//! | `POST /light?level=N` | holds the simulated light at N (0-1000) |
//! | `POST /light?day` | back to the simulated day |
//! | `POST /network?up=false` / `?up=true` | cuts / restores the device's link to its broker |
//!
//! A `POST` must carry `X-Nightlight: 1`, which a page from another origin cannot send without
//! a CORS preflight this server never answers, and every request must name this server in
//! `Host` (no DNS rebinding): nothing but the page itself can move the light or cut the network.
//!
//! HTTP is hyper's HTTP/1 server (only in `virtual` builds): small, and already the Rust
//! ecosystem's HTTP core; the page needs three routes, not a framework.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::relay::Network;
use super::view::{Board, Seen};
use crate::payload::SimulatedLight;
use crate::sensor::SimulatedControl;

const PAGE: &str = include_str!("page.html");

/// What the page shows and moves.
pub struct App {
    pub id: String,
    pub threshold: u16,
    pub hysteresis: u16,
    pub board: Arc<Board>,
    pub control: SimulatedControl,
    pub network: Network,
}

/// Serves `app` on `listener` until the task is dropped.
///
/// Bounded for a shared machine: at most [`MAX_CONNECTIONS`] at once (one more is closed at
/// once), [`HEADER_TIMEOUT`] to send a request's headers, and a failed accept (out of file
/// descriptors, say) waits before the next instead of spinning.
pub async fn serve(listener: TcpListener, app: Arc<App>) {
    let Ok(addr) = listener.local_addr() else { return };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = crate::broker::accept(&listener).await;
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(handle(&app, addr, &req)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(io, service)
                .await;
            drop(slot);
        });
    }
}

/// Connections the page serves at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send a request's headers.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

type Reply = Response<Either<Full<Bytes>, Events>>;

fn handle(app: &Arc<App>, addr: SocketAddr, req: &Request<Incoming>) -> Reply {
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let port = addr.port();
    if host != format!("127.0.0.1:{port}") && host != format!("localhost:{port}") {
        return text(StatusCode::MISDIRECTED_REQUEST, "this server answers to 127.0.0.1 only");
    }
    let query = req.uri().query().unwrap_or_default();
    if req.method() == Method::POST && req.headers().get("x-nightlight").is_none_or(|v| v != "1") {
        return text(StatusCode::FORBIDDEN, "missing X-Nightlight: 1");
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => Response::builder()
            .header(CONTENT_TYPE, "text/html; charset=utf-8")
            .header(CACHE_CONTROL, "no-store")
            .body(Either::Left(Full::new(Bytes::from_static(PAGE.as_bytes()))))
            .expect("static response"),
        (&Method::GET, "/events") => Response::builder()
            .header(CONTENT_TYPE, "text/event-stream")
            .header(CACHE_CONTROL, "no-store")
            .body(Either::Right(Events::start(app.clone())))
            .expect("static response"),
        (&Method::POST, "/light") => match light_request(query) {
            Ok(Some(level)) => {
                app.control.set(SimulatedLight::Level(level));
                no_content()
            }
            Ok(None) => {
                app.control.clear();
                no_content()
            }
            Err(e) => text(StatusCode::BAD_REQUEST, e),
        },
        (&Method::POST, "/network") => match query {
            "up=true" => {
                app.network.set(true);
                no_content()
            }
            "up=false" => {
                app.network.set(false);
                no_content()
            }
            _ => text(StatusCode::BAD_REQUEST, "expected ?up=true or ?up=false"),
        },
        (_, "/" | "/events" | "/light" | "/network") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// `level=N` (0-1000) holds the light; `day` releases it.
fn light_request(query: &str) -> Result<Option<u16>, &'static str> {
    const ERR: &str = "expected ?level=0..1000 or ?day";
    match query.split_once('=') {
        None if query == "day" => Ok(None),
        Some(("level", v)) => v.parse::<u16>().ok().filter(|l| *l <= 1000).map(Some).ok_or(ERR),
        _ => Err(ERR),
    }
}

/// The page's view of the board; `readings` holds those after the first `seen`.
pub fn snapshot(app: &App, s: &Seen, seen: u64) -> serde_json::Value {
    let readings: Vec<[u64; 2]> = s.readings_after(seen).map(|&(ts, l)| [ts, u64::from(l)]).collect();
    json!({
        "id": app.id,
        "threshold": app.threshold,
        "hysteresis": app.hysteresis,
        "light": s.light,
        "led": s.led,
        "connection": s.status,
        "queue": s.queue,
        "network": s.network,
        "override": s.light_override,
        "commands": s.commands,
        "recent": s.recent,
        "readings": readings,
    })
}

/// The `/events` body: a task turns board changes into SSE frames for one client, and ends
/// when the client goes (its body, and so the receiver, is dropped).
pub struct Events(mpsc::Receiver<Bytes>);

impl Events {
    fn start(app: Arc<App>) -> Self {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut changes = app.board.watch();
            let mut seen = 0;
            loop {
                let (msg, total) = app.board.read(|s| (snapshot(&app, s, seen), s.readings_total));
                seen = total;
                if tx.send(Bytes::from(format!("data: {msg}\n\n"))).await.is_err() {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        });
        Events(rx)
    }
}

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn no_content() -> Reply {
    Response::builder().status(StatusCode::NO_CONTENT).body(Either::Left(Full::default())).expect("static response")
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Either::Left(Full::new(Bytes::from_static(body.as_bytes()))))
        .expect("static response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_light_request_takes_a_level_in_range_or_the_day() {
        assert_eq!(light_request("level=50"), Ok(Some(50)));
        assert_eq!(light_request("level=1000"), Ok(Some(1000)));
        assert_eq!(light_request("day"), Ok(None));
        assert!(light_request("level=1001").is_err());
        assert!(light_request("level=-1").is_err());
        assert!(light_request("").is_err());
        assert!(light_request("day=1").is_err());
    }
}
