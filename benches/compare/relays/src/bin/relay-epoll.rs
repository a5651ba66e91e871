//! `relay-epoll LISTEN_IP:PORT BACKEND_IP:PORT`: `examples/relay_floor.rs` on a bare epoll loop.
//!
//! The same measuring instrument — each client connection gets its own backend connection, bytes
//! go through untouched, no HTTP work — without tokio: one thread, one level-triggered epoll set
//! holding both sockets of every pair (registered once), and per turn one `epoll_wait`, then per
//! readable socket one `recv` and one `send` of what it read to the other socket. The same
//! system calls as the tokio relay and the proxy (four per request, and a share of an
//! `epoll_wait`), with the least user-space work around them: the loop HAProxy's design stands
//! for. `benches/compare.sh` runs it beside the tokio relay to show what tokio's reactor and
//! scheduler cost per request.
//!
//! Like the other relays it expects a client that waits for each answer (wrk) and answers that
//! fit one read, and connects to the backend with a blocking `connect` in the loop (over
//! loopback, at once); a send that does not take everything at once closes the pair.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

/// The listener's key in the epoll set; a socket's key is its fd and its peer's fd.
const LISTENER: u64 = u64::MAX;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, backend] = args.as_slice() else {
        eprintln!("usage: relay-epoll LISTEN_IP:PORT BACKEND_IP:PORT");
        std::process::exit(64);
    };
    if let Err(e) = run(listen, backend) {
        eprintln!("relay-epoll: {e}");
        std::process::exit(1);
    }
}

/// The result of a libc call that returns -1 and sets errno on failure.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn key(fd: RawFd, peer: RawFd) -> u64 {
    (fd as u32 as u64) << 32 | peer as u32 as u64
}

fn run(listen: &str, backend: &str) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    // SAFETY: plain system calls on fds this function owns; pointers are to live locals.
    let epoll = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    add(epoll, listener.as_raw_fd(), LISTENER)?;
    eprintln!("relay-epoll listening on {listen}, relaying to {backend}");
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = vec![0u8; 16 * 1024];
    // The fds closed in this turn: later events of the turn for them are stale.
    let mut closed: Vec<RawFd> = Vec::new();
    loop {
        closed.clear();
        // SAFETY: `events` has room for the number of events asked for.
        let n = match check(unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) }) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for event in &events[..n] {
            let data = event.u64;
            if data == LISTENER {
                while let Ok((client, _)) = listener.accept() {
                    // Failures here drop the client connection (closed with `client`).
                    let _ = pair(epoll, client, backend);
                }
                continue;
            }
            let (fd, peer) = ((data >> 32) as RawFd, data as u32 as RawFd);
            if closed.contains(&fd) {
                continue;
            }
            // SAFETY: `buf` is a live buffer of the length given; fd and peer are open (a pair
            // is closed only below, which also keeps the rest of the turn off its fds).
            let got = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
                continue;
            }
            let sent = if got > 0 {
                // SAFETY: as above.
                unsafe { libc::send(peer, buf.as_ptr().cast(), got as usize, libc::MSG_NOSIGNAL) }
            } else {
                -1
            };
            if got <= 0 || sent != got {
                // SAFETY: closing both fds of the pair once; the close takes them out of the
                // epoll set, and `closed` keeps this turn's remaining events off them.
                unsafe {
                    libc::close(fd);
                    libc::close(peer);
                }
                closed.extend([fd, peer]);
            }
        }
    }
}

/// Registers `fd` for level-triggered reads under `key`.
fn add(epoll: RawFd, fd: RawFd, key: u64) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: key,
    };
    // SAFETY: a live event struct; fds owned by the caller.
    check(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) }).map(drop)
}

/// Connects `client` to the backend and puts both sockets in the epoll set.
fn pair(epoll: RawFd, client: TcpStream, backend: &str) -> io::Result<()> {
    let upstream = TcpStream::connect(backend)?;
    for s in [&client, &upstream] {
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
    }
    let (c, u) = (client.into_raw_fd(), upstream.into_raw_fd());
    let added = add(epoll, c, key(c, u)).and_then(|()| add(epoll, u, key(u, c)));
    if added.is_err() {
        // SAFETY: the two fds just taken from their streams, used nowhere else.
        unsafe {
            libc::close(c);
            libc::close(u);
        }
    }
    added
}
