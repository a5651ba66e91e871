//! Hostile clients and broken backends: every case gets a prompt, proper answer, the proxy's
//! other clients are unaffected, and nothing leaks.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use kbs_proxy::config::Settings;
use kbs_proxy_harness::kbs_client::KbsClient;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(10);

/// Writes `raw` and reads until the server closes or `LIMIT`; returns what came back.
async fn raw_exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything; a failed write is fine.
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LIMIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_proper_statuses() {
    let (_sims, proxy) = two_replicas().await;
    let a = proxy.addr;
    let long_path = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000));
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many_headers = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n");
    let huge_cookie = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nCookie: route={}\r\n\r\n",
        "A".repeat(100_000)
    );
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("request line too long", long_path.into_bytes(), &[414, 431]),
        ("too many headers", many_headers.into_bytes(), &[431]),
        ("cookie header too large", huge_cookie.into_bytes(), &[431]),
        (
            "invalid header bytes",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad\x01: v\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "no header colon",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nBroken\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "two different content-lengths",
            b"POST /kbs/v0/auth HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde".to_vec(),
            &[400],
        ),
        (
            "bad chunk size",
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            &[400, 502],
        ),
        (
            "obs-fold",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "not http",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(),
            &[400, 0],
        ),
    ];
    for (what, raw, want) in cases {
        let got = raw_exchange(a, &raw).await;
        assert!(want.contains(&status_of(&got)), "{what}: got {:?}", got.lines().next());
    }
    // The proxy is still fine for everybody else.
    let mut c = KbsClient::new(proxy.url());
    c.get_resource("default/key/demo").await.unwrap();
}

#[tokio::test]
async fn content_length_with_chunked_cannot_smuggle_a_second_request() {
    // RFC 9112 §6.3: Transfer-Encoding wins, Content-Length is dropped, and the connection is
    // closed after the response, so bytes hidden behind the chunked body are never a request.
    let echo = start_echo().await;
    let proxy = start_proxy(settings(vec![format!("echo=http://{echo}")])).await;
    let raw = b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n\
3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let got = raw_exchange(proxy.addr, raw).await;
    assert_eq!(got.matches("HTTP/1.1 ").count(), 1, "one response only: {got}");
    assert!(
        got.ends_with("\r\n3\r\nabc\r\n0\r\n\r\n"),
        "the chunked body, not the Content-Length, framed it: {got}"
    );
    assert!(got.contains("connection: close"), "{got}");
    assert!(!got.contains("smuggled"));
}

#[tokio::test]
async fn hostile_route_cookies_are_absent_counted_and_never_panic() {
    let (_sims, proxy) = two_replicas().await;
    let many: String = (0..300).map(|i| format!("route=junk{i}; ")).collect();
    let bodies = [
        many.as_str(),
        "route=",
        "route=====",
        "route=\u{1}\u{2}",
        "route=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "route=\"\"; route; =; ;;;",
        "route=%00%ff",
    ];
    for cookie in bodies {
        let req = Request::get(format!("{}/healthz", proxy.url()))
            .header("cookie", cookie)
            .body(Full::default());
        let Ok(req) = req else { continue }; // not even a valid header value
        let (parts, _) = send(req).await;
        assert_eq!(parts.status, StatusCode::OK, "{cookie:?}");
        assert!(
            parts.headers.contains_key("set-cookie"),
            "treated as absent: a new cookie"
        );
    }
    // A valid signature for a backend this proxy does not have.
    let stranger = route_value(kbs_proxy::routing::route_cookie::BackendId::from_name("not-here"));
    let mut c = KbsClient::new(proxy.url());
    c.set_cookie("route", &stranger);
    c.get_resource("default/key/demo").await.unwrap();
    let stats = proxy.proxy.stats();
    assert!(stats.rejected(kbs_proxy::routing::route_cookie::Rejection::UnknownBackend) >= 1);
    assert!(stats.rejected(kbs_proxy::routing::route_cookie::Rejection::Malformed) >= 6);
}

#[tokio::test]
async fn slow_loris_and_idle_keep_alive_connections_are_closed() {
    let sims = start_sims(1).await;
    let proxy = start_proxy(Settings {
        client_idle_timeout: Some("300ms".into()),
        ..settings(backends_of(&sims))
    })
    .await;
    // A head that never ends.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(LIMIT, slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a slow head is cut off");
    // A keep-alive connection that goes quiet after one request.
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(LIMIT, idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle keep-alive connection is closed");
}

#[tokio::test]
async fn beyond_the_connection_limit_new_connections_wait() {
    let sims = start_sims(1).await;
    let proxy = start_proxy(Settings {
        max_connections: Some(2),
        ..settings(backends_of(&sims))
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.unwrap();
        held.push(s);
    }
    // The third connects (kernel backlog) but is not served while two are open.
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let early = tokio::time::timeout(Duration::from_millis(300), third.read_to_end(&mut out)).await;
    assert!(
        early.is_err() && out.is_empty(),
        "served beyond the limit: {:?}",
        String::from_utf8_lossy(&out)
    );
    drop(held.pop());
    tokio::time::timeout(LIMIT, third.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    // The third's slot is given back just after its socket closes, on the proxy's thread.
    let active = || {
        proxy
            .proxy
            .stats()
            .active_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    eventually(LIMIT, || active() == 1).await;
    assert_eq!(active(), 1);
}

/// A backend that answers each connection with `script` (raw bytes), then does `then`.
async fn scripted_backend(script: &'static [u8], then: After) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(script).await;
                match then {
                    After::Reset => {
                        let _ = s.set_zero_linger();
                        drop(s);
                    }
                    After::Hang => {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    After::Trickle => {
                        for _ in 0..5 {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            if s.write_all(b"x").await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

#[derive(Clone, Copy)]
enum After {
    Reset,
    Hang,
    Trickle,
}

fn kbs_error_type(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("KBS JSON error body");
    v["type"].as_str().unwrap().rsplit('/').next().unwrap().to_owned()
}

#[tokio::test]
async fn broken_backends_get_prompt_kbs_shaped_answers_and_leak_nothing() {
    let sims = start_sims(1).await;
    let cases: Vec<(&str, std::net::SocketAddr, StatusCode, &str)> = vec![
        ("refused", dead_addr().await, StatusCode::BAD_GATEWAY, "BadGateway"),
        (
            "reset before answering",
            scripted_backend(b"", After::Reset).await,
            StatusCode::BAD_GATEWAY,
            "BadGateway",
        ),
        (
            "malformed response",
            scripted_backend(b"HTTP/1.1 abc\r\n\r\n", After::Reset).await,
            StatusCode::BAD_GATEWAY,
            "BadGateway",
        ),
        (
            "accepts and hangs",
            scripted_backend(b"", After::Hang).await,
            StatusCode::GATEWAY_TIMEOUT,
            "GatewayTimeout",
        ),
    ];
    for (what, addr, status, variant) in cases {
        let proxy = start_proxy(Settings {
            backend_response_timeout: Some("400ms".into()),
            ..settings(vec![format!("broken=http://{addr}"), format!("good={}", sims[0].url())])
        })
        .await;
        let routing = proxy.proxy.routing();
        let broken = routing.backends.by_name("broken").unwrap().clone();
        // Pin a KBS call with a streamed body (so it cannot be re-sent elsewhere) to the broken
        // backend with a cookie for it.
        let pin = route_value(broken.id);
        let started = tokio::time::Instant::now();
        // A chunked body of unknown length streams: it cannot be re-sent to another replica.
        let chunks: Vec<Result<hyper::body::Frame<Bytes>, std::io::Error>> =
            vec![Ok(hyper::body::Frame::data(Bytes::from_static(b"{}")))];
        let req = Request::post(format!("{}/kbs/v0/plugin/echo", proxy.url()))
            .header("cookie", format!("route={pin}"))
            .body(http_body_util::StreamBody::new(tokio_stream::iter(chunks)))
            .unwrap();
        let resp = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http()
            .request(req)
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        assert!(started.elapsed() < Duration::from_secs(5), "{what}: prompt");
        assert_eq!(parts.status, status, "{what}");
        assert_eq!(kbs_error_type(&body), variant, "{what}");
        // The other clients (here: one pinned to the good replica) are unaffected.
        let good = routing.backends.by_name("good").unwrap().id;
        let mut c = KbsClient::new(proxy.url());
        c.set_cookie("route", &route_value(good));
        c.get_resource("default/key/demo").await.unwrap();
        eventually(LIMIT, || broken.in_flight() == 0).await;
        assert_eq!(broken.in_flight(), 0, "{what}: no request left in flight");
    }
}

#[tokio::test]
async fn a_backend_reset_mid_response_ends_the_client_response_and_a_slow_body_blocks_nobody() {
    let sims = start_sims(1).await;
    let partial = scripted_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf", After::Reset).await;
    let trickle = scripted_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", After::Trickle).await;
    let proxy = start_proxy(settings(vec![
        format!("partial=http://{partial}"),
        format!("trickle=http://{trickle}"),
        format!("good={}", sims[0].url()),
    ]))
    .await;
    let routing = proxy.proxy.routing();
    let cookie_for = |name: &str| format!("route={}", route_value(routing.backends.by_name(name).unwrap().id));
    let client = client();
    let req = Request::get(format!("{}/x", proxy.url()))
        .header("cookie", cookie_for("partial"))
        .body(Full::default())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(LIMIT, resp.into_body().collect()).await.unwrap();
    assert!(
        body.is_err(),
        "a truncated body is an error for the client, not a short success"
    );

    let req = Request::get(format!("{}/x", proxy.url()))
        .header("cookie", cookie_for("trickle"))
        .body(Full::default())
        .unwrap();
    let slow = tokio::spawn(async move {
        let resp = client.request(req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    });
    let started = tokio::time::Instant::now();
    let mut c = KbsClient::new(proxy.url());
    c.set_cookie("route", cookie_for("good").trim_start_matches("route="));
    c.get_resource("default/key/demo").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "others are served while the slow body trickles"
    );
    assert_eq!(&tokio::time::timeout(LIMIT, slow).await.unwrap().unwrap()[..], b"xxxxx");
    // The proxy's task ends the exchange just after writing its last byte, which the client may
    // have read first.
    let all_done = || routing.backends.list.iter().all(|b| b.in_flight() == 0);
    eventually(LIMIT, all_done).await;
    for b in &routing.backends.list {
        assert_eq!(b.in_flight(), 0, "{}", b.name);
    }
}

#[tokio::test]
async fn an_http2_rapid_reset_flood_is_cut_off_and_others_are_served() {
    let (_sims, proxy) = two_replicas().await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut client = client;
    let mut cut_off = false;
    for _ in 0..10_000 {
        let ready = tokio::time::timeout(LIMIT, client.ready()).await.unwrap();
        let Ok(c) = ready else {
            cut_off = true;
            break;
        };
        client = c;
        let req = http::Request::get(format!("http://{}/healthz", proxy.addr))
            .body(())
            .unwrap();
        match client.send_request(req, false) {
            Ok((_resp, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => {
                cut_off = true;
                break;
            }
        }
    }
    let ended = tokio::time::timeout(LIMIT, driver).await;
    assert!(cut_off || matches!(ended, Ok(Ok(Err(_)))), "the flood was not bounded");
    // Others are served.
    let mut c = KbsClient::http2(proxy.url());
    c.get_resource("default/key/demo").await.unwrap();
}

/// An HTTP/2 frame header: length, type, flags, stream 0.
fn h2_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn http2_ping_and_settings_floods_stay_bounded() {
    let (_sims, proxy) = two_replicas().await;
    let routing = proxy.proxy.routing();
    let before = routing.backends.list[0].in_flight();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    flood.extend(h2_frame(0x4, 0, &[])); // SETTINGS
    for i in 0..20_000u64 {
        if i % 2 == 0 {
            flood.extend(h2_frame(0x6, 0, &i.to_be_bytes())); // PING
        } else {
            flood.extend(h2_frame(0x4, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS max streams 100
        }
    }
    // Write the flood without reading the answers: the server must not buffer answers without
    // bound; it either keeps up, stops reading, or closes the connection.
    let _ = tokio::time::timeout(Duration::from_secs(5), s.write_all(&flood)).await;
    drop(s);
    // Others are served, over HTTP/2 and HTTP/1.1.
    KbsClient::http2(proxy.url())
        .get_resource("default/key/demo")
        .await
        .unwrap();
    KbsClient::new(proxy.url())
        .get_resource("default/key/demo")
        .await
        .unwrap();
    eventually(LIMIT, || routing.backends.list[0].in_flight() == before).await;
    assert_eq!(routing.backends.list[0].in_flight(), before);
}
