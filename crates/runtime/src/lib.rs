//! What the proxy's HTTP/1.1 fast path needs from a runtime, and the runtimes that provide it.
//!
//! The fast path serves a client connection in one task: it reads a request head, writes it to a
//! pooled backend connection, relays the answer, and times the exchange. All it asks of a runtime
//! is in [`Runtime`]: TCP streams that read into a `Vec`'s spare room and write from `&self`,
//! a listener, `spawn`, and a clock read at most once per turn of the loop.
//!
//! Two implementations sit side by side, so they can be compared in one benchmark run and the
//! fast path tested on either:
//! - [`own`]: the fast path's own event loop (`mio`'s reactor, `async-task`'s tasks, its own
//!   readiness and budget rules), one per worker, on a thread of its own;
//! - [`tokio`]: tokio, on the worker's `current_thread` runtime; under `tokio::time::pause` its
//!   clock is tokio's paused one, so the fast path's timeouts can be tested without waiting.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

pub mod own;
pub mod tokio;

/// A TCP connection as the fast path uses it. Reads and writes take `&self`, so one task can
/// wait on a read while it holds a write half elsewhere (a client closing during a relay).
pub trait Stream: Sized + Send + Sync + 'static {
    /// Connects to `addr`.
    fn connect(addr: SocketAddr) -> impl Future<Output = io::Result<Self>> + Send;
    /// Waits until a read would not block (data, or the peer's close).
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Reads what the socket has into `buf`'s spare capacity (made if there is none), without
    /// waiting: `WouldBlock` when it has nothing. `Ok(0)`: the peer closed.
    fn try_read_vec(&self, buf: &mut Vec<u8>) -> io::Result<usize>;
    /// Reads into `buf`'s spare capacity (made if there is none), waiting for data.
    fn read_vec(&self, buf: &mut Vec<u8>) -> impl Future<Output = io::Result<usize>> + Send;
    /// Reads into `buf`, waiting for data.
    fn read(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send;
    /// Reads into `buf` without waiting: `WouldBlock` when the socket has nothing.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes what the socket takes of `data` without waiting: `WouldBlock` when it has no room.
    fn try_write(&self, data: &[u8]) -> io::Result<usize>;
    /// Waits until a write would not block.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Writes all of `data`, waiting for room as needed.
    fn write_all(&self, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
    /// Sends a FIN: the peer reads the end of the stream.
    fn shutdown_write(&self) -> io::Result<()>;
    /// Turns Nagle's algorithm off (`true`) or on.
    fn set_nodelay(&self, nodelay: bool) -> io::Result<()>;
    /// Leaves the runtime: the socket (non-blocking), for another runtime to take over.
    fn into_std(self) -> io::Result<std::net::TcpStream>;
}

/// A listening socket.
pub trait Listener: Sized + Send + Sync + 'static {
    /// The connections it accepts.
    type Stream: Stream;
    /// The next connection and its peer's address.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
}

/// A runtime the fast path can run on; the methods work on the thread that runs it.
pub trait Runtime: 'static {
    /// Its TCP connections.
    type Stream: Stream;
    /// Its listening sockets.
    type Listener: Listener<Stream = Self::Stream>;
    /// Takes a bound, listening socket into this thread's runtime (made non-blocking).
    fn listener(socket: std::net::TcpListener) -> io::Result<Self::Listener>;
    /// Runs `task` on this thread's runtime.
    fn spawn(task: impl Future<Output = ()> + Send + 'static);
    /// The time of the loop's turn: what requests are timed by. It may lag the clock by the work
    /// of the turn so far; it never runs ahead of it.
    fn now() -> Instant;
}

/// Room a read makes in a full buffer.
const MIN_READ_ROOM: usize = 8 * 1024;

/// Makes room in `buf` for a read when it has none.
fn reserve_read_room(buf: &mut Vec<u8>) {
    if buf.capacity() == buf.len() {
        buf.reserve(MIN_READ_ROOM);
    }
}
