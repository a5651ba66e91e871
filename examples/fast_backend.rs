//! A minimal, fast HTTP/1.1 backend for proxy benchmarks: answers every request with 200 and a
//! prepared answer, so the proxy under test is what the benchmark measures.
//!
//! ```text
//! cargo run --release --example fast_backend -- 127.0.0.1:9001 127.0.0.1:9002
//! cargo run --release --example fast_backend -- --kbs 127.0.0.1:9001 127.0.0.1:9002
//! ```
//!
//! By default the answer is a small `ok` and no `Set-Cookie`. With `--kbs` the answers have the
//! shape of the real KBS's (Trustee's `kbs/src/api_server.rs` on actix-web, `kbs/src/jwe.rs`):
//! `POST /kbs/v0/auth` gets the challenge JSON with `set-cookie: kbs-session-id=<32 hex>;
//! Expires=...`; everything else gets a resource's JWE as `application/json`, sized as the real
//! one for a 32-byte secret (RSA1_5 key wrap with a 2048-bit TEE key: a 342-character
//! `encrypted_key`), with the `date` field actix adds. The bytes are prepared once: the sizes
//! and fields are what a proxy's work depends on, not the values.
//!
//! One thread serves every address given (pin it with `taskset`); each response names the
//! address that served it in `x-backend`, so a benchmark can check which backend a cookie
//! routes to. It is deliberately not a full HTTP server, to cost as little as possible: it reads
//! request heads (with `Content-Length` bodies, pipelined or not) and writes a prepared answer
//! per request; anything it cannot frame closes the connection, and so does a request with
//! `Connection: close` (after its answer, which says so), as a real server does.
//!
//! A connection that opens with the HTTP/2 preface (prior knowledge, as `--backend-protocol
//! http2` and HAProxy's `proto h2` speak to plain-TCP servers) is served by hyper's HTTP/2 server
//! with the same answer, so the benchmark can compare both protocols to the backends.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BODY: &str = "ok\n";

/// A resource's JWE as the real KBS answers it (see the module docs): 32 bytes of secret.
fn jwe_body() -> String {
    let b64 = |n: usize| "A".repeat(n.div_ceil(3) * 4 - (3 - n % 3) % 3);
    format!(
        r#"{{"protected":"{}","encrypted_key":"{}","iv":"{}","ciphertext":"{}","aad":"{}","tag":"{}"}}"#,
        b64(32),
        b64(256),
        b64(12),
        b64(32),
        b64(32),
        b64(16)
    )
}

/// The answer to `auth`: a nonce and the session cookie.
const AUTH_BODY: &str = r#"{"nonce":"q2Ykm3VqMNF0QpkJ5e9m4m0I6Yqz4YQm0Uy2dTq5HqM=","extra-params":""}"#;

/// What the real KBS's HTTP server (actix-web) adds to every answer.
const DATE: &str = "date: Thu, 03 Dec 2026 10:00:00 GMT\r\n";

/// The answers one address gives.
#[derive(Clone, Copy)]
struct Answers {
    /// To every request (`--kbs`: every request but `auth`), and the same asking to close.
    any: (&'static [u8], &'static [u8]),
    /// To `POST /kbs/v0/auth` (`--kbs` only).
    auth: Option<(&'static [u8], &'static [u8])>,
}

fn main() -> std::io::Result<()> {
    let mut kbs = false;
    let addrs: Vec<SocketAddr> = std::env::args()
        .skip(1)
        .filter(|a| {
            let flag = a == "--kbs";
            kbs |= flag;
            !flag
        })
        .map(|a| a.parse().expect("an IP:PORT to listen on"))
        .collect();
    if addrs.is_empty() {
        eprintln!("usage: fast_backend [--kbs] IP:PORT [IP:PORT ...]");
        std::process::exit(64);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                for addr in addrs {
                    let listener = TcpListener::bind(addr).await?;
                    eprintln!("fast_backend listening on {addr}");
                    tokio::task::spawn_local(serve(listener, addr, kbs));
                }
                tokio::signal::ctrl_c().await
            })
            .await
    })
}

async fn serve(listener: TcpListener, addr: SocketAddr, kbs: bool) {
    let both = |extra: &str, kind: &str, body: &str| {
        (
            prepared_answer(addr, extra, kind, body),
            prepared_answer(addr, &format!("{extra}connection: close\r\n"), kind, body),
        )
    };
    let answers = if kbs {
        let session = format!(
            "{DATE}set-cookie: kbs-session-id=0123456789abcdef0123456789abcdef; Expires=Thu, 03 Dec 2026 10:05:00 GMT\r\n"
        );
        Answers {
            any: both(DATE, "application/json", &jwe_body()),
            auth: Some(both(&session, "application/json", AUTH_BODY)),
        }
    } else {
        Answers {
            any: both("", "text/plain", BODY),
            auth: None,
        }
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::task::spawn_local(async move {
            let mut first = [0u8; PREFACE.len()];
            match stream.peek(&mut first).await {
                // "PRI" is no HTTP/1.1 method here: three bytes decide (a shorter first read
                // goes to HTTP/1.1; clients send the preface whole).
                Ok(n) if n >= 3 && first[..n] == PREFACE[..n] => http2(stream, addr).await,
                _ => connection(stream, answers).await,
            }
        });
    }
}

/// What an HTTP/2 connection with prior knowledge starts with (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves an HTTP/2 connection: every request gets 200 with the same fields and body.
async fn http2(stream: TcpStream, addr: SocketAddr) {
    let service = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| async move {
        hyper::Response::builder()
            .header("content-type", "text/plain")
            .header("x-backend", addr.to_string())
            .body(http_body_util::Full::new(bytes::Bytes::from_static(BODY.as_bytes())))
    });
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await;
}

/// An answer of `addr` with `extra` (whole field lines) in its head, a `kind` body.
fn prepared_answer(addr: SocketAddr, extra: &str, kind: &str, body: &str) -> &'static [u8] {
    format!(
        "HTTP/1.1 200 OK\r\n{extra}content-type: {kind}\r\nx-backend: {addr}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
    .leak()
}

/// Answers each complete request in `buf` with its answer, all of a read's requests in one
/// write; after a request that asks to close, with the closing one, and closes.
async fn connection(mut stream: TcpStream, answers: Answers) {
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(answers.any.0.len());
    loop {
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut used = 0;
        let mut close = false;
        while let Some(framed) = next_request(&buf[used..]) {
            let Some(request) = framed else {
                return; // not a request this backend can frame
            };
            used += request.len;
            let (answer, closing) = match answers.auth {
                Some(auth) if request.auth => auth,
                _ => answers.any,
            };
            if request.close {
                out.extend_from_slice(closing);
                close = true;
                break;
            }
            out.extend_from_slice(answer);
        }
        buf.drain(..used);
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
        if buf.len() > 1 << 20 {
            return;
        }
    }
}

/// A complete request at the start of the buffer.
struct Request {
    /// Head and body.
    len: usize,
    /// It asked to close the connection (`Connection: close`).
    close: bool,
    /// `POST /kbs/v0/auth`.
    auth: bool,
}

/// The request at the start of `buf`: `None` when it is not all there yet, `Some(None)` when it
/// cannot be framed (a chunked body).
fn next_request(buf: &[u8]) -> Option<Option<Request>> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok();
    let mut body = 0usize;
    let mut close = false;
    for line in head.into_iter().flat_map(str::lines) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("connection") {
            close |= value.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Some(None);
        }
        if name.eq_ignore_ascii_case("content-length") {
            match value.trim().parse() {
                Ok(n) => body = n,
                Err(_) => return Some(None),
            }
        }
    }
    let len = head_end + body;
    let auth = buf.starts_with(b"POST /kbs/v0/auth ");
    (buf.len() >= len).then_some(Some(Request { len, close, auth }))
}
