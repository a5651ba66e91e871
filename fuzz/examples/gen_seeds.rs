//! Writes minted route cookies into `seeds/route_cookie/`:
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds`.
//! The keys and issue time must match `fuzz_targets/route_cookie.rs`.

use kbs_proxy::routing::route_cookie::{BackendId, CookieSecret, RouteCookieCodec};
use std::path::Path;

const NEW_KEY: &[u8] = b"fuzz-route-cookie-secret-new-0123456789";
const OLD_KEY: &[u8] = b"fuzz-route-cookie-secret-old-0123456789";
const SEED_NOW: u64 = 1_800_000_000;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/route_cookie");
    std::fs::create_dir_all(&dir).unwrap();
    let new = RouteCookieCodec::new(&CookieSecret::new(NEW_KEY.to_vec()).unwrap());
    let old = RouteCookieCodec::new(&CookieSecret::new(OLD_KEY.to_vec()).unwrap());
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
    for (i, backend) in ["kbs-0", "kbs-1", "kbs-2"].iter().enumerate() {
        let id = BackendId::from_name(backend);
        let v = new.mint(id, SEED_NOW - 100 * i as u64);
        // The fuzz target's live clock accepts the seeds, so its `Ok` checks are reached.
        assert!(new.verify(&v, SEED_NOW + 10, 3600).is_ok());
        write(&format!("minted-{backend}"), &v);
        let mut header = b"kbs-session-id=0123456789abcdef0123456789abcdef; route=".to_vec();
        header.extend_from_slice(&v);
        write(&format!("header-{backend}"), &header);
        let mut quoted = b"other=1;route=\"".to_vec();
        quoted.extend_from_slice(&v);
        quoted.extend_from_slice(b"\" ; route=stale");
        write(&format!("header-quoted-{backend}"), &quoted);
    }
    // The same bytes with other padding bits in the last character must not verify.
    let v = new.mint(BackendId::from_name("kbs-0"), SEED_NOW);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let six = ALPHABET.iter().position(|&c| c == v[38]).unwrap();
    let mut other_bits = v;
    other_bits[38] = ALPHABET[six ^ 1]; // the lowest bit of the last character carries no data
    assert!(new.verify(&other_bits, SEED_NOW + 10, 3600).is_err());
    write("minted-old-key", &old.mint(BackendId::from_name("kbs-0"), SEED_NOW));
    write("minted-u32-max", &new.mint(BackendId::from_name("kbs-0"), u64::MAX));
    write("named-scan", b"route\0 route = a ;route=\"b\";\troute=\t; x=route");
}
