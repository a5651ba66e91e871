//! The route cookie: a signed, expiring note that names the backend a client is pinned to.
//!
//! Wire format (before base64url, no padding):
//!
//! | bytes   | field                                                        |
//! |---------|--------------------------------------------------------------|
//! | 0       | format version (`1`)                                         |
//! | 1..9    | backend id, big endian: see [`BackendId::from_name`]         |
//! | 9..13   | issue time, Unix seconds, big endian                         |
//! | 13..29  | HMAC-SHA256 over bytes 0..13, truncated to 128 bits          |
//!
//! The id is a hash of the backend's *name*, never its list position or address, so two proxy
//! processes with the same secret and the same backend names route a cookie identically with no
//! shared state, and re-ordering the backend list changes nothing. Truncating the tag to 128 bits
//! is allowed by RFC 2104 §5 (at least half the hash length) and keeps the cookie at 39 characters.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const VERSION: u8 = 1;
const SIGNED_LEN: usize = 13;
const TAG_LEN: usize = 16;
const RAW_LEN: usize = SIGNED_LEN + TAG_LEN;
/// Length of an encoded cookie value: `ceil(29 * 4 / 3)` base64url characters.
pub(crate) const ENCODED_LEN: usize = 39;
/// How far in the future an issue time may lie before the cookie is refused: proxy replicas'
/// clocks may differ by this much.
const MAX_CLOCK_SKEW_SECS: u64 = 60;
/// The shortest secret accepted: 128 bits of key material at the very least.
pub(crate) const MIN_SECRET_LEN: usize = 16;

/// A backend's stable identifier inside route cookies, derived from its name.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendId(u64);

impl BackendId {
    /// Derives the id from a backend's name: the first 8 bytes of
    /// SHA-256(`"kbs-affinity-proxy backend v1\0"` ‖ name).
    pub fn from_name(name: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"kbs-affinity-proxy backend v1\0");
        h.update(name.as_bytes());
        let digest = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        Self(u64::from_be_bytes(id))
    }
}

impl fmt::Debug for BackendId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendId({:016x})", self.0)
    }
}

/// The key that signs route cookies. Its `Debug` prints nothing of it.
#[derive(Clone)]
pub struct CookieSecret(Vec<u8>);

impl CookieSecret {
    /// Wraps key material; `None` when it is shorter than [`MIN_SECRET_LEN`] bytes.
    pub fn new(bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() >= MIN_SECRET_LEN).then_some(Self(bytes))
    }

    /// A fresh random 256-bit secret, for a proxy started without one.
    pub fn generate() -> Self {
        Self(rand::random::<[u8; 32]>().to_vec())
    }
}

impl fmt::Debug for CookieSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieSecret(<redacted>)")
    }
}

/// Why a presented route cookie was not accepted. Every variant means "treat as absent".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Wrong length, not base64url, or an unknown format version.
    Malformed,
    /// The tag does not match: forged, altered, or signed with another secret.
    BadSignature,
    /// Older than the configured maximum age.
    Expired,
    /// Issued further in the future than clock skew explains.
    FromTheFuture,
    /// Validly signed, but naming a backend this proxy does not have (removed, or a cookie from
    /// a proxy with other backends).
    UnknownBackend,
}

/// A verified cookie's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    /// The backend the cookie names.
    pub backend: BackendId,
    /// When the cookie was issued, Unix seconds.
    pub issued_at: u64,
}

/// Mints route cookie values with the newest secret and verifies them with every listed one,
/// so secrets can be rotated without un-pinning clients.
#[derive(Clone)]
pub struct RouteCookieCodec {
    /// The keyed HMAC state of the signing secret, cloned per use so the key schedule runs once.
    mac: HmacSha256,
    /// Older secrets still accepted, newest first.
    older: Vec<HmacSha256>,
}

impl fmt::Debug for RouteCookieCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RouteCookieCodec(<redacted>)")
    }
}

impl RouteCookieCodec {
    /// A codec keyed with `secret`.
    pub fn new(secret: &CookieSecret) -> Self {
        Self::with_keys(secret, &[])
    }

    /// A codec that signs with `newest` and also accepts cookies signed with any of `older`.
    pub fn with_keys(newest: &CookieSecret, older: &[CookieSecret]) -> Self {
        let key = |s: &CookieSecret| HmacSha256::new_from_slice(&s.0).expect("HMAC takes keys of any length");
        Self {
            mac: key(newest),
            older: older.iter().map(key).collect(),
        }
    }

    /// The encoded cookie value pinning `backend`, issued at `now` (Unix seconds).
    pub fn mint(&self, backend: BackendId, now: u64) -> [u8; ENCODED_LEN] {
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION;
        raw[1..9].copy_from_slice(&backend.0.to_be_bytes());
        // Saturate rather than wrap: a clock past 2106 yields cookies that expire, not forgeries.
        let issued = u32::try_from(now).unwrap_or(u32::MAX);
        raw[9..13].copy_from_slice(&issued.to_be_bytes());
        let mut mac = self.mac.clone();
        mac.update(&raw[..SIGNED_LEN]);
        raw[SIGNED_LEN..].copy_from_slice(&mac.finalize().into_bytes()[..TAG_LEN]);
        let mut out = [0u8; ENCODED_LEN];
        let n = URL_SAFE_NO_PAD
            .encode_slice(raw, &mut out)
            .expect("39 bytes hold 29 encoded");
        debug_assert_eq!(n, ENCODED_LEN);
        out
    }

    /// Verifies an encoded value: the signature in constant time, then the age against `max_age`.
    pub fn verify(&self, value: &[u8], now: u64, max_age: u64) -> Result<Pin, Rejection> {
        if value.len() != ENCODED_LEN {
            return Err(Rejection::Malformed);
        }
        let mut raw = [0u8; RAW_LEN + 3];
        let n = URL_SAFE_NO_PAD
            .decode_slice(value, &mut raw)
            .map_err(|_| Rejection::Malformed)?;
        if n != RAW_LEN || raw[0] != VERSION {
            return Err(Rejection::Malformed);
        }
        let signed_by = |key: &HmacSha256| {
            let mut mac = key.clone();
            mac.update(&raw[..SIGNED_LEN]);
            mac.verify_truncated_left(&raw[SIGNED_LEN..RAW_LEN]).is_ok()
        };
        if !signed_by(&self.mac) && !self.older.iter().any(signed_by) {
            return Err(Rejection::BadSignature);
        }
        let backend = BackendId(u64::from_be_bytes(raw[1..9].try_into().expect("8 bytes")));
        let issued_at = u64::from(u32::from_be_bytes(raw[9..13].try_into().expect("4 bytes")));
        Self::check_age(Pin { backend, issued_at }, now, max_age)
    }

    /// The age checks of [`Self::verify`] alone, for a pin whose signature was checked before
    /// (a keep-alive connection sends the same cookie with every request).
    pub(crate) fn check_age(pin: Pin, now: u64, max_age: u64) -> Result<Pin, Rejection> {
        if pin.issued_at > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(Rejection::FromTheFuture);
        }
        if now.saturating_sub(pin.issued_at) >= max_age {
            return Err(Rejection::Expired);
        }
        Ok(pin)
    }
}

/// The values of every cookie called `name` (a token) in one `Cookie` header value (RFC 6265
/// §5.4 syntax: `a=1; b=2`), borrowed from the header bytes. Quoted values lose their quotes.
///
/// On the hot path of every pinned request: pairs are found with `memchr` and a pair is looked
/// at no further than its name, so a long value is passed over at vector speed.
pub fn cookie_values<'a>(header: &'a [u8], name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = Some(header);
    std::iter::from_fn(move || loop {
        let h = rest?;
        let (pair, next) = match memchr::memchr(b';', h) {
            Some(i) => (&h[..i], Some(&h[i + 1..])),
            None => (h, None),
        };
        rest = next;
        // `name`, optional whitespace, `=`: the pair's name is exactly `name` (a token holds no
        // `=` and no whitespace, so no other split of the pair gives it).
        let Some(after) = trim_ows(pair).strip_prefix(name) else {
            continue;
        };
        let Some(value) = trim_ows(after).strip_prefix(b"=") else {
            continue;
        };
        return Some(match trim_ows(value) {
            [b'"', inner @ .., b'"'] => inner,
            v => v,
        });
    })
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codec() -> RouteCookieCodec {
        RouteCookieCodec::new(&CookieSecret::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap())
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn round_trip() {
        let id = BackendId::from_name("kbs-0");
        let v = codec().mint(id, NOW);
        assert!(v.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_'));
        let pin = codec().verify(&v, NOW + 10, 100).unwrap();
        assert_eq!(
            pin,
            Pin {
                backend: id,
                issued_at: NOW
            }
        );
    }

    #[test]
    fn ids_depend_on_name_only() {
        assert_eq!(BackendId::from_name("a"), BackendId::from_name("a"));
        assert_ne!(BackendId::from_name("a"), BackendId::from_name("b"));
    }

    #[test]
    fn rejects_expired_future_forged_truncated_and_other_secret() {
        let c = codec();
        let v = c.mint(BackendId::from_name("kbs-0"), NOW);
        assert_eq!(c.verify(&v, NOW + 100, 100), Err(Rejection::Expired));
        assert_eq!(c.verify(&v, NOW - 61, 100), Err(Rejection::FromTheFuture));
        assert_eq!(c.verify(&v[..38], NOW, 100), Err(Rejection::Malformed));
        assert_eq!(c.verify(b"", NOW, 100), Err(Rejection::Malformed));
        let mut tampered = v;
        tampered[5] = if tampered[5] == b'A' { b'B' } else { b'A' };
        assert_eq!(c.verify(&tampered, NOW, 100), Err(Rejection::BadSignature));
        let other = RouteCookieCodec::new(&CookieSecret::new(vec![7u8; 32]).unwrap());
        assert_eq!(other.verify(&v, NOW, 100), Err(Rejection::BadSignature));
        let mut not_b64 = v;
        not_b64[0] = b'!';
        assert_eq!(c.verify(&not_b64, NOW, 100), Err(Rejection::Malformed));
    }

    #[test]
    fn rotation_signs_with_the_newest_and_accepts_the_listed() {
        let old = CookieSecret::new(vec![1; 32]).unwrap();
        let new = CookieSecret::new(vec![2; 32]).unwrap();
        let id = BackendId::from_name("kbs-0");
        let before = RouteCookieCodec::new(&old).mint(id, NOW);
        let rotated = RouteCookieCodec::with_keys(&new, std::slice::from_ref(&old));
        assert_eq!(
            rotated.verify(&before, NOW, 100).map(|p| p.backend),
            Ok(id),
            "old cookies still pin"
        );
        let after = rotated.mint(id, NOW);
        assert!(
            RouteCookieCodec::new(&new).verify(&after, NOW, 100).is_ok(),
            "new cookies use the newest"
        );
        assert_eq!(
            RouteCookieCodec::new(&old).verify(&after, NOW, 100),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(CookieSecret::new(vec![1; MIN_SECRET_LEN - 1]).is_none());
        assert_eq!(
            format!("{:?}", CookieSecret::new(vec![1; 32]).unwrap()),
            "CookieSecret(<redacted>)"
        );
    }

    #[test]
    fn scanner_finds_every_value() {
        let h = b"kbs-session-id=abc; route=one ;other=x;route=\"two\"; route";
        let got: Vec<&[u8]> = cookie_values(h, b"route").collect();
        assert_eq!(got, vec![&b"one"[..], b"two"]);
        assert_eq!(cookie_values(b"", b"route").count(), 0);
        assert_eq!(cookie_values(b"route=", b"route").collect::<Vec<_>>(), vec![&b""[..]]);
    }

    proptest! {
        #[test]
        fn any_bytes_never_verify_or_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            // A random string passes only by forging a 128-bit tag.
            prop_assert!(codec().verify(&bytes, NOW, 1000).is_err());
        }

        #[test]
        fn the_scanner_finds_what_a_plain_split_finds(
            header in proptest::collection::vec(proptest::sample::select(b"route=ab; \t\"x".to_vec()), 0..48),
            name in proptest::sample::select(vec![&b"route"[..], b"r", b"x", b"rout"]),
        ) {
            // Names are tokens (the configuration refuses others): no `=`, no whitespace.
            // The reference: split on `;`, the name is the trimmed part before the first `=`.
            let reference: Vec<&[u8]> = header.split(|&b| b == b';').filter_map(|pair| {
                let pair = trim_ows(pair);
                let eq = pair.iter().position(|&b| b == b'=')?;
                if trim_ows(&pair[..eq]) != name {
                    return None;
                }
                Some(match trim_ows(&pair[eq + 1..]) {
                    [b'"', inner @ .., b'"'] => inner,
                    v => v,
                })
            }).collect();
            let found: Vec<&[u8]> = cookie_values(&header, name).collect();
            prop_assert_eq!(found, reference);
        }

        #[test]
        fn scanner_never_panics(header in proptest::collection::vec(any::<u8>(), 0..256)) {
            for v in cookie_values(&header, b"route") {
                prop_assert!(v.len() <= header.len());
            }
        }

        #[test]
        fn mint_verify_round_trips(name in ".{0,40}", age in 0u64..1000) {
            let id = BackendId::from_name(&name);
            let v = codec().mint(id, NOW);
            prop_assert_eq!(codec().verify(&v, NOW + age, 1000).map(|p| p.backend), Ok(id));
        }

        #[test]
        fn any_single_byte_change_is_rejected(pos in 0usize..ENCODED_LEN, b in any::<u8>()) {
            let v = codec().mint(BackendId::from_name("kbs-1"), NOW);
            prop_assume!(v[pos] != b);
            let mut t = v;
            t[pos] = b;
            prop_assert!(codec().verify(&t, NOW, 1000).is_err());
        }
    }
}
