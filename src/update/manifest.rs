//! Release keys and signed manifests: what `nightlight release keygen` and `release sign` write
//! on the laptop, and what the device (and the installer, again, as root) checks.
//!
//! Rules:
//! - Keys are Ed25519 (through `ring`, already linked for TLS). A public key is one line,
//!   `ed25519:<64 hex digits>`; its id is the first 16 hex digits of its SHA-256. No
//!   certificates and no validity period: **the clock never decides whether an update is
//!   taken** (a Pi has no real-time clock).
//! - A manifest is a JSON object: `version`, `arch` (Debian's: `arm64`, `armhf`, ...), `size`,
//!   `sha256` (of the `.deb`), `url`, `key` (the signing key's id) and `sig` (hex). The
//!   signature covers [`Manifest::signed_bytes`]: a fixed prefix and each field on a line of its
//!   own, so no two manifests sign the same bytes; a field holding a control character is
//!   refused.
//! - A manifest is taken only when signed by a key the device trusts, for its architecture, and
//!   newer than what it runs ([`compare_versions`], Debian's order): replaying an old signed
//!   manifest never downgrades, the same version is already done.
//!
//! Pure: no I/O.

use std::cmp::Ordering;

use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

/// A manifest larger than this is refused before it is parsed.
pub const MAX_MANIFEST_BYTES: usize = 4096;
/// The prefix of the bytes a signature covers (its format's version).
const SIGNED_PREFIX: &str = "nightlight-manifest-v1\n";
/// How a public key is written.
const PUBLIC_PREFIX: &str = "ed25519:";
/// How a private key (PKCS#8, as ring makes it) is written.
const PRIVATE_PREFIX: &str = "ed25519-pkcs8:";

/// A signed update: a `.deb` and where to fetch it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: String,
    pub arch: String,
    pub size: u64,
    pub sha256: String,
    pub url: String,
    pub key: String,
    pub sig: String,
}

/// A public key the device trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    bytes: [u8; 32],
}

impl PublicKey {
    /// Parses `ed25519:<64 hex>` (surrounding whitespace ignored).
    ///
    /// # Errors
    /// Not in that form.
    pub fn parse(s: &str) -> Result<Self, String> {
        let hex = s.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(|| {
            format!("{:?} is not a release key (ed25519:<64 hex digits>, as in release.pub)", short(s))
        })?;
        let bytes = from_hex(hex)
            .filter(|b| b.len() == 32)
            .ok_or_else(|| format!("{:?} is not a release key (ed25519:<64 hex digits>)", short(s)))?;
        Ok(PublicKey { bytes: bytes.try_into().expect("32 bytes") })
    }

    /// The key's id: the first 16 hex digits of its SHA-256.
    pub fn id(&self) -> String {
        to_hex(&ring::digest::digest(&ring::digest::SHA256, &self.bytes).as_ref()[..8])
    }

    /// Whether `sig` is this key's signature of `message`.
    pub fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.bytes).verify(message, sig).is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", to_hex(&self.bytes))
    }
}

/// A release signing key (only ever on the laptop).
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    /// A new random key.
    ///
    /// # Errors
    /// The system's random number generator failed.
    pub fn generate() -> Result<Self, String> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "cannot generate a key".to_owned())?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec())
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| "not an Ed25519 private key".to_owned())?;
        Ok(SigningKey { pair, pkcs8 })
    }

    /// Parses what [`SigningKey::to_file`] wrote.
    ///
    /// # Errors
    /// Not a release signing key.
    pub fn parse(s: &str) -> Result<Self, String> {
        let hex = s.trim().strip_prefix(PRIVATE_PREFIX).ok_or("not a release signing key (from `release keygen`)")?;
        Self::from_pkcs8(from_hex(hex).ok_or("not a release signing key (bad hex)")?)
    }

    /// The private key file's content (one line).
    pub fn to_file(&self) -> String {
        format!("{PRIVATE_PREFIX}{}\n", to_hex(&self.pkcs8))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey { bytes: self.pair.public_key().as_ref().try_into().expect("an Ed25519 public key is 32 bytes") }
    }

    /// `unsigned` with `key` and `sig` filled in.
    pub fn sign(&self, mut unsigned: Manifest) -> Manifest {
        unsigned.key = self.public().id();
        unsigned.sig = to_hex(self.pair.sign(&unsigned.signed_bytes()).as_ref());
        unsigned
    }
}

/// Why a manifest was refused (the reason in the update state).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the manifest is larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge,
    #[error("the manifest is not valid: {0}")]
    Malformed(String),
    #[error("signed by key {0}, which this device does not trust (update.keys)")]
    UntrustedKey(String),
    #[error("the signature does not match the manifest (altered, or not signed by key {0})")]
    BadSignature(String),
    #[error("the package is for {theirs}, this device is {ours}")]
    Architecture { theirs: String, ours: String },
    #[error("version {theirs} is older than the running {ours}: not downgrading")]
    Older { theirs: String, ours: String },
}

impl Manifest {
    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "{SIGNED_PREFIX}version={}\narch={}\nsize={}\nsha256={}\nurl={}\nkey={}\n",
            self.version, self.arch, self.size, self.sha256, self.url, self.key
        )
        .into_bytes()
    }

    /// Parses a manifest and checks its fields' shapes (not its signature).
    ///
    /// # Errors
    /// Too large, not JSON of this shape, or a field out of shape.
    pub fn parse(payload: &[u8]) -> Result<Self, Refused> {
        if payload.len() > MAX_MANIFEST_BYTES {
            return Err(Refused::TooLarge);
        }
        let m: Manifest = serde_json::from_slice(payload).map_err(|e| Refused::Malformed(e.to_string()))?;
        let bad = |why: &str| Err(Refused::Malformed(why.to_owned()));
        for field in [&m.version, &m.arch, &m.url, &m.key, &m.sha256, &m.sig] {
            if field.is_empty() || field.chars().any(char::is_control) {
                return bad("a field is empty or holds a control character");
            }
        }
        if !valid_version(&m.version) {
            return bad("version is not a Debian version");
        }
        if !m.arch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return bad("arch is not a Debian architecture");
        }
        if m.sha256.len() != 64 || from_hex(&m.sha256).is_none() {
            return bad("sha256 is not 64 hex digits");
        }
        if !(m.url.starts_with("http://") || m.url.starts_with("https://")) {
            return bad("url is not http:// or https://");
        }
        if m.size == 0 {
            return bad("size is 0");
        }
        Ok(m)
    }

    /// Whether `self` is signed by one of `trusted` (matched by key id).
    ///
    /// # Errors
    /// No trusted key has its id, or the signature does not verify.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<(), Refused> {
        let key = trusted.iter().find(|k| k.id() == self.key).ok_or_else(|| Refused::UntrustedKey(self.key.clone()))?;
        let sig = from_hex(&self.sig).ok_or_else(|| Refused::BadSignature(self.key.clone()))?;
        if key.verifies(&self.signed_bytes(), &sig) {
            Ok(())
        } else {
            Err(Refused::BadSignature(self.key.clone()))
        }
    }

    /// Parses, verifies and checks a manifest for a device of `arch` running `running`.
    /// `Ok(None)`: already running this version.
    ///
    /// # Errors
    /// The first rule it breaks.
    pub fn accept(payload: &[u8], trusted: &[PublicKey], arch: &str, running: &str) -> Result<Option<Self>, Refused> {
        let m = Self::parse(payload)?;
        m.verify(trusted)?;
        if m.arch != arch && m.arch != "all" {
            return Err(Refused::Architecture { theirs: m.arch, ours: arch.to_owned() });
        }
        match compare_versions(&m.version, running) {
            Ordering::Less => Err(Refused::Older { theirs: m.version, ours: running.to_owned() }),
            Ordering::Equal => Ok(None),
            Ordering::Greater => Ok(Some(m)),
        }
    }
}

/// Whether `v` is a Debian version: `[epoch:]upstream[-revision]`.
fn valid_version(v: &str) -> bool {
    let (epoch, rest) = v.split_once(':').unwrap_or(("0", v));
    epoch.bytes().all(|b| b.is_ascii_digit())
        && !epoch.is_empty()
        && rest.starts_with(|c: char| c.is_ascii_digit())
        && rest.len() <= 128
        && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b".+-~".contains(&b))
}

/// Debian's order of versions (as `dpkg --compare-versions`): epoch, then upstream version and
/// revision, each compared as runs of non-digits (`~` before everything, letters before other
/// characters) and numbers.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let split = |v: &str| -> (u64, String, String) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) => (e.parse().unwrap_or(0), r),
            None => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((up, rev)) => (epoch, up.to_owned(), rev.to_owned()),
            None => (epoch, rest.to_owned(), String::new()),
        }
    };
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb).then_with(|| compare_part(&ua, &ub)).then_with(|| compare_part(&ra, &rb))
}

fn compare_part(a: &str, b: &str) -> Ordering {
    fn order(c: Option<u8>) -> i32 {
        match c {
            Some(b'~') => -1,
            None => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(c),
            Some(c) => i32::from(c) + 256,
        }
    }
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    while !a.is_empty() || !b.is_empty() {
        // The non-digit runs.
        loop {
            let (ca, cb) = (
                a.first().copied().filter(|c| !c.is_ascii_digit()),
                b.first().copied().filter(|c| !c.is_ascii_digit()),
            );
            if ca.is_none() && cb.is_none() {
                break;
            }
            match order(ca).cmp(&order(cb)) {
                Ordering::Equal => {
                    a = &a[1..];
                    b = &b[1..];
                }
                other => return other,
            }
        }
        // The numbers.
        let digits = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
        let (na, nb) = (digits(a), digits(b));
        // Leading zeros do not count; no digits is 0.
        let (xa, xb) = (trim_zeros(&a[..na]), trim_zeros(&b[..nb]));
        let by_value = xa.len().cmp(&xb.len()).then_with(|| xa.cmp(xb));
        if by_value != Ordering::Equal {
            return by_value;
        }
        a = &a[na..];
        b = &b[nb..];
    }
    Ordering::Equal
}

fn trim_zeros(mut s: &[u8]) -> &[u8] {
    while let [b'0', rest @ ..] = s {
        s = rest;
    }
    s
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex (either case) to bytes; `None` if it is not.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn short(s: &str) -> String {
    s.chars().take(24).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsigned(version: &str) -> Manifest {
        Manifest {
            version: version.into(),
            arch: "arm64".into(),
            size: 1234,
            sha256: "ab".repeat(32),
            url: "http://10.0.2.100:8000/nightlight.deb".into(),
            key: String::new(),
            sig: String::new(),
        }
    }

    fn json(m: &Manifest) -> Vec<u8> {
        serde_json::to_vec(m).unwrap()
    }

    #[test]
    fn a_manifest_signed_by_a_trusted_key_and_newer_is_taken() {
        let key = SigningKey::generate().unwrap();
        let m = key.sign(unsigned("0.2.0"));
        let got = Manifest::accept(&json(&m), &[key.public()], "arm64", "0.1.0").unwrap();
        assert_eq!(got, Some(m));
    }

    #[test]
    fn the_second_trusted_key_is_as_good_as_the_first_and_a_removed_one_is_revoked() {
        let (old, new) = (SigningKey::generate().unwrap(), SigningKey::generate().unwrap());
        let m = new.sign(unsigned("0.2.0"));
        assert!(Manifest::accept(&json(&m), &[old.public(), new.public()], "arm64", "0.1.0").is_ok());
        assert_eq!(
            Manifest::accept(&json(&m), &[old.public()], "arm64", "0.1.0"),
            Err(Refused::UntrustedKey(new.public().id()))
        );
    }

    #[test]
    fn any_altered_field_breaks_the_signature() {
        let key = SigningKey::generate().unwrap();
        let m = key.sign(unsigned("0.2.0"));
        let alter: [fn(&mut Manifest); 5] = [
            |m| m.version = "0.2.1".into(),
            |m| m.size += 1,
            |m| m.sha256 = "cd".repeat(32),
            |m| m.url.push('x'),
            |m| m.arch = "armhf".into(),
        ];
        for f in alter {
            let mut bad = m.clone();
            f(&mut bad);
            assert_eq!(bad.verify(&[key.public()]), Err(Refused::BadSignature(m.key.clone())), "{bad:?}");
        }
    }

    #[test]
    fn a_signature_by_another_key_claiming_a_trusted_id_is_refused() {
        let (trusted, forger) = (SigningKey::generate().unwrap(), SigningKey::generate().unwrap());
        let mut m = forger.sign(unsigned("0.2.0"));
        m.key = trusted.public().id();
        assert!(matches!(m.verify(&[trusted.public()]), Err(Refused::BadSignature(_))));
    }

    #[test]
    fn another_architecture_an_older_version_and_the_same_one_are_not_installed() {
        let key = SigningKey::generate().unwrap();
        let trusted = [key.public()];
        let arm64 = json(&key.sign(unsigned("0.2.0")));
        assert!(matches!(Manifest::accept(&arm64, &trusted, "armhf", "0.1.0"), Err(Refused::Architecture { .. })));
        assert!(matches!(Manifest::accept(&arm64, &trusted, "arm64", "0.3.0"), Err(Refused::Older { .. })));
        assert_eq!(Manifest::accept(&arm64, &trusted, "arm64", "0.2.0"), Ok(None));
    }

    #[test]
    fn hostile_manifests_are_refused_before_any_signature_is_checked() {
        let too_large = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert_eq!(Manifest::parse(&too_large), Err(Refused::TooLarge));
        for bad in [
            r#"{"version":"0.2.0"}"#.to_owned(),
            "not json".to_owned(),
            serde_json::to_string(&Manifest { url: "file:///etc/shadow".into(), ..unsigned("0.2.0") }).unwrap(),
            serde_json::to_string(&Manifest { version: "0.2.0\nurl=x".into(), ..unsigned("0.2.0") }).unwrap(),
            serde_json::to_string(&Manifest { sha256: "zz".into(), ..unsigned("0.2.0") }).unwrap(),
        ] {
            assert!(matches!(Manifest::parse(bad.as_bytes()), Err(Refused::Malformed(_))), "{bad}");
        }
    }

    #[test]
    fn keys_round_trip_through_their_files() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::parse(&key.to_file()).unwrap();
        assert_eq!(again.public(), key.public());
        assert_eq!(PublicKey::parse(&format!("  {}\n", key.public())).unwrap(), key.public());
        assert!(PublicKey::parse("ed25519:abcd").is_err());
        assert!(PublicKey::parse(&key.public().to_string().replace("ed25519:", "rsa:")).is_err());
    }

    #[test]
    fn versions_are_in_debians_order() {
        use Ordering::*;
        for (a, b, want) in [
            ("0.1.0", "0.1.0", Equal),
            ("0.1.0", "0.2.0", Less),
            ("0.10.0", "0.9.0", Greater),
            ("0.1.0+update2", "0.1.0", Greater),
            ("0.1.0~rc1", "0.1.0", Less),
            ("0.1.0-1", "0.1.0", Greater),
            ("0.1.0-2", "0.1.0-10", Less),
            ("1:0.1.0", "9.9.9", Greater),
            ("0.1.0a", "0.1.0+", Less),
            ("1.01", "1.1", Equal),
        ] {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }
}
