//! Session learning from backend responses: `session_from_set_cookie`, `session_key` and
//! `jwt_expiry`, on arbitrary bytes.
//!
//! Checks:
//! - none of them panics;
//! - a learned session value lies inside the header, is the cookie `kbs-session-id`'s value
//!   (the header's first `;`-part is `kbs-session-id=<value>` up to surrounding whitespace), and
//!   `session_key` of it does not panic either.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use kbs_proxy::routing::sessions::{jwt_expiry, session_from_set_cookie, session_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The whole input as a `Set-Cookie` field value.
    if let Some((value, _expires)) = session_from_set_cookie(data) {
        let range = data.as_ptr_range();
        let r = value.as_ptr_range();
        assert!(range.start <= r.start && r.end <= range.end, "value outside the header");
        let text = std::str::from_utf8(data).expect("only UTF-8 headers are parsed");
        let first = text.split(';').next().unwrap();
        let (name, v) = first.split_once('=').expect("a learned session has `name=value`");
        assert_eq!(name.trim(), "kbs-session-id");
        assert_eq!(v.trim().as_bytes(), value, "learned value is not the cookie's value");
        let _ = session_key(value);
    }
    let _ = session_key(data);

    // The whole input as a token, and as a token's claims (so the JSON parser is reached directly).
    let text = String::from_utf8_lossy(data);
    let _ = jwt_expiry(&text);
    let token = format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(data));
    let _ = jwt_expiry(&token);
});
