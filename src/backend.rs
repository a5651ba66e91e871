//! The backends (KBS replicas): who they are, how busy, and whether they answered lately.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};

use crate::route_cookie::BackendId;

/// One replica behind the proxy. Shared by every worker; counters are atomics.
#[derive(Debug)]
pub struct Backend {
    /// Stable name (`NAME=URL` on the command line, else `host:port`); the cookie id derives from it.
    pub name: String,
    /// Hash of `name` carried in route cookies.
    pub id: BackendId,
    /// `http` (TLS to backends comes with `https`).
    pub scheme: Scheme,
    /// `host:port` the proxy connects to; the pool keys connections by it.
    pub authority: Authority,
    /// Requests sent and not yet answered in full, for least-requests balancing.
    in_flight: AtomicUsize,
    /// Passive health from real traffic: connect failures put the backend aside for a while.
    health: PassiveHealth,
}

impl Backend {
    /// A backend named `name` reached at `scheme://authority`.
    pub fn new(name: String, scheme: Scheme, authority: Authority) -> Self {
        Self {
            id: BackendId::from_name(&name),
            name,
            scheme,
            authority,
            in_flight: AtomicUsize::new(0),
            health: PassiveHealth::default(),
        }
    }

    /// Requests in flight right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the returned guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Whether new sessions may be sent here: not inside a back-off after connect failures.
    pub fn is_available(&self) -> bool {
        self.health.is_available()
    }

    /// Records that a connection could not be made (refused, unreachable, connect timeout).
    pub fn record_connect_failure(&self) {
        self.health.record_failure();
    }

    /// Records a response: the backend is reachable.
    pub fn record_success(&self) {
        self.health.record_success();
    }
}

/// Keeps a backend's in-flight count raised while alive.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Back-off after connect failures: 1 s after the first, doubling per consecutive failure up to
/// 30 s; any response clears it. A backend in back-off gets no new sessions.
#[derive(Debug, Default)]
struct PassiveHealth {
    /// Consecutive connect failures.
    failures: AtomicU32,
    /// Milliseconds since [`epoch`] before which the backend is set aside; 0 when available.
    down_until_ms: AtomicU64,
}

const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl PassiveHealth {
    fn is_available(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until == 0 || now_ms() >= until
    }

    fn record_failure(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = BACKOFF_FIRST.saturating_mul(1 << n).min(BACKOFF_MAX);
        let until = now_ms() + u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
        self.down_until_ms.store(until.max(1), Ordering::Relaxed);
    }

    fn record_success(&self) {
        // Loads first: the common case (healthy) writes nothing and keeps the line shared.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.down_until_ms.load(Ordering::Relaxed) != 0 {
            self.down_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// A monotonic time base for atomics that store instants as milliseconds.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// An immutable snapshot of the backend set, swapped whole when it changes.
#[derive(Debug, Default)]
pub struct Backends {
    /// In configuration order; positions mean nothing to clients (cookies carry ids).
    pub list: Vec<Arc<Backend>>,
}

impl Backends {
    /// The backend a cookie names, if it is still configured.
    pub fn by_id(&self, id: BackendId) -> Option<&Arc<Backend>> {
        self.list.iter().find(|b| b.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str) -> Arc<Backend> {
        Arc::new(Backend::new(
            name.into(),
            Scheme::HTTP,
            Authority::from_static("127.0.0.1:1"),
        ))
    }

    #[test]
    fn connect_failure_sets_aside_until_success() {
        let b = backend("a");
        assert!(b.is_available());
        b.record_connect_failure();
        assert!(!b.is_available());
        b.record_success();
        assert!(b.is_available());
    }

    #[test]
    fn in_flight_follows_guards() {
        let b = backend("a");
        let g1 = b.start_request();
        let g2 = b.start_request();
        assert_eq!(b.in_flight(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(b.in_flight(), 0);
    }

    #[test]
    fn lookup_by_id() {
        let set = Backends {
            list: vec![backend("a"), backend("b")],
        };
        assert_eq!(set.by_id(BackendId::from_name("b")).unwrap().name, "b");
        assert!(set.by_id(BackendId::from_name("c")).is_none());
    }
}
