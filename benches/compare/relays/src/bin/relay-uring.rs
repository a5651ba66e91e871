//! `relay-uring LISTEN_IP:PORT BACKEND_IP:PORT`: `examples/relay_floor.rs` on io_uring.
//!
//! The same measuring instrument — each client connection gets its own backend connection, bytes
//! go through untouched, no HTTP work — with the I/O model that batches system calls: one thread,
//! one ring (single issuer, deferred task work), a multishot accept, a multishot receive armed
//! once on each socket of a pair with buffers taken from one provided-buffer ring, and each
//! buffer sent on as it was received. One `io_uring_enter` per turn of the loop submits every
//! send of the turn and waits for the next completions. `benches/compare.sh` runs it beside the
//! epoll relay and the proxies to show what io_uring would change for a proxy on this kernel.
//!
//! Like the other relays it expects a client that waits for each answer (wrk), and connects to
//! the backend with a blocking `connect` in the loop (over loopback, at once); it keeps each
//! direction's sends in order all the same (one in flight, the others queued).

use std::collections::VecDeque;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{cqueue, opcode, squeue, types, types::BufRingEntry, IoUring};

/// Buffers in the provided-buffer ring (a power of two) and the size of each.
const BUFFERS: u16 = 4096;
const BUFFER_SIZE: usize = 4096;
/// The buffer group the receives take from.
const GROUP: u16 = 0;

/// What a completion is for: the low 3 bits of its user data.
const ACCEPT: u64 = 0;
const RECV: u64 = 1;
const SEND: u64 = 2;

/// The two sockets of a pair, as indexes into `Pair::fds`.
const CLIENT: usize = 0;
const BACKEND: usize = 1;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, backend] = args.as_slice() else {
        eprintln!("usage: relay-uring LISTEN_IP:PORT BACKEND_IP:PORT");
        std::process::exit(64);
    };
    if let Err(e) = run(listen, backend) {
        eprintln!("relay-uring: {e}");
        std::process::exit(1);
    }
}

/// A client connection and its backend connection.
#[derive(Default)]
struct Pair {
    fds: [RawFd; 2],
    /// Multishot receives still armed (0–2).
    armed: u8,
    /// Per destination side: a send is in flight to it, and the received buffers
    /// (id, length) waiting for it to end.
    sending: [bool; 2],
    queued: [VecDeque<(u16, u32)>; 2],
    /// One side ended: both sockets are shut down, the pair closes when its last operation ends.
    closing: bool,
}

/// User data: kind | side << 3 | buffer id << 4 | send length << 20 | pair slot << 33.
fn user_data(kind: u64, side: usize, bid: u16, len: u32, slot: usize) -> u64 {
    kind | (side as u64) << 3 | u64::from(bid) << 4 | u64::from(len) << 20 | (slot as u64) << 33
}

fn run(listen: &str, backend: &str) -> io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(4096)?;
    let memory = vec![0u8; usize::from(BUFFERS) * BUFFER_SIZE];
    let mut buffers = Buffers::new(&ring, &memory)?;
    let base = buffers.base;
    eprintln!("relay-uring listening on {listen}, relaying to {backend}");

    let mut pairs: Vec<Pair> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut next: Vec<squeue::Entry> = Vec::new();
    let accept = |fd| opcode::AcceptMulti::new(types::Fd(fd)).build().user_data(ACCEPT);
    next.push(accept(listener.as_raw_fd()));
    let recv = |fd, side, slot| {
        opcode::RecvMulti::new(types::Fd(fd), GROUP)
            .build()
            .user_data(user_data(RECV, side, 0, 0, slot))
    };
    let send = |pair: &Pair, to: usize, (bid, len): (u16, u32), slot| {
        opcode::Send::new(
            types::Fd(pair.fds[to]),
            base.wrapping_add(usize::from(bid) * BUFFER_SIZE),
            len,
        )
        .build()
        .user_data(user_data(SEND, to, bid, len, slot))
    };

    loop {
        {
            let mut sq = ring.submission();
            for entry in next.drain(..) {
                // SAFETY: every buffer an entry points to (the provided buffers, the ring's
                // memory) lives as long as `memory` and `buffers`, which outlive the loop.
                if unsafe { sq.push(&entry) }.is_err() {
                    drop(sq);
                    ring.submit()?;
                    sq = ring.submission();
                    // SAFETY: as above; the queue was just emptied by the submit.
                    unsafe { sq.push(&entry) }.map_err(|_| io::Error::other("queue full"))?;
                }
            }
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let completions: Vec<(u64, i32, u32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (data, res, flags) in completions {
            let (kind, side) = (data & 7, (data >> 3 & 1) as usize);
            let (bid, len) = ((data >> 4 & 0xffff) as u16, (data >> 20 & 0x1fff) as u32);
            let slot = (data >> 33) as usize;
            match kind {
                ACCEPT => {
                    if !cqueue::more(flags) {
                        next.push(accept(listener.as_raw_fd()));
                    }
                    if res < 0 {
                        continue;
                    }
                    let Some(upstream) = connect(backend, res) else {
                        // SAFETY: `res` is the fd the accept just gave us, used nowhere else.
                        unsafe { libc::close(res) };
                        continue;
                    };
                    let slot = free.pop().unwrap_or_else(|| {
                        pairs.push(Pair::default());
                        pairs.len() - 1
                    });
                    pairs[slot] = Pair {
                        fds: [res, upstream],
                        armed: 2,
                        ..Pair::default()
                    };
                    next.push(recv(res, CLIENT, slot));
                    next.push(recv(upstream, BACKEND, slot));
                }
                RECV => {
                    let pair = &mut pairs[slot];
                    let ended = res == 0 || (res < 0 && res != -libc::ENOBUFS);
                    if res > 0 {
                        let bid = cqueue::buffer_select(flags).expect("a receive into a buffer");
                        let (to, received) = (1 - side, (bid, res as u32));
                        if pair.closing {
                            buffers.give_back(bid);
                        } else if pair.sending[to] {
                            pair.queued[to].push_back(received);
                        } else {
                            pair.sending[to] = true;
                            next.push(send(pair, to, received, slot));
                        }
                    }
                    if ended && !pair.closing {
                        shut_down(pair);
                    }
                    if !cqueue::more(flags) {
                        if pair.closing {
                            pair.armed -= 1;
                        } else {
                            // Out of buffers, or the kernel ended it: arm it again.
                            next.push(recv(pair.fds[side], side, slot));
                        }
                    }
                }
                SEND => {
                    let pair = &mut pairs[slot];
                    buffers.give_back(bid);
                    pair.sending[side] = false;
                    if (res < 0 || (res as u32) < len) && !pair.closing {
                        // A failed or short send: this relay does not resend, it closes.
                        shut_down(pair);
                    }
                    if pair.closing {
                        for (bid, _) in pair.queued[side].drain(..) {
                            buffers.give_back(bid);
                        }
                    } else if let Some(received) = pair.queued[side].pop_front() {
                        pair.sending[side] = true;
                        next.push(send(pair, side, received, slot));
                    }
                }
                _ => unreachable!("no other kind is submitted"),
            }
            let pair = pairs.get_mut(slot).filter(|_| kind != ACCEPT);
            if let Some(pair) = pair.filter(|p| p.closing && p.armed == 0 && p.sending == [false; 2]) {
                for fd in pair.fds {
                    // SAFETY: the pair's fds are closed once, when no operation uses them.
                    unsafe { libc::close(fd) };
                }
                *pair = Pair::default();
                free.push(slot);
            }
        }
        buffers.publish();
    }
}

/// Connects to the backend for the client connection `client`, both without Nagle's delay.
fn connect(backend: &str, client: RawFd) -> Option<RawFd> {
    let upstream = TcpStream::connect(backend).ok()?;
    upstream.set_nodelay(true).ok()?;
    let one: libc::c_int = 1;
    // SAFETY: a plain setsockopt on an fd we own, with a pointer to a live c_int.
    let set = unsafe {
        libc::setsockopt(
            client,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    (set == 0).then(|| upstream.into_raw_fd())
}

/// Shuts both sockets down, which ends their armed receives; the pair closes when they have.
fn shut_down(pair: &mut Pair) {
    pair.closing = true;
    for fd in pair.fds {
        // SAFETY: shutdown on fds the pair owns and has not closed.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// The provided-buffer ring and the buffers it hands out.
struct Buffers {
    /// `BUFFERS` entries, page-aligned (mmap), registered with the ring as group `GROUP`.
    ring: *mut BufRingEntry,
    /// The buffers: `BUFFERS` of `BUFFER_SIZE` bytes from here (the caller's memory).
    base: *const u8,
    /// Our copy of the ring's tail: entries added but maybe not yet published.
    tail: u16,
}

impl Buffers {
    fn new(uring: &IoUring, memory: &[u8]) -> io::Result<Buffers> {
        assert!(memory.len() >= usize::from(BUFFERS) * BUFFER_SIZE);
        let bytes = usize::from(BUFFERS) * std::mem::size_of::<BufRingEntry>();
        // SAFETY: an anonymous private mapping; checked for failure below.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
                -1,
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut buffers = Buffers {
            ring: ring.cast(),
            base: memory.as_ptr(),
            tail: 0,
        };
        for bid in 0..BUFFERS {
            buffers.give_back(bid);
        }
        buffers.publish();
        // SAFETY: the ring memory is page-aligned, BUFFERS entries long, and lives (never
        // unmapped) as long as the process.
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(buffers.ring as u64, BUFFERS, GROUP, 0)?
        };
        Ok(buffers)
    }

    /// Puts buffer `bid` back in the ring (seen by the kernel after `publish`).
    fn give_back(&mut self, bid: u16) {
        let index = usize::from(self.tail & (BUFFERS - 1));
        // SAFETY: `index` < BUFFERS, inside the mapping; the kernel reads entries only up to
        // the published tail, and this one is past it.
        let entry = unsafe { &mut *self.ring.add(index) };
        entry.set_addr(self.base.wrapping_add(usize::from(bid) * BUFFER_SIZE) as u64);
        entry.set_len(BUFFER_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the entries added since the last call.
    fn publish(&self) {
        // SAFETY: the ring's tail field overlays the first entry's reserved field; the kernel
        // reads it concurrently, hence the atomic store with release ordering.
        unsafe {
            let tail = BufRingEntry::tail(self.ring).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}
