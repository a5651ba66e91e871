//! The fast path's byte buffers, reused through a free list per thread.
//!
//! A worker is one thread with its own runtime, so a thread-local list is a per-worker list
//! without a lock. A [`Buf`] goes back to the list when dropped, on every path, errors included.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Capacity a buffer starts with: a request or response head and a small body. Every request in
/// flight holds up to three, so this bounds the memory a burst of requests takes (and glibc
/// keeps as RSS afterwards).
pub(crate) const BUF_SIZE: usize = 4 * 1024;
/// What a body copy reads at a time; its buffer grows to this.
pub(crate) const STREAM_CHUNK: usize = 16 * 1024;
/// Buffers kept on a thread's free list.
const FREE_BUFFERS: usize = 256;
/// A buffer grown past this (a huge head) is freed rather than kept.
const KEEP_AT_MOST: usize = 4 * STREAM_CHUNK;

/// A thread's spare buffers and how many it has handed out (one thread-local: one lookup).
struct Pool {
    free: Vec<Vec<u8>>,
    /// Written by this thread only (a load and a store, no atomic read-modify-write), read by
    /// [`in_use`] from any.
    in_use: Arc<AtomicUsize>,
}

impl Pool {
    fn new() -> Self {
        let in_use = Arc::new(AtomicUsize::new(0));
        IN_USE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&in_use));
        Pool {
            free: Vec::new(),
            in_use,
        }
    }

    fn count(&self, taken: bool) {
        let n = self.in_use.load(Ordering::Relaxed);
        let n = if taken { n + 1 } else { n.saturating_sub(1) };
        self.in_use.store(n, Ordering::Relaxed);
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::new());
}

/// Every live thread's count of buffers handed out (a thread's goes with its free list).
static IN_USE: Mutex<Vec<Weak<AtomicUsize>>> = Mutex::new(Vec::new());

/// Buffers the fast path holds right now (out of the free lists), over all threads: the
/// requests in flight hold up to three each, an idle connection none.
pub fn in_use() -> usize {
    let mut counts = IN_USE.lock().unwrap_or_else(|p| p.into_inner());
    counts.retain(|c| c.strong_count() > 0);
    counts
        .iter()
        .filter_map(Weak::upgrade)
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
}

/// A byte buffer from the thread's free list; returned to it on drop. An empty `Buf` (no
/// capacity) holds no memory: an idle connection keeps one of those.
#[derive(Debug, Default)]
pub(crate) struct Buf(Vec<u8>);

impl Buf {
    /// A cleared buffer with at least [`BUF_SIZE`] bytes of capacity.
    pub fn take() -> Self {
        let spare = POOL.with_borrow_mut(|p| {
            p.count(true);
            p.free.pop()
        });
        let mut b = spare.unwrap_or_default();
        b.clear();
        if b.capacity() < BUF_SIZE {
            b.reserve(BUF_SIZE);
        }
        Buf(b)
    }

    /// Gives the memory back to the free list, leaving this buffer empty.
    pub fn release(&mut self) {
        if self.0.capacity() == 0 {
            return;
        }
        let b = std::mem::take(&mut self.0);
        // `try_with`: a buffer dropped while the thread's locals are torn down is just freed.
        let _ = POOL.try_with(|pool| {
            if let Ok(mut pool) = pool.try_borrow_mut() {
                pool.count(false);
                if b.capacity() <= KEEP_AT_MOST && pool.free.len() < FREE_BUFFERS {
                    pool.free.push(b);
                }
            }
        });
    }

    /// The bytes, leaving nothing to the free list.
    pub(crate) fn into_vec(mut self) -> Vec<u8> {
        if self.0.capacity() > 0 {
            POOL.with_borrow(|p| p.count(false));
        }
        std::mem::take(&mut self.0)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        self.release();
    }
}

impl Deref for Buf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_cleared_and_huge_ones_are_freed() {
        let mut a = Buf::take();
        a.extend_from_slice(b"secret bytes");
        let ptr = a.as_ptr();
        drop(a);
        let b = Buf::take();
        assert!(b.is_empty() && b.capacity() >= BUF_SIZE);
        assert_eq!(b.as_ptr(), ptr, "the same memory, reused");
        drop(b);

        let pooled = || POOL.with_borrow(|p| p.free.len());
        let before = pooled();
        let mut huge = Buf::take();
        huge.reserve(KEEP_AT_MOST * 2);
        drop(huge);
        assert_eq!(pooled(), before - 1, "a huge buffer is freed, not kept");
        drop(Buf::take());
        assert_eq!(pooled(), (before - 1).max(1), "a buffer taken and dropped is kept");

        let mut idle = Buf::take();
        idle.release();
        assert_eq!(idle.capacity(), 0, "an idle connection holds no memory");
        assert_eq!(Buf::take().into_vec().len(), 0);
    }
}
