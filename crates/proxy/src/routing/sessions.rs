//! Affinity without the route cookie: what the proxy learned from the replicas' own answers.
//!
//! - `kbs-session-id` → backend, from each `auth` response's `Set-Cookie`, expiring with the
//!   session (its `Expires`, at most the configured session lifetime);
//! - attestation token → backend, from each `attest` response's body, expiring with the token's
//!   `exp` claim.
//!
//! Keys are 128-bit: a session id's 32 hex digits as a number, or a SHA-256 prefix of anything
//! else (tokens are never stored). The table is split into shards, each behind its own short
//! mutex held for one map operation only, so lookups under load do not contend on one lock.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::routing::route_cookie::BackendId;

const SHARDS: usize = 64;

/// A bounded, expiring map from a 128-bit key to the backend that issued it.
#[derive(Debug)]
pub(crate) struct AffinityTable {
    shards: Vec<Mutex<HashMap<u128, Entry>>>,
    /// Entries per shard at most.
    per_shard: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    backend: BackendId,
    /// Unix seconds after which the entry is void.
    expires: u64,
}

impl AffinityTable {
    /// A table holding at most about `capacity` entries (rounded up to a multiple of the shards).
    pub fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard,
        }
    }

    fn shard(&self, key: u128) -> std::sync::MutexGuard<'_, HashMap<u128, Entry>> {
        // The keys are uniformly random bits (ids or hashes): the low bits pick the shard.
        let i = (key as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that `key` belongs to `backend` until `expires` (Unix seconds). True when a
    /// live entry was dropped to make room (`kbs_proxy_sessions_evicted_total`).
    pub fn insert(&self, key: u128, backend: BackendId, expires: u64, now: u64) -> bool {
        let mut evicted = false;
        let mut shard = self.shard(key);
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, e| e.expires > now);
            if shard.len() >= self.per_shard {
                // Still full of live entries: drop the one closest to expiry.
                if let Some(victim) = shard.iter().min_by_key(|(_, e)| e.expires).map(|(k, _)| *k) {
                    shard.remove(&victim);
                    evicted = true;
                }
            }
        }
        shard.insert(key, Entry { backend, expires });
        evicted
    }

    /// The backend `key` belongs to, if known and not expired.
    pub fn get(&self, key: u128, now: u64) -> Option<BackendId> {
        let mut shard = self.shard(key);
        match shard.get(&key) {
            Some(e) if e.expires > now => Some(e.backend),
            Some(_) => {
                shard.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Entries held now (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// The most entries it holds.
    pub(crate) fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }
}

/// The key of a `kbs-session-id` value: its 32 hex digits as a number, else a hash.
pub fn session_key(value: &[u8]) -> u128 {
    // Exactly 32 lower-case hex digits (what the KBS issues): `from_str_radix` alone would also
    // take a leading `+` or upper case, giving two spellings one key.
    if value.len() == 32 && value.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        if let Some(n) = std::str::from_utf8(value)
            .ok()
            .and_then(|s| u128::from_str_radix(s, 16).ok())
        {
            return n;
        }
    }
    hash_key(value)
}

/// The key of a secret (an attestation token): a SHA-256 prefix, so the token itself is never kept.
pub(crate) fn hash_key(value: &[u8]) -> u128 {
    let d = Sha256::digest(value);
    u128::from_be_bytes(d[..16].try_into().expect("16 bytes"))
}

/// The `exp` claim (Unix seconds) of a JWT, read without verifying it: only the replica that
/// issued the token verifies it; the proxy only needs to know how long to remember it.
pub fn jwt_expiry(token: &str) -> Option<u64> {
    let claims = token.split('.').nth(1)?;
    let claims = URL_SAFE_NO_PAD.decode(claims.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&claims).ok()?;
    v.get("exp")?.as_u64()
}

/// The `kbs-session-id` value and its expiry (Unix seconds, from `Expires`) in one `Set-Cookie`.
pub fn session_from_set_cookie(header: &[u8]) -> Option<(&[u8], Option<u64>)> {
    let text = std::str::from_utf8(header).ok()?;
    let cookie = cookie::Cookie::parse(text).ok()?;
    if cookie.name() != crate::kbs::SESSION_COOKIE {
        return None;
    }
    // Borrowed from `header` (the cookie was parsed from it), so the value is not copied.
    let value = cookie.value_raw()?;
    let expires = cookie
        .expires_datetime()
        .and_then(|t| u64::try_from(t.unix_timestamp()).ok());
    Some((value.as_bytes(), expires))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn remembers_until_expiry() {
        let t = AffinityTable::new(100);
        let b = BackendId::from_name("kbs-1");
        t.insert(7, b, 1000, 500);
        assert_eq!(t.get(7, 999), Some(b));
        assert_eq!(t.get(7, 1000), None);
        assert_eq!(t.len(), 0, "an expired entry found is dropped");
    }

    #[test]
    fn stays_within_its_bound() {
        let t = AffinityTable::new(640);
        let b = BackendId::from_name("kbs-1");
        let mut evicted = 0;
        for k in 0..10_000u128 {
            let key = k.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
            evicted += usize::from(t.insert(key, b, 2000 + k as u64, 1000));
        }
        assert!(t.len() <= t.capacity(), "{} > {}", t.len(), t.capacity());
        assert_eq!(evicted, 10_000 - t.len(), "every live entry dropped is counted");
    }

    #[test]
    fn parses_the_kbs_set_cookie() {
        let h = b"kbs-session-id=0123456789abcdef0123456789abcdef; Expires=Sun, 06 Nov 2044 08:49:37 GMT";
        let (v, exp) = session_from_set_cookie(h).unwrap();
        assert_eq!(v, b"0123456789abcdef0123456789abcdef");
        assert_eq!(exp, Some(2_362_034_977));
        assert_eq!(session_key(v), 0x0123456789abcdef0123456789abcdef);
        assert!(session_from_set_cookie(b"route=x; Path=/").is_none());
        // Other spellings of the same number are other keys.
        let canonical = session_key(b"0123456789abcdef0123456789abcdef");
        assert_ne!(session_key(b"+123456789abcdef0123456789abcdef"), canonical);
        assert_ne!(session_key(b"0123456789ABCDEF0123456789ABCDEF"), canonical);
    }

    #[test]
    fn reads_other_set_cookie_shapes_as_the_cookie_crate_does() {
        // No Expires, or one that does not parse: the value without an expiry.
        let (v, exp) = session_from_set_cookie(b"kbs-session-id=abc; Path=/; HttpOnly").unwrap();
        assert_eq!((v, exp), (&b"abc"[..], None));
        let (v, exp) = session_from_set_cookie(b"kbs-session-id=abc; Expires=soon").unwrap();
        assert_eq!((v, exp), (&b"abc"[..], None));
        // Attribute names in any case, spaces around the value.
        let (v, exp) = session_from_set_cookie(b"kbs-session-id = abc ;EXPIRES=Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        assert_eq!((v, exp), (&b"abc"[..], Some(1_445_412_480)));
        assert!(session_from_set_cookie(b"kbs-session-id").is_none(), "no value");
        assert!(session_from_set_cookie(b"=abc").is_none(), "no name");
    }

    #[test]
    fn reads_a_jwt_expiry() {
        let claims = URL_SAFE_NO_PAD.encode(br#"{"exp":1234,"iss":"kbs-0"}"#);
        assert_eq!(jwt_expiry(&format!("e30.{claims}.sig")), Some(1234));
        assert_eq!(jwt_expiry("not a token"), None);
    }

    proptest! {
        #[test]
        fn set_cookie_parser_never_panics(h in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = session_from_set_cookie(&h);
            let _ = session_key(&h);
        }
    }
}
