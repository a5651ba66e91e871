//! Route cookie parsing: `RouteCookieCodec::verify` and the `Cookie` header scanner
//! `cookie_values`, on arbitrary bytes.
//!
//! Checks:
//! - neither function panics;
//! - `verify` returns `Ok` only for a value the codec itself minted: the pin re-mints to exactly
//!   the input bytes (so no second encoding of a cookie, no unsigned bytes, no other length);
//! - with a rotated codec (new key + old key), `Ok` means one of the two keys minted exactly it;
//! - every slice `cookie_values` yields lies inside the header and holds no `;`.
#![no_main]

use kbs_proxy::routing::route_cookie::{cookie_values, CookieSecret, Pin, RouteCookieCodec};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

// Keep in step with examples/gen_seeds.rs, which mints the seed cookies with these keys.
const NEW_KEY: &[u8] = b"fuzz-route-cookie-secret-new-0123456789";
const OLD_KEY: &[u8] = b"fuzz-route-cookie-secret-old-0123456789";
/// Issue time of the seed cookies.
const SEED_NOW: u64 = 1_800_000_000;

struct Codecs {
    new: RouteCookieCodec,
    old: RouteCookieCodec,
    rotated: RouteCookieCodec,
}

fn codecs() -> &'static Codecs {
    static C: OnceLock<Codecs> = OnceLock::new();
    C.get_or_init(|| {
        let new = CookieSecret::new(NEW_KEY.to_vec()).unwrap();
        let old = CookieSecret::new(OLD_KEY.to_vec()).unwrap();
        Codecs {
            new: RouteCookieCodec::new(&new),
            old: RouteCookieCodec::new(&old),
            rotated: RouteCookieCodec::with_keys(&new, &[old]),
        }
    })
}

/// (now, max_age) pairs: the live case that accepts the seeds, and the saturating edges.
const CLOCKS: [(u64, u64); 5] = [
    (SEED_NOW + 10, 3600),
    (SEED_NOW - 60, u64::MAX),
    (0, u64::MAX),
    (u64::MAX, u64::MAX),
    (u64::MAX, 0),
];

fn check_verify(value: &[u8]) {
    let c = codecs();
    for (now, max_age) in CLOCKS {
        if let Ok(Pin { backend, issued_at }) = c.new.verify(value, now, max_age) {
            assert_eq!(
                &c.new.mint(backend, issued_at)[..],
                value,
                "verify accepted bytes the codec would not mint"
            );
            assert!(issued_at <= now.saturating_add(60));
            assert!(now.saturating_sub(issued_at) < max_age);
        }
        if let Ok(Pin { backend, issued_at }) = c.rotated.verify(value, now, max_age) {
            assert!(
                c.new.mint(backend, issued_at)[..] == *value || c.old.mint(backend, issued_at)[..] == *value,
                "rotated codec accepted bytes neither key would mint"
            );
        }
    }
}

fn check_scan(header: &[u8], name: &[u8], verify_values: bool) {
    let range = header.as_ptr_range();
    let mut n = 0usize;
    for v in cookie_values(header, name) {
        let r = v.as_ptr_range();
        assert!(range.start <= r.start && r.end <= range.end, "value outside the header");
        assert!(!v.contains(&b';'), "value spans a `;`");
        n += 1;
        if verify_values {
            check_verify(v);
        }
    }
    assert!(n <= header.iter().filter(|&&b| b == b';').count() + 1);
}

fuzz_target!(|data: &[u8]| {
    // The whole input as a cookie value.
    check_verify(data);
    // The whole input as a `Cookie` header; every `route` value goes through verify as the proxy does.
    check_scan(data, b"route", true);
    check_scan(data, b"kbs-session-id", false);
    check_scan(data, b"", false);
    // `name\0header`: a fuzzer-chosen cookie name.
    if let Some(i) = data.iter().position(|&b| b == 0) {
        check_scan(&data[i + 1..], &data[..i], false);
    }
});
