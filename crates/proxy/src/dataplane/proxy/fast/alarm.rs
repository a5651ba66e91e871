//! Deadlines for the fast path's client connections, kept by one sweeper task per worker.
//!
//! A tokio timer per connection costs a few hundred instructions per request even when it never
//! fires: it is re-armed for every response deadline and idle wait, and polled in every wait.
//! Here a connection's deadline is one number in its [`Alarm`], set with a store, and its task's
//! waker is handed over once per connection; a sweeper walks the alarms a few times per timeout
//! and wakes the connections whose deadline has passed, and all of them when the worker stops.
//!
//! The price is precision: an alarm rings after its deadline, never before, and at most about
//! two sweeps late (a sweep every [`SWEEPS_PER_TIMEOUT`]th of the shortest timeout, at least
//! every [`MAX_SWEEP`]). Timeouts are seconds in practice, so that is far below what matters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Sweeps per shortest timeout.
const SWEEPS_PER_TIMEOUT: u32 = 8;
/// The longest time between sweeps.
const MAX_SWEEP: Duration = Duration::from_millis(250);
/// The shortest time between sweeps.
const MIN_SWEEP: Duration = Duration::from_millis(1);
/// No deadline.
const NEVER: u64 = u64::MAX;
/// The deadline passed and the sweeper rang.
const RUNG: u64 = u64::MAX - 1;

/// The alarms of one worker's connections.
#[derive(Debug)]
pub(super) struct Alarms {
    /// Times are milliseconds since this.
    epoch: Instant,
    slots: Mutex<Slots>,
    /// Set once the worker stops: every waiting connection is woken.
    stopping: AtomicBool,
    /// Wakes the sweeper when the first alarm is registered.
    registered: Notify,
}

#[derive(Debug, Default)]
struct Slots {
    alarms: Vec<Option<Arc<Alarm>>>,
    free: Vec<usize>,
}

impl Slots {
    fn is_empty(&self) -> bool {
        self.free.len() == self.alarms.len()
    }
}

/// One connection's deadline and the waker of the task that waits for it.
#[derive(Debug)]
struct Alarm {
    /// Milliseconds since the epoch (rounded up); [`NEVER`] when none, [`RUNG`] once rung.
    deadline: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl Default for Alarms {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            slots: Mutex::default(),
            stopping: AtomicBool::new(false),
            registered: Notify::new(),
        }
    }
}

impl Alarms {
    /// An alarm for one connection, unset; it is removed when the handle is dropped.
    pub(super) fn register(&self) -> AlarmHandle<'_> {
        let alarm = Arc::new(Alarm {
            deadline: AtomicU64::new(NEVER),
            waker: Mutex::new(None),
        });
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let was_empty = slots.is_empty();
        let slot = match slots.free.pop() {
            Some(i) => {
                slots.alarms[i] = Some(Arc::clone(&alarm));
                i
            }
            None => {
                slots.alarms.push(Some(Arc::clone(&alarm)));
                slots.alarms.len() - 1
            }
        };
        drop(slots);
        if was_empty {
            self.registered.notify_one();
        }
        AlarmHandle {
            alarms: self,
            slot,
            alarm,
            waker: None,
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        // Rounded up: an alarm never rings before its deadline.
        let since = at.saturating_duration_since(self.epoch);
        let ms = since.as_secs().saturating_mul(1000);
        ms.saturating_add(u64::from(since.subsec_nanos().div_ceil(1_000_000)))
            .min(RUNG - 1)
    }

    /// Whether the worker is stopping (the sweeper saw the shutdown).
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Rings the alarms whose deadline has passed at `now`, and wakes every waiting task when
    /// `all`.
    fn ring(&self, now: Instant, all: bool) {
        // Truncated, where deadlines are rounded up: a deadline passed only when `now` is at or
        // past it.
        let now = u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(RUNG - 1);
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for alarm in slots.alarms.iter().flatten() {
            let deadline = alarm.deadline.load(Ordering::Relaxed);
            // Compare-and-swap: a deadline the connection moved meanwhile is not rung.
            let rung = deadline <= now
                && alarm
                    .deadline
                    .compare_exchange(deadline, RUNG, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok();
            if rung || all {
                if let Some(w) = alarm.waker.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    w.wake_by_ref();
                }
            }
        }
    }

    /// Sweeps until dropped: every `period()` while any alarm is registered, and wakes every
    /// connection once `shutdown` is cancelled (idle ones then close; ones with a request in
    /// flight finish it, still under their deadlines).
    pub(super) async fn sweep(&self, shutdown: CancellationToken, period: impl Fn() -> Duration) {
        let mut stop_seen = false;
        loop {
            let idle = self.slots.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
            if idle {
                tokio::select! {
                    () = self.registered.notified() => {}
                    () = shutdown.cancelled(), if !stop_seen => {}
                }
            } else {
                let pause = period().clamp(MIN_SWEEP, MAX_SWEEP);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.cancelled(), if !stop_seen => {}
                }
            }
            let stop_now = !stop_seen && shutdown.is_cancelled();
            if stop_now {
                stop_seen = true;
                self.stopping.store(true, Ordering::Relaxed);
            }
            self.ring(Instant::now(), stop_now);
        }
    }
}

/// How often to sweep for timeouts as short as `shortest`.
pub(super) fn sweep_period(shortest: Duration) -> Duration {
    shortest / SWEEPS_PER_TIMEOUT
}

/// A connection's alarm; see the module docs.
#[derive(Debug)]
pub(super) struct AlarmHandle<'a> {
    alarms: &'a Alarms,
    slot: usize,
    alarm: Arc<Alarm>,
    /// The waker handed over last (a connection's task keeps its waker: handed over once).
    waker: Option<Waker>,
}

impl AlarmHandle<'_> {
    /// Sets the deadline to `at`, replacing any earlier one (rung or not).
    pub(super) fn set(&self, at: Instant) {
        self.alarm.deadline.store(self.alarms.millis(at), Ordering::Relaxed);
    }

    /// Ready once the deadline has passed (the sweeper rang the alarm), or, with `or_stop`,
    /// once the worker is stopping. A pending poll makes sure the sweeper will wake the task.
    pub(super) fn poll_rung(&mut self, cx: &mut Context<'_>, or_stop: bool) -> Poll<()> {
        let rung = |h: &Self| h.alarm.deadline.load(Ordering::Relaxed) == RUNG || (or_stop && h.alarms.stopping());
        if rung(self) {
            return Poll::Ready(());
        }
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let w = cx.waker().clone();
            *self.alarm.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(w.clone());
            self.waker = Some(w);
            // Rung while the waker was handed over: the sweeper may have found none.
            if rung(self) {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }

    /// Waits until [`poll_rung`](Self::poll_rung) is ready.
    pub(super) async fn rung(&mut self, or_stop: bool) {
        std::future::poll_fn(|cx| self.poll_rung(cx, or_stop)).await
    }
}

impl Drop for AlarmHandle<'_> {
    fn drop(&mut self) {
        let mut slots = self.alarms.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.alarms[self.slot] = None;
        slots.free.push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_millis(10);

    /// Alarms with their sweeper running (on paused time: it advances when all tasks wait).
    fn swept(shutdown: &CancellationToken) -> Arc<Alarms> {
        let alarms = Arc::new(Alarms::default());
        let sweeper = Arc::clone(&alarms);
        let shutdown = shutdown.clone();
        tokio::spawn(async move { sweeper.sweep(shutdown, || PERIOD).await });
        alarms
    }

    #[tokio::test(start_paused = true)]
    async fn an_alarm_rings_after_its_deadline_never_before_and_within_two_sweeps() {
        let shutdown = CancellationToken::new();
        let alarms = swept(&shutdown);
        let mut alarm = alarms.register();
        let start = Instant::now();
        let deadline = start + Duration::from_millis(95);
        alarm.set(deadline);
        alarm.rung(false).await;
        let late = Instant::now().saturating_duration_since(deadline);
        assert!(Instant::now() >= deadline, "rang early");
        assert!(late <= 2 * PERIOD, "rang {late:?} late");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_later_is_not_rung_at_the_old_one() {
        let shutdown = CancellationToken::new();
        let alarms = swept(&shutdown);
        let mut alarm = alarms.register();
        let start = Instant::now();
        alarm.set(start + Duration::from_millis(30));
        // Before it passes, the deadline moves (as at every request of a busy connection).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let later = start + Duration::from_millis(200);
        alarm.set(later);
        alarm.rung(false).await;
        assert!(Instant::now() >= later, "rang at the old deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn the_shutdown_wakes_idle_waits_but_not_response_waits() {
        let shutdown = CancellationToken::new();
        let alarms = swept(&shutdown);
        let mut idle = alarms.register();
        let mut busy = alarms.register();
        let start = Instant::now();
        idle.set(start + Duration::from_secs(60));
        let busy_deadline = start + Duration::from_secs(1);
        busy.set(busy_deadline);
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stopper.cancel();
        });
        idle.rung(true).await;
        assert!(
            Instant::now() < start + Duration::from_millis(100),
            "the idle wait ends at the shutdown"
        );
        // A response wait keeps its deadline through the shutdown (the request finishes).
        busy.rung(false).await;
        assert!(Instant::now() >= busy_deadline);
        // And a wait that starts after the shutdown ends at once.
        tokio::time::timeout(Duration::from_millis(1), busy.rung(true))
            .await
            .expect("stopping: an idle wait ends at once");
    }

    #[tokio::test]
    async fn slots_of_dropped_alarms_are_reused() {
        let alarms = Alarms::default();
        let a = alarms.register();
        let b = alarms.register();
        drop(a);
        let c = alarms.register();
        assert_eq!(c.slot, 0);
        drop((b, c));
        let slots = alarms.slots.lock().unwrap();
        assert!(slots.is_empty());
        assert_eq!(slots.alarms.len(), 2, "no growth beyond the most at once");
    }

    #[test]
    fn deadlines_round_up_and_the_sweep_rounds_down() {
        let alarms = Alarms::default();
        let at = alarms.epoch + Duration::from_micros(1_500);
        assert_eq!(alarms.millis(at), 2);
        // 1.9 ms after the epoch the sweep must not ring a deadline of 1.5 ms rounded to 2 ms.
        let handle = alarms.register();
        handle.set(at);
        alarms.ring(alarms.epoch + Duration::from_micros(1_900), false);
        assert_eq!(handle.alarm.deadline.load(Ordering::Relaxed), 2);
        alarms.ring(alarms.epoch + Duration::from_micros(2_000), false);
        assert_eq!(handle.alarm.deadline.load(Ordering::Relaxed), RUNG);
    }
}
