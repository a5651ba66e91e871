//! The floor under every proxy in `benches/compare.sh`: a relay that does no HTTP work at all.
//!
//! ```text
//! cargo run --release --example relay_floor -- 127.0.0.1:18084 127.0.0.1:18081
//! ```
//!
//! Each client connection gets its own connection to the one backend given; the relay then
//! reads from the client, writes what it read to the backend, reads from the backend, writes that
//! to the client, and again — on one `current_thread` tokio runtime, with the I/O discipline of
//! the proxy's fast path: wait for readiness, one `recv` (a short read clears tokio's readiness,
//! so the next wait does not start with a `recv` that finds nothing), one `send`, both direct
//! system calls. Four system calls per request, as the proxy makes. No parsing, no routing, no
//! cookie, no header rewrite: the CPU time it spends per request is what the kernel's TCP work
//! over loopback, the system calls and tokio's reactor cost by themselves, and the difference
//! between it and the proxy is what the proxy's own work costs.
//!
//! It is a measuring instrument, not a proxy: it relies on the client waiting for each answer
//! before it sends the next request (as wrk does) and on each request and each answer arriving in
//! one read (the benchmark's are ~100 bytes). `benches/compare/relays` has the same relay on a
//! bare epoll loop and on io_uring.

use std::future::poll_fn;
use std::io;

use rustix::net::{RecvFlags, SendFlags};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, backend] = args.as_slice() else {
        eprintln!("usage: relay_floor LISTEN_IP:PORT BACKEND_IP:PORT");
        std::process::exit(64);
    };
    let backend = backend.clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        eprintln!("relay_floor listening on {listen}, relaying to {backend}");
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(relay(client, backend.clone()));
        }
    })
}

/// Relays one client connection in lockstep until either side closes or fails.
async fn relay(client: TcpStream, backend: String) {
    let Ok(upstream) = TcpStream::connect(&backend).await else {
        return;
    };
    if client.set_nodelay(true).is_err() || upstream.set_nodelay(true).is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    while pass(&client, &upstream, &mut buf).await.unwrap_or(false)
        && pass(&upstream, &client, &mut buf).await.unwrap_or(false)
    {}
}

/// One read from `from`, sent whole to `to`; false when `from` closed.
async fn pass(from: &TcpStream, to: &TcpStream, buf: &mut [u8]) -> io::Result<bool> {
    let n = loop {
        poll_fn(|cx| from.poll_read_ready(cx)).await?;
        let mut got = 0;
        let read = from.try_io(Interest::READABLE, || {
            (got, _) = rustix::net::recv(from, &mut *buf, RecvFlags::empty())?;
            if got > 0 && got < buf.len() {
                Err(io::ErrorKind::WouldBlock.into()) // drained: tokio clears the readiness
            } else {
                Ok(got)
            }
        });
        match read {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => break got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    let mut sent = 0;
    while sent < n {
        match to.try_io(Interest::WRITABLE, || {
            Ok(rustix::net::send(to, &buf[sent..n], SendFlags::NOSIGNAL)?)
        }) {
            Ok(k) => sent += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => poll_fn(|cx| to.poll_write_ready(cx)).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(n > 0)
}
