//! HTTP/1.1 over TLS on the fast path (rustls driven in the connection's own task): what is
//! particular to TLS. The same requests through the fast path and through hyper are compared in
//! tests/fastpath.rs (`over_tls_*`); here: the hand-over to hyper with the TLS session, the ends
//! of a connection (close_notify both ways), records that are cut short or forged, KeyUpdate,
//! a TLS 1.2 renegotiation (refused), and bodies larger than a record. A certificate swapped
//! while connections are open, session resumption across workers and reloads, and ALPN `h2`
//! (hyper's) are in tests/production.rs.

mod support;

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kbs_proxy::config::Settings;
use rustls::pki_types::ServerName;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How a test backend answers.
#[derive(Clone, Copy)]
enum Answer {
    /// `n` bytes of `x`, framed by Content-Length.
    Length(usize),
    /// `n` bytes of `x`, then the backend closes (no framing field).
    UntilClose(usize),
}

/// A backend answering every request (read to the end of its Content-Length body) as `answer`
/// says, without a `Date` field: hyper's server adds one, the fast path forwards what the
/// backend sent, which is how a test tells the two apart. Counts the requests it got.
async fn start_backend(answer: Answer) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(len) = read_message(&mut s, &mut buf, false).await {
                    buf.drain(..len);
                    count.fetch_add(1, Ordering::SeqCst);
                    let (reply, close) = match answer {
                        Answer::Length(n) => (format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n"), n),
                        Answer::UntilClose(n) => ("HTTP/1.1 200 OK\r\n\r\n".to_owned(), n),
                    };
                    let mut reply = reply.into_bytes();
                    reply.resize(reply.len() + close, b'x');
                    if s.write_all(&reply).await.is_err() || matches!(answer, Answer::UntilClose(_)) {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Reads from `s` until `buf` holds a whole message (head and Content-Length body, or with
/// `until_close` everything to the end); its length, or `None` when the stream ends first.
async fn read_message<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>, until_close: bool) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let body = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
            if !until_close && buf.len() >= i + 4 + body {
                return Some(i + 4 + body);
            }
        }
        let mut chunk = [0u8; 16 * 1024];
        match s.read(&mut chunk).await {
            Ok(0) if until_close => return Some(buf.len()),
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A response as a client sees it.
struct Seen {
    status: u16,
    /// Lower-case head.
    head: String,
    body_len: usize,
}

/// Writes `req` and reads one response.
async fn ask<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, req: &[u8]) -> Seen {
    s.write_all(req).await.unwrap();
    let mut buf = Vec::new();
    let len = tokio::time::timeout(Duration::from_secs(10), read_message(s, &mut buf, false))
        .await
        .expect("an answer in time")
        .expect("an answer");
    seen(&buf[..len])
}

fn seen(raw: &[u8]) -> Seen {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    Seen {
        status: head[9..12].parse().unwrap(),
        head,
        body_len: raw.len() - end,
    }
}

const GET: &[u8] = b"GET /kbs/v0/resource/default/key/1 HTTP/1.1\r\nHost: kbs\r\n\r\n";

struct Tls {
    proxy: TestProxy,
    client: Arc<rustls::ClientConfig>,
    backend: Arc<AtomicUsize>,
    _pki: pki::Pki,
}

/// A proxy terminating TLS (fast path on) in front of one backend answering `answer`.
async fn start(answer: Answer) -> Tls {
    let (addr, backend) = start_backend(answer).await;
    let pki = pki::Pki::new();
    let files = pki.issue("proxy", &["localhost"]);
    let proxy = start_proxy(Settings {
        fast_path: Some("on".into()),
        tls_cert: Some(files.cert.clone()),
        tls_key: Some(files.key.clone()),
        ..settings(vec![format!("kbs=http://{addr}")])
    })
    .await;
    Tls {
        proxy,
        client: pki.client_config(&[b"http/1.1"]),
        backend,
        _pki: pki,
    }
}

impl Tls {
    async fn connect(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.proxy.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::clone(&self.client))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap()
    }

    /// A connection whose TLS records the test writes itself: the socket and the session.
    fn connect_by_hand(&self) -> (std::net::TcpStream, rustls::ClientConnection) {
        let mut tcp = std::net::TcpStream::connect(self.proxy.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::clone(&self.client), name).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).unwrap();
        }
        (tcp, conn)
    }
}

#[tokio::test]
async fn http1_over_tls_is_served_by_the_fast_path_and_handed_to_hyper_mid_connection() {
    let t = start(Answer::Length(2)).await;
    let mut s = t.connect().await;
    // The fast path forwards the backend's fields as they are: no `Date`.
    let r = ask(&mut s, GET).await;
    assert_eq!((r.status, r.body_len), (200, 2));
    assert!(!r.head.contains("\r\ndate:"), "served by the fast path: {}", r.head);
    // `auth` is hyper's: the connection, its TLS session and the bytes read move over.
    let auth = b"POST /kbs/v0/auth HTTP/1.1\r\nHost: kbs\r\nContent-Length: 2\r\n\r\n{}";
    let r = ask(&mut s, auth).await;
    assert_eq!(r.status, 200);
    assert!(r.head.contains("\r\ndate:"), "served by hyper: {}", r.head);
    // And the connection keeps serving there.
    let r = ask(&mut s, GET).await;
    assert_eq!((r.status, r.body_len), (200, 2));
    assert_eq!(t.backend.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn pipelined_requests_and_bodies_larger_than_a_record_cross_intact() {
    let t = start(Answer::Length(100_000)).await;
    let mut s = t.connect().await;
    let mut two = GET.to_vec();
    two.extend_from_slice(GET);
    s.write_all(&two).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        let len = read_message(&mut s, &mut buf, false).await.expect("an answer");
        let r = seen(&buf[..len]);
        assert_eq!((r.status, r.body_len), (200, 100_000));
        buf.drain(..len);
    }
    // A request body of 300 KB, streamed through in records of 16 KB.
    let mut post =
        b"PUT /kbs/v0/resource/default/key/2 HTTP/1.1\r\nHost: kbs\r\nContent-Length: 300000\r\n\r\n".to_vec();
    post.resize(post.len() + 300_000, b'y');
    let r = ask(&mut s, &post).await;
    assert_eq!((r.status, r.body_len), (200, 100_000));
    assert!(!r.head.contains("\r\ndate:"), "served by the fast path: {}", r.head);
    assert_eq!(t.backend.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_client_close_notify_is_answered_with_one() {
    let t = start(Answer::Length(2)).await;
    let mut s = t.connect().await;
    assert_eq!(ask(&mut s, GET).await.status, 200);
    // close_notify, then FIN.
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    // A server that closed without a close_notify would give UnexpectedEof here.
    let end = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(matches!(end, Ok(Ok(0))), "{end:?}");
}

#[tokio::test]
async fn a_connection_the_proxy_ends_ends_with_a_close_notify() {
    // `Connection: close` from the client.
    let t = start(Answer::Length(2)).await;
    let mut s = t.connect().await;
    s.write_all(b"GET /kbs/v0/resource/a/b/c HTTP/1.1\r\nHost: kbs\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all)).await;
    assert!(matches!(end, Ok(Ok(_))), "{end:?}");
    assert_eq!(seen(&all).body_len, 2);

    // A body framed by the backend's close: only the close_notify tells the client it is whole.
    let t = start(Answer::UntilClose(50_000)).await;
    let mut s = t.connect().await;
    s.write_all(GET).await.unwrap();
    let mut all = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all)).await;
    assert!(matches!(end, Ok(Ok(_))), "{end:?}");
    let r = seen(&all);
    assert_eq!((r.status, r.body_len), (200, 50_000));
}

// Blocking socket calls below: the proxy's tasks on the test's runtime need other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_record_reaches_no_backend_and_the_proxy_serves_on() {
    let t = start(Answer::Length(2)).await;
    let (mut tcp, mut conn) = t.connect_by_hand();
    conn.writer().write_all(GET).unwrap();
    let mut record = Vec::new();
    conn.write_tls(&mut record).unwrap();
    // The record's header and all but its last bytes, then the end of the stream.
    tcp.write_all(&record[..record.len() - 5]).unwrap();
    tcp.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);
    conn.read_tls(&mut &rest[..]).unwrap();
    conn.process_new_packets().unwrap();
    let mut plain = Vec::new();
    let _ = conn.reader().read_to_end(&mut plain);
    assert!(plain.is_empty(), "no answer to a request never whole: {plain:?}");
    assert_eq!(t.backend.load(Ordering::SeqCst), 0);
    // Others are served.
    assert_eq!(ask(&mut t.connect().await, GET).await.status, 200);
}

// Blocking socket calls below: the proxy's tasks on the test's runtime need other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_record_is_refused_with_an_alert() {
    let t = start(Answer::Length(2)).await;
    let (mut tcp, mut conn) = t.connect_by_hand();
    conn.writer().write_all(GET).unwrap();
    let mut record = Vec::new();
    conn.write_tls(&mut record).unwrap();
    // One bit of the ciphertext changed: the record's tag no longer matches.
    let last = record.len() - 1;
    record[last] ^= 1;
    tcp.write_all(&record).unwrap();
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);
    conn.read_tls(&mut &rest[..]).unwrap();
    let refused = conn.process_new_packets();
    assert!(
        matches!(
            refused,
            Err(rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac))
        ),
        "{refused:?}"
    );
    assert_eq!(t.backend.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_key_update_from_the_client_changes_nothing_for_it() {
    let t = start(Answer::Length(2)).await;
    let mut s = t.connect().await;
    for _ in 0..3 {
        // The client asks for new traffic keys both ways before each request.
        s.get_mut().1.refresh_traffic_keys().unwrap();
        let r = ask(&mut s, GET).await;
        assert_eq!((r.status, r.body_len), (200, 2));
    }
    assert_eq!(t.backend.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_tls12_renegotiation_is_refused_and_the_proxy_serves_on() {
    // A client that renegotiates: OpenSSL's s_client on TLS 1.2 (`R` asks for it; TLS 1.3 has
    // no renegotiation). rustls answers with a `no_renegotiation` alert, which OpenSSL takes as
    // the end of the connection.
    let t = start(Answer::Length(2)).await;
    let mut client = match tokio::process::Command::new("openssl")
        .args(["s_client", "-tls1_2", "-servername", "localhost", "-connect"])
        .arg(t.proxy.addr.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("this test needs the `openssl` command-line tool (Debian: openssl): {e}"),
    };
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"R\n").await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), client.wait_with_output())
        .await
        .expect("s_client ends once refused")
        .unwrap();
    drop(stdin);
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("RENEGOTIATING"), "{said}");
    assert!(said.contains("no renegotiation"), "refused with the alert: {said}");
    assert_eq!(t.backend.load(Ordering::SeqCst), 0);
    assert_eq!(ask(&mut t.connect().await, GET).await.status, 200);
}
