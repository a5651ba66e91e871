//! Opens many keep-alive HTTP/1.1 connections to one address, makes one request on each, then
//! holds them all idle: for measuring a proxy's memory per idle client connection.
//!
//! ```text
//! ulimit -n 65536
//! cargo run --release --example idle_conns -- 127.0.0.1:8080 10000 30
//! cargo run --release --example idle_conns -- --tls 127.0.0.1:8443 10000 30
//! ```
//!
//! Arguments: `--tls` (HTTPS, TLS 1.3, the certificate not checked: a benchmark client),
//! address, number of connections, seconds to hold them. Prints `ready N` on stdout
//! once every connection has had its answer, then holds, then exits (closing them all). Each
//! request is `GET /` with no cookie, so a proxy balances it and answers `Set-Cookie`; what the
//! proxy keeps afterwards is an ordinary idle keep-alive connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// A connection held open: plain or TLS.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Connections being opened at once: enough to be quick, few enough for the accept backlog.
const PARALLEL: usize = 200;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    let usage = "usage: idle_conns [--tls] IP:PORT COUNT HOLD_SECONDS";
    let tls = args.next_if(|a| a == "--tls").map(|_| tls_config());
    let addr: SocketAddr = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let count: usize = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let hold: u64 = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let started = Instant::now();
        let mut open = Vec::with_capacity(count);
        let mut failed = 0usize;
        let mut pending = JoinSet::new();
        let mut next = 0;
        while next < count || !pending.is_empty() {
            while next < count && pending.len() < PARALLEL {
                pending.spawn(connect_and_ask(addr, tls.clone()));
                next += 1;
            }
            match pending.join_next().await {
                Some(Ok(Ok(stream))) => open.push(stream),
                Some(Ok(Err(e))) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("idle_conns: {e}");
                    }
                }
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                None => break,
            }
        }
        eprintln!(
            "idle_conns: {} open, {failed} failed, in {:.1}s",
            open.len(),
            started.elapsed().as_secs_f64()
        );
        println!("ready {}", open.len());
        tokio::time::sleep(Duration::from_secs(hold)).await;
        drop(open);
        Ok(())
    })
}

/// Connects (with `tls`, over TLS), sends one `GET /`, reads the whole answer (headers and
/// `Content-Length` body).
async fn connect_and_ask(addr: SocketAddr, tls: Option<Arc<rustls::ClientConfig>>) -> std::io::Result<Box<dyn Conn>> {
    let fut = async {
        let tcp = TcpStream::connect(addr).await?;
        let mut s: Box<dyn Conn> = match tls {
            Some(config) => {
                let name = ServerName::try_from("localhost").expect("a valid name");
                Box::new(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        };
        s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n").await?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::other("closed before the answer"));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return Ok(s);
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| std::io::Error::other("no answer within 10 s"))?
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// TLS 1.3 (what clients of the proxy use), any certificate: this tool measures memory, the
/// certificate is the benchmark's own.
fn tls_config() -> Arc<rustls::ClientConfig> {
    let config = rustls::ClientConfig::builder_with_provider(kbs_proxy::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 is supported")
        .dangerous()
        .with_custom_certificate_verifier(kbs_proxy::tls::accept_any_certificate())
        .with_no_client_auth();
    Arc::new(config)
}
