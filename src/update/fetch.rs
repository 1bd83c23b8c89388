//! Fetching a `.deb` over HTTP(S): resumed with `Range` where it stopped, never hanging.
//!
//! Rules:
//! - One GET per attempt, `Connection: close`; `Range: bytes=N-` once N bytes are kept. A `206`
//!   must start at N; a `200` (a server that ignores `Range`) starts the file again; a `416` with
//!   the whole file kept is the end. A body must come with a `Content-Length` (what every static
//!   file server sends); a chunked one is refused with a reason.
//! - Never more than the manifest's size is kept: a server with a larger file is refused, one with
//!   a smaller file (truncated) too.
//! - No byte for [`Fetcher::stall`] is a stall: the attempt ends and the next one resumes.
//! - What was fetched is synced every [`SYNC_EVERY`] bytes. After a restart (a `kill -9`, a power
//!   cut) the last [`SYNC_EVERY`] bytes and the incomplete block are fetched again, since only
//!   what was synced is known to be on the storage: at most 2 × [`SYNC_EVERY`] (32 KiB) per
//!   interruption. Within one run an interrupted connection resumes exactly where it was.
//! - The file is checked whole at the end ([`sha256_of`]) by the caller.
//!
//! Written by hand over tokio's `TcpStream` and the `tokio-rustls` already linked for MQTT: a
//! client crate (hyper's +156 KiB, ureq's +246 KiB) would take most of the update's budget.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How often what was fetched is synced to storage (and so what a power cut can cost).
pub const SYNC_EVERY: u64 = 16 * 1024;
/// The largest response head read.
const MAX_HEAD: usize = 16 * 1024;

/// Where to fetch from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parses an `http://` or `https://` URL (no user info).
    ///
    /// # Errors
    /// Another scheme, no host, a bad port, user info.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("{url}: not an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(format!("{url}: credentials in a URL are not supported"));
        }
        let default = if https { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("{url}: bad IPv6 address"))?;
            (h.to_owned(), after.strip_prefix(':').map(str::parse).transpose().map_err(|_| format!("{url}: bad port"))?)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p.parse().map_err(|_| format!("{url}: bad port"))?)),
                None => (authority.to_owned(), None),
            }
        };
        if host.is_empty() || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!("{url}: no host, or spaces in the path"));
        }
        Ok(Url { https, host, port: port.unwrap_or(default), path })
    }
}

/// Why an attempt ended short of the whole file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Worth another attempt: the connection, the server's state, a stall.
    #[error("{0}")]
    Transient(String),
    /// Another attempt would get the same: the file, the URL, the storage.
    #[error("{0}")]
    Fatal(String),
}

/// Fetches one file into `part`, resuming.
pub struct Fetcher {
    pub url: Url,
    /// The manifest's size.
    pub size: u64,
    /// No byte for this long ends an attempt.
    pub stall: Duration,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Fetcher {
    /// Opens `part` to resume: what a restart may not have on storage is dropped (see the module
    /// doc); returns the file and how many bytes it keeps.
    ///
    /// # Errors
    /// It cannot be opened or truncated.
    pub fn open_after_restart(part: &Path) -> io::Result<(File, u64)> {
        let mut f = crate::statefile::open_regular(
            part,
            OpenOptions::new().read(true).write(true).create(true).truncate(false),
        )?;
        let len = f.metadata()?.len();
        let keep = (len / SYNC_EVERY).saturating_sub(1) * SYNC_EVERY;
        f.set_len(keep)?;
        f.seek(SeekFrom::Start(keep))?;
        Ok((f, keep))
    }

    /// One attempt: GET from `*have` bytes on, appending to `file` (positioned at `*have`),
    /// `progress(have)` after each write. `Ok` once the whole file is kept.
    ///
    /// # Errors
    /// See [`FetchError`]; `*have` is what is kept either way.
    pub async fn attempt(
        &self,
        file: &mut File,
        have: &mut u64,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), FetchError> {
        if *have == self.size {
            return Ok(());
        }
        let tcp = self.timed(TcpStream::connect((self.url.host.as_str(), self.url.port))).await?.map_err(|e| {
            FetchError::Transient(format!("cannot connect to {}:{}: {e}", self.url.host, self.url.port))
        })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            Some(cfg) if self.url.https => {
                let name = rustls::pki_types::ServerName::try_from(self.url.host.clone())
                    .map_err(|_| FetchError::Fatal(format!("{}: not a host name for TLS", self.url.host)))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone());
                let stream = self
                    .timed(tls.connect(name, tcp))
                    .await?
                    .map_err(|e| FetchError::Transient(format!("TLS with {}: {e}", self.url.host)))?;
                self.exchange(stream, file, have, progress).await
            }
            Some(_) | None if self.url.https => Err(FetchError::Fatal("https:// without TLS".into())),
            _ => self.exchange(tcp, file, have, progress).await,
        }
    }

    async fn timed<F: std::future::Future>(&self, f: F) -> Result<F::Output, FetchError> {
        tokio::time::timeout(self.stall, f)
            .await
            .map_err(|_| FetchError::Transient(format!("stalled: nothing for {} s", self.stall.as_secs_f32())))
    }

    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut s: S,
        file: &mut File,
        have: &mut u64,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), FetchError> {
        let transient = |what: &str, e: io::Error| FetchError::Transient(format!("{what}: {e}"));
        let range = if *have > 0 { format!("Range: bytes={}-\r\n", *have) } else { String::new() };
        let host = if self.url.host.contains(':') { format!("[{}]", self.url.host) } else { self.url.host.clone() };
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {host}:{}\r\nUser-Agent: nightlight/{}\r\n{range}Connection: close\r\n\r\n",
            self.url.path,
            self.url.port,
            crate::VERSION
        );
        self.timed(s.write_all(req.as_bytes())).await?.map_err(|e| transient("sending the request", e))?;
        // The head, then whatever of the body came with it.
        let mut buf = Vec::with_capacity(4096);
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err(FetchError::Transient("the response head is too large".into()));
            }
            let mut chunk = [0u8; 4096];
            let n = self.timed(s.read(&mut chunk)).await?.map_err(|e| transient("reading the response", e))?;
            if n == 0 {
                return Err(FetchError::Transient("the server closed the connection before answering".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = Head::parse(&buf[..head_end])?;
        let mut body = buf.split_off(head_end);
        let (start, length) = match head.status {
            206 => {
                let (first, total) =
                    head.content_range.ok_or_else(|| FetchError::Transient("206 without Content-Range".into()))?;
                if first != *have {
                    return Err(FetchError::Transient(format!(
                        "asked from byte {}, the server sent from {first}",
                        *have
                    )));
                }
                if total.is_some_and(|t| t != self.size) {
                    return Err(self.wrong_size(total.unwrap_or(0)));
                }
                (first, head.content_length)
            }
            200 => {
                if head.content_length.is_some_and(|l| l != self.size) {
                    return Err(self.wrong_size(head.content_length.unwrap_or(0)));
                }
                (0, head.content_length)
            }
            416 if *have == self.size => return Ok(()),
            416 => return Err(FetchError::Transient(format!("the server refused the range from byte {}", *have))),
            404 | 410 => return Err(FetchError::Fatal(format!("the server has no such file (HTTP {})", head.status))),
            s @ 500..=599 => return Err(FetchError::Transient(format!("the server failed (HTTP {s})"))),
            s => return Err(FetchError::Fatal(format!("the server answered HTTP {s}"))),
        };
        if head.chunked {
            return Err(FetchError::Fatal(
                "the server sent a chunked body: serve the file with a Content-Length".into(),
            ));
        }
        let length = length.ok_or_else(|| FetchError::Fatal("the server sent no Content-Length".into()))?;
        if start + length > self.size {
            return Err(self.wrong_size(start + length));
        }
        if start == 0 && *have > 0 {
            // The server ignores Range: start over.
            file.set_len(0).and_then(|()| file.seek(SeekFrom::Start(0)).map(drop)).map_err(storage)?;
            *have = 0;
        }
        let end = start + length;
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            if !body.is_empty() {
                let take = body.len().min((end - *have) as usize);
                self.keep(file, have, &body[..take])?;
                progress(*have);
                body.clear();
            }
            if *have == end {
                break;
            }
            let n = self.timed(s.read(&mut chunk)).await?.map_err(|e| transient("reading the file", e))?;
            if n == 0 {
                return Err(FetchError::Transient(format!("the connection closed at byte {} of {}", *have, self.size)));
            }
            body.extend_from_slice(&chunk[..n]);
        }
        file.sync_data().map_err(storage)?;
        if *have < self.size {
            return Err(FetchError::Fatal(format!(
                "the server's file ends at byte {} and the manifest says {}: truncated",
                *have, self.size
            )));
        }
        Ok(())
    }

    /// Appends `bytes`, syncing each time another [`SYNC_EVERY`] is passed.
    fn keep(&self, file: &mut File, have: &mut u64, bytes: &[u8]) -> Result<(), FetchError> {
        file.write_all(bytes).map_err(storage)?;
        let before = *have;
        *have += bytes.len() as u64;
        if *have / SYNC_EVERY != before / SYNC_EVERY {
            file.sync_data().map_err(storage)?;
        }
        Ok(())
    }

    fn wrong_size(&self, theirs: u64) -> FetchError {
        if theirs < self.size {
            FetchError::Fatal(format!(
                "the server's file is {theirs} bytes and the manifest says {}: truncated",
                self.size
            ))
        } else {
            FetchError::Fatal(format!("the server's file is {theirs} bytes and the manifest says {}", self.size))
        }
    }
}

fn storage(e: io::Error) -> FetchError {
    FetchError::Fatal(format!("cannot write the download: {e}"))
}

/// What the client needs of a response head.
#[derive(Debug, Default, PartialEq, Eq)]
struct Head {
    status: u16,
    content_length: Option<u64>,
    /// `Content-Range: bytes FIRST-LAST/TOTAL` (TOTAL `*`: `None`).
    content_range: Option<(u64, Option<u64>)>,
    chunked: bool,
}

impl Head {
    fn parse(raw: &[u8]) -> Result<Self, FetchError> {
        let bad = || FetchError::Transient("the server's answer is not HTTP/1".into());
        let text = std::str::from_utf8(raw).map_err(|_| bad())?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().ok_or_else(bad)?;
        let mut parts = status_line.splitn(3, ' ');
        if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
            return Err(bad());
        }
        let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let mut head = Head { status, ..Head::default() };
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':').ok_or_else(bad)?;
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => head.content_length = Some(value.parse().map_err(|_| bad())?),
                "transfer-encoding" => head.chunked = value.to_ascii_lowercase().contains("chunked"),
                "content-range" => {
                    let spec = value.strip_prefix("bytes ").ok_or_else(bad)?;
                    let (range, total) = spec.split_once('/').ok_or_else(bad)?;
                    let first = range.split_once('-').and_then(|(f, _)| f.parse().ok()).ok_or_else(bad)?;
                    head.content_range = Some((first, total.parse().ok()));
                }
                _ => {}
            }
        }
        Ok(head)
    }
}

/// The SHA-256 of a file, as hex.
///
/// # Errors
/// It cannot be read.
pub fn sha256_of(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(super::manifest::to_hex(ctx.finish().as_ref()))
}

/// Free bytes for an unprivileged user on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_host_port_and_path() {
        assert_eq!(
            Url::parse("http://10.0.2.100:8000/debs/n.deb?x=1").unwrap(),
            Url { https: false, host: "10.0.2.100".into(), port: 8000, path: "/debs/n.deb?x=1".into() }
        );
        assert_eq!(Url::parse("https://example.org").unwrap().port, 443);
        assert_eq!(Url::parse("http://[::1]:81/a").unwrap().host, "::1");
        for bad in ["ftp://x/y", "http://user:pw@x/y", "http://x:port/", "http:///a", "http://x/a b"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_range_answer_says_where_it_starts_and_the_whole_size() {
        let h =
            Head::parse(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\nContent-Range: bytes 5-14/15\r\n\r\n")
                .unwrap();
        assert_eq!(
            h,
            Head { status: 206, content_length: Some(10), content_range: Some((5, Some(15))), chunked: false }
        );
        assert!(Head::parse(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(Head::parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap().chunked);
    }

    #[test]
    fn after_a_restart_only_what_was_surely_synced_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("p");
        for (len, kept) in
            [(0, 0), (SYNC_EVERY - 1, 0), (SYNC_EVERY * 3 + 5, SYNC_EVERY * 2), (SYNC_EVERY * 2, SYNC_EVERY)]
        {
            std::fs::write(&part, vec![7u8; len as usize]).unwrap();
            let (_, have) = Fetcher::open_after_restart(&part).unwrap();
            assert_eq!(have, kept, "from {len}");
            assert_eq!(std::fs::metadata(&part).unwrap().len(), kept);
            assert!(len - kept <= 2 * SYNC_EVERY);
        }
    }
}
