//! TLS for the MQTT link: rustls with the ring provider, the broker verified against
//! `mqtt.tls.ca_file` or the system roots (host name and IP addresses checked), and an optional
//! client certificate for mutual TLS (PEM; PKCS#8, PKCS#1 RSA and SEC1 EC keys).
//!
//! The client certificate is the broker's to judge, not ours: one that rustls's parser cannot
//! read (an X.509 v1 certificate, which OpenSSL 3 makes from the `openssl x509 -req` recipe of
//! `mosquitto-tls(7)`) is sent as it is; only a key that provably belongs to another
//! certificate is refused here. A broker certificate rustls cannot accept (v1, or without a
//! subjectAltName for the host) gets a message that says so and how to make one that works.
//!
//! Loading happens while the configuration is validated, so a missing or unreadable file is a
//! configuration error (exit 2) that names it.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, InconsistentKeys, RootCertStore};

use crate::config::TlsConfig;

/// A TLS setting that cannot be used: the key and the file, and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {reason}")]
pub struct TlsError {
    /// The configuration key naming the file.
    pub key: &'static str,
    pub file: String,
    pub reason: String,
}

/// Builds the rustls client configuration from `[mqtt.tls]`.
///
/// # Errors
/// A file is missing, unreadable or holds no usable certificate or key.
pub fn client_config(cfg: &TlsConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    if cfg.ca_file.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(TlsError {
                key: "mqtt.tls.ca_file",
                file: "(system roots)".into(),
                reason:
                    "no trusted root certificates found on this system: install ca-certificates or set mqtt.tls.ca_file"
                        .into(),
            });
        }
    } else {
        for cert in certs("mqtt.tls.ca_file", &cfg.ca_file)? {
            roots.add(cert).map_err(|e| err("mqtt.tls.ca_file", &cfg.ca_file, format!("not a CA certificate: {e}")))?;
        }
    }
    // Certificates are checked against the device's own clock (crate::clock), the one its
    // readings are stamped with, so the clock a Pi boots on is the one TLS sees.
    let builder = ClientConfig::builder_with_details(provider.clone(), Arc::new(DeviceClock))
        .with_safe_default_protocol_versions()
        .map_err(|e| err("mqtt.tls.enabled", "", e.to_string()))?
        .with_root_certificates(roots);
    let config = match (cfg.cert_file.is_empty(), cfg.key_file.is_empty()) {
        (true, true) => builder.with_no_client_auth(),
        (false, false) => {
            let chain = certs("mqtt.tls.cert_file", &cfg.cert_file)?;
            let signer = provider
                .key_provider
                .load_private_key(key(&cfg.key_file)?)
                .map_err(|e| err("mqtt.tls.key_file", &cfg.key_file, format!("cannot be used: {e}")))?;
            let certified = CertifiedKey::new(chain, signer);
            // Anything else is a match, or not knowable here (a certificate rustls cannot
            // parse): the broker verifies the certificate and that we hold its key.
            if let Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) = certified.keys_match() {
                return Err(err(
                    "mqtt.tls.key_file",
                    &cfg.key_file,
                    format!("is not the key of the certificate in {}", cfg.cert_file),
                ));
            }
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
        (true, false) => return Err(err("mqtt.tls.cert_file", "", "is required with mqtt.tls.key_file".into())),
        (false, true) => return Err(err("mqtt.tls.key_file", "", "is required with mqtt.tls.cert_file".into())),
    };
    Ok(Arc::new(config))
}

fn err(key: &'static str, file: &str, reason: String) -> TlsError {
    TlsError { key, file: file.to_owned(), reason }
}

fn read(key: &'static str, file: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(Path::new(file)).map_err(|e| err(key, file, format!("cannot read: {e}")))
}

fn certs(key: &'static str, file: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(key, file)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| err(key, file, format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err(key, file, "holds no PEM certificate".into()));
    }
    Ok(certs)
}

fn key(file: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("mqtt.tls.key_file", file)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| err("mqtt.tls.key_file", file, format!("not PEM: {e}")))?
        .ok_or_else(|| err("mqtt.tls.key_file", file, "holds no PEM private key (PKCS#8, RSA or EC)".into()))
}

/// rustls's clock: [`crate::clock::now`].
#[derive(Debug)]
struct DeviceClock;

impl rustls::time_provider::TimeProvider for DeviceClock {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        let ms = crate::clock::now().0;
        Some(rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_millis(ms)))
    }
}

/// The rustls error `e` carries, if any: `e` itself, something in its `source` chain, or the
/// payload of an I/O error in that chain (where rumqttc puts TLS failures).
pub fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = r.downcast_ref::<rustls::Error>() {
                return Some(r);
            }
        }
        cur = err.source();
    }
    None
}

/// Whether `e` (or what it wraps) is a certificate refused for its dates: not valid yet, or
/// expired. On a machine whose clock is not synchronized, that is the clock's fault as likely
/// as the certificate's.
pub fn is_date_error(e: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::{CertificateError as C, Error as E};
    matches!(
        rustls_error(e),
        Some(E::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. }
        ))
    )
}

/// Says in words why a TLS handshake failed, if `e` carries a rustls error.
pub fn explain(e: &(dyn std::error::Error + 'static), host: &str) -> Option<String> {
    rustls_error(e).map(|r| explain_rustls(r, host))
}

fn explain_rustls(e: &rustls::Error, host: &str) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer) | E::InvalidCertificate(C::BadSignature) => {
            "TLS: the broker's certificate is not signed by a trusted CA (check mqtt.tls.ca_file)".into()
        }
        E::InvalidCertificate(C::Expired) | E::InvalidCertificate(C::ExpiredContext { .. }) => {
            "TLS: the broker's certificate has expired".into()
        }
        E::InvalidCertificate(C::NotValidYet) | E::InvalidCertificate(C::NotValidYetContext { .. }) => {
            "TLS: the broker's certificate is not valid yet (check this machine's clock)".into()
        }
        E::InvalidCertificate(C::NotValidForName) | E::InvalidCertificate(C::NotValidForNameContext { .. }) => {
            format!(
                "TLS: the broker's certificate is not valid for {host}: its subjectAltName must name {host} \
                 (rustls does not look at the CN). Check mqtt.host, or sign the broker's certificate again \
                 with {}",
                extfile(host)
            )
        }
        E::InvalidCertificate(C::Other(o))
            if matches!(o.0.downcast_ref(), Some(webpki::Error::UnsupportedCertVersion)) =>
        {
            format!(
                "TLS: the broker's certificate is an X.509 version 1 certificate, which rustls does not accept \
                 (OpenSSL 3 makes one when `openssl x509 -req` is given no extensions). Sign it again with {}",
                extfile(host)
            )
        }
        E::AlertReceived(A::CertificateRequired) => {
            "TLS: the broker requires a client certificate (set mqtt.tls.cert_file and key_file)".into()
        }
        E::AlertReceived(a @ (A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::DecryptError)) => {
            format!("TLS: the broker refused our client certificate ({a:?})")
        }
        other => format!("TLS: {other}"),
    }
}

/// The `openssl x509 -req` argument that makes a v3 certificate naming `host`.
fn extfile(host: &str) -> String {
    let san = if host.parse::<std::net::IpAddr>().is_ok() { "IP" } else { "DNS" };
    format!("-extfile <(printf 'subjectAltName={san}:{host}')")
}
