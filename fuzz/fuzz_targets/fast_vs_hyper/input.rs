//! From fuzzer bytes to the request bytes sent to both proxies.
//!
//! The first byte picks the mode and the backend. Its low two bits: `2` (e.g. `R`, `^`) is
//! **raw**, the rest goes as it is; anything else is **structured**. Its bits 2 to 4 all set
//! (e.g. `^`) send the request to the proxies whose backend refuses connections, else to the
//! mirror's. Structured: the rest drives a generator (via `arbitrary::Unstructured`) that
//! writes one request, or two pipelined ones, from tables of interesting methods, targets,
//! versions and field lines (framing, hop-by-hop, forwarding, cookies, obs-fold, bad names),
//! arbitrary field lines and bodies (length-framed with right or wrong lengths, chunked with or
//! without extensions, trailers and bad sizes, or unframed). Structured requests are mostly
//! well-formed, so the fuzzer gets past the parsers into forwarding.
//!
//! In both modes `@ROUTE@`, `@GONE@`, `@OLD@` and `@DEAD@` are replaced by route cookie values
//! minted at start-up (valid for the mirror; for a backend not in the set; expired; valid for the
//! refusing backend), so seeds and dictionary entries can carry a valid cookie without going
//! stale.

use libfuzzer_sys::arbitrary::Unstructured;

use super::harness::{Backend, Cookies};

/// Raw mode when `first byte % 4 == RAW`.
const RAW: u8 = 2;
/// The refusing backend when `first byte & DEAD == DEAD`.
const DEAD: u8 = 0b1_1100;

/// The request bytes and the backend they go to.
pub fn request(data: &[u8], cookies: &Cookies) -> (Vec<u8>, Backend) {
    let Some((&mode, rest)) = data.split_first() else {
        return (Vec::new(), Backend::Mirror);
    };
    let raw = if mode % 4 == RAW {
        rest.to_vec()
    } else {
        structured(&mut Unstructured::new(rest))
    };
    let backend = if mode & DEAD == DEAD {
        Backend::Dead
    } else {
        Backend::Mirror
    };
    (substitute(raw, cookies), backend)
}

fn substitute(raw: Vec<u8>, cookies: &Cookies) -> Vec<u8> {
    let mut out = raw;
    for (from, to) in [
        (&b"@ROUTE@"[..], &cookies.valid),
        (b"@GONE@", &cookies.gone),
        (b"@OLD@", &cookies.expired),
        (b"@DEAD@", &cookies.dead),
    ] {
        out = replace(&out, from, to.as_bytes());
    }
    out
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

const METHODS: &[&str] = &[
    "GET", "GET", "POST", "POST", "PUT", "DELETE", "HEAD", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "get",
    "M-SEARCH", "X~Y", "PRI",
];

const TARGETS: &[&str] = &[
    "/",
    "/healthz",
    "/kbs/v0/resource/default/key/1",
    "/kbs/v0/resource/default/key/1?x=1",
    "/kbs/v0/auth",
    "/kbs/v0/attest",
    "/kbs/v0/resource-policy",
    "/kbs/v0/reference-value/x?y=1",
    "/kbs/v0/resource/a/b#frag",
    "/kbs/v0/auth#x",
    "/kbs/v0/auth?",
    "/a?b=c&d=%20",
    "/%2e%2e/etc",
    "//double",
    "*",
    "http://kbs.example/kbs/v0/resource/a/b/c",
    "kbs.example:443",
    "/q\"uote",
    "/{brace}",
    "/pipe|caret^back`tick",
    "/back\\slash",
    "/non-ascii-\u{e9}",
];

const VERSIONS: &[&str] = &[
    "HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "http/1.1",
    "HTTP/2.0",
];

/// How the `Host` field is sent.
const HOSTS: &[&[&str]] = &[
    &["Host: kbs.example:8080"],
    &["Host: kbs.example:8080"],
    &["Host: kbs.example:8080"],
    &["Host: kbs.example:8080"],
    &[],
    &["Host: kbs.example:8080", "Host: kbs.example:8080"],
    &["Host: a.example", "Host: b.example"],
    &["Host:"],
    &["Host: [::1]:80"],
    &["host: KBS.example"],
    &["Host: a b"],
];

/// Mirror answer framings (see mirror.rs).
const MIRROR_MODES: &[&str] = &[
    "chunked",
    "gzip-chunked",
    "close",
    "204",
    "continue",
    "cl-te",
    "conn-cl",
];

/// Field lines; `{len}` is the length of the body bytes that follow the head.
const FIELDS: &[&str] = &[
    "Content-Length: {len}",
    "Content-Length: {len}, {len}",
    "Content-Length: {len}\r\nContent-Length: {len}",
    "Content-Length: {len+1}",
    "Content-Length: {len-1}",
    "Content-Length: +{len}",
    "Content-Length: 0{len}",
    "Content-Length: 00000000000000000000{len}",
    "content-length:{len}",
    "Content-Length: {len} ",
    "Content-Length: 18446744073709551616",
    "Transfer-Encoding: chunked",
    "Transfer-Encoding: gzip, chunked",
    "Transfer-Encoding: chunked, gzip",
    "Transfer-Encoding: identity",
    "Transfer-Encoding: CHUNKED",
    "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    "Connection: close",
    "Connection: keep-alive",
    "Connection: keep-alive, X-Secret",
    "Connection: x-mirror-mode",
    "Connection: cookie",
    "Connection: host",
    "Connection: content-length",
    "Connection: x-forwarded-for",
    "Connection: x-forwarded-host",
    "Connection: upgrade",
    "Connection: te, close",
    "Connection: a, b, c, d, e, f, g, h, i",
    "Connection: ,,",
    "X-Secret: hop",
    "Keep-Alive: timeout=3",
    "Proxy-Connection: keep-alive",
    "Proxy-Authorization: Basic eA==",
    "TE: trailers",
    "Trailer: X-T",
    "Upgrade: websocket",
    "Upgrade: h2c",
    "Expect: 100-continue",
    "Expect: something-else",
    "X-Forwarded-For: 203.0.113.9",
    "X-Forwarded-For: 198.51.100.7",
    "X-Forwarded-For:",
    "X-Forwarded-Host: spoof.example",
    "X-Forwarded-Proto: https",
    "Forwarded: for=192.0.2.60",
    "Cookie: route=@ROUTE@",
    "Cookie: a=b; route=@ROUTE@; c=d",
    "Cookie: route=@GONE@",
    "Cookie: route=@OLD@",
    "Cookie: route=@DEAD@",
    "Cookie: route=junk",
    "Cookie: route=@ROUTE@; route=junk",
    "Cookie: route=junk\r\nCookie: route=@ROUTE@",
    "Cookie: kbs-session-id=0123456789abcdef0123456789abcdef",
    "Authorization: Bearer not-a-real-token",
    "Authorization: Bearer ",
    "X-Fold: a\r\n folded",
    "X-Fold: a\r\n\tfolded",
    "X-Space : v",
    " X-Lead: v",
    "X-Empty:",
    "X-Tab:\tv\t",
    "X-Utf8: caf\u{e9}",
    "X-Ctl: a\u{1}b",
    "X-Del: a\u{7f}b",
    "Bad\u{1}Name: v",
    "NoColon",
    ": no-name",
    "Accept: */*",
    "Content-Type: application/json",
    "Content-Encoding: gzip",
    "Via: 1.1 other",
    "Max-Forwards: 0",
];

/// Bytes a target suffix may map to besides visible ASCII.
const TARGET_ODD: &[u8] = b"%#?\"{}\\^`|<>[] \t\x80\xff\x00";

fn pick<'a, T: ?Sized>(u: &mut Unstructured<'_>, list: &'a [&'a T]) -> &'a T {
    let i = u.choose_index(list.len()).unwrap_or(0);
    list[i]
}

fn small(u: &mut Unstructured<'_>, max: usize) -> usize {
    u.int_in_range(0..=max).unwrap_or(0)
}

fn bytes(u: &mut Unstructured<'_>, max: usize) -> Vec<u8> {
    let n = small(u, max);
    let n = n.min(u.len());
    u.bytes(n).map(<[u8]>::to_vec).unwrap_or_default()
}

/// How the body follows the head.
enum BodyKind {
    None,
    /// Framed by `Content-Length` (added unless a field line already frames it).
    Length,
    /// Chunked (`Transfer-Encoding: chunked` added unless a field line already frames it).
    Chunked,
    /// Bytes after the head with no framing field (pipelined garbage, or a body the fields frame).
    Unframed,
}

fn structured(u: &mut Unstructured<'_>) -> Vec<u8> {
    let count = if u.ratio(1u8, 4).unwrap_or(false) { 2 } else { 1 };
    let mut out = Vec::new();
    for i in 0..count {
        let last = i + 1 == count;
        // Most last requests close, so the exchange ends without waiting for a quiet timeout.
        let close = last && !u.ratio(1u8, 5).unwrap_or(false);
        one_request(u, close, &mut out);
    }
    out
}

fn one_request(u: &mut Unstructured<'_>, close: bool, out: &mut Vec<u8>) {
    let eol: &[u8] = if u.ratio(1u8, 12).unwrap_or(false) {
        b"\n"
    } else {
        b"\r\n"
    };
    let method = pick(u, METHODS);
    let mut target = pick(u, TARGETS).as_bytes().to_vec();
    for b in bytes(u, 6) {
        target.push(if b.is_ascii_graphic() {
            b
        } else {
            TARGET_ODD[usize::from(b) % TARGET_ODD.len()]
        });
    }
    let version = pick(u, VERSIONS);

    let mut lines: Vec<Vec<u8>> = pick(u, HOSTS).iter().map(|l| l.as_bytes().to_vec()).collect();
    for _ in 0..small(u, 6) {
        let line = match small(u, 9) {
            0 => bytes(u, 40),
            1 => {
                let mut l = b"X-".to_vec();
                l.extend(bytes(u, 8).into_iter().map(|b| b'a' + b % 26));
                l.extend_from_slice(b": ");
                l.extend(
                    bytes(u, 16)
                        .into_iter()
                        .map(|b| if b.is_ascii_graphic() { b } else { b' ' }),
                );
                l
            }
            2 => format!("X-Mirror-Mode: {}", pick(u, MIRROR_MODES)).into_bytes(),
            _ => pick(u, FIELDS).as_bytes().to_vec(),
        };
        lines.push(line);
    }
    if close {
        lines.push(b"Connection: close".to_vec());
    }

    let kind = match small(u, 7) {
        0..=2 => BodyKind::None,
        3..=4 => BodyKind::Length,
        5..=6 => BodyKind::Chunked,
        _ => BodyKind::Unframed,
    };
    let data = bytes(u, 64);
    let body = match kind {
        BodyKind::None => Vec::new(),
        BodyKind::Length | BodyKind::Unframed => data,
        BodyKind::Chunked => chunked(u, &data),
    };
    let frames = |name: &[u8]| {
        lines
            .iter()
            .any(|l| l.len() >= name.len() && l[..name.len()].eq_ignore_ascii_case(name))
    };
    let framed = frames(b"content-length") || frames(b"transfer-encoding");
    match kind {
        BodyKind::Length if !framed => lines.push(b"Content-Length: {len}".to_vec()),
        BodyKind::Chunked if !framed => lines.push(b"Transfer-Encoding: chunked".to_vec()),
        _ => {}
    }

    let len = body.len();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(&target);
    out.push(b' ');
    out.extend_from_slice(version.as_bytes());
    out.extend_from_slice(eol);
    for line in lines {
        let line = replace(&line, b"{len+1}", (len + 1).to_string().as_bytes());
        let line = replace(&line, b"{len-1}", len.saturating_sub(1).to_string().as_bytes());
        let line = replace(&line, b"{len}", len.to_string().as_bytes());
        out.extend_from_slice(&line);
        out.extend_from_slice(eol);
    }
    out.extend_from_slice(eol);
    out.extend_from_slice(&body);
}

/// `data` as a chunked body, cut where the fuzzer says, with the odd extension, trailer or broken
/// size line.
fn chunked(u: &mut Unstructured<'_>, data: &[u8]) -> Vec<u8> {
    const SIZE_ODDITIES: &[&str] = &["", " ", "\t", ";ext", ";a=\"q\"", " ;x=y"];
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (small(u, 31) + 1).min(rest.len());
        let upper = u.ratio(1u8, 4).unwrap_or(false);
        let size = if upper { format!("{n:X}") } else { format!("{n:x}") };
        match small(u, 15) {
            0 => out.extend_from_slice(b"zz"),
            1 => out.extend_from_slice(format!("-{size}").as_bytes()),
            2 => out.extend_from_slice(format!("0x{size}").as_bytes()),
            3 => out.extend_from_slice(format!("ffffffffffffffff{size}").as_bytes()),
            4 => out.extend_from_slice(format!("0000000000000000{size}").as_bytes()),
            _ => out.extend_from_slice(size.as_bytes()),
        }
        out.extend_from_slice(pick(u, SIZE_ODDITIES).as_bytes());
        out.extend_from_slice(if u.ratio(1u8, 16).unwrap_or(false) {
            b"\n"
        } else {
            b"\r\n"
        });
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0");
    out.extend_from_slice(pick(u, SIZE_ODDITIES).as_bytes());
    out.extend_from_slice(b"\r\n");
    match small(u, 5) {
        0 => out.extend_from_slice(b"X-Trailer: t\r\n"),
        1 => out.extend_from_slice(b"Content-Length: 5\r\n"),
        2 => out.extend_from_slice(b"Bad Trailer\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
    out
}
