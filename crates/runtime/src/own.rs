//! The fast path's own event loop: `mio`'s reactor and `async-task`'s tasks, driven by one thread
//! per worker, with the readiness and budget rules kept here.
//!
//! Why not tokio there: measured against HAProxy on the same requests, the fast path spends less
//! CPU per request, and less memory per idle connection, on this loop than on a `current_thread`
//! tokio runtime (`benches/compare.sh` runs both; [`crate::tokio`] is the same fast path on tokio,
//! to measure it again). tokio's general machinery (readiness and task states kept in atomics,
//! waiter lists under locks, timers in the driver) serves any number of tasks on any threads; the
//! fast path has one task per client connection, on one thread, and needs much less.
//!
//! What is borrowed: `mio` waits for the kernel's events (edge-triggered epoll) and wakes the loop
//! from other threads ([`mio::Waker`]); `async-task` makes the tasks and their [`Waker`]s. What is
//! ours, because it decides what a request costs:
//! - [`Runtime::block_on`] runs a future and the tasks it [`spawn`]s on the calling thread until
//!   that future is done; what is still running then is dropped. Tasks need not be `Send`. As
//!   on tokio, a task that panics is dropped and the others go on, and a task yields after
//!   [`BUDGET`] socket operations in one poll, so a connection that always has bytes ready
//!   cannot starve the others.
//! - Scheduling: a task woken on the loop's thread (by a socket's event) goes on the run queue; one
//!   woken from another thread (a tokio timer, a cancellation) on a locked list, and the first on
//!   that list wakes the loop.
//! - [`TcpListener`] and [`TcpStream`]: registered once; readiness is kept per socket as tokio
//!   keeps it (set by events, cleared by `EAGAIN` or a short read/write, the peer's close
//!   sticky), with one waiting reader and one waiting writer per socket. Connecting, accepting
//!   and registering are `mio`'s; the reads and writes every request makes are system calls made
//!   directly (rustix), not through libc's cancellation-point wrappers.
//! - No timers of its own: the thread running a loop enters a tokio runtime's handle, so tokio's
//!   timers, DNS lookups and `spawn` work from it (off the hot path: connects, the deadline
//!   sweeper, shutdown). What the tasks time, they time by the loop's turn: [`now`], the clock
//!   read once per look at the kernel's events.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use async_task::{Runnable, Task};
use mio::event::{Event, Source};
use mio::{Events, Interest, Token};
use rustix::net::{RecvFlags, SendFlags};
use slab::Slab;

/// Events taken from the kernel per wait.
const EVENTS_PER_WAIT: usize = 256;
/// The token of the [`mio::Waker`] through which other threads wake the loop.
const WAKE_TOKEN: Token = Token(usize::MAX);
/// Socket operations a task may make in one poll before it yields, as under tokio's cooperative
/// budget: a connection that always has bytes ready cannot starve the others.
const BUDGET: u32 = 128;

/// Data to read, or a connection to accept.
const READABLE: u8 = 1;
/// Room to write.
const WRITABLE: u8 = 2;
/// The peer closed its side or the socket failed: reads no longer wait (sticky).
const READ_CLOSED: u8 = 4;
/// Hung up or failed: writes no longer wait (sticky).
const WRITE_CLOSED: u8 = 8;

/// Which way a socket is waited on.
#[derive(Clone, Copy, Debug)]
enum Direction {
    Read,
    Write,
}

impl Direction {
    /// The readiness bits that let this direction go on.
    fn ready(self) -> u8 {
        match self {
            Direction::Read => READABLE | READ_CLOSED,
            Direction::Write => WRITABLE | WRITE_CLOSED,
        }
    }

    /// The bit an `EAGAIN` (or a short transfer) clears; the closed bits stay.
    fn clearable(self) -> u8 {
        match self {
            Direction::Read => READABLE,
            Direction::Write => WRITABLE,
        }
    }
}

/// Tells loops apart, so a task's scheduling knows whether it runs on its loop's thread.
static NEXT_LOOP_ID: AtomicUsize = AtomicUsize::new(1);

// The loop a thread runs, while it runs it. What the hot path touches (a socket's readiness, the
// run queue) is a thread-local of its own, one lookup away.
thread_local! {
    static CORE: RefCell<Option<Rc<Core>>> = const { RefCell::new(None) };
    /// Its id (0: none): sockets and scheduling check it.
    static LOOP_ID: Cell<usize> = const { Cell::new(0) };
    /// Per registered socket: readiness and the waiting reader and writer.
    static IO: RefCell<Slab<IoSlot>> = const { RefCell::new(Slab::new()) };
    /// Tasks to poll, in the order they were woken.
    static QUEUE: RefCell<VecDeque<Runnable>> = const { RefCell::new(VecDeque::new()) };
    /// What is left of the polled task's [`BUDGET`].
    static BUDGET_LEFT: Cell<u32> = const { Cell::new(BUDGET) };
    /// The time of the loop's turn (see [`now`]).
    static NOW: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The time of this loop's turn: the clock read once after each look at the kernel's events,
/// as HAProxy's and nginx's loops keep it, so the requests a turn serves do not each read it;
/// it lags the clock by the turn's work so far. Off a loop's thread, the clock.
pub fn now() -> Instant {
    NOW.get().unwrap_or_else(Instant::now)
}

/// Takes one unit of the polled task's budget; false when it is spent (the task must yield).
#[inline]
fn take_budget() -> bool {
    let left = BUDGET_LEFT.get();
    BUDGET_LEFT.set(left.saturating_sub(1));
    left > 0
}

/// Runs `f` with this thread's loop, if it runs one.
fn with_core<R>(f: impl FnOnce(&Core) -> R) -> Option<R> {
    CORE.with(|c| c.borrow().as_deref().map(f))
}

fn not_on_loop() -> io::Error {
    io::Error::other("socket used outside its event loop")
}

/// A loop, ready to run: see the module docs.
pub struct Runtime {
    core: Rc<Core>,
}

/// The loop's state (beside [`IO`] and [`QUEUE`]), reached through [`CORE`].
struct Core {
    /// Borrowed mutably only while it waits, when no task runs (tasks register sockets).
    poll: RefCell<mio::Poll>,
    /// The spawned tasks' handles, so that what still runs when [`Runtime::block_on`] ends can be
    /// cancelled (a detached task could not be); a task takes its own out when it finishes.
    tasks: RefCell<Slab<Task<()>>>,
    /// What other threads need to wake tasks here.
    remote: Arc<Remote>,
}

/// One socket's state in the loop.
#[derive(Default)]
struct IoSlot {
    ready: u8,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

/// The way into a loop from other threads, and what every task's schedule function holds.
struct Remote {
    loop_id: usize,
    /// Tasks woken from other threads, for the loop to take over.
    woken: Mutex<Vec<Runnable>>,
    /// Woken when `woken` gets its first entry.
    waker: mio::Waker,
}

impl Remote {
    /// A task's schedule function (`async-task` calls it when the task is woken).
    fn schedule(&self, runnable: Runnable) {
        if LOOP_ID.get() == self.loop_id {
            QUEUE.with_borrow_mut(|q| q.push_back(runnable));
            return;
        }
        let first = {
            let mut woken = self.woken.lock().unwrap_or_else(|p| p.into_inner());
            woken.push(runnable);
            woken.len() == 1
        };
        if first {
            // An eventfd write, edge-triggered: each one is an event. It fails only when the loop
            // has gone (and then nobody waits for the task).
            let _ = self.waker.wake();
        }
    }
}

impl Runtime {
    /// A loop with its poller and wake-up; nothing runs until [`block_on`].
    ///
    /// [`block_on`]: Runtime::block_on
    pub fn new() -> io::Result<Self> {
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), WAKE_TOKEN)?;
        let remote = Arc::new(Remote {
            loop_id: NEXT_LOOP_ID.fetch_add(1, Ordering::Relaxed),
            woken: Mutex::default(),
            waker,
        });
        Ok(Self {
            core: Rc::new(Core {
                poll: RefCell::new(poll),
                tasks: RefCell::default(),
                remote,
            }),
        })
    }

    /// Runs `future` and the tasks spawned meanwhile on this thread until `future` is done, then
    /// drops the tasks still running. Fails only when the kernel refuses to wait for events.
    /// A spawned task that panics is dropped (and logged) and the others carry on, as on tokio.
    ///
    /// # Panics
    /// When this thread already runs a loop, or with `future`'s own panic.
    pub fn block_on<F>(&self, future: F) -> io::Result<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let _installed = Installed::new(&self.core);
        let remote = Arc::clone(&self.core.remote);
        // Its panic is kept in the task, to come out of here once the others are dropped.
        let (runnable, mut root) = async_task::Builder::new()
            .propagate_panic(true)
            .spawn_local(move |()| future, move |r| remote.schedule(r));
        runnable.schedule();
        let mut events = Events::with_capacity(EVENTS_PER_WAIT);
        loop {
            self.core.run_queued();
            if root.is_finished() {
                break;
            }
            let block = QUEUE.with_borrow(VecDeque::is_empty);
            if let Err(e) = self.core.wait(&mut events, block) {
                drop(root);
                self.core.drop_tasks();
                return Err(e);
            }
        }
        self.core.drop_tasks();
        match Pin::new(&mut root).poll(&mut Context::from_waker(&Waker::from(Arc::new(NoWake)))) {
            Poll::Ready(output) => Ok(output),
            Poll::Pending => unreachable!("a finished task has its output"),
        }
    }
}

/// A waker for a poll that cannot wait: a finished task's.
struct NoWake;

impl Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

/// Makes a loop this thread's while alive (also through a panic).
struct Installed;

impl Installed {
    fn new(core: &Rc<Core>) -> Self {
        CORE.with(|c| {
            let mut c = c.borrow_mut();
            assert!(c.is_none(), "this thread already runs an event loop");
            *c = Some(Rc::clone(core));
        });
        LOOP_ID.set(core.remote.loop_id);
        NOW.set(Some(Instant::now()));
        Installed
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        LOOP_ID.set(0);
        NOW.set(None);
        // Sockets still registered (kept elsewhere) are off the loop from now on.
        let io = IO.take();
        let queue = QUEUE.take();
        let core = CORE.with(|c| c.borrow_mut().take());
        drop((io, queue, core));
    }
}

/// Runs `future` as a task of this thread's loop.
///
/// # Panics
/// When this thread runs no loop.
pub fn spawn(future: impl Future<Output = ()> + 'static) {
    with_core(|core| core.spawn(Box::pin(future))).expect("evloop::spawn outside an event loop");
}

/// A spawned task's future, and what takes the task's handle out of the loop when it is dropped:
/// after it is done, when it panicked or when it is cancelled.
///
/// The future is boxed where it is spawned, so that only a pointer moves on into the task: a
/// future moved by value is copied at every call on the way, the whole of a connection's state
/// each time. And a struct, not an `async` block: a block that awaits the future it captures
/// holds it twice (the captured one and the awaited one).
struct Tracked {
    future: LocalFuture,
    _finished: Finished,
}

/// A task's future: it stays on its loop's thread, so it need not be `Send`.
type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;

impl Future for Tracked {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.future.as_mut().poll(cx)
    }
}

/// Takes a finished task's handle out of its loop's [`Core::tasks`], however it finished.
struct Finished(usize);

impl Drop for Finished {
    fn drop(&mut self) {
        // The handle is dropped after the borrow ends.
        let handle = with_core(|core| core.tasks.borrow_mut().try_remove(self.0));
        drop(handle);
    }
}

impl Core {
    fn spawn(&self, future: LocalFuture) {
        let mut tasks = self.tasks.borrow_mut();
        let entry = tasks.vacant_entry();
        let task = Tracked {
            future,
            _finished: Finished(entry.key()),
        };
        let remote = Arc::clone(&self.remote);
        let (runnable, handle) = async_task::spawn_local(task, move |r| remote.schedule(r));
        entry.insert(handle);
        drop(tasks);
        QUEUE.with_borrow_mut(|q| q.push_back(runnable));
    }

    /// Polls the tasks queued now; those they wake wait for the next turn, after the kernel's
    /// events have been looked at.
    fn run_queued(&self) {
        let mut n = QUEUE.with_borrow(VecDeque::len);
        while n > 0 {
            n -= 1;
            let Some(runnable) = QUEUE.with_borrow_mut(VecDeque::pop_front) else {
                break;
            };
            BUDGET_LEFT.set(BUDGET);
            // A panic closes the task and drops its future on the way out of `run`.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runnable.run())).is_err() {
                tracing::error!("a task of the fast path's event loop panicked; it is dropped");
            }
        }
    }

    /// Waits for events (or only looks, when `block` is false) and wakes who waits for them.
    fn wait(&self, events: &mut Events, block: bool) -> io::Result<()> {
        let timeout = (!block).then_some(Duration::ZERO);
        let waited = self.poll.borrow_mut().poll(events, timeout);
        NOW.set(Some(Instant::now()));
        match waited {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for event in events.iter() {
            let Token(key) = event.token();
            if event.token() == WAKE_TOKEN {
                self.take_remote_wakes();
                continue;
            }
            let ready = readiness(event);
            let woken = IO.with_borrow_mut(|io| {
                let slot = io.get_mut(key)?;
                slot.ready |= ready;
                let reader = if ready & Direction::Read.ready() != 0 {
                    slot.reader.take()
                } else {
                    None
                };
                let writer = if ready & Direction::Write.ready() != 0 {
                    slot.writer.take()
                } else {
                    None
                };
                Some((reader, writer))
            });
            // Woken with the slots released: a waker may do anything.
            let Some((reader, writer)) = woken else { continue };
            if let Some(w) = reader {
                w.wake();
            }
            if let Some(w) = writer {
                w.wake();
            }
        }
        Ok(())
    }

    fn take_remote_wakes(&self) {
        let woken = std::mem::take(&mut *self.remote.woken.lock().unwrap_or_else(|p| p.into_inner()));
        QUEUE.with_borrow_mut(|q| q.extend(woken));
    }

    /// Drops every task (their sockets close) while the loop is still this thread's. A cancelled
    /// task is scheduled once more for its future to be dropped, so the queue is emptied until
    /// nothing comes back (a drop may wake or spawn).
    fn drop_tasks(&self) {
        loop {
            let tasks = std::mem::take(&mut *self.tasks.borrow_mut());
            let mut dropped = !tasks.is_empty();
            drop(tasks);
            self.take_remote_wakes();
            // One at a time, the queue released: a future's drop may wake others.
            while let Some(runnable) = QUEUE.with_borrow_mut(VecDeque::pop_front) {
                dropped = true;
                drop(runnable);
            }
            if !dropped {
                break;
            }
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        // A task woken from another thread while the loop ended holds `remote` in its schedule
        // function: the cycle is broken here, on the loop's thread, where the task may be dropped.
        let woken = std::mem::take(&mut *self.remote.woken.lock().unwrap_or_else(|p| p.into_inner()));
        drop(woken);
    }
}

/// A socket's readiness from its event.
fn readiness(event: &Event) -> u8 {
    let mut ready = 0;
    if event.is_readable() {
        ready |= READABLE;
    }
    if event.is_writable() {
        ready |= WRITABLE;
    }
    if event.is_read_closed() || event.is_error() {
        ready |= READABLE | READ_CLOSED;
    }
    if event.is_write_closed() || event.is_error() {
        ready |= WRITABLE | WRITE_CLOSED;
    }
    ready
}

/// A socket's place in its loop; leaving it when dropped.
#[derive(Debug)]
struct Registration {
    loop_id: usize,
    key: usize,
}

impl Registration {
    /// Registers `source` with this thread's loop for reads and writes (`mio` registers
    /// edge-triggered).
    fn new(source: &mut impl Source, ready: u8) -> io::Result<Self> {
        with_core(|core| {
            let key = IO.with_borrow_mut(|io| {
                io.insert(IoSlot {
                    ready,
                    ..IoSlot::default()
                })
            });
            let registered =
                core.poll
                    .borrow()
                    .registry()
                    .register(source, Token(key), Interest::READABLE | Interest::WRITABLE);
            match registered {
                Ok(()) => Ok(Self {
                    loop_id: core.remote.loop_id,
                    key,
                }),
                Err(e) => {
                    IO.with_borrow_mut(|io| io.remove(key));
                    Err(e)
                }
            }
        })
        .unwrap_or_else(|| Err(not_on_loop()))
    }

    /// Runs `f` on this socket's slot; `None` off its loop's thread.
    #[inline]
    fn with_slot<R>(&self, f: impl FnOnce(&mut IoSlot) -> R) -> Option<R> {
        if LOOP_ID.get() != self.loop_id {
            return None;
        }
        IO.with_borrow_mut(|io| io.get_mut(self.key).map(f))
    }

    fn poll_ready(&self, cx: &mut Context<'_>, dir: Direction) -> Poll<io::Result<()>> {
        if !take_budget() {
            // Spent: yield, and be polled again after the kernel's events were looked at.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.with_slot(|slot| {
            if slot.ready & dir.ready() != 0 {
                return Poll::Ready(Ok(()));
            }
            let waiter = match dir {
                Direction::Read => &mut slot.reader,
                Direction::Write => &mut slot.writer,
            };
            match waiter {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waiter = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .unwrap_or_else(|| Poll::Ready(Err(not_on_loop())))
    }

    /// A system call in `dir`, made only when the socket is ready: its `EAGAIN` clears the
    /// readiness, and so does a result `drained` calls final (a short read or write: the socket
    /// was drained, or its buffer filled), so the next wait does not start with a system call that
    /// finds nothing. With the task's budget spent, `WouldBlock` without a system call, the
    /// readiness kept: the wait that follows yields.
    fn transfer<R>(
        &self,
        dir: Direction,
        mut call: impl FnMut() -> io::Result<R>,
        drained: impl Fn(&R) -> bool,
    ) -> io::Result<R> {
        if !take_budget() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.with_slot(|slot| {
            if slot.ready & dir.ready() == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            loop {
                match call() {
                    Ok(r) => {
                        if drained(&r) {
                            slot.ready &= !dir.clearable();
                        }
                        return Ok(r);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        slot.ready &= !dir.clearable();
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                }
            }
        })
        .unwrap_or_else(|| Err(not_on_loop()))
    }
}

/// A byte count that left room: the transfer drained the socket (or filled its buffer).
fn short_of(room: usize) -> impl Fn(&usize) -> bool {
    move |&n| n > 0 && n < room
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Closing the socket takes it out of the epoll set (no `deregister` system call): only
        // the slot is left to free.
        if LOOP_ID.get() == self.loop_id {
            IO.with_borrow_mut(|io| io.try_remove(self.key));
        }
    }
}

/// A TCP connection on this thread's loop.
#[derive(Debug)]
pub struct TcpStream {
    io: Registration,
    socket: mio::net::TcpStream,
}

impl TcpStream {
    /// Takes a connected socket into this thread's loop (made non-blocking).
    pub fn from_std(socket: std::net::TcpStream) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        Self::register(mio::net::TcpStream::from_std(socket), WRITABLE)
    }

    /// `ready`: what `socket` is known to be ready for now.
    fn register(mut socket: mio::net::TcpStream, ready: u8) -> io::Result<Self> {
        Ok(Self {
            io: Registration::new(&mut socket, ready)?,
            socket,
        })
    }

    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = Self::register(mio::net::TcpStream::connect(addr)?, 0)?;
        stream.writable().await?;
        match stream.socket.take_error()? {
            Some(e) => Err(e),
            None => Ok(stream),
        }
    }

    /// Waits until a read would not block (data, or the peer's close).
    pub async fn readable(&self) -> io::Result<()> {
        poll_fn(|cx| self.io.poll_ready(cx, Direction::Read)).await
    }

    /// Waits until a write would not block.
    pub async fn writable(&self) -> io::Result<()> {
        poll_fn(|cx| self.io.poll_ready(cx, Direction::Write)).await
    }

    /// Reads what the socket has into `buf`'s spare capacity (made if there is none), without
    /// waiting: `WouldBlock` when it has nothing. `Ok(0)`: the peer closed.
    pub fn try_read_vec(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        crate::reserve_read_room(buf);
        let room = buf.capacity() - buf.len();
        self.io.transfer(Direction::Read, || self.recv_vec(buf), short_of(room))
    }

    /// Reads into `buf`'s spare capacity (made if there is none), waiting for data.
    pub async fn read_vec(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        loop {
            match self.try_read_vec(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable().await?,
                other => return other,
            }
        }
    }

    // The reads and writes every request makes are system calls of their own (rustix), not
    // `mio`'s: those are `std`'s, which read only into initialised bytes (zeroing a buffer's room
    // before each read would cost what the spare capacity saves) and go through libc's
    // cancellation-point wrappers, which cost more than the loop's own work for the call.

    fn recv_vec(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        rustix::net::recv(&self.socket, rustix::buffer::spare_capacity(buf), RecvFlags::empty())
            .map(|(n, _)| n)
            .map_err(io::Error::from)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        rustix::net::recv(&self.socket, buf, RecvFlags::empty())
            .map(|(n, _)| n)
            .map_err(io::Error::from)
    }

    /// `MSG_NOSIGNAL`: a closed peer is an error, not a SIGPIPE.
    fn send(&self, data: &[u8]) -> io::Result<usize> {
        rustix::net::send(&self.socket, data, SendFlags::NOSIGNAL).map_err(io::Error::from)
    }

    /// Reads into `buf`, waiting for data.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.try_read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable().await?,
                other => return other,
            }
        }
    }

    /// Reads into `buf` without waiting: `WouldBlock` when the socket has nothing.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let drained = short_of(buf.len());
        self.io.transfer(Direction::Read, || self.recv(buf), drained)
    }

    /// Writes what the socket takes of `data` without waiting: `WouldBlock` when it has no room.
    pub fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        self.io
            .transfer(Direction::Write, || self.send(data), short_of(data.len()))
    }

    /// Writes all of `data`, waiting for room as needed.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match self.try_write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends a FIN: the peer reads the end of the stream.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.socket.shutdown(Shutdown::Write)
    }

    /// Turns Nagle's algorithm off (`true`) or on.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.socket.set_nodelay(nodelay)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.socket.peer_addr()
    }

    /// Leaves the loop: the socket (still non-blocking), for another runtime to take over.
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        let Self { io, mut socket } = self;
        with_core(|core| core.poll.borrow().registry().deregister(&mut socket)).ok_or_else(not_on_loop)??;
        drop(io);
        Ok(socket.into())
    }
}

impl AsFd for TcpStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// A listening socket on this thread's loop.
#[derive(Debug)]
pub struct TcpListener {
    io: Registration,
    socket: mio::net::TcpListener,
}

impl TcpListener {
    /// Takes a bound, listening socket into this thread's loop (made non-blocking).
    pub fn from_std(socket: std::net::TcpListener) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let mut socket = mio::net::TcpListener::from_std(socket);
        Ok(Self {
            // Connections may be waiting already: the first accept tries.
            io: Registration::new(&mut socket, READABLE)?,
            socket,
        })
    }

    /// The next connection (non-blocking, on this loop) and its peer's address.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let accept = || loop {
            match self.socket.accept() {
                // A connection reset while in the queue: take the next.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                other => return other,
            }
        };
        let (socket, peer) = loop {
            match self.io.transfer(Direction::Read, accept, |_| false) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    poll_fn(|cx| self.io.poll_ready(cx, Direction::Read)).await?;
                }
                other => break other?,
            }
        };
        Ok((TcpStream::register(socket, WRITABLE)?, peer))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

/// The fast path's own loop (see the module docs), run by [`Runtime::block_on`].
#[derive(Debug)]
pub struct Own;

impl crate::Runtime for Own {
    type Stream = TcpStream;
    type Listener = TcpListener;

    fn listener(socket: std::net::TcpListener) -> io::Result<TcpListener> {
        TcpListener::from_std(socket)
    }

    fn spawn(task: impl Future<Output = ()> + Send + 'static) {
        spawn(task);
    }

    fn now() -> Instant {
        now()
    }
}

impl crate::Stream for TcpStream {
    fn connect(addr: SocketAddr) -> impl Future<Output = io::Result<Self>> + Send {
        TcpStream::connect(addr)
    }

    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }

    fn try_read_vec(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        TcpStream::try_read_vec(self, buf)
    }

    fn read_vec(&self, buf: &mut Vec<u8>) -> impl Future<Output = io::Result<usize>> + Send {
        TcpStream::read_vec(self, buf)
    }

    fn read(&self, buf: &mut [u8]) -> impl Future<Output = io::Result<usize>> + Send {
        TcpStream::read(self, buf)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }

    fn try_write(&self, data: &[u8]) -> io::Result<usize> {
        TcpStream::try_write(self, data)
    }

    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::writable(self)
    }

    fn write_all(&self, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::write_all(self, data)
    }

    fn shutdown_write(&self) -> io::Result<()> {
        TcpStream::shutdown_write(self)
    }

    fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        TcpStream::set_nodelay(self, nodelay)
    }

    fn into_std(self) -> io::Result<std::net::TcpStream> {
        TcpStream::into_std(self)
    }
}

impl crate::Listener for TcpListener {
    type Stream = TcpStream;

    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;

    /// Runs `f` on a loop of this thread, a tokio runtime entered for timers (as the server does).
    fn run<F>(f: F) -> F::Output
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let tokio_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _entered = tokio_rt.enter();
        Runtime::new().unwrap().block_on(f).unwrap()
    }

    /// A connection's two ends, blocking.
    fn std_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// A blocking client and the server's end of its connection, on the loop.
    fn pair() -> (std::net::TcpStream, TcpStream) {
        let (client, server) = std_pair();
        (client, TcpStream::from_std(server).unwrap())
    }

    /// Waits (bounded) until `s` is readable; false when it is not within `within`.
    async fn readable_within(s: &TcpStream, within: Duration) -> bool {
        tokio::time::timeout(within, s.readable()).await.is_ok()
    }

    #[test]
    fn a_draining_read_clears_readiness_and_loses_no_later_bytes() {
        run(async {
            let (mut client, server) = pair();
            client.write_all(b"abc").unwrap();
            assert!(readable_within(&server, Duration::from_secs(5)).await);
            let mut buf = Vec::with_capacity(64);
            assert_eq!(server.try_read_vec(&mut buf).unwrap(), 3);
            // Drained: no readiness left over, so nothing to find without new bytes.
            assert!(!readable_within(&server, Duration::from_millis(50)).await);
            let again = server.try_read_vec(&mut buf).unwrap_err();
            assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
            // New bytes wake the waiter.
            client.write_all(b"def").unwrap();
            assert!(readable_within(&server, Duration::from_secs(5)).await);
            assert_eq!(server.try_read_vec(&mut buf).unwrap(), 3);
            assert_eq!(buf, b"abcdef");
            // End of stream is 0, not an error, and stays readable.
            drop(client);
            assert!(readable_within(&server, Duration::from_secs(5)).await);
            assert_eq!(server.read_vec(&mut buf).await.unwrap(), 0);
            assert_eq!(server.read_vec(&mut buf).await.unwrap(), 0);
        });
    }

    #[test]
    fn a_read_that_fills_the_buffer_keeps_readiness_for_the_rest() {
        run(async {
            let (mut client, server) = pair();
            client.write_all(&[7u8; 100]).unwrap();
            // Wait (bounded) until all 100 bytes are there, so the first read surely stops at
            // the room.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut peek = [0u8; 128];
            while server.socket.peek(&mut peek).unwrap_or(0) < 100 {
                assert!(Instant::now() < deadline, "the bytes never arrived");
                std::thread::yield_now();
            }
            assert!(readable_within(&server, Duration::from_secs(5)).await);
            let mut buf = Vec::with_capacity(40);
            let room = buf.capacity();
            assert_eq!(server.try_read_vec(&mut buf).unwrap(), room);
            // The socket still holds bytes and the readiness says so: no new event is needed.
            assert!(readable_within(&server, Duration::from_millis(50)).await);
            let mut into = [0u8; 100];
            let mut total = buf.len();
            while total < 100 {
                total += server.read(&mut into[..100 - total]).await.unwrap();
            }
            assert_eq!(total, 100);
        });
    }

    #[test]
    fn now_is_read_once_a_turn() {
        let before = Instant::now();
        let (first, same, next) = run(async {
            let first = now();
            std::thread::sleep(Duration::from_millis(2));
            let same = now();
            // Polled again in the next turn, after a look at the kernel's events.
            yield_once().await;
            (first, same, now())
        });
        assert!(first >= before);
        assert_eq!(first, same, "one reading through the turn");
        assert!(next >= first + Duration::from_millis(2), "read again in the next turn");
        // Off a loop: the clock.
        let off = now();
        assert!(off >= next && off <= Instant::now());
    }

    #[test]
    fn block_on_returns_the_output_and_drops_the_tasks_still_running() {
        let dropped = Arc::new(AtomicBool::new(false));
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let guard = SetOnDrop(Arc::clone(&dropped));
        let out = run(async move {
            spawn(async move {
                let _guard = guard;
                std::future::pending::<()>().await;
            });
            // Tasks on one loop wake each other.
            let (tx, rx) = tokio::sync::oneshot::channel();
            spawn(async move {
                let _ = tx.send(40);
            });
            rx.await.unwrap() + 2
        });
        assert_eq!(out, 42);
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[test]
    fn a_wake_from_another_thread_reaches_the_waiting_loop() {
        let got = run(async {
            let (tx, mut rx) = tokio::sync::oneshot::channel();
            let (go, wait) = std::sync::mpsc::channel::<()>();
            let sender = std::thread::spawn(move || {
                wait.recv().unwrap();
                tx.send(7).unwrap();
            });
            // The sender sends only once the receiver waits: the wake comes from its thread.
            let mut go = Some(go);
            let got = poll_fn(|cx| {
                let polled = Pin::new(&mut rx).poll(cx);
                if polled.is_pending() {
                    if let Some(go) = go.take() {
                        go.send(()).unwrap();
                    }
                }
                polled
            })
            .await;
            sender.join().unwrap();
            got.unwrap()
        });
        assert_eq!(got, 7);
    }

    #[test]
    fn write_all_waits_for_room_and_delivers_every_byte() {
        const LEN: usize = 8 * 1024 * 1024;
        let received = run(async {
            let (client, server) = pair();
            // More than loopback's socket buffers hold: writes wait for the reader.
            let reader = std::thread::spawn(move || {
                let mut client = client;
                let mut all = Vec::new();
                client.read_to_end(&mut all).unwrap();
                all
            });
            let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
            server.write_all(&data).await.unwrap();
            server.shutdown_write().unwrap();
            let all = tokio::task::spawn_blocking(move || reader.join().unwrap())
                .await
                .unwrap();
            (all, data)
        });
        assert_eq!(received.0.len(), LEN);
        assert!(received.0 == received.1);
    }

    #[test]
    fn connect_reaches_a_listener_and_fails_on_a_closed_port() {
        run(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut accepted, _) = listener.accept().unwrap();
            stream.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            accepted.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
            drop(listener);
            let refused = TcpStream::connect(addr).await.unwrap_err();
            assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        });
    }

    #[test]
    fn accept_gives_each_connection_with_its_peer() {
        run(async {
            let listener = TcpListener::from_std(std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            // One waiting before the first accept, one arriving while it waits.
            let first = std::net::TcpStream::connect(addr).unwrap();
            let (a, peer_a) = listener.accept().await.unwrap();
            assert_eq!(peer_a, first.local_addr().unwrap());
            assert_eq!(a.peer_addr().unwrap(), peer_a);
            let connector = std::thread::spawn(move || std::net::TcpStream::connect(addr).unwrap());
            let (_b, peer_b) = listener.accept().await.unwrap();
            let second = tokio::task::spawn_blocking(move || connector.join().unwrap())
                .await
                .unwrap();
            assert_eq!(peer_b, second.local_addr().unwrap());
        });
    }

    #[test]
    fn into_std_hands_the_socket_over_with_its_unread_bytes() {
        run(async {
            let (mut client, server) = pair();
            client.write_all(b"hello").unwrap();
            assert!(readable_within(&server, Duration::from_secs(5)).await);
            let mut socket = server.into_std().unwrap();
            socket.set_nonblocking(false).unwrap();
            let mut got = [0u8; 5];
            socket.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hello");
            // The loop forgot it: its slot is free again.
            assert_eq!(IO.with_borrow(Slab::len), 0);
        });
    }

    /// Ready after waking itself once: lets the loop run the others.
    async fn yield_once() {
        let mut yielded = false;
        poll_fn(|cx| {
            if std::mem::replace(&mut yielded, true) {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
        .await;
    }

    #[test]
    fn a_task_that_panics_is_dropped_and_the_others_carry_on() {
        let out = run(async {
            spawn(async { panic!("a bug in one connection") });
            let (tx, rx) = tokio::sync::oneshot::channel();
            spawn(async move {
                yield_once().await;
                let _ = tx.send(5);
            });
            rx.await.unwrap()
        });
        assert_eq!(out, 5);
    }

    #[test]
    fn the_root_futures_panic_comes_out_of_block_on() {
        let caught = std::panic::catch_unwind(|| run(async { panic!("the root's own") }));
        let panic = caught.unwrap_err();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"the root's own"));
    }

    #[test]
    fn a_connection_that_always_has_bytes_does_not_starve_the_others() {
        const SENT: usize = 1024 * 1024;
        let read_by_then = run(async {
            let (client, server) = pair();
            // A megabyte waiting in the socket, read a byte at a time: every read fills its
            // buffer, so the readiness stays and the reads never have to wait.
            let writer = std::thread::spawn(move || {
                let mut client = client;
                client.write_all(&vec![1u8; SENT]).unwrap();
                client
            });
            let read = Rc::new(Cell::new(0usize));
            let counted = Rc::clone(&read);
            spawn(async move {
                let mut byte = [0u8; 1];
                while server.read(&mut byte).await.unwrap_or(0) == 1 {
                    counted.set(counted.get() + 1);
                }
            });
            // Wait until the hog is reading, then see that this task still gets its turns.
            while read.get() == 0 {
                yield_once().await;
            }
            for _ in 0..3 {
                yield_once().await;
            }
            let read_by_then = read.get();
            drop(tokio::task::spawn_blocking(move || writer.join()).await);
            read_by_then
        });
        assert!(
            read_by_then < SENT / 2,
            "the other task waited for {read_by_then} reads"
        );
    }

    #[test]
    fn sockets_need_a_loop() {
        let (_client, server) = std_pair();
        let err = TcpStream::from_std(server).unwrap_err();
        assert_eq!(err.to_string(), "socket used outside its event loop");
    }

    #[test]
    fn wakes_from_another_thread_each_reach_the_loop_through_its_waker() {
        const ROUNDS: usize = 200;
        // One sender thread; each round it wakes the loop while the loop sleeps in the kernel.
        let sum = run(async {
            let (tx, rx) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<usize>>();
            let sender = std::thread::spawn(move || {
                for (i, reply) in rx.iter().enumerate() {
                    std::thread::sleep(Duration::from_micros(200));
                    let _ = reply.send(i);
                }
            });
            let mut sum = 0;
            for _ in 0..ROUNDS {
                let (reply, answer) = tokio::sync::oneshot::channel();
                tx.send(reply).unwrap();
                sum += answer.await.unwrap();
            }
            drop(tx);
            drop(tokio::task::spawn_blocking(move || sender.join()).await);
            // Many at once: the list fills while the loop is awake, one wake-up or several.
            let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
            for i in 0..ROUNDS {
                let (reply, answer) = tokio::sync::oneshot::channel();
                std::thread::spawn(move || reply.send(i).unwrap());
                let done_tx = done_tx.clone();
                spawn(async move { done_tx.send(answer.await.unwrap()).unwrap() });
            }
            drop(done_tx);
            while let Some(i) = done_rx.recv().await {
                sum += i;
            }
            sum
        });
        assert_eq!(sum, 2 * (0..ROUNDS).sum::<usize>());
    }

    #[test]
    fn a_task_that_panics_while_it_holds_a_socket_frees_it() {
        let (out, sockets_left) = run(async {
            let (mut client, server) = pair();
            let (go, woken) = tokio::sync::oneshot::channel::<()>();
            spawn(async move {
                let _server = server;
                // Panics in a later poll, woken from another thread (a tokio timer's).
                let _ = woken.await;
                panic!("a bug in one connection");
            });
            yield_once().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            go.send(()).unwrap();
            // The panicked task's socket closes: the client reads the end of the stream.
            let read = tokio::task::spawn_blocking(move || client.read(&mut [0u8; 8]))
                .await
                .unwrap();
            (read.unwrap(), IO.with_borrow(Slab::len))
        });
        assert_eq!(out, 0);
        assert_eq!(sockets_left, 0);
    }

    #[test]
    fn a_spawned_task_holds_its_future_once() {
        // An idle connection's memory is mostly its task's future: the wrapper adds its guard.
        async fn large() {
            let buf = [0u8; 1024];
            yield_once().await;
            std::hint::black_box(&buf);
        }
        let future = large();
        let alone = std::mem::size_of_val(&future);
        let tracked = Tracked {
            future: Box::pin(future),
            _finished: Finished(0),
        };
        let Tracked { future, .. } = &tracked;
        assert_eq!(std::mem::size_of_val(&**future), alone);
        assert!(std::mem::size_of_val(&tracked) <= 32);
    }

    #[test]
    fn a_spent_budget_fails_reads_without_a_system_call_and_the_wait_yields() {
        run(async {
            let (mut client, server) = pair();
            client.write_all(&[1u8; 4 * BUDGET as usize]).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut peek = [0u8; 4 * BUDGET as usize];
            while server.socket.peek(&mut peek).unwrap_or(0) < peek.len() {
                assert!(Instant::now() < deadline, "the bytes never arrived");
                std::thread::yield_now();
            }
            assert!(readable_within(&server, Duration::from_secs(5)).await);
            let other_ran = Rc::new(Cell::new(false));
            let set = Rc::clone(&other_ran);
            spawn(async move { set.set(true) });
            // Byte by byte in one poll: each read fills its buffer, so the readiness stays.
            let mut reads = 0;
            let mut byte = [0u8; 1];
            let spent = loop {
                match server
                    .io
                    .transfer(Direction::Read, || server.recv(&mut byte), short_of(1))
                {
                    Ok(1) => reads += 1,
                    other => break other.unwrap_err(),
                }
            };
            assert_eq!(spent.kind(), io::ErrorKind::WouldBlock);
            assert!(reads < BUDGET && reads + 2 >= BUDGET, "{reads} reads in one poll");
            assert!(!other_ran.get());
            // The readiness was kept; the wait yields once, and the other task has its turn.
            server.readable().await.unwrap();
            assert!(other_ran.get());
            assert_eq!(server.read(&mut byte).await.unwrap(), 1);
        });
    }
}
