//! A minimal, fast HTTP/1.1 backend for proxy benchmarks: answers every request with 200, a
//! small fixed body and no `Set-Cookie`, so the proxy under test is what the benchmark measures.
//!
//! ```text
//! cargo run --release --example fast_backend -- 127.0.0.1:9001 127.0.0.1:9002
//! ```
//!
//! One thread serves every address given (pin it with `taskset`); each response names the
//! address that served it in `x-backend`, so a benchmark can check which backend a cookie
//! routes to.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const BODY: &[u8] = b"ok\n";

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
    let name = HeaderValue::from_str(&addr.to_string()).expect("an address is a header value");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let name = name.clone();
        tokio::task::spawn_local(async move {
            let service = service_fn(move |_req| {
                let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
                let h = resp.headers_mut();
                h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                h.insert("x-backend", name.clone());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
