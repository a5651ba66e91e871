//! The backends (KBS replicas): who they are, how busy, whether they are healthy or draining.
//!
//! "Enabled" and "healthy" are kept apart (as Pingora does): health is what checks and traffic
//! observe, draining is what an operator or discovery decided. New sessions need both healthy and
//! not draining; requests pinned to a backend need it healthy and, when draining, still within
//! the drain timeout.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};

use crate::kbs::RouteKind;
use crate::routing::route_cookie::BackendId;

/// One replica behind the proxy. Shared by every worker; all state is atomics.
#[derive(Debug)]
pub struct Backend {
    /// Stable name (`NAME=URL`, else `host:port`; the address for discovered backends); the
    /// cookie id derives from it.
    pub name: String,
    /// Hash of `name` carried in route cookies.
    pub id: BackendId,
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host:port` the proxy connects to; the pool keys connections by it.
    pub authority: Authority,
    /// For `https`: the name its certificate must carry, sent as SNI.
    pub tls_name: String,
    /// Set when the backend left the configured or discovered set: it only drains, and an
    /// operator cannot undrain it.
    retired: AtomicBool,
    /// Requests sent and not yet answered in full, for least-requests balancing.
    in_flight: AtomicUsize,
    /// Passive health from real traffic: connect failures put the backend aside for a while.
    passive: PassiveHealth,
    /// Active checks' verdict, after hysteresis. Starts healthy so a new backend takes traffic
    /// before its first check; the first failed checks take it out.
    healthy: AtomicBool,
    /// Consecutive active-check results of the current kind (positive: successes).
    streak: AtomicU32,
    /// Whether the last active check succeeded (to know what `streak` counts).
    last_check_ok: AtomicBool,
    /// Milliseconds since [`epoch`] when draining began; 0 when not draining.
    drain_since_ms: AtomicU64,
    /// Admin writes in the journal this backend has not applied; it takes no new sessions
    /// until caught up.
    journal_lag: AtomicU64,
    /// Counters for metrics and `/backends`.
    pub stats: BackendStats,
}

/// Per-backend counters, incremented on the request path without locks.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Responses by route kind and status class (1xx..5xx), indexed by [`route_index`] and
    /// `status / 100 - 1`.
    pub responses: [[AtomicU64; 5]; 5],
    /// Route cookies issued pinning this backend (sessions pinned since start).
    pub sessions_pinned: AtomicU64,
    /// Pinned requests refused with a KBS 401 because this backend was down, drained or gone.
    pub pinned_refused: AtomicU64,
    /// Active health transitions to up.
    pub went_up: AtomicU64,
    /// Active health transitions to down.
    pub went_down: AtomicU64,
    /// Passive ejections after failed connects or timeouts on real traffic.
    pub ejections: AtomicU64,
    /// Times the replica was found to have (possibly) lost its state and was resynced.
    pub state_resets: AtomicU64,
    /// Journal writes replayed to it (catch-ups and reconciliations), by outcome, indexed as
    /// [`REPLAY_OUTCOMES`].
    pub replays: [AtomicU64; 4],
    /// Time from request sent to response head, both transports.
    pub response_latency: crate::control::metrics::ResponseLatency,
    /// Failed exchanges on real traffic, by [`UpstreamCause`].
    upstream_errors: [AtomicU64; UpstreamCause::ALL.len()],
    /// Requests re-sent elsewhere after it refused the connection.
    pub retries: AtomicU64,
}

/// Why an exchange with a backend failed: the `cause` of `kbs_proxy_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamCause {
    /// No connection: refused, unreachable, or the TLS handshake refused.
    ConnectRefused,
    /// No connection within the connect timeout.
    ConnectTimeout,
    /// No response head within the response timeout.
    ResponseTimeout,
    /// The connection closed or was reset before a response head.
    Reset,
    /// Something that is not an HTTP/1.1 response the proxy can relay.
    BadResponse,
}

impl UpstreamCause {
    /// Every cause, in counter order.
    pub(crate) const ALL: [Self; 5] = [
        Self::ConnectRefused,
        Self::ConnectTimeout,
        Self::ResponseTimeout,
        Self::Reset,
        Self::BadResponse,
    ];

    /// Its label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::ConnectRefused => "connect_refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::ResponseTimeout => "response_timeout",
            Self::Reset => "reset",
            Self::BadResponse => "bad_response",
        }
    }

    /// The cause of a failed connect (the connectors say `TimedOut` for their timeout).
    pub(crate) fn of_connect(e: &std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::TimedOut => Self::ConnectTimeout,
            _ => Self::ConnectRefused,
        }
    }
}

/// Replay outcomes: applied; refused for authorization (401/403: not applied, retried);
/// refused otherwise (4xx: skipped); failed (5xx, no answer: retried).
pub(crate) const REPLAY_OUTCOMES: [&str; 4] = ["applied", "unauthorized", "refused", "failed"];

/// Index of a route kind in [`BackendStats::responses`].
pub(crate) fn route_index(kind: RouteKind) -> usize {
    match kind {
        RouteKind::Auth => 0,
        RouteKind::Attest => 1,
        RouteKind::Resource => 2,
        RouteKind::Admin => 3,
        RouteKind::Other => 4,
    }
}

/// The route kinds in [`route_index`] order.
pub(crate) const ROUTES: [RouteKind; 5] = [
    RouteKind::Auth,
    RouteKind::Attest,
    RouteKind::Resource,
    RouteKind::Admin,
    RouteKind::Other,
];

impl BackendStats {
    /// Counts a failed exchange.
    pub(crate) fn count_error(&self, cause: UpstreamCause) {
        self.upstream_errors[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Failed exchanges for `cause` so far.
    pub(crate) fn upstream_errors(&self, cause: UpstreamCause) -> u64 {
        self.upstream_errors[cause as usize].load(Ordering::Relaxed)
    }

    /// Counts a response with `status` for a request of `kind`.
    pub(crate) fn count_response(&self, kind: RouteKind, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.responses[route_index(kind)][class].fetch_add(1, Ordering::Relaxed);
    }
}

/// What an active check concluded, when it changed the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Now healthy.
    Up,
    /// Now unhealthy.
    Down,
}

impl Backend {
    /// A backend named `name` reached at `scheme://authority`.
    pub fn new(name: String, scheme: Scheme, authority: Authority) -> Self {
        let tls_name = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Self::with_tls_name(name, scheme, authority, tls_name)
    }

    /// The same with an explicit certificate name.
    pub(crate) fn with_tls_name(name: String, scheme: Scheme, authority: Authority, tls_name: String) -> Self {
        Self {
            id: BackendId::from_name(&name),
            name,
            scheme,
            authority,
            tls_name,
            retired: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            passive: PassiveHealth::default(),
            healthy: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            last_check_ok: AtomicBool::new(true),
            drain_since_ms: AtomicU64::new(0),
            journal_lag: AtomicU64::new(0),
            stats: BackendStats::default(),
        }
    }

    /// Requests in flight right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the returned guard drops.
    pub(crate) fn start_request(self: &Arc<Self>) -> InFlight {
        InFlight::new(Arc::clone(self))
    }

    /// Whether checks and traffic say it works: actively healthy and not in passive back-off.
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.passive.is_available()
    }

    /// Whether new sessions may be sent here: healthy, not draining, and not missing admin writes.
    pub fn accepts_new_sessions(&self) -> bool {
        self.is_serving() && self.journal_lag() == 0
    }

    /// Healthy and not draining, whether or not it has every admin write: replays go to it, and
    /// new sessions too when no replica in sync is serving.
    pub(crate) fn is_serving(&self) -> bool {
        self.is_healthy() && !self.is_draining()
    }

    /// Admin writes it has not applied yet.
    pub fn journal_lag(&self) -> u64 {
        self.journal_lag.load(Ordering::Relaxed)
    }

    /// Sets how many admin writes it has not applied.
    pub(crate) fn set_journal_lag(&self, lag: u64) {
        self.journal_lag.store(lag, Ordering::Relaxed);
    }

    /// Whether requests pinned here may still be served: healthy, and if draining, not for
    /// longer than `drain_timeout`.
    pub(crate) fn serves_pinned(&self, drain_timeout: Duration) -> bool {
        self.is_healthy() && !self.drain_expired(drain_timeout)
    }

    /// The active checks' verdict alone.
    pub(crate) fn check_verdict(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether it is in passive back-off after failures on real traffic.
    pub fn in_backoff(&self) -> bool {
        !self.passive.is_available()
    }

    /// Records a failed connect or a timeout on real traffic.
    pub(crate) fn record_failure(&self) {
        if self.passive.record_failure() {
            self.stats.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                backend = self.name,
                reason = "a connect failed or a response timed out on real traffic",
                "backend ejected for a back-off (new sessions avoid it)"
            );
        }
    }

    /// Records a response: the backend is reachable.
    pub fn record_success(&self) {
        self.passive.record_success();
    }

    /// Feeds one active check result; flips the verdict after `rise` consecutive successes or
    /// `fall` consecutive failures, and says so.
    pub(crate) fn record_check(&self, ok: bool, rise: u32, fall: u32) -> Option<Transition> {
        if ok {
            // A check that reached it is as good as a response: end any passive back-off.
            self.passive.record_success();
        }
        // Only the backend's one checker task calls this, so load/store pairs do not race.
        let streak = if self.last_check_ok.swap(ok, Ordering::Relaxed) == ok {
            self.streak.load(Ordering::Relaxed).saturating_add(1)
        } else {
            1
        };
        self.streak.store(streak, Ordering::Relaxed);
        let healthy = self.healthy.load(Ordering::Relaxed);
        match (healthy, ok) {
            (false, true) if streak >= rise => {
                self.healthy.store(true, Ordering::Relaxed);
                self.passive.record_success();
                self.stats.went_up.fetch_add(1, Ordering::Relaxed);
                Some(Transition::Up)
            }
            (true, false) if streak >= fall => {
                self.healthy.store(false, Ordering::Relaxed);
                self.stats.went_down.fetch_add(1, Ordering::Relaxed);
                Some(Transition::Down)
            }
            _ => None,
        }
    }

    /// Starts draining (no new sessions); keeps the original start when already draining.
    pub fn drain(&self) {
        let _ = self
            .drain_since_ms
            .compare_exchange(0, now_ms().max(1), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Stops draining; refused (false) for a retired backend.
    pub fn undrain(&self) -> bool {
        if self.is_retired() {
            return false;
        }
        self.drain_since_ms.store(0, Ordering::Relaxed);
        true
    }

    /// Marks it as gone from the configured or discovered set, and drains it.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.drain();
    }

    /// Brings a retired backend back (it re-appeared in the set).
    pub(crate) fn unretire(&self) {
        if self.retired.swap(false, Ordering::Relaxed) {
            self.drain_since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Whether it left the configured or discovered set.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// Whether it is draining.
    pub(crate) fn is_draining(&self) -> bool {
        self.drain_since_ms.load(Ordering::Relaxed) != 0
    }

    /// Whether it has been draining for longer than `timeout`.
    pub(crate) fn drain_expired(&self, timeout: Duration) -> bool {
        match self.drain_since_ms.load(Ordering::Relaxed) {
            0 => false,
            since => now_ms().saturating_sub(since) >= u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// Keeps a backend's in-flight count raised while alive. Holds the backend as `B`: an `Arc` by
/// default (a response body outlives the request that started it), a reference where the caller
/// holds the backend for longer anyway (no reference count to raise and lower per request).
#[derive(Debug)]
pub struct InFlight<B: std::ops::Deref<Target = Backend> = Arc<Backend>>(B);

impl<B: std::ops::Deref<Target = Backend>> InFlight<B> {
    /// Counts a request to `backend` as in flight until the guard drops.
    pub fn new(backend: B) -> Self {
        backend.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(backend)
    }
}

impl<B: std::ops::Deref<Target = Backend>> Drop for InFlight<B> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Back-off after failures on real traffic: 1 s after the first, doubling per consecutive
/// failure up to 30 s; any response clears it.
#[derive(Debug, Default)]
struct PassiveHealth {
    /// Consecutive failures.
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

    /// Returns true when this failure started a back-off (the backend was available).
    fn record_failure(&self) -> bool {
        let was_available = self.is_available();
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(16);
        let backoff = BACKOFF_FIRST.saturating_mul(1 << n).min(BACKOFF_MAX);
        let until = now_ms() + u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
        self.down_until_ms.store(until.max(1), Ordering::Relaxed);
        was_available
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
    /// How long a draining backend keeps serving the sessions pinned to it.
    pub drain_timeout: Duration,
}

impl Backends {
    /// The backend a cookie names, if it is still in the set.
    pub(crate) fn by_id(&self, id: BackendId) -> Option<&Arc<Backend>> {
        self.list.iter().find(|b| b.id == id)
    }

    /// The backend called `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Backend>> {
        self.list.iter().find(|b| b.name == name)
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
        assert!(b.accepts_new_sessions());
        b.record_failure();
        assert!(!b.accepts_new_sessions());
        assert_eq!(b.stats.ejections.load(Ordering::Relaxed), 1);
        b.record_success();
        assert!(b.accepts_new_sessions());
    }

    #[test]
    fn hysteresis_needs_consecutive_results() {
        let b = backend("a");
        // fall = 3: two failures, a success, two failures: still up.
        for ok in [false, false, true, false, false] {
            assert_eq!(b.record_check(ok, 2, 3), None);
        }
        assert_eq!(b.record_check(false, 2, 3), Some(Transition::Down));
        assert!(!b.is_healthy());
        assert_eq!(b.record_check(true, 2, 3), None);
        assert_eq!(b.record_check(false, 2, 3), None);
        assert_eq!(b.record_check(true, 2, 3), None);
        assert_eq!(b.record_check(true, 2, 3), Some(Transition::Up));
        assert!(b.is_healthy());
    }

    #[test]
    fn draining_keeps_pinned_sessions_until_the_timeout() {
        let b = backend("a");
        b.drain();
        assert!(!b.accepts_new_sessions());
        assert!(b.serves_pinned(Duration::from_secs(300)));
        assert!(!b.serves_pinned(Duration::ZERO));
        assert!(b.undrain());
        assert!(b.accepts_new_sessions());
        b.retire();
        assert!(!b.undrain(), "a retired backend only drains");
        b.unretire();
        assert!(b.accepts_new_sessions());
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
    fn lookup_by_id_and_name() {
        let set = Backends {
            list: vec![backend("a"), backend("b")],
            drain_timeout: Duration::ZERO,
        };
        assert_eq!(set.by_id(BackendId::from_name("b")).unwrap().name, "b");
        assert!(set.by_id(BackendId::from_name("c")).is_none());
        assert!(set.by_name("a").is_some());
    }
}
