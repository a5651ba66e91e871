//! Accepting clients: SO_REUSEPORT listeners, one single-threaded runtime per worker thread,
//! HTTP/1.1 and HTTP/2 (h2c) on the same port, graceful shutdown.
//!
//! One `current_thread` runtime per core costs less per request than tokio's multi-thread
//! runtime: no work stealing, and a connection, its requests and its pooled backend connections
//! all stay on one thread. With the fast path on, each worker's listener is served
//! by an event loop of the fast path's own ([`rt::own`]) on a second thread, cheaper per request
//! still; what it hands over (HTTP/2, HTTP/1.0, `auth`/`attest`, admin writes, ...) hyper serves
//! on the worker's runtime.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{ClientLimits, Config};
use crate::dataplane::proxy::FastRuntime;
use crate::dataplane::proxy::{ClientIo as _, ConnInfo, Handoff, Plain, Proxy, Rewind, TlsClient, Worker};
use rt::{Listener as _, Stream as _};

/// Streams one HTTP/2 client may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Header fields per request head, on both transports; more is 431.
pub(crate) const MAX_HEADERS: usize = 100;
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
pub(crate) type TlsSettings = Arc<ArcSwap<rustls::ServerConfig>>;

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
        // Delayed ACKs from the start (after `listen`, which resets them; accepted sockets
        // inherit it): a new connection's first request is acknowledged by its answer, not by
        // an ACK of its own before it: one packet less per connection (HAProxy's
        // `tcp-smart-accept`). The kernel still ACKs every second full segment at once, and
        // within its delayed-ACK timeout when no answer comes. A saving only: a kernel that
        // refuses it does not stop the listener.
        let _ = socket.set_quickack(false);
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
    /// Serve HTTP/1.1 (plain or over TLS) on the fast path (hyper for everything else).
    pub fast_path: bool,
    /// The runtime the fast path runs on.
    pub fast_loop: FastLoop,
}

/// The runtime the fast path runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FastLoop {
    /// Its own event loop ([`rt::own`]), on a thread beside the worker's: what the proxy runs.
    /// Measured side by side with the same fast path on tokio, it spends less CPU per request
    /// with new sessions, paced clients and a connection per request, and less memory per idle
    /// connection (docs/benchmarks.md).
    #[default]
    Own,
    /// The worker's tokio runtime ([`rt::tokio`]). Under `tokio::time::pause` the fast path's
    /// timeouts then run on paused time, so tests of them do not wait.
    Tokio,
}

impl ServeOptions {
    /// The options a configuration asks for.
    pub fn from_config(config: &Config, tls: Option<TlsSettings>) -> Self {
        Self {
            tls,
            limits: config.limits,
            grace: config.shutdown_grace,
            fast_path: config.fast_path,
            fast_loop: FastLoop::Own,
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
    if options.fast_path {
        return serve_fast(worker, listener, options, shutdown).await;
    }
    let ServeOptions { tls, limits, grace, .. } = options;
    let worker = Arc::new(worker);
    let builder = Arc::new(hyper_builder(&limits));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let Some((stream, peer, slot)) = next_connection(&slots, &shutdown, || listener.accept()).await else {
            break;
        };
        // Small request/response exchanges: do not let Nagle hold the last segment back.
        let _ = stream.set_nodelay(true);
        let guard = ConnGuard::new(&worker, slot);
        let conn = Conn {
            worker: Arc::clone(&worker),
            info: ConnInfo::new(peer, tls.is_some()),
        };
        let (builder, watcher) = (Arc::clone(&builder), graceful.watcher());
        match &tls {
            None => {
                tokio::spawn(serve_with_hyper(builder, TokioIo::new(stream), conn, watcher, guard));
            }
            Some(settings) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(settings.load_full());
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
                    serve_with_hyper(builder, TokioIo::new(tls_stream), conn, watcher, guard).await;
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

/// The next connection from `accept` and its connection slot, once one is free (at the limit,
/// accepting stops until a connection closes); `None` once `shutdown` is cancelled.
async fn next_connection<S, F>(
    slots: &Arc<tokio::sync::Semaphore>,
    shutdown: &CancellationToken,
    mut accept: impl FnMut() -> F,
) -> Option<(S, SocketAddr, tokio::sync::OwnedSemaphorePermit)>
where
    F: Future<Output = io::Result<(S, SocketAddr)>>,
{
    let slot = tokio::select! {
        slot = Arc::clone(slots).acquire_owned() => slot.expect("the semaphore is never closed"),
        () = shutdown.cancelled() => return None,
    };
    loop {
        let accepted = tokio::select! {
            accepted = accept() => accepted,
            () = shutdown.cancelled() => return None,
        };
        match accepted {
            Ok((stream, peer)) => return Some((stream, peer, slot)),
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves one client connection with hyper, each request through [`Worker::handle`], until it
/// ends or the graceful shutdown ends it; its slot is freed then.
async fn serve_with_hyper<I>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: I,
    conn: Conn,
    watcher: Watcher,
    guard: ConnGuard,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let service = service_fn(move |req| {
        let conn = Arc::clone(&conn);
        async move { Ok::<_, Infallible>(conn.worker.handle(req, &conn.info).await) }
    });
    let connection = builder.serve_connection(io, service).into_owned();
    if let Err(e) = watcher.watch(connection).await {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
    drop(guard);
}

/// hyper's server settings for client connections: HTTP/1.1 and HTTP/2, bounded.
fn hyper_builder(limits: &ClientLimits) -> auto::Builder<TokioExecutor> {
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
    builder
}

/// A connection the fast path gave to hyper.
struct HandedOver {
    /// Bytes already read from it (decrypted, over TLS), to be read again first.
    read: Vec<u8>,
    conn: Handoff,
    peer: SocketAddr,
    guard: ConnGuard,
}

/// Serves clients with the fast path: an event loop of its own ([`rt::own`]), on a
/// thread of its own (or, with [`FastLoop::Tokio`], this runtime), accepts and serves HTTP/1.1;
/// what it hands over, hyper serves here, on this runtime, whose handle the loop's thread enters
/// (tokio's timers and DNS lookups work there). Stops as [`serve`] does.
async fn serve_fast(worker: Worker, listener: TcpListener, options: ServeOptions, shutdown: CancellationToken) {
    let ServeOptions {
        tls,
        limits,
        grace,
        fast_loop,
        ..
    } = options;
    let worker = Arc::new(worker);
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot move the listener to the fast path's event loop");
            return;
        }
    };
    // The fast path's connection deadlines, kept for as long as this function runs.
    let keeper = Arc::clone(&worker).keep_fast_deadlines(limits.idle_timeout, shutdown.clone());
    let _deadlines = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(keeper));
    let (to_hyper, mut handed_over) = tokio::sync::mpsc::unbounded_channel();
    // `stop`: the grace ran out, the loop ends now; `ended`: it has ended.
    let (stop, ended) = (CancellationToken::new(), CancellationToken::new());
    let accept = FastAccept {
        worker: Arc::clone(&worker),
        listener,
        tls: tls.clone(),
        limits,
        shutdown: shutdown.clone(),
        stop: stop.clone(),
        to_hyper,
    };
    let event_loop = if fast_loop == FastLoop::Tokio {
        let ended = ended.clone();
        tokio::spawn(async move {
            let _ended = ended.drop_guard();
            if let Err(e) = accept_fast::<rt::tokio::Tokio>(accept).await {
                tracing::error!(error = %e, "the fast path's accept loop failed");
            }
        });
        None
    } else {
        let ended = ended.clone();
        let handle = tokio::runtime::Handle::current();
        let name = format!("{}-fast", std::thread::current().name().unwrap_or("worker"));
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let _ended = ended.drop_guard();
            let _entered = handle.enter();
            let served = rt::own::Runtime::new().and_then(|rt| rt.block_on(accept_fast::<rt::own::Own>(accept)));
            if let Err(e) = served.and_then(|r| r) {
                tracing::error!(error = %e, "the fast path's event loop failed");
            }
        });
        match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the fast path's event loop");
                return;
            }
        }
    };
    let builder = Arc::new(hyper_builder(&limits));
    let graceful = GracefulShutdown::new();
    loop {
        let HandedOver {
            read,
            conn: Handoff { socket, tls: session },
            peer,
            guard,
        } = tokio::select! {
            h = handed_over.recv() => match h {
                Some(h) => h,
                None => break, // the loop has ended
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(stream) = TcpStream::from_std(socket) else {
            continue;
        };
        let conn = Conn {
            worker: Arc::clone(&worker),
            info: ConnInfo::new(peer, session.is_some()),
        };
        let (builder, watcher) = (Arc::clone(&builder), graceful.watcher());
        let tls = tls.clone();
        tokio::spawn(async move {
            // The socket is new to tokio's reactor: its first event (writable) comes first, as
            // for an accepted socket. hyper may otherwise find its answer unflushable and, on a
            // request asking for an `Upgrade` whose body failed, end the connection before
            // writing it (found by fuzzing: fast_vs_hyper).
            if stream.writable().await.is_err() {
                return;
            }
            match (session, tls) {
                (Some(session), Some(tls)) => {
                    // tokio-rustls makes its stream only from a handshake: this one starts with the
                    // session the fast path completed (swapped in before it starts: it sees no
                    // handshake to do, sends what the session has queued, and is done). The
                    // session it made to be replaced costs a few µs, on hand-overs only.
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.load_full());
                    let stream = match acceptor.accept_with(stream, move |s| *s = *session).await {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(error = %e, %peer, "TLS connection lost at the hand-over");
                            return;
                        }
                    };
                    serve_with_hyper(builder, TokioIo::new(Rewind::new(read, stream)), conn, watcher, guard).await;
                }
                _ => {
                    serve_with_hyper(builder, TokioIo::new(Rewind::new(read, stream)), conn, watcher, guard).await;
                }
            }
        });
    }
    // Connections handed over with the shutdown are not started.
    drop(handed_over);
    let all_done = async {
        graceful.shutdown().await;
        ended.cancelled().await;
    };
    tokio::select! {
        () = all_done => tracing::debug!("all connections closed"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "shutdown grace elapsed; closing open connections");
            stop.cancel();
        }
    }
    // The loop has ended or is ending now: its thread exits without waiting on anything.
    if let Some(event_loop) = event_loop {
        let _ = tokio::task::spawn_blocking(move || event_loop.join()).await;
    }
}

/// What the fast path's accept loop works with.
struct FastAccept {
    worker: Arc<Worker>,
    listener: std::net::TcpListener,
    /// Client-facing TLS, when on: each connection's handshake is made in its task.
    tls: Option<TlsSettings>,
    limits: ClientLimits,
    /// Stop accepting; connections finish the request in flight.
    shutdown: CancellationToken,
    /// The grace ran out: end now.
    stop: CancellationToken,
    /// Where connections the fast path does not serve go (hyper, on the worker's runtime).
    to_hyper: tokio::sync::mpsc::UnboundedSender<HandedOver>,
}

/// The fast path's accept loop, on its event loop: serves each connection as a task of the loop
/// until `shutdown`, then waits for them to finish the request in flight (or for `stop`).
async fn accept_fast<R: FastRuntime>(accept: FastAccept) -> io::Result<()> {
    let FastAccept {
        worker,
        listener,
        tls,
        limits,
        shutdown,
        stop,
        to_hyper,
    } = accept;
    let listener = R::listener(listener)?;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let Some((stream, peer, slot)) = next_connection(&slots, &shutdown, || listener.accept()).await else {
            break;
        };
        // Small request/response exchanges: do not let Nagle hold the last segment back.
        let _ = stream.set_nodelay(true);
        let guard = ConnGuard::new(&worker, slot);
        let info = Arc::new(ConnInfo::new(peer, tls.is_some()));
        let to_hyper = to_hyper.clone();
        let handoff = move |read, conn| {
            let _ = to_hyper.send(HandedOver {
                read,
                conn,
                peer,
                guard,
            });
        };
        let (idle, max_head) = (limits.idle_timeout, limits.max_header_bytes);
        let worker = Arc::clone(&worker);
        match &tls {
            // Spawned as it is (no block around it): every idle connection holds this state.
            None => R::spawn(worker.serve_fast::<R, _>(Plain(stream), info, idle, max_head, shutdown.clone(), handoff)),
            Some(settings) => {
                let (config, shutdown) = (settings.load_full(), shutdown.clone());
                R::spawn(async move {
                    let accepted = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, TlsClient::accept(stream, config));
                    let client = match accepted.await {
                        Ok(Ok(client)) => client,
                        Ok(Err(e)) => return tracing::debug!(error = %e, %peer, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    // HTTP/2 is hyper's; HTTP/1.1 (or no ALPN) the fast path's.
                    if client.alpn() == Some(b"h2") {
                        if let Ok(conn) = client.into_handoff() {
                            handoff(Vec::new(), conn);
                        }
                        return;
                    }
                    worker
                        .serve_fast::<R, _>(client, info, idle, max_head, shutdown, handoff)
                        .await;
                });
            }
        }
    }
    drop(listener);
    // Connections finish their request in flight and stop (they watch `shutdown`); each holds a
    // slot until it closes (handed over to hyper too), so all slots back means all closed.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = slots.acquire_many(all) => {}
        () = stop.cancelled() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::SockRef;

    #[test]
    fn listeners_share_a_port_and_accepted_connections_delay_their_acks() {
        let listeners = bind_listeners("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        assert_eq!(
            listeners[1].local_addr().unwrap(),
            addr,
            "SO_REUSEPORT: one port for all"
        );
        assert!(listeners.iter().all(|l| !SockRef::from(l).quickack().unwrap()));

        // What matters is the accepted socket: it inherits delayed ACKs (with quick ACKs, a
        // request's ACK leaves on its own, ahead of the answer).
        let listener = bind_listeners("127.0.0.1:0".parse().unwrap(), 1).unwrap().remove(0);
        listener.set_nonblocking(false).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(!SockRef::from(&accepted).quickack().unwrap());
    }
}
