//! The backend both proxies forward to: it answers each request with a report of exactly what it
//! received (the raw request head, then the decoded body), so the harness compares what each path
//! put on the wire. Keep-alive, pipelining and chunked request bodies are handled.
//!
//! The request field `x-mirror-mode` picks how the answer is framed, so the fuzzer reaches the
//! response side of both paths too: `chunked` (with a chunk extension and a trailer),
//! `gzip-chunked` (`Transfer-Encoding: gzip, chunked`: a coding besides chunked), `close` (no
//! length: the body ends when the mirror closes), `204`, `continue` (a `100 Continue` first) and
//! `cl-te` (both `Content-Length` and chunked, then close) and `conn-cl` (`Connection:
//! content-length`: the length is named hop-by-hop). Anything else: `Content-Length`, with
//! hop-by-hop fields the proxies must drop. When there is no body to carry the report (`HEAD`,
//! `204`) it travels hex-encoded in `x-mirror-view`.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::http::{dechunk, framing, hex, Chunked, Framing};

/// Binds 127.0.0.1:0 and serves on the current runtime.
pub async fn start() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the mirror");
    let addr = listener.local_addr().expect("mirror address");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(serve(s));
        }
    });
    addr
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Length,
    Chunked,
    GzipChunked,
    Close,
    NoContent,
    Continue,
    ClTe,
    ConnCl,
}

impl Mode {
    fn of(headers: &[httparse::Header<'_>]) -> Self {
        let value = headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("x-mirror-mode"))
            .map_or(&b""[..], |h| h.value);
        match value {
            b"chunked" => Self::Chunked,
            b"gzip-chunked" => Self::GzipChunked,
            b"close" => Self::Close,
            b"204" => Self::NoContent,
            b"continue" => Self::Continue,
            b"cl-te" => Self::ClTe,
            b"conn-cl" => Self::ConnCl,
            _ => Self::Length,
        }
    }
}

/// A request read off the connection.
struct Received {
    /// The raw head, then the decoded body.
    view: Vec<u8>,
    /// Bytes of the connection buffer it took.
    consumed: usize,
    head_only: bool,
    mode: Mode,
}

enum Read {
    Partial,
    Done(Received),
    /// The proxy sent something the mirror cannot frame: a finding in itself.
    Bad(String),
}

fn read_request(buf: &[u8]) -> Read {
    let mut storage = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut storage);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Read::Partial,
        Err(e) => return Read::Bad(format!("unparseable request head ({e})")),
    };
    let (body, body_len) = match framing(req.headers) {
        Framing::Unframed => (Vec::new(), 0),
        Framing::Length(n) if buf.len() >= head_len + n => (buf[head_len..head_len + n].to_vec(), n),
        Framing::Length(_) => return Read::Partial,
        Framing::Chunked => match dechunk(&buf[head_len..]) {
            Chunked::Done { body, len } => (body, len),
            Chunked::Partial => return Read::Partial,
            Chunked::Bad => return Read::Bad("bad chunked request body".into()),
        },
        Framing::Invalid => return Read::Bad("invalid request framing fields".into()),
    };
    let mut view = buf[..head_len].to_vec();
    view.extend_from_slice(&body);
    Read::Done(Received {
        view,
        consumed: head_len + body_len,
        head_only: req.method == Some("HEAD"),
        mode: Mode::of(req.headers),
    })
}

async fn serve(mut s: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let received = loop {
            match read_request(&buf) {
                Read::Done(r) => break r,
                Read::Partial => {}
                Read::Bad(why) => {
                    // Answered (not dropped) so the report reaches the client side of the harness.
                    let body = format!("mirror: {why}: {}", hex(&buf));
                    let resp = format!(
                        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    return;
                }
            }
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..received.consumed);
        let (resp, close) = answer(&received);
        if s.write_all(&resp).await.is_err() || close {
            return;
        }
    }
}

/// The response reporting `r`, and whether the mirror closes after it.
fn answer(r: &Received) -> (Vec<u8>, bool) {
    let view = &r.view;
    // The report goes in a field when the response has no body.
    let in_field = |out: &mut String| {
        out.push_str("x-mirror-view: ");
        out.push_str(&hex(view));
        out.push_str("\r\n");
    };
    let mut head = String::new();
    let mut body: Vec<u8> = Vec::new();
    let mut close = false;
    match r.mode {
        Mode::Length | Mode::Continue | Mode::ConnCl => {
            if r.mode == Mode::Continue {
                head.push_str("HTTP/1.1 100 Continue\r\n\r\n");
            }
            if r.mode == Mode::ConnCl {
                head.push_str("HTTP/1.1 200 OK\r\nConnection: content-length\r\n");
                head.push_str(&format!("Content-Length: {}\r\nX-Mirror: yes\r\n", view.len()));
                body.extend_from_slice(view);
                if r.head_only {
                    in_field(&mut head);
                    body.clear();
                }
                head.push_str("\r\n");
                let mut out = head.into_bytes();
                out.extend_from_slice(&body);
                return (out, false);
            }
            head.push_str(&format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Mirror: yes\r\nKeep-Alive: timeout=5\r\n\
                 Connection: keep-alive, X-Hop\r\nX-Hop: drop me\r\nProxy-Authenticate: Basic\r\n",
                view.len()
            ));
            body.extend_from_slice(view);
        }
        Mode::Chunked | Mode::GzipChunked | Mode::ClTe => {
            head.push_str("HTTP/1.1 200 OK\r\nX-Mirror: yes\r\n");
            match r.mode {
                Mode::GzipChunked => head.push_str("Transfer-Encoding: gzip, chunked\r\n"),
                Mode::ClTe => {
                    // A length that is wrong for the chunked body; chunked wins (RFC 9112 §6.3).
                    head.push_str("Content-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n");
                    close = true;
                }
                _ => head.push_str("Transfer-Encoding: chunked\r\n"),
            }
            for (i, c) in view.chunks(7).enumerate() {
                let ext = if i == 0 { ";e=1" } else { "" };
                body.extend_from_slice(format!("{:x}{ext}\r\n", c.len()).as_bytes());
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
        }
        Mode::Close => {
            head.push_str("HTTP/1.1 200 OK\r\nX-Mirror: yes\r\nConnection: close\r\n");
            body.extend_from_slice(view);
            close = true;
        }
        Mode::NoContent => {
            head.push_str("HTTP/1.1 204 No Content\r\nX-Mirror: yes\r\n");
            in_field(&mut head);
        }
    }
    if r.head_only && r.mode != Mode::NoContent {
        in_field(&mut head);
        body.clear();
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    (out, close)
}
