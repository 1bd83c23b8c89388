//! The metrics endpoint (`metrics.listen`) and the textfile (`metrics.textfile`).
//!
//! Rules:
//! - `GET /metrics` (and `HEAD`) answers the exposition; any other path is 404, any other
//!   method 405, a head that is not HTTP/1 400 (and the connection closed). Nothing a peer
//!   sends reaches the device loop. HTTP/1.1 keep-alive, as Prometheus uses it; no request
//!   body is read (a request with one is not a scrape, and its bytes end the connection).
//! - Written for this one job rather than with hyper: hyper's server cost +128 KiB on the
//!   aarch64 binary, over the whole +100 KiB budget for metrics (measured; the demo's page, in
//!   virtual builds only, keeps hyper).
//! - Memory is bounded whatever peers do: at most [`MAX_CONNECTIONS`] at once (one more is
//!   closed at accept), a request's head must arrive within [`HEAD_TIMEOUT`], and a connection
//!   is closed after [`CONNECTION_LIFETIME`] whatever it is doing (a client that never reads
//!   what it asked for included).
//! - Scrapes within [`FRESH_FOR`] of each other share one rendering: a flood of scrapes costs
//!   the socket work, not the formatting.
//! - The textfile is written as node_exporter's textfile collector wants it: a temporary file
//!   beside it (no `.prom` suffix, so never read half-written), then a rename; readable by all
//!   (node_exporter runs as another user). It is meant for `/run`: in memory.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::Counters;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// A request's head must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Any connection is closed after this.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// The most a request head may take.
pub const MAX_HEAD: usize = 8 * 1024;
/// Scrapes within this share one rendering.
pub const FRESH_FOR: Duration = Duration::from_millis(100);
/// How often the textfile is written.
pub const TEXTFILE_EVERY: Duration = Duration::from_secs(5);

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Starts what `metrics` configures, on a thread of its own (its own single-threaded runtime):
/// a scrape never waits for the device loop, and the device loop never waits for a scrape. The
/// endpoint: a bind that fails is logged, and the device runs without it (a taken port must not
/// keep a nightlight dark). The textfile: written every `TEXTFILE_EVERY` (5 s).
pub fn start(cfg: &crate::config::MetricsConfig, counters: &Arc<Counters>) {
    let listener = cfg.listen_addr().and_then(|addr| match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            let at = l.local_addr().map_or_else(|_| addr.to_string(), |a| a.to_string());
            tracing::info!(listen = %at, "metrics: serving GET /metrics");
            Some(l)
        }
        Err(e) => {
            tracing::error!(listen = %addr, error = %e, "metrics: cannot listen on metrics.listen; running without the endpoint");
            None
        }
    });
    let textfile = (!cfg.textfile.is_empty()).then(|| PathBuf::from(&cfg.textfile));
    if let Some(w) = textfile.as_deref().and_then(textfile_warning) {
        warn!("{w}");
    }
    if listener.is_none() && textfile.is_none() {
        return;
    }
    let counters = counters.clone();
    let thread = std::thread::Builder::new().name("metrics".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return tracing::error!(error = %e, "metrics: cannot start; running without them"),
        };
        rt.block_on(async move {
            let endpoint = async {
                match listener.map(|l| l.set_nonblocking(true).and_then(|()| TcpListener::from_std(l))) {
                    Some(Ok(l)) => serve(l, counters.clone()).await,
                    Some(Err(e)) => tracing::error!(error = %e, "metrics: cannot serve; running without the endpoint"),
                    None => {}
                }
            };
            let file = async {
                if let Some(path) = textfile {
                    write_textfile(path, counters.clone()).await;
                }
            };
            tokio::join!(endpoint, file);
        });
    });
    if let Err(e) = thread {
        tracing::error!(error = %e, "metrics: cannot start a thread; running without them");
    }
}

/// The warning for a textfile on storage, not in memory (`None` in memory): rewritten every
/// few seconds, it wears an SD card for nothing.
pub fn textfile_warning(path: &Path) -> Option<String> {
    let medium = crate::queue::medium::of_dir(path.parent().unwrap_or(Path::new("/")));
    medium.is_durable().then(|| {
        format!(
            "metrics.textfile {} is on storage, not in memory: it is rewritten every few seconds; put it under /run \
             (the unit makes /run/nightlight)",
            path.display()
        )
    })
}

/// The exposition, rendered at most once per [`FRESH_FOR`] however many scrape it.
struct Rendered {
    last: std::sync::Mutex<Option<(std::time::Instant, Arc<String>)>>,
}

impl Rendered {
    fn get(&self, counters: &Counters) -> Arc<String> {
        // A poisoned lock means a panic elsewhere, and panics abort this program.
        let mut last = self.last.lock().expect("lock");
        match &*last {
            Some((at, text)) if at.elapsed() < FRESH_FOR => text.clone(),
            _ => {
                let text = Arc::new(counters.render(crate::clock::now().0));
                *last = Some((std::time::Instant::now(), text.clone()));
                text
            }
        }
    }
}

/// Serves scrapes until the process ends.
pub async fn serve(listener: TcpListener, counters: Arc<Counters>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let rendered = Arc::new(Rendered { last: std::sync::Mutex::new(None) });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics: too many connections; closed");
            continue;
        };
        let (counters, rendered) = (counters.clone(), rendered.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(CONNECTION_LIFETIME, connection(stream, &counters, &rendered)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics: connection ended"),
                Err(_) => debug!(%peer, "metrics: connection closed after its lifetime"),
            }
            drop(slot);
        });
    }
}

/// One connection: requests answered in turn (keep-alive) until the peer closes it, a head
/// does not arrive within [`HEAD_TIMEOUT`], or one is malformed.
async fn connection(mut stream: TcpStream, counters: &Counters, rendered: &Rendered) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream, &mut buf)).await {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => return Ok(()), // closed between requests
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no request head in time")),
        };
        let (status, body, close, head_only) = match parse(&head) {
            Some(req) => {
                let (status, body) = answer(req.method, req.path, counters, rendered);
                (status, body, req.close, req.method == "HEAD")
            }
            None => ("400 Bad Request", Arc::new("400: not an HTTP/1 request\n".to_owned()), true, false),
        };
        let kind = if status.starts_with("200") { CONTENT_TYPE } else { "text/plain; charset=utf-8" };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{}\r\n{}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" },
            if head_only { "" } else { body.as_str() }
        );
        stream.write_all(response.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

/// Reads up to the end of a request head (a blank line), at most [`MAX_HEAD`] bytes; what was
/// read past it (a pipelined request) stays in `buf`. `None`: closed before a byte of it.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf[..end].to_vec();
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too large"));
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What is used of a request head.
struct Head<'a> {
    method: &'a str,
    path: &'a str,
    /// HTTP/1.0, or `Connection: close`.
    close: bool,
}

fn parse(head: &[u8]) -> Option<Head<'_>> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target, version) = (first.next()?, first.next()?, first.next()?);
    if first.next().is_some() || !version.starts_with("HTTP/1.") || method.is_empty() {
        return None;
    }
    let close = version == "HTTP/1.0"
        || lines.any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
            })
        });
    let path = target.split('?').next().unwrap_or(target);
    Some(Head { method, path, close })
}

fn answer(method: &str, path: &str, counters: &Counters, rendered: &Rendered) -> (&'static str, Arc<String>) {
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", rendered.get(counters)),
        (_, "/metrics") => ("405 Method Not Allowed", Arc::new("405: metrics are at GET /metrics\n".into())),
        _ => ("404 Not Found", Arc::new("404: metrics are at GET /metrics\n".into())),
    }
}

/// Writes the textfile every `TEXTFILE_EVERY` (5 s), once the device loop gave its figures, until the
/// process ends; a failure is logged once until a write succeeds again.
pub async fn write_textfile(path: PathBuf, counters: Arc<Counters>) {
    let mut failing = false;
    let mut every = tokio::time::interval(TEXTFILE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if !counters.has_snapshot() {
            continue; // the device loop's figures are not there yet: no half a file
        }
        match write_once(&path, counters.render(crate::clock::now().0).as_bytes()) {
            Ok(()) if failing => {
                failing = false;
                debug!(path = %path.display(), "metrics: writing the textfile again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                warn!(path = %path.display(), error = %e, "metrics: cannot write metrics.textfile; retrying");
            }
            Err(_) => {}
        }
    }
}

/// The textfile, atomically: a temporary file beside it, then a rename.
///
/// # Errors
/// The directory is not writable, or full.
pub fn write_once(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let name = path.file_name().ok_or_else(|| io::Error::other("metrics.textfile names no file"))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp)?;
    // The service's umask (0077) would hide it from node_exporter.
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_line_gives_method_path_and_whether_to_close() {
        let h = parse(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nConnection: Close").unwrap();
        assert_eq!((h.method, h.path, h.close), ("GET", "/metrics", true));
        let h = parse(b"GET /metrics HTTP/1.1\r\nHost: a").unwrap();
        assert!(!h.close, "HTTP/1.1 keeps the connection");
        assert!(parse(b"GET /metrics HTTP/1.0").unwrap().close, "HTTP/1.0 closes it");
    }

    #[test]
    fn anything_that_is_not_an_http_1_request_line_is_refused() {
        for bad in [&b"GET /metrics"[..], b"GET /metrics HTTP/2.0", b"\xff\xfe", b"GET  /metrics HTTP/1.1", b""] {
            assert!(parse(bad).is_none(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
