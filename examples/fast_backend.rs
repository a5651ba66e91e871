//! A minimal, fast HTTP/1.1 backend for proxy benchmarks: answers every request with 200, a
//! small fixed body and no `Set-Cookie`, so the proxy under test is what the benchmark measures.
//!
//! ```text
//! cargo run --release --example fast_backend -- 127.0.0.1:9001 127.0.0.1:9002
//! ```
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

fn main() -> std::io::Result<()> {
    let addrs: Vec<SocketAddr> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("an IP:PORT to listen on"))
        .collect();
    if addrs.is_empty() {
        eprintln!("usage: fast_backend IP:PORT [IP:PORT ...]");
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
                    tokio::task::spawn_local(serve(listener, addr));
                }
                tokio::signal::ctrl_c().await
            })
            .await
    })
}

async fn serve(listener: TcpListener, addr: SocketAddr) {
    let answer = prepared_answer(addr, "");
    let closing = prepared_answer(addr, "connection: close\r\n");
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
                _ => connection(stream, answer, closing).await,
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

/// The answer `addr` gives to every request, with `extra` (whole field lines) in its head.
fn prepared_answer(addr: SocketAddr, extra: &str) -> &'static [u8] {
    format!(
        "HTTP/1.1 200 OK\r\n{extra}content-type: text/plain\r\nx-backend: {addr}\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    )
    .into_bytes()
    .leak()
}

/// Answers each complete request in `buf` with `answer`, all of a read's requests in one write;
/// after a request that asks to close, with `closing`, and closes.
async fn connection(mut stream: TcpStream, answer: &'static [u8], closing: &'static [u8]) {
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(answer.len());
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
    (buf.len() >= len).then_some(Some(Request { len, close }))
}
