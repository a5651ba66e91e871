//! Accepting clients: SO_REUSEPORT listeners, one single-threaded runtime per worker thread,
//! HTTP/1.1 and HTTP/2 (h2c) on the same port, graceful shutdown.
//!
//! One `current_thread` runtime per core costs less per request than tokio's multi-thread
//! runtime: no work stealing, and a connection, its requests and its pooled backend connections
//! all stay on one thread.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::{ConnInfo, Proxy, Worker};

/// How long a client may take to send a request head (slow-loris bound).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Streams one HTTP/2 client may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// How long a client may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Client-facing TLS: the server configuration in force, swapped whole on reload. Each new
/// connection reads it once.
pub type TlsSettings = Arc<ArcSwap<rustls::ServerConfig>>;

/// Binds `count` listeners on `addr` with SO_REUSEPORT, so the kernel spreads new connections
/// over the workers. With port 0 the first bind picks the port and the others share it.
pub fn bind_listeners(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// Runs one worker thread per listener, each with its own `current_thread` runtime, until
/// `shutdown` is cancelled and in-flight requests have finished (or `grace` ran out).
pub fn run_workers(
    proxy: &Proxy,
    listeners: Vec<std::net::TcpListener>,
    tls: Option<TlsSettings>,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    let mut threads = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        let thread = std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener)?;
                serve(proxy.worker(), listener, tls, shutdown, grace).await;
                Ok::<_, io::Error>(())
            })
        })?;
        threads.push(thread);
    }
    for t in threads {
        t.join().map_err(|_| io::Error::other("a worker thread panicked"))??;
    }
    Ok(())
}

/// Per-connection state handed to every request on it.
struct Conn {
    worker: Arc<Worker>,
    info: ConnInfo,
}

/// Counts a client connection as open while alive.
struct ConnGuard(Arc<Worker>);

impl ConnGuard {
    fn new(worker: &Arc<Worker>) -> Self {
        worker.stats().active_connections.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(worker))
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.stats().active_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves clients from `listener` on the current runtime until `shutdown` is cancelled, then
/// waits up to `grace` for open requests to finish. With `tls`, every connection is TLS.
pub async fn serve(
    worker: Worker,
    listener: TcpListener,
    tls: Option<TlsSettings>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let worker = Arc::new(worker);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        // Small request/response exchanges: do not let Nagle hold the last segment back.
        let _ = stream.set_nodelay(true);
        let guard = ConnGuard::new(&worker);
        let conn = Arc::new(Conn {
            worker: Arc::clone(&worker),
            info: ConnInfo::new(peer, tls.is_some()),
        });
        let service = service_fn(move |req| {
            let conn = Arc::clone(&conn);
            async move { Ok::<_, Infallible>(conn.worker.handle(req, &conn.info).await) }
        });
        match &tls {
            None => {
                let watched = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
                tokio::spawn(async move {
                    if let Err(e) = watched.await {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                    drop(guard);
                });
            }
            Some(settings) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(settings.load_full());
                let builder = Arc::clone(&builder);
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let tls_stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let connection = builder.serve_connection(TokioIo::new(tls_stream), service).into_owned();
                    if let Err(e) = watcher.watch(connection).await {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                    drop(guard);
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::debug!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "shutdown grace elapsed; closing open connections"),
    }
}
