//! Wall-clock seconds without a wall-clock read per request.
//!
//! Route cookies carry their issue time in Unix seconds, so every fast-path request needs the
//! wall clock (to check a cookie's age, to mint a Set-Cookie) besides the monotonic reading it
//! takes anyway for its deadlines and latency. A clock read costs ~25 ns on the benchmark machine
//! (a VM), and this was one of a request's three; here the wall clock is derived from the
//! request's monotonic reading and an offset between the two clocks taken again once a second.
//! A step of the wall clock (NTP, an operator) is therefore seen within a second, and in between
//! the derived time runs with the monotonic clock, never backwards.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// How long an offset between the clocks is used before it is measured again, in milliseconds.
const REFRESH_MS: u64 = 1000;

/// Unix time from monotonic readings; one per worker (its fast state).
#[derive(Debug)]
pub(super) struct WallClock {
    /// Monotonic readings count from here.
    epoch: Instant,
    /// The wall clock at `epoch` in Unix milliseconds, as last measured (each value stored is a
    /// whole measurement, so a reader never mixes two).
    offset_ms: AtomicU64,
    /// Milliseconds after `epoch` from which `offset_ms` is measured again (0: never measured).
    until_ms: AtomicU64,
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock {
            epoch: Instant::now(),
            offset_ms: AtomicU64::new(0),
            until_ms: AtomicU64::new(0),
        }
    }
}

impl WallClock {
    /// Unix seconds at the monotonic reading `at`.
    pub(super) fn unix_secs(&self, at: Instant) -> u64 {
        let ms = u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX);
        if ms < self.until_ms.load(Relaxed) {
            return self.offset_ms.load(Relaxed).saturating_add(ms) / 1000;
        }
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.offset_ms.store(unix_ms.saturating_sub(ms), Relaxed);
        self.until_ms.store(ms.saturating_add(REFRESH_MS), Relaxed);
        unix_ms / 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn unix_now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn derived_seconds_follow_the_wall_clock() {
        let clock = WallClock::default();
        let start = Instant::now();
        let before = unix_now();
        let first = clock.unix_secs(start);
        assert!((before..=unix_now()).contains(&first), "read at the first call");
        let until = clock.until_ms.load(Relaxed);

        // Within the refresh period: derived from the monotonic reading, no wall-clock read.
        let later = clock.unix_secs(start + Duration::from_millis(400));
        assert!((first..=first + 1).contains(&later), "{later} after {first}");
        assert_eq!(clock.until_ms.load(Relaxed), until, "not read again");
        assert_eq!(clock.unix_secs(start), first, "the same reading, the same second");

        // Past it: read again.
        let past = Instant::now() + Duration::from_millis(REFRESH_MS + 1);
        let before = unix_now();
        let again = clock.unix_secs(past);
        assert!(clock.until_ms.load(Relaxed) > until, "read again");
        assert!((before..=unix_now()).contains(&again));
    }
}
