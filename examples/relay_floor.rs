//! The floor under every proxy in `benches/compare.sh`: a relay that does no HTTP work at all.
//!
//! ```text
//! cargo run --release --example relay_floor -- 127.0.0.1:18084 127.0.0.1:18081
//! ```
//!
//! Each client connection gets its own connection to the one backend given; the relay then
//! reads from the client, writes what it read to the backend, reads from the backend, writes that
//! to the client, and again — on one `current_thread` tokio runtime, the I/O model the proxy's
//! workers use. No parsing, no routing, no cookie, no header rewrite: the CPU time it spends per
//! request is what the kernel's TCP work over loopback, the system calls and tokio's reactor cost
//! by themselves, and the difference between it and a proxy is what the proxy's own work costs.
//!
//! It is a measuring instrument, not a proxy: it relies on the client waiting for each answer
//! before it sends the next request (as wrk does) and on each request and each answer arriving in
//! one read (the benchmark's are ~100 bytes). `benches/compare/relay-uring` is the same relay on
//! io_uring.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, backend] = args.as_slice() else {
        eprintln!("usage: relay_floor LISTEN_IP:PORT BACKEND_IP:PORT");
        std::process::exit(64);
    };
    let backend = backend.clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::bind(listen).await?;
        eprintln!("relay_floor listening on {listen}, relaying to {backend}");
        loop {
            let Ok((client, _)) = listener.accept().await else {
                continue;
            };
            tokio::task::spawn_local(relay(client, backend.clone()));
        }
    })
}

/// Relays one client connection in lockstep until either side closes or fails.
async fn relay(mut client: TcpStream, backend: String) {
    let Ok(mut upstream) = TcpStream::connect(&backend).await else {
        return;
    };
    if client.set_nodelay(true).is_err() || upstream.set_nodelay(true).is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    while pass(&mut client, &mut upstream, &mut buf).await && pass(&mut upstream, &mut client, &mut buf).await {}
}

/// One read from `from`, written whole to `to`; false when either side closed or failed.
async fn pass(from: &mut TcpStream, to: &mut TcpStream, buf: &mut [u8]) -> bool {
    match from.read(buf).await {
        Ok(0) | Err(_) => false,
        Ok(n) => to.write_all(&buf[..n]).await.is_ok(),
    }
}
