//! The HTTP/1.1 fast path against the hyper path: the same request must put the same head and
//! body on the backend and give the client the same response (as HTTP means it: field names
//! case-insensitive, order kept per name). Property-tested over generated requests, plus hostile
//! framing that both must refuse alike.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kbs_proxy::config::Settings;
use proptest::prelude::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend on 127.0.0.1:0 serving each connection with `serve`.
async fn start_backend<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// Reads from `s` into `buf` until it holds a whole request head; its length, or `None` when
/// the connection ends first.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A backend that answers each request with the exact request head and body it received as its
/// response body (keep-alive, Content-Length framed), and a few response headers of its own,
/// hop-by-hop ones included.
async fn start_mirror() -> SocketAddr {
    start_backend(|mut s| async move {
                let mut buf = Vec::new();
                loop {
                    let Some(head_end) = read_head(&mut s, &mut buf).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let mirrored: Vec<u8> = buf.drain(..head_end + len).collect();
                    let mut resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Mirror: yes\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive, X-Hop\r\nX-Hop: drop me\r\n\r\n",
                        mirrored.len()
                    )
                    .into_bytes();
                    resp.extend_from_slice(&mirrored);
                    if s.write_all(&resp).await.is_err() {
                        return;
                    }
                }
    })
    .await
}

/// One request over a new connection; the raw response bytes (the connection is closed after
/// one response by `Connection: close`, or read until the response is complete).
async fn exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

/// [`exchange`] over TLS (`client` trusts the proxy's certificate for `localhost`).
async fn exchange_tls(addr: SocketAddr, client: &Arc<rustls::ClientConfig>, raw: &[u8]) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::clone(client))
        .connect(name, tcp)
        .await
        .unwrap();
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

/// A response as HTTP means it: status, fields (lower-case names, order kept per name, minus
/// `date`, the cookie value and framing fields that legitimately differ) and body.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

fn normalize_fields(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .filter(|(n, _)| !matches!(n.as_str(), "date" | "connection" | "transfer-encoding"))
        .map(|(n, v)| {
            if n == "set-cookie" {
                (n, v.split(';').skip(1).collect::<Vec<_>>().join(";"))
            } else {
                (n, v)
            }
        })
        .collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0)); // stable: same-name values keep their order
    fields
}

fn parse_response(raw: &[u8]) -> Option<Seen> {
    let mut storage = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut storage);
    let n = match resp.parse(raw).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let len = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok());
    let body = match len {
        Some(len) => raw.get(n..n + len)?.to_vec(),
        None => raw[n..].to_vec(),
    };
    Some(Seen {
        status: resp.code?,
        fields: normalize_fields(resp.headers),
        body,
    })
}

/// What the backend saw: request line, normalized fields, body.
type BackendView = (String, Vec<(String, String)>, Vec<u8>);

/// The backend's view (the mirrored request) normalized the same way.
fn parse_mirrored(body: &[u8]) -> Option<BackendView> {
    let mut storage = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut storage);
    let n = match req.parse(body).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let line = format!("{} {}", req.method?, req.path?);
    Some((line, normalize_fields(req.headers), body[n..].to_vec()))
}

struct Pair {
    fast: TestProxy,
    hyper: TestProxy,
}

async fn pair(mirror: SocketAddr) -> Pair {
    let s = |fast: &str| Settings {
        fast_path: Some(fast.into()),
        ..settings(vec![format!("mirror=http://{mirror}")])
    };
    Pair {
        fast: start_proxy(s("on")).await,
        hyper: start_proxy(s("off")).await,
    }
}

/// A [`Pair`] terminating TLS, and a client that trusts them.
struct TlsPair {
    proxies: Pair,
    client: Arc<rustls::ClientConfig>,
    _pki: pki::Pki,
}

impl TlsPair {
    async fn new(mirror: SocketAddr) -> Self {
        let pki = pki::Pki::new();
        let files = pki.issue("proxy", &["localhost"]);
        let s = |fast: &str| Settings {
            fast_path: Some(fast.into()),
            tls_cert: Some(files.cert.clone()),
            tls_key: Some(files.key.clone()),
            ..settings(vec![format!("mirror=http://{mirror}")])
        };
        let proxies = Pair {
            fast: start_proxy(s("on")).await,
            hyper: start_proxy(s("off")).await,
        };
        Self {
            proxies,
            client: pki.client_config(&[b"http/1.1"]),
            _pki: pki,
        }
    }

    /// `raw` through the fast path and through hyper: both raw responses.
    async fn both(&self, raw: &[u8]) -> (Vec<u8>, Vec<u8>) {
        (
            exchange_tls(self.proxies.fast.addr, &self.client, raw).await,
            exchange_tls(self.proxies.hyper.addr, &self.client, raw).await,
        )
    }
}

/// The fast path's answer and hyper's to one request mean the same, and so do the requests the
/// backend got.
fn assert_same_exchange(fast: &[u8], hyper: &[u8]) -> Result<(), TestCaseError> {
    let fast = parse_response(fast).expect("fast path answered");
    let hyper = parse_response(hyper).expect("hyper path answered");
    prop_assert_eq!(fast.status, hyper.status);
    // Same bytes at the backend, as HTTP means them.
    let f = parse_mirrored(&fast.body);
    let h = parse_mirrored(&hyper.body);
    prop_assert!(f.is_some() || fast.status != 200, "a 200 carries the mirrored request");
    prop_assert_eq!(f, h, "backend views differ");
    prop_assert_eq!(fast.fields, hyper.fields, "client views differ");
    Ok(())
}

fn route_cookie_for(name: &str) -> String {
    route_value(kbs_proxy::routing::route_cookie::BackendId::from_name(name))
}

fn request_strategy() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![Just("GET"), Just("POST"), Just("PUT"), Just("DELETE"), Just("OPTIONS")];
    let path = prop_oneof![
        Just("/healthz".to_owned()),
        Just("/kbs/v0/resource/default/key/1".to_owned()),
        Just("/kbs/v0/reference-value/x?y=1".to_owned()),
        "/[a-z]{1,8}(/[a-z0-9]{1,6}){0,3}".prop_map(|p| p),
    ];
    let extra = prop::collection::vec(
        prop_oneof![
            Just("X-Forwarded-For: 203.0.113.9".to_owned()),
            Just("X-Forwarded-Host: spoof.example".to_owned()),
            Just("X-Forwarded-Proto: https".to_owned()),
            Just("Keep-Alive: timeout=3".to_owned()),
            Just("Connection: keep-alive, X-Secret".to_owned()),
            Just("X-Secret: hop".to_owned()),
            Just("Proxy-Authorization: Basic eA==".to_owned()),
            Just("Authorization: Bearer not-a-real-token".to_owned()),
            Just("Accept: */*".to_owned()),
            Just("Cookie: a=b; route=junk".to_owned()),
            Just("Cookie: kbs-session-id=0123456789abcdef0123456789abcdef".to_owned()),
            Just(format!("Cookie: route={}", route_cookie_for("mirror"))),
            "X-[A-Za-z]{1,10}: [ -~]{0,20}".prop_map(|h| h.trim_end().to_owned()),
        ],
        0..8,
    );
    let body = prop::collection::vec(any::<u8>(), 0..300);
    (method, path, extra, body).prop_map(|(m, p, extra, body)| {
        let mut raw = format!("{m} {p} HTTP/1.1\r\nHost: kbs.example:8080\r\nConnection: close\r\n");
        for h in extra {
            raw.push_str(&h);
            raw.push_str("\r\n");
        }
        if !body.is_empty() || m == "POST" {
            raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        raw.push_str("\r\n");
        let mut raw = raw.into_bytes();
        raw.extend_from_slice(&body);
        raw
    })
}

#[test]
fn the_fast_path_forwards_and_answers_exactly_as_the_hyper_path() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mirror, proxies) = rt.block_on(async {
        let m = start_mirror().await;
        (m, pair(m).await)
    });
    let _ = mirror;
    let config = ProptestConfig {
        cases: 96,
        ..ProptestConfig::default()
    };
    proptest!(config, |(raw in request_strategy())| {
        let (fast, hyper) = rt.block_on(async {
            (exchange(proxies.fast.addr, &raw).await, exchange(proxies.hyper.addr, &raw).await)
        });
        assert_same_exchange(&fast, &hyper)?;
    });
}

/// The same over TLS: the fast path serves HTTP/1.1 over TLS too (rustls in its own task), and
/// must keep doing what hyper over tokio-rustls does.
#[test]
fn over_tls_the_fast_path_forwards_and_answers_exactly_as_the_hyper_path() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pair = rt.block_on(async { TlsPair::new(start_mirror().await).await });
    let config = ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    };
    proptest!(config, |(raw in request_strategy())| {
        let (fast, hyper) = rt.block_on(pair.both(&raw));
        assert_same_exchange(&fast, &hyper)?;
    });
}

/// Requests both paths must refuse with a 400.
const BAD_FRAMING: [&[u8]; 6] = [
    b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1x\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n folded\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: h\r\nBad\x01Name: v\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n",
];

fn assert_both_refused(raw: &[u8], fast: &[u8], hyper: &[u8]) {
    let status = |r: &[u8]| String::from_utf8_lossy(r).split(' ').nth(1).unwrap_or("").to_owned();
    assert_eq!(status(fast), status(hyper), "{:?}", String::from_utf8_lossy(raw));
    assert_eq!(status(fast), "400", "{:?}", String::from_utf8_lossy(raw));
}

#[tokio::test]
async fn both_paths_refuse_bad_framing_alike() {
    let mirror = start_mirror().await;
    let p = pair(mirror).await;
    for raw in BAD_FRAMING {
        let fast = exchange(p.fast.addr, raw).await;
        let hyper = exchange(p.hyper.addr, raw).await;
        assert_both_refused(raw, &fast, &hyper);
    }
}

#[tokio::test]
async fn over_tls_both_paths_refuse_bad_framing_alike() {
    let pair = TlsPair::new(start_mirror().await).await;
    for raw in BAD_FRAMING {
        let (fast, hyper) = pair.both(raw).await;
        assert_both_refused(raw, &fast, &hyper);
    }
}

#[tokio::test]
async fn keep_alive_pipelining_and_large_bodies_on_the_fast_path() {
    let mirror = start_mirror().await;
    let p = pair(mirror).await;
    // Three pipelined requests on one connection, bodies of different sizes.
    let mut raw = Vec::new();
    for (i, size) in [0usize, 70_000, 5].iter().enumerate() {
        raw.extend_from_slice(format!("POST /p{i} HTTP/1.1\r\nHost: h\r\nContent-Length: {size}\r\n\r\n").as_bytes());
        raw.extend(std::iter::repeat_n(b'a' + i as u8, *size));
    }
    let mut s = TcpStream::connect(p.fast.addr).await.unwrap();
    s.write_all(&raw).await.unwrap();
    let mut got = Vec::new();
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen < 3 {
        let mut chunk = vec![0u8; 65536];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early");
        got.extend_from_slice(&chunk[..n]);
        seen = 0;
        let mut rest = &got[..];
        while let Some(r) = parse_response(rest) {
            let mut storage = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut storage);
            let httparse::Status::Complete(n) = resp.parse(rest).unwrap() else {
                break;
            };
            if rest.len() < n + r.body.len() {
                break;
            }
            seen += 1;
            rest = &rest[n + r.body.len()..];
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("POST /p0 ") && text.contains("POST /p1 ") && text.contains("POST /p2 "));
    assert!(text.contains(&"b".repeat(70_000)));
}

/// A backend that reads one request head per exchange and answers `reply` after `delay`, or
/// never answers (`None`), keeping the connection open.
async fn start_scripted(reply: Option<&'static [u8]>, delay: Duration) -> SocketAddr {
    start_backend(move |mut s| async move {
        let mut buf = Vec::new();
        loop {
            if read_head(&mut s, &mut buf).await.is_none() {
                return;
            }
            buf.clear();
            let Some(reply) = reply else {
                // Hang: hold the connection until the proxy gives up on it.
                let _ = s.read_to_end(&mut buf).await;
                return;
            };
            tokio::time::sleep(delay).await;
            if s.write_all(reply).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// One keep-alive exchange on `s`: the status code and the response head.
async fn keep_alive_get(s: &mut TcpStream, cookie: &str) -> (u16, String) {
    s.write_all(format!("GET /kbs/v0/resource/a/b/c HTTP/1.1\r\nHost: h\r\nCookie: route={cookie}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = parse_response(&got) {
            let head = String::from_utf8_lossy(&got).into_owned();
            let len = r
                .fields
                .iter()
                .find(|(n, _)| n == "content-length")
                .map_or(0, |(_, v)| v.parse::<usize>().unwrap());
            if r.body.len() == len {
                return (r.status, head);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("answered in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
}

const OK_REPLY: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[tokio::test]
async fn the_idle_timeout_counts_from_the_last_response_not_from_the_first() {
    let backend = start_scripted(Some(OK_REPLY), Duration::ZERO).await;
    let proxy = start_proxy(Settings {
        client_idle_timeout: Some("400ms".into()),
        fast_path: Some("on".into()),
        ..settings(vec![format!("b=http://{backend}")])
    })
    .await;
    let cookie = route_cookie_for("b");
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let opened = tokio::time::Instant::now();
    // Busy for longer than the idle timeout, never idle for as long.
    let mut answered = tokio::time::Instant::now();
    while opened.elapsed() < Duration::from_millis(1000) {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(keep_alive_get(&mut s, &cookie).await.0, 200);
        answered = tokio::time::Instant::now();
    }
    // Then quiet: closed about the idle timeout after the last answer.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("an idle connection is closed")
        .unwrap();
    assert!(rest.is_empty());
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(300),
        "closed early: {idle:?} after the last answer"
    );
}

#[tokio::test]
async fn response_deadlines_on_the_fast_path_hold_whichever_timeout_is_shorter() {
    // A response timeout shorter than the idle timeout: a hanging backend gets 504 on time,
    // though the connection's timer was armed for the (later) idle deadline first.
    let hang = start_scripted(None, Duration::ZERO).await;
    let ok = start_scripted(Some(OK_REPLY), Duration::ZERO).await;
    let proxy = start_proxy(Settings {
        client_idle_timeout: Some("30s".into()),
        backend_response_timeout: Some("300ms".into()),
        fast_path: Some("on".into()),
        ..settings(vec![format!("hang=http://{hang}"), format!("ok=http://{ok}")])
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(keep_alive_get(&mut s, &route_cookie_for("ok")).await.0, 200);
    let asked = tokio::time::Instant::now();
    let (status, head) = keep_alive_get(&mut s, &route_cookie_for("hang")).await;
    assert_eq!(status, 504, "{head}");
    assert!(head.contains("GatewayTimeout"), "KBS-shaped: {head}");
    assert!(asked.elapsed() < Duration::from_secs(5));

    // A response timeout longer than the idle timeout: a slow answer within it is relayed,
    // though the idle deadline passes while waiting.
    let slow = start_scripted(Some(OK_REPLY), Duration::from_millis(600)).await;
    let proxy = start_proxy(Settings {
        client_idle_timeout: Some("200ms".into()),
        backend_response_timeout: Some("5s".into()),
        fast_path: Some("on".into()),
        ..settings(vec![format!("slow=http://{slow}")])
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..2 {
        assert_eq!(keep_alive_get(&mut s, &route_cookie_for("slow")).await.0, 200);
    }
}

#[tokio::test]
async fn a_response_head_the_fast_path_cannot_frame_is_a_kbs_shaped_502() {
    let cases: [(&str, &'static [u8]); 4] = [
        ("bad length", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
        (
            "conflicting lengths",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
        (
            "unframable coding",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        ),
        // Not HTTP at all, and the connection stays open: refused at once, not at a timeout.
        ("garbage", b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n"),
    ];
    for (what, reply) in cases {
        let backend = start_scripted(Some(reply), Duration::ZERO).await;
        let proxy = start_proxy(Settings {
            backend_response_timeout: Some("20s".into()),
            fast_path: Some("on".into()),
            ..settings(vec![format!("b=http://{backend}")])
        })
        .await;
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let asked = tokio::time::Instant::now();
        let (status, head) = keep_alive_get(&mut s, &route_cookie_for("b")).await;
        assert_eq!(status, 502, "{what}: {head}");
        assert!(head.contains("BadGateway"), "{what}: KBS-shaped: {head}");
        assert!(asked.elapsed() < Duration::from_secs(5), "{what}: prompt");
    }
}

#[tokio::test]
async fn idle_keep_alive_connections_hold_no_buffer() {
    // The count is the process's (nextest runs each test in a process of its own): this proxy's.
    use kbs_proxy::dataplane::proxy::fast_buffers_in_use;
    let backend = start_scripted(Some(OK_REPLY), Duration::ZERO).await;
    let proxy = start_proxy(Settings {
        fast_path: Some("on".into()),
        ..settings(vec![format!("b=http://{backend}")])
    })
    .await;
    let cookie = route_cookie_for("b");
    let mut conns = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(keep_alive_get(&mut s, &cookie).await.0, 200);
        conns.push(s);
    }
    // Every connection answered and idle: once their tasks are back waiting, no buffer is held.
    eventually(Duration::from_secs(5), || fast_buffers_in_use() == 0).await;
    assert_eq!(fast_buffers_in_use(), 0, "buffers held by 40 idle connections");
    // And they still serve.
    for s in &mut conns {
        assert_eq!(keep_alive_get(s, &cookie).await.0, 200);
    }
}

#[tokio::test]
async fn odd_but_valid_framing_is_forwarded_alike() {
    let mirror = start_mirror().await;
    let p = pair(mirror).await;
    let cases: [&[u8]; 2] = [
        // Leading zeros: a valid Content-Length (RFC 9110 §8.6: 1*DIGIT), hyper reads it.
        b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 00000000000000000005\r\nConnection: close\r\n\r\nhello",
        b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    ];
    for raw in cases {
        let fast = parse_response(&exchange(p.fast.addr, raw).await).expect("fast path answered");
        let hyper = parse_response(&exchange(p.hyper.addr, raw).await).expect("hyper path answered");
        let what = String::from_utf8_lossy(raw);
        assert_eq!(fast.status, 200, "{what}");
        assert_eq!(hyper.status, 200, "{what}");
        assert_eq!(parse_mirrored(&fast.body), parse_mirrored(&hyper.body), "{what}");
    }
}

#[tokio::test]
async fn what_the_differential_fuzzer_found_is_handled_alike() {
    let mirror = start_mirror().await;
    let p = pair(mirror).await;
    let cases: [&[u8]; 9] = [
        // `Connection` naming Content-Length must not unframe the body: no second request.
        b"POST /x HTTP/1.1\r\nHost: h\r\nConnection: content-length, close\r\nContent-Length: 35\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: host, close\r\n\r\n",
        b"GET /x#f HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        b"GET /a` HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        b"GET /a?q=\"x\" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        b"CONNECT /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\nConnection: close\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello",
        // Handed to hyper (`Upgrade`, chunked), whose answer (400: the chunk size line is bad)
        // must be written before the connection ends.
        b"POST /kbs/v0/resource/default/key/1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\nzz\nz\r\n0\r\n\r\n",
    ];
    for raw in cases {
        let what = String::from_utf8_lossy(raw);
        let fast = exchange(p.fast.addr, raw).await;
        let hyper = exchange(p.hyper.addr, raw).await;
        let status = |r: &[u8]| String::from_utf8_lossy(r).split(' ').nth(1).unwrap_or("").to_owned();
        assert_eq!(status(&fast), status(&hyper), "{what}");
        if let (Some(f), Some(h)) = (parse_response(&fast), parse_response(&hyper)) {
            assert_eq!(parse_mirrored(&f.body), parse_mirrored(&h.body), "{what}");
        }
    }
    // The answer to the broken upgrade request is hyper's 400, written before the close.
    let fast = exchange(p.fast.addr, cases[8]).await;
    assert!(fast.starts_with(b"HTTP/1.1 400 "), "{}", String::from_utf8_lossy(&fast));
    // The smuggling case in detail: one request at the backend, with its whole body.
    let fast = parse_response(&exchange(p.fast.addr, cases[0]).await).unwrap();
    let (line, fields, body) = parse_mirrored(&fast.body).unwrap();
    assert_eq!(line, "POST /x");
    assert_eq!(body.len(), 35);
    assert!(fields.contains(&("content-length".into(), "35".into())));
    // Several X-Forwarded-For fields are joined in order, the client last.
    let fast = parse_response(&exchange(p.fast.addr, cases[6]).await).unwrap();
    let (_, fields, _) = parse_mirrored(&fast.body).unwrap();
    assert!(
        fields.contains(&("x-forwarded-for".into(), "1.1.1.1, 2.2.2.2, 127.0.0.1".into())),
        "{fields:?}"
    );
}

#[tokio::test]
async fn framing_fields_a_backend_names_in_connection_still_frame_the_answer() {
    let backend = start_scripted(
        Some(b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nok"),
        Duration::ZERO,
    )
    .await;
    let proxy = start_proxy(Settings {
        fast_path: Some("on".into()),
        ..settings(vec![format!("b=http://{backend}")])
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..2 {
        let (status, head) = keep_alive_get(&mut s, &route_cookie_for("b")).await;
        assert_eq!(status, 200, "{head}");
        assert!(head.to_ascii_lowercase().contains("content-length: 2"), "{head}");
    }
}

#[tokio::test]
async fn an_answer_of_the_proxys_own_to_head_has_no_body() {
    // A cookie pinning a backend that refuses connections: the proxy answers itself.
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let proxy = start_proxy(Settings {
        fast_path: Some("on".into()),
        ..settings(vec![format!("gone=http://{gone}")])
    })
    .await;
    let raw = format!(
        "HEAD /kbs/v0/resource/a/b/c HTTP/1.1\r\nHost: h\r\nCookie: route={}\r\n\r\n",
        route_cookie_for("gone")
    );
    let got = exchange(proxy.addr, raw.as_bytes()).await;
    let text = String::from_utf8_lossy(&got);
    let head_end = text.find("\r\n\r\n").expect("a whole head") + 4;
    assert!(
        text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.1 5"),
        "{text}"
    );
    assert_eq!(got.len(), head_end, "no body after the head: {text}");
}

/// The length of the first HTTP/1.1 response in `raw` (head and Content-Length body).
fn first_response_len(raw: &[u8]) -> usize {
    let mut storage = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut storage);
    let head = match resp.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("no complete response in {:?}: {other:?}", String::from_utf8_lossy(raw)),
    };
    let body: usize = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
        .unwrap_or(0);
    head + body
}

#[tokio::test]
async fn an_http2_preface_after_http1_requests_is_refused_as_hyper_refuses_it() {
    // Found by the differential fuzzer: the fast path took the preface for HTTP/2 with prior
    // knowledge at any request, and answered with an HTTP/2 SETTINGS frame; the preface is only
    // valid as a connection's first bytes (RFC 9113 §3.3).
    let mirror = start_mirror().await;
    let p = pair(mirror).await;
    let first = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n".to_vec();
    // The whole preface: hyper's HTTP/1 server closes without an answer.
    let whole = [&first[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"].concat();
    for addr in [p.fast.addr, p.hyper.addr] {
        let out = exchange(addr, &whole).await;
        assert!(out.starts_with(b"HTTP/1.1 200 "), "{}", String::from_utf8_lossy(&out));
        assert_eq!(
            out.len(),
            first_response_len(&out),
            "nothing may follow the first answer: {}",
            String::from_utf8_lossy(&out)
        );
    }
    // Part of it (the request line with its version): a 400, then the connection closes.
    let part = [&first[..], b"PRI * HTTP/2.0\r\n\r\n"].concat();
    for addr in [p.fast.addr, p.hyper.addr] {
        let out = exchange(addr, &part).await;
        let rest = &out[first_response_len(&out)..];
        assert!(rest.starts_with(b"HTTP/1.1 400 "), "{}", String::from_utf8_lossy(&out));
    }
    // As a connection's first bytes it is HTTP/2 with prior knowledge, on either path.
    for addr in [p.fast.addr, p.hyper.addr] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut frame = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut frame))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(frame[3], 0x4, "a SETTINGS frame first: {frame:?}");
    }
}

#[tokio::test]
async fn an_http2_preface_after_empty_lines_is_answered_as_hyper_answers_it() {
    // Found by the differential fuzzer: empty lines, then the preface, as a connection's first
    // bytes. Whether hyper answers 400 or closes without a word depends on how much of the
    // request line its version sniffing read; the fast path used to answer 400 always. Now a bad
    // version in a connection's first request goes to hyper, as on the hyper path.
    let mirror = start_mirror().await;
    let p = pair(mirror).await;
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let status = |r: &[u8]| String::from_utf8_lossy(r).split(' ').nth(1).unwrap_or("").to_owned();
    let mut answers = std::collections::BTreeSet::new();
    for lines in [&b"\n"[..], b"\r\n"] {
        for n in [1, 4, 7, 8, 12, 13, 14, 16, 24] {
            let raw = [lines.repeat(n), preface.to_vec()].concat();
            let fast = exchange(p.fast.addr, &raw).await;
            let hyper = exchange(p.hyper.addr, &raw).await;
            assert_eq!(status(&fast), status(&hyper), "{:?}", String::from_utf8_lossy(&raw));
            // Refused either way: a 400, or a close; never forwarded.
            assert!(matches!(status(&fast).as_str(), "400" | ""), "{fast:?}");
            answers.insert(status(&fast));
        }
    }
    // Both of hyper's answers occur among these inputs, so both were compared.
    assert_eq!(answers.len(), 2, "{answers:?}");

    // After a first request: hyper drops leading CR and LF bytes at a parse error and closes
    // without an answer when the whole preface follows (found by the fuzzer, mid-connection).
    let first = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n";
    for lines in [&b"\r\n"[..], b"\n", b"\r"] {
        for n in [1, 3, 20] {
            for tail in [&b""[..], b"ooo\r\nX: y\r\n\r\n"] {
                let raw = [&first[..], &lines.repeat(n), preface, tail].concat();
                let fast = exchange(p.fast.addr, &raw).await;
                let hyper = exchange(p.hyper.addr, &raw).await;
                let what = String::from_utf8_lossy(&raw);
                assert!(fast.starts_with(b"HTTP/1.1 200 "), "{what}");
                assert_eq!(
                    fast.len(),
                    first_response_len(&fast),
                    "nothing after the first answer: {what}"
                );
                assert_eq!(hyper.len(), first_response_len(&hyper), "{what}");
            }
        }
    }
}
