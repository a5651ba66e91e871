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
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{ClientLimits, Config};
use crate::proxy::{ConnInfo, Handoff, Proxy, Rewind, Worker};

/// Streams one HTTP/2 client may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Header fields in one HTTP/1.1 request; more gets 431.
const MAX_HEADERS: usize = 100;
/// HTTP/2 streams reset by the client before the server saw them (rapid-reset bound).
const H2_MAX_PENDING_RESETS: usize = 20;
/// HTTP/2 streams the server may reset for protocol errors before it closes the connection.
const H2_MAX_LOCAL_RESETS: usize = 256;
/// How long an HTTP/2 keep-alive ping may go unanswered.
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
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

/// How a listener serves: TLS, limits, shutdown grace.
#[derive(Clone)]
pub struct ServeOptions {
    /// Client-facing TLS, when on.
    pub tls: Option<TlsSettings>,
    /// Client limits (idle timeout, connections, header size).
    pub limits: ClientLimits,
    /// Time open requests get to finish on shutdown.
    pub grace: Duration,
    /// Serve plain HTTP/1.1 on the fast path (hyper for everything else).
    pub fast_path: bool,
}

impl ServeOptions {
    /// The options a configuration asks for.
    pub fn from_config(config: &Config, tls: Option<TlsSettings>) -> Self {
        Self {
            tls,
            limits: config.limits,
            grace: config.shutdown_grace,
            fast_path: config.fast_path,
        }
    }
}

/// Runs one worker thread per listener, each with its own `current_thread` runtime, until
/// `shutdown` is cancelled and in-flight requests have finished (or the grace ran out). The
/// connection limit is shared out evenly between the workers.
pub fn run_workers(
    proxy: &Proxy,
    listeners: Vec<std::net::TcpListener>,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut threads = Vec::with_capacity(listeners.len());
    let mut per_worker = options.clone();
    per_worker.limits.max_connections = options.limits.max_connections.div_ceil(listeners.len().max(1));
    for (i, listener) in listeners.into_iter().enumerate() {
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        let options = per_worker.clone();
        let thread = std::thread::Builder::new().name(format!("worker-{i}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener)?;
                serve(proxy.worker(), listener, options, shutdown).await;
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

/// Counts a client connection as open, and holds its connection slot, while alive.
struct ConnGuard {
    worker: Arc<Worker>,
    /// Returned to the listener's semaphore on drop.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl ConnGuard {
    fn new(worker: &Arc<Worker>, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        worker.stats().active_connections.fetch_add(1, Ordering::Relaxed);
        Self {
            worker: Arc::clone(worker),
            _slot: slot,
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.worker.stats().active_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves clients from `listener` on the current runtime until `shutdown` is cancelled, then
/// waits up to the grace for open requests to finish. With TLS, every connection is TLS.
///
/// At most `max_connections` connections are served at once: beyond that the loop stops
/// accepting, new connections wait in the kernel's listen backlog (and are refused when it is
/// full), and memory stays bounded.
pub async fn serve(worker: Worker, listener: TcpListener, options: ServeOptions, shutdown: CancellationToken) {
    let ServeOptions {
        tls,
        limits,
        grace,
        fast_path,
    } = options;
    let fast_conns = tokio_util::task::TaskTracker::new();
    let worker = Arc::new(worker);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's header read timeout also runs while a keep-alive connection waits for its next
    // request, so it bounds slow-loris heads and idle keep-alive connections alike.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
        .keep_alive_interval(Some(limits.idle_timeout))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let builder = Arc::new(builder);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    // The fast path's connection deadlines, kept for as long as this function runs.
    let _deadlines = fast_path.then(|| {
        let keeper = Arc::clone(&worker).keep_fast_deadlines(limits.idle_timeout, shutdown.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(keeper))
    });
    let graceful = GracefulShutdown::new();
    loop {
        // A free connection slot first: at the limit, stop accepting until a connection closes.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
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
        let guard = ConnGuard::new(&worker, slot);
        let conn = Arc::new(Conn {
            worker: Arc::clone(&worker),
            info: ConnInfo::new(peer, tls.is_some()),
        });
        let service = service_fn(move |req| {
            let conn = Arc::clone(&conn);
            async move { Ok::<_, Infallible>(conn.worker.handle(req, &conn.info).await) }
        });
        match &tls {
            None if fast_path => {
                // HTTP/1.1 on the fast path; anything else is handed to hyper with what was read.
                let builder = Arc::clone(&builder);
                let watcher = graceful.watcher();
                let handoff: Handoff = Box::new(move |rewound: Rewind<TcpStream>| {
                    Box::pin(async move {
                        let connection = builder.serve_connection(TokioIo::new(rewound), service).into_owned();
                        if let Err(e) = watcher.watch(connection).await {
                            tracing::debug!(error = %e, "client connection ended with an error");
                        }
                    })
                });
                let worker = Arc::clone(&worker);
                let info = Arc::new(ConnInfo::new(peer, false));
                let shutdown = shutdown.clone();
                fast_conns.spawn(async move {
                    worker
                        .serve_fast(
                            stream,
                            info,
                            limits.idle_timeout,
                            limits.max_header_bytes,
                            shutdown,
                            handoff,
                        )
                        .await;
                    drop(guard);
                });
            }
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
    fast_conns.close();
    // Fast-path connections finish their request in flight and stop (they watch `shutdown`).
    let all_done = async {
        graceful.shutdown().await;
        fast_conns.wait().await;
    };
    tokio::select! {
        () = all_done => tracing::debug!("all connections closed"),
        () = tokio::time::sleep(grace) => tracing::warn!(?grace, "shutdown grace elapsed; closing open connections"),
    }
}
