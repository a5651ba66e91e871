//! Header rewriting between client and backend.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop fields (RFC 9110 §7.6.1: Connection, Proxy-Connection, Keep-Alive, TE,
/// Transfer-Encoding, Upgrade), plus Trailer (RFC 7230 §6.1's list) and the proxy
/// authentication fields (RFC 9110 §11.7), which are meant for this proxy and must not travel on.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Whether `name` is one of the static hop-by-hop fields (any case): for the fast path, which
/// checks names as borrowed bytes instead of `HeaderName`s.
pub(crate) fn is_hop_by_hop_name(name: &str) -> bool {
    // By length (and first letter) to the one candidate: this runs for every field of every
    // message on the fast path, and most fields match no length here.
    let candidate = match name.len() {
        2 => "te",
        7 if name.as_bytes()[0].eq_ignore_ascii_case(&b'u') => "upgrade",
        7 => "trailer",
        10 if name.as_bytes()[0].eq_ignore_ascii_case(&b'c') => "connection",
        10 => "keep-alive",
        16 => "proxy-connection",
        17 => "transfer-encoding",
        18 => "proxy-authenticate",
        19 => "proxy-authorization",
        _ => return false,
    };
    name.eq_ignore_ascii_case(candidate)
}

/// For a backend answer whose body hyper's client has read: `chunked` is undone, so a
/// Content-Length beside `Transfer-Encoding` is not this body's length (RFC 9112 §6.3) and goes.
/// `false` when a coding other than `chunked` was applied: that body cannot be passed on (the
/// coding's name is in a hop-by-hop field).
pub(crate) fn settle_decoded_framing(headers: &mut HeaderMap) -> bool {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    let only_chunked = headers.get_all(header::TRANSFER_ENCODING).iter().all(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .all(|c| c.is_empty() || c.eq_ignore_ascii_case(b"chunked"))
    });
    headers.remove(header::CONTENT_LENGTH);
    only_chunked
}

/// `X-Forwarded-For` (de-facto standard; RFC 7239 is its formal cousin).
pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop fields, including every field that `Connection` names (RFC 9110 §7.6.1).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        // Names listed in Connection; collected first since removing borrows the map mutably.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
}

/// Sets the `X-Forwarded-*` fields: appends the client's address to `X-Forwarded-For`, and
/// replaces `-Proto` and `-Host` with what this proxy saw.
pub fn set_forwarded(headers: &mut HeaderMap, client_ip: &HeaderValue, tls: bool, host: Option<HeaderValue>) {
    // Every X-Forwarded-For field the client sent, in order, then the client's address.
    let mut joined = Vec::new();
    for prev in headers.get_all(&X_FORWARDED_FOR) {
        joined.extend_from_slice(prev.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(client_ip.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    let proto = HeaderValue::from_static(if tls { "https" } else { "http" });
    headers.insert(X_FORWARDED_PROTO.clone(), proto);
    match host {
        Some(h) => headers.insert(X_FORWARDED_HOST.clone(), h),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_static_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, X-Secret-Hop"));
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("Basic eA=="));
        h.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::COOKIE));
    }

    #[test]
    fn the_byte_check_knows_exactly_the_static_list() {
        for h in &HOP_BY_HOP {
            let name = h.as_str();
            assert!(is_hop_by_hop_name(name), "{name}");
            assert!(is_hop_by_hop_name(&name.to_ascii_uppercase()), "{name}");
            // One letter changed, anywhere: not hop-by-hop.
            for i in 0..name.len() {
                let mut other = name.as_bytes().to_vec();
                other[i] = if other[i] == b'x' { b'y' } else { b'x' };
                assert!(!is_hop_by_hop_name(std::str::from_utf8(&other).unwrap()), "{other:?}");
            }
        }
        for name in [
            "",
            "t",
            "cookie",
            "host",
            "content-length",
            "x-forwarded-for",
            "upgradex",
            "keep_alive",
        ] {
            assert!(!is_hop_by_hop_name(name), "{name}");
        }
    }

    #[test]
    fn a_decoded_chunked_body_loses_its_stray_length_and_other_codings_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert!(settle_decoded_framing(&mut h), "no coding: as it is");
        assert!(h.contains_key(header::CONTENT_LENGTH));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert!(settle_decoded_framing(&mut h));
        assert!(!h.contains_key(header::CONTENT_LENGTH), "a length beside chunked goes");
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip, chunked"));
        assert!(!settle_decoded_framing(&mut h), "gzip cannot be passed on decoded");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        let ip = HeaderValue::from_static("127.0.0.1");
        set_forwarded(&mut h, &ip, false, Some(HeaderValue::from_static("kbs.example")));
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1");
        set_forwarded(&mut h, &ip, true, None);
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
        // Several fields from the client: all kept, in order, as one.
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.9"));
        set_forwarded(&mut h, &ip, false, None);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1, 127.0.0.1, 203.0.113.9, 127.0.0.1");
    }
}
