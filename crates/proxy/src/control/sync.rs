//! Keeping every replica's admin state (resources, policies, reference values) equal to the
//! admin journal, through restarts of the replicas and of the proxies.
//!
//! A Trustee replica keeps that state in its own storage, which on an emptyDir is gone when the
//! pod restarts: it comes back on the same address with its boot-time configuration. So the
//! proxy watches each replica for any sign that it lost its state and **resyncs** it (it is
//! then behind by the whole compacted journal, takes no new sessions, and gets every write
//! again, in order, before it does). The signs, each enough on its own:
//! - its `/metrics` counters went backwards (every Trustee counter starts at 0 with the
//!   process); scraped every [`WATCH_INTERVAL`] over one kept-alive connection;
//! - that kept-alive connection closed although it was in use (a KBS closes an idle
//!   connection only after its keep-alive timeout, far longer than the watch's interval);
//! - the replica's name resolves to another address when the watch reconnects;
//! - the active health check saw it down and then up again.
//!
//! Under all of them, as the floor for what no signal shows (a Trustee without `/metrics`, a
//! restart that raced every signal), the owner **reconciles**: every `admin-reconcile-interval`
//! it re-applies the whole compacted journal to every in-sync replica. Admin writes are
//! idempotent, so this changes nothing on a replica that kept its state.
//!
//! Replays carry the proxy's own admin credential when `admin-replay-token-file` is set (read
//! again at each round, so a rotated token is picked up). A replay refused with 401 or 403 is
//! never counted as applied: the replica stays behind (no new sessions), the refusal is counted
//! and shown in `/backends`, and the replay is tried again each round. When no healthy replica
//! is in sync, new sessions still go to the healthy ones (the balancer's fallback): the proxy
//! never leaves zero replicas serving, and says so in `/readyz`, `/backends` and the log.
//!
//! With several proxies only one, the **journal owner**, keeps a journal, replays and
//! reconciles. The others (`journal-owner` set) forward admin writes to it, ask it to resync a
//! replica when they see one of the signs themselves, and take each replica's sync state from
//! the owner's `/backends` at every watch round.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, HOST, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::AdminToken;
use crate::control::journal::AdminWrite;
use crate::dataplane::proxy::{Proxy, ProxyBody};
use crate::upstream::backend::Backend;
use crate::upstream::connector::BackendConnector;

/// How often each replica is watched. Short, so a restart is seen within about a second, and
/// far below any KBS keep-alive timeout (actix-web's default is 5 s), so the watch's
/// connection never idles long enough to be closed by it.
pub(crate) const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A kept-alive connection that closed within this time of its last use was not closed by the
/// server's keep-alive timeout: the replica's process went away.
const KEEPALIVE_FLOOR: Duration = Duration::from_secs(3);

/// Largest `/metrics` or owner `/backends` body read.
const BODY_LIMIT: usize = 1 << 20;

/// The `User-Agent` of the watch and of replays.
const AGENT: HeaderValue = HeaderValue::from_static("kbs-affinity-proxy-sync");

/// Why a replica is taken to have lost its admin state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LossSignal {
    /// A `/metrics` counter is lower than at the last scrape: a new process.
    CountersWentBack {
        /// The series that went back.
        series: String,
        /// Its value before.
        before: f64,
        /// Its value now.
        now: f64,
    },
    /// The watch's kept-alive connection closed while in use.
    ConnectionClosed,
    /// The name resolves to other addresses than when the watch last connected.
    NewAddress,
    /// The active health check saw it down, then up.
    CameBackUp,
    /// A replayed write was refused for authorization: what it holds is unknown.
    ReplayRefused,
    /// Asked through the admin port (another proxy saw a sign, or an operator).
    Requested,
}

impl fmt::Display for LossSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CountersWentBack { series, before, now } => {
                write!(
                    f,
                    "its /metrics counter {series} went back from {before} to {now} (a new process)"
                )
            }
            Self::ConnectionClosed => {
                f.write_str("its kept-alive connection closed while in use (the process went away)")
            }
            Self::NewAddress => f.write_str("its name resolves to a new address"),
            Self::CameBackUp => f.write_str("it came back up after being down"),
            Self::ReplayRefused => f.write_str("it refused a replayed admin write for authorization"),
            Self::Requested => f.write_str("a resync was requested through the admin port"),
        }
    }
}

/// How one replayed write ended.
#[derive(Debug)]
enum Replayed {
    /// 2xx, or a delete of something already gone.
    Applied,
    /// 401 or 403: the credential was refused. Not applied.
    Unauthorized(StatusCode),
    /// Another 4xx: the replica will not take this write; skipped, reported.
    Refused(StatusCode),
    /// 5xx, no answer, no connection: tried again next round.
    Failed(String),
}

impl Replayed {
    /// Index in [`crate::upstream::backend::BackendStats::replays`].
    fn index(&self) -> usize {
        match self {
            Self::Applied => 0,
            Self::Unauthorized(_) => 1,
            Self::Refused(_) => 2,
            Self::Failed(_) => 3,
        }
    }
}

/// How a run of replays to one replica ended.
#[derive(Debug, Default)]
struct ReplayRun {
    /// Writes sent.
    sent: u64,
    /// The last write applied (or skipped as refused) before the run stopped.
    applied_to: Option<u64>,
    /// It stopped at a 401/403.
    unauthorized: bool,
}

/// What `/backends` shows of a replica's sync, beyond its lag.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReplicaStatus {
    /// Why it was last resynced.
    pub last_reset: Option<String>,
    /// The last replay problem, cleared when it is in sync again.
    pub replay_error: Option<String>,
    /// Whether its `/metrics` answered (None before the first scrape).
    pub has_metrics: Option<bool>,
}

/// The sending half of the watch's connection, in the replicas' protocol.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// The watch's kept-alive connection to one replica.
struct Kept {
    sender: Sender,
    /// When the connection's task ended (the peer closed it, or it failed).
    closed_at: Arc<Mutex<Option<Instant>>>,
    /// When it last carried a request.
    last_used: Instant,
    /// Ends the connection's task when the watch drops the connection.
    _driver: tokio_util::task::AbortOnDropHandle<()>,
}

impl Kept {
    /// `None` while open; once it ended, whether that was while in use (within
    /// [`KEEPALIVE_FLOOR`] of its last request: not the server's keep-alive timeout).
    fn ended_in_use(&self) -> Option<bool> {
        let closed = *lock(&self.closed_at);
        closed.map(|at| at.saturating_duration_since(self.last_used) < KEEPALIVE_FLOOR)
    }
}

/// What the watch remembers of one replica.
#[derive(Default)]
struct Watch {
    conn: Option<Kept>,
    /// Counter series and their values at the last scrape.
    counters: Option<HashMap<String, f64>>,
    /// The address the watch's last connection reached.
    peer: Option<SocketAddr>,
}

/// How [`ReplicaSync`] works, from the configuration.
#[derive(Debug, Clone, Default)]
pub(crate) struct SyncSettings {
    /// The proxy's own KBS admin token for replays (`admin-replay-token-file`), re-read each
    /// round.
    pub replay_token: Option<PathBuf>,
    /// Sent to the journal owner's admin port with resync requests (`admin-token-file`).
    pub owner_token: Option<AdminToken>,
    /// Watch each replica every [`WATCH_INTERVAL`] (`replica-watch`).
    pub watch: bool,
    /// The replicas speak HTTP/2 (`backend-protocol = "http2"`): so does the watch.
    pub http2: bool,
}

/// Keeps the replicas in sync with the journal; owned by the control plane.
pub(crate) struct ReplicaSync {
    proxy: Proxy,
    /// Pooled client for replays and the journal owner.
    client: Client<BackendConnector, ProxyBody>,
    connector: BackendConnector,
    settings: SyncSettings,
    watches: Mutex<HashMap<String, Watch>>,
    status: Mutex<HashMap<String, ReplicaStatus>>,
    /// Wakes the control plane to catch up now (a resync was requested).
    wake: Notify,
    /// On a follower: each replica's lag as the owner last reported it (replicas it did not
    /// list count as behind).
    owner_lags: Mutex<Option<HashMap<String, u64>>>,
    /// Whether new sessions go to replicas behind on admin writes (none healthy is in sync),
    /// as last logged.
    degraded: std::sync::atomic::AtomicBool,
    /// Each replica's `scheme://authority` when the backend set last changed: a name that comes
    /// back with another address is another replica, which has none of the journal.
    addresses: Mutex<HashMap<String, String>>,
    /// Replicas to resync at the next wake (found where no await is possible).
    pending: Mutex<Vec<String>>,
    /// On a follower: whether the owner answered the last poll (to log changes only).
    owner_reachable: std::sync::atomic::AtomicBool,
}

/// A backend's address as the proxy reaches it.
fn address_of(b: &Backend) -> String {
    format!("{}://{}", b.scheme, b.authority)
}

impl fmt::Debug for ReplicaSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaSync").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReplicaSync {
    /// Sync for `proxy`, connecting to the replicas with `connector`.
    pub fn new(proxy: Proxy, connector: BackendConnector, settings: SyncSettings) -> Self {
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(settings.http2)
            .build(connector.clone());
        Self {
            client,
            connector,
            settings,
            watches: Mutex::new(HashMap::new()),
            status: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            owner_lags: Mutex::new(None),
            degraded: std::sync::atomic::AtomicBool::new(false),
            addresses: Mutex::new(proxy_addresses(&proxy)),
            pending: Mutex::new(Vec::new()),
            owner_reachable: std::sync::atomic::AtomicBool::new(true),
            proxy,
        }
    }

    /// Resyncs the replicas found changed since the last wake, then catches up: what the
    /// control plane runs when woken.
    pub(crate) async fn on_wake(&self) {
        self.resync_pending().await;
        self.catch_up().await;
    }

    async fn resync_pending(&self) {
        let names = std::mem::take(&mut *lock(&self.pending));
        let routing = self.proxy.routing();
        for name in names {
            if let Some(backend) = routing.backends.by_name(&name) {
                self.resync(backend, LossSignal::NewAddress).await;
            }
        }
    }

    /// Resolves when a resync asks for a catch-up now.
    pub(crate) async fn woken(&self) {
        self.wake.notified().await;
    }

    /// Whether this proxy owns the journal (it replays and reconciles).
    pub(crate) fn is_owner(&self) -> bool {
        self.proxy.journal_owner().is_none()
    }

    /// A replica's sync status, for `/backends`.
    pub fn status(&self, name: &str) -> ReplicaStatus {
        lock(&self.status).get(name).cloned().unwrap_or_default()
    }

    fn set_status(&self, name: &str, f: impl FnOnce(&mut ReplicaStatus)) {
        f(lock(&self.status).entry(name.to_owned()).or_default());
    }

    /// One watch round: looks at every replica for a sign of lost state (see the module docs),
    /// resyncs those that show one, and (on a proxy that follows an owner) takes the sync
    /// states from the owner.
    pub async fn watch(&self) {
        self.resync_pending().await;
        let routing = self.proxy.routing();
        let mut signals: Vec<(Arc<Backend>, LossSignal)> = Vec::new();
        let mut set = tokio::task::JoinSet::new();
        let watched = routing.backends.list.iter().filter(|b| !b.is_retired());
        for backend in watched.filter(|_| self.settings.watch) {
            let mut watch = lock(&self.watches).remove(&backend.name).unwrap_or_default();
            let backend = Arc::clone(backend);
            let connector = self.connector.clone();
            let http2 = self.settings.http2;
            set.spawn(async move {
                let (signal, has_metrics) = watch_one(&backend, &mut watch, &connector, http2).await;
                (backend, watch, signal, has_metrics)
            });
        }
        while let Some(done) = set.join_next().await {
            let Ok((backend, watch, signal, has_metrics)) = done else {
                continue;
            };
            lock(&self.watches).insert(backend.name.clone(), watch);
            if has_metrics.is_some() {
                self.set_status(&backend.name, |s| s.has_metrics = has_metrics);
            }
            if let Some(signal) = signal {
                signals.push((backend, signal));
            }
        }
        // Forget replicas that left the set.
        lock(&self.watches).retain(|name, _| routing.backends.by_name(name).is_some());
        for (backend, signal) in signals {
            self.resync(&backend, signal).await;
        }
        if let Some(owner) = self.proxy.journal_owner().cloned() {
            self.follow_owner(&owner).await;
        }
        self.report_degraded();
    }

    /// Logs when new sessions start or stop going to replicas behind on admin writes.
    fn report_degraded(&self) {
        let routing = self.proxy.routing();
        let list = &routing.backends.list;
        let degraded = !list.iter().any(|b| b.accepts_new_sessions()) && list.iter().any(|b| b.is_serving());
        if self.degraded.swap(degraded, Ordering::Relaxed) != degraded {
            if degraded {
                let behind: Vec<&str> = list
                    .iter()
                    .filter(|b| b.is_serving())
                    .map(|b| b.name.as_str())
                    .collect();
                tracing::error!(replicas = behind.join(", "), "no replica is in sync with the admin journal: new sessions go to replicas that are behind rather than to none");
            } else {
                tracing::info!("a replica in sync with the admin journal takes new sessions again");
            }
        }
    }

    /// Treats `backend` as having lost its admin state: it is behind by the whole journal until
    /// it has applied it again (on a follower: the owner is asked to resync it, and it counts as
    /// behind until the owner says it is in sync).
    pub async fn resync(&self, backend: &Backend, signal: LossSignal) {
        backend.stats.state_resets.fetch_add(1, Ordering::Relaxed);
        let reason = signal.to_string();
        self.set_status(&backend.name, |s| s.last_reset = Some(reason.clone()));
        if let Some(owner) = self.proxy.journal_owner().cloned() {
            tracing::warn!(
                backend = backend.name,
                reason,
                "replica may have lost its admin state; asking the journal owner to resync it"
            );
            backend.set_journal_lag(backend.journal_lag().max(1));
            self.ask_owner_to_resync(&owner, &backend.name).await;
            return;
        }
        let journal = self.proxy.journal();
        // Under the order lock: a fan-out must not mark it applied between the reset and the
        // replay (it would look in sync with older writes missing).
        let _order = journal.order().await;
        match journal.resync(&backend.name) {
            Ok(0) => tracing::info!(
                backend = backend.name,
                reason,
                "replica may have lost its admin state; the journal is empty, nothing to replay"
            ),
            Ok(n) => tracing::warn!(
                backend = backend.name,
                reason,
                writes = n,
                "replica may have lost its admin state; it takes no new sessions until the journal is replayed"
            ),
            Err(e) => tracing::error!(backend = backend.name, error = %e, "cannot record a resync in the journal"),
        }
        journal.refresh_lags(&self.proxy.routing().backends);
        self.wake.notify_one();
    }

    /// Resyncs the backend called `name` (the admin port's `POST /backends/NAME/resync`).
    pub(crate) async fn resync_by_name(&self, name: &str) -> bool {
        let routing = self.proxy.routing();
        let Some(backend) = routing.backends.by_name(name) else {
            return false;
        };
        self.resync(backend, LossSignal::Requested).await;
        true
    }

    /// The replay credential, read now; `Err` says why there is none although one is configured.
    fn replay_credential(&self) -> Result<Option<HeaderValue>, String> {
        let Some(path) = &self.settings.replay_token else {
            return Ok(None);
        };
        let token = crate::config::read_replay_token(path)
            .map_err(|e| format!("admin-replay-token-file {}: {e}", path.display()))?;
        let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?;
        v.set_sensitive(true);
        Ok(Some(v))
    }

    /// Replays the journaled writes each healthy, non-draining replica has missed, in order; it
    /// takes new sessions again once it has them all. See the module docs for how refusals count.
    pub async fn catch_up(&self) {
        if !self.is_owner() {
            return;
        }
        let journal = Arc::clone(self.proxy.journal());
        let routing = self.proxy.routing();
        journal.refresh_lags(&routing.backends);
        let behind: Vec<&Arc<Backend>> = routing
            .backends
            .list
            .iter()
            .filter(|b| b.is_serving() && journal.behind(&b.name) > 0)
            .collect();
        if behind.is_empty() {
            return;
        }
        let credential = match self.replay_credential() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = e, "no replay credential; replicas behind cannot be caught up");
                for b in behind {
                    self.set_status(&b.name, |s| s.replay_error = Some(e.clone()));
                }
                return;
            }
        };
        for backend in behind {
            {
                // Held through the position's record: a resync must not land between them.
                let _order = journal.order().await;
                let pending = journal.pending(&backend.name);
                let run = self
                    .replay_in_order(backend, &pending, credential.as_ref(), routing.response_timeout)
                    .await;
                if let Some(seq) = run.applied_to {
                    if let Err(e) = journal.mark_applied(&backend.name, seq) {
                        tracing::error!(error = %e, "cannot record the admin journal position");
                    }
                }
            }
            journal.refresh_lags(&routing.backends);
            if journal.behind(&backend.name) == 0 {
                tracing::info!(backend = backend.name, "replica caught up on admin writes");
                self.set_status(&backend.name, |s| s.replay_error = None);
            }
        }
    }

    /// Re-applies the whole compacted journal to every healthy, non-draining replica that is in
    /// sync (those behind are being caught up). Returns the writes sent.
    pub async fn reconcile(&self) -> u64 {
        if !self.is_owner() {
            return 0;
        }
        let journal = Arc::clone(self.proxy.journal());
        if journal.is_empty() {
            return 0;
        }
        let routing = self.proxy.routing();
        let credential = match self.replay_credential() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = e, "no replay credential; the reconciliation is skipped");
                return 0;
            }
        };
        let mut sent = 0;
        for backend in &routing.backends.list {
            if !backend.is_serving() || journal.behind(&backend.name) != 0 {
                continue;
            }
            let run = {
                let _order = journal.order().await;
                let entries = journal.entries();
                self.replay_in_order(backend, &entries, credential.as_ref(), routing.response_timeout)
                    .await
            };
            sent += run.sent;
            if run.unauthorized {
                self.resync(backend, LossSignal::ReplayRefused).await;
            }
        }
        if sent > 0 {
            tracing::debug!(writes = sent, "admin journal reconciled");
        }
        sent
    }

    /// Replays `writes` to `backend` in order, stopping at the first that was neither applied
    /// nor skipped. The caller holds the journal's order lock.
    async fn replay_in_order(
        &self,
        backend: &Backend,
        writes: &[Arc<AdminWrite>],
        credential: Option<&HeaderValue>,
        timeout: Duration,
    ) -> ReplayRun {
        let mut run = ReplayRun::default();
        for write in writes {
            run.sent += 1;
            match self.replay(backend, write, credential, timeout).await {
                Replayed::Applied | Replayed::Refused(_) => run.applied_to = Some(write.seq),
                Replayed::Unauthorized(_) => {
                    run.unauthorized = true;
                    break;
                }
                Replayed::Failed(_) => break,
            }
        }
        run
    }

    /// Sends one journaled write to `backend` and classifies the answer; counts and reports it.
    async fn replay(
        &self,
        backend: &Backend,
        write: &AdminWrite,
        credential: Option<&HeaderValue>,
        timeout: Duration,
    ) -> Replayed {
        let outcome = self.send_replay(backend, write, credential, timeout).await;
        backend.stats.replays[outcome.index()].fetch_add(1, Ordering::Relaxed);
        // The path without its query: query strings are never logged.
        let path = write.path.split('?').next().unwrap_or("");
        let problem = match &outcome {
            Replayed::Applied => return outcome,
            Replayed::Unauthorized(status) => format!(
                "replay of {} {path} refused with {status}: the replay credential is not accepted (check admin-replay-token-file and the KBS admin policy); not applied, retrying",
                write.method
            ),
            Replayed::Refused(status) => format!("replay of {} {path} refused with {status}; skipped", write.method),
            Replayed::Failed(why) => format!("replay of {} {path} failed: {why}; retrying", write.method),
        };
        // Retried every second: said when it changes, not at each retry (the metric counts each).
        let mut repeated = false;
        self.set_status(&backend.name, |s| {
            repeated = s.replay_error.as_deref() == Some(problem.as_str());
            s.replay_error = Some(problem.clone());
        });
        if repeated {
            tracing::debug!(backend = backend.name, problem, "admin journal replay problem persists");
        } else if matches!(outcome, Replayed::Unauthorized(_)) {
            tracing::error!(
                backend = backend.name,
                seq = write.seq,
                problem,
                "replica refused a replayed admin write for authorization"
            );
        } else {
            tracing::warn!(
                backend = backend.name,
                seq = write.seq,
                problem,
                "admin journal replay did not apply"
            );
        }
        outcome
    }

    async fn send_replay(
        &self,
        backend: &Backend,
        write: &AdminWrite,
        credential: Option<&HeaderValue>,
        timeout: Duration,
    ) -> Replayed {
        let Ok(path) = PathAndQuery::try_from(write.path.as_str()) else {
            return Replayed::Refused(StatusCode::BAD_REQUEST);
        };
        let mut req = Request::new(ProxyBody::full(write.body.clone()));
        *req.method_mut() = write.method.clone();
        *req.uri_mut() = crate::dataplane::proxy::backend_uri(backend, path);
        for (name, value) in &write.headers {
            req.headers_mut().append(name.clone(), value.clone());
        }
        if let Some(c) = credential {
            req.headers_mut().insert(AUTHORIZATION, c.clone());
        }
        req.headers_mut().insert(USER_AGENT, AGENT);
        let resp = match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return Replayed::Failed(e.to_string()),
            Err(_) => return Replayed::Failed("no answer in time".into()),
        };
        let status = resp.status();
        let body = Limited::new(resp.into_body(), BODY_LIMIT)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        classify(write, status, &body)
    }

    /// Asks the journal owner to resync `name`.
    async fn ask_owner_to_resync(&self, owner: &Uri, name: &str) {
        let Some(uri) = owner_url(owner, &format!("/backends/{name}/resync")) else {
            return;
        };
        let mut req = Request::new(ProxyBody::Empty);
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        if let Some(t) = &self.settings.owner_token {
            if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", t.0)) {
                v.set_sensitive(true);
                req.headers_mut().insert(AUTHORIZATION, v);
            }
        }
        match tokio::time::timeout(WATCH_INTERVAL * 5, self.client.request(req)).await {
            Ok(Ok(r)) if r.status().is_success() => {}
            Ok(Ok(r)) => {
                tracing::error!(backend = name, status = %r.status(), "the journal owner refused a resync request")
            }
            Ok(Err(e)) => {
                tracing::error!(backend = name, error = %e, "the journal owner cannot be reached for a resync")
            }
            Err(_) => tracing::error!(backend = name, "the journal owner did not answer a resync request"),
        }
    }

    /// Takes each replica's lag from the journal owner's `/backends`. Replicas the owner does
    /// not list count as behind; when the owner cannot be reached the last known lags stay.
    async fn follow_owner(&self, owner: &Uri) {
        let Some(uri) = owner_url(owner, "/backends") else {
            return;
        };
        let mut req = Request::new(ProxyBody::Empty);
        *req.uri_mut() = uri;
        let answer = match tokio::time::timeout(WATCH_INTERVAL * 5, self.client.request(req)).await {
            Ok(Ok(r)) if r.status().is_success() => Ok(r),
            Ok(Ok(r)) => Err(format!("its /backends answered {}", r.status())),
            Ok(Err(e)) => Err(format!("it cannot be reached: {e}")),
            Err(_) => Err("it did not answer in time".to_owned()),
        };
        let list = match answer {
            Ok(r) => match Limited::new(r.into_body(), BODY_LIMIT).collect().await {
                Ok(body) => match serde_json::from_slice(&body.to_bytes()) {
                    Ok(serde_json::Value::Array(list)) => Ok(list),
                    _ => Err("its /backends is not a list".to_owned()),
                },
                Err(_) => Err("its /backends could not be read".to_owned()),
            },
            Err(e) => Err(e),
        };
        // Said once when it changes, not every second.
        let reachable = list.is_ok();
        if self.owner_reachable.swap(reachable, Ordering::Relaxed) != reachable {
            match &list {
                Ok(_) => tracing::info!(owner = %owner, "the journal owner answers again"),
                Err(e) => {
                    tracing::error!(owner = %owner, error = e, "the journal owner is unavailable: admin writes are refused with 503, and the last known sync states are kept")
                }
            }
        }
        let Ok(list) = list else { return };
        let lags: HashMap<String, u64> = list
            .iter()
            .filter_map(|b| {
                Some((
                    b.get("name")?.as_str()?.to_owned(),
                    b.get("admin_writes_behind")?.as_u64()?,
                ))
            })
            .collect();
        *lock(&self.owner_lags) = Some(lags);
        self.apply_owner_lags();
    }

    /// Sets every replica's lag from the owner's last report; one it did not list counts as
    /// behind (a replica just discovered must not take sessions before the owner has it).
    fn apply_owner_lags(&self) {
        let lags = lock(&self.owner_lags);
        let Some(lags) = lags.as_ref() else { return };
        for backend in &self.proxy.routing().backends.list {
            let lag = lags.get(&backend.name).copied().unwrap_or(1);
            backend.set_journal_lag(lag);
        }
    }

    /// The backend set changed (discovery, reload): a new replica is behind until it has the
    /// journal (on a follower: until the owner says it is in sync), from the first request on.
    pub(crate) fn backends_changed(&self) {
        let routing = self.proxy.routing();
        let now = proxy_addresses(&self.proxy);
        let moved: Vec<String> = {
            let mut known = lock(&self.addresses);
            let moved = now
                .iter()
                .filter(|(name, addr)| known.get(*name).is_some_and(|a| a != *addr))
                .map(|(name, _)| name.clone())
                .collect();
            *known = now;
            moved
        };
        if self.is_owner() {
            let journal = self.proxy.journal();
            for name in &moved {
                // At once, so it takes no new session; again under the order lock at the wake,
                // in case a fan-out in flight marked the old replica's position meanwhile.
                tracing::warn!(
                    backend = name,
                    "replica has a new address: another replica, given the whole journal before new sessions"
                );
                if let Err(e) = journal.resync(name) {
                    tracing::error!(backend = name, error = %e, "cannot record a resync in the journal");
                }
            }
            journal.refresh_lags(&routing.backends);
        } else {
            self.apply_owner_lags();
            for b in routing.backends.list.iter().filter(|b| moved.contains(&b.name)) {
                b.set_journal_lag(b.journal_lag().max(1));
            }
        }
        if !moved.is_empty() {
            lock(&self.pending).extend(moved);
            self.wake.notify_one();
        }
    }

    /// The healthy, non-draining replicas that are not in sync (for `/readyz`).
    pub(crate) fn out_of_sync(&self) -> Vec<String> {
        self.proxy
            .routing()
            .backends
            .list
            .iter()
            .filter(|b| b.is_serving() && b.journal_lag() > 0)
            .map(|b| b.name.clone())
            .collect()
    }
}

/// Every current backend's name and address (retired ones, still draining under a name that
/// may have a new address, left out).
fn proxy_addresses(proxy: &Proxy) -> HashMap<String, String> {
    proxy
        .routing()
        .backends
        .list
        .iter()
        .filter(|b| !b.is_retired())
        .map(|b| (b.name.clone(), address_of(b)))
        .collect()
}

/// `path` on the journal owner's admin port (`owner` is its validated `http://HOST:PORT`).
pub(crate) fn owner_url(owner: &Uri, path: &str) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = owner.scheme().cloned();
    parts.authority = owner.authority().cloned();
    parts.path_and_query = Some(PathAndQuery::try_from(path).ok()?);
    Uri::from_parts(parts).ok()
}

/// How a replica's answer to a replayed write counts. A delete of something already gone
/// counts as applied (deletes are replayed to replicas that may never have had the resource).
fn classify(write: &AdminWrite, status: StatusCode, body: &[u8]) -> Replayed {
    if status.is_success() {
        return Replayed::Applied;
    }
    if write.is_delete() && is_not_found(status, body) {
        return Replayed::Applied;
    }
    match status.as_u16() {
        401 | 403 if !is_not_found(status, body) => Replayed::Unauthorized(status),
        400..=499 => Replayed::Refused(status),
        _ => Replayed::Failed(format!("answered {status}")),
    }
}

/// Whether an answer says "no such resource": a 404, or the KBS's JSON error whose detail says
/// the resource was not found (the KBS answers most errors with 401).
fn is_not_found(status: StatusCode, body: &[u8]) -> bool {
    if status == StatusCode::NOT_FOUND {
        return true;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let text = |k: &str| v.get(k).and_then(|d| d.as_str()).unwrap_or("").to_ascii_lowercase();
    let (kind, detail) = (text("type"), text("detail"));
    !kind.contains("auth") && (detail.contains("not found") || detail.contains("no such file"))
}

/// One watch of one replica: the kept-alive connection's fate, then a `/metrics` scrape over it
/// (over a new connection if the kept one turns out closed). Returns the sign of lost state it
/// saw, and whether `/metrics` answered.
async fn watch_one(
    backend: &Backend,
    watch: &mut Watch,
    connector: &BackendConnector,
    http2: bool,
) -> (Option<LossSignal>, Option<bool>) {
    let mut signal = None;
    for _attempt in 0..2 {
        // A connection that ended: a sign when it was in use, and a new one either way.
        if let Some(in_use) = watch.conn.as_ref().and_then(Kept::ended_in_use) {
            if in_use {
                signal = signal.or(Some(LossSignal::ConnectionClosed));
            }
            watch.conn = None;
        }
        if watch.conn.is_none() {
            let uri = crate::dataplane::proxy::backend_uri(backend, PathAndQuery::from_static("/"));
            let Ok(Some((kept, peer))) =
                tokio::time::timeout(WATCH_INTERVAL * 2, connect(connector, &uri, http2)).await
            else {
                return (signal, None);
            };
            if watch.peer.is_some_and(|p| p != peer) {
                signal = signal.or(Some(LossSignal::NewAddress));
            }
            watch.peer = Some(peer);
            watch.conn = Some(kept);
        }
        let Some(kept) = watch.conn.as_mut() else {
            return (signal, None);
        };
        let Some((status, body)) = scrape(backend, kept).await else {
            // Failed on the kept connection: let its task note the end, then try a fresh one.
            tokio::task::yield_now().await;
            if kept.ended_in_use() == Some(true) {
                signal = signal.or(Some(LossSignal::ConnectionClosed));
            }
            watch.conn = None;
            continue;
        };
        kept.last_used = Instant::now();
        if !status.is_success() {
            return (signal, Some(false));
        }
        let now = counters(&String::from_utf8_lossy(&body));
        if let Some((series, before, now)) = watch.counters.as_ref().and_then(|b| went_back(b, &now)) {
            signal = signal.or(Some(LossSignal::CountersWentBack { series, before, now }));
        }
        watch.counters = Some(now);
        return (signal, Some(true));
    }
    (signal, None)
}

/// `GET /metrics` over the kept connection: status and body, or `None` when it failed.
async fn scrape(backend: &Backend, kept: &mut Kept) -> Option<(StatusCode, Bytes)> {
    let exchange = async {
        let resp = match &mut kept.sender {
            Sender::Http1(sender) => {
                let host = HeaderValue::from_str(backend.authority.as_str()).ok()?;
                let req = Request::get("/metrics")
                    .header(HOST, host)
                    .header(USER_AGENT, AGENT)
                    .body(Empty::<Bytes>::new())
                    .ok()?;
                sender.ready().await.ok()?;
                sender.send_request(req).await.ok()?
            }
            Sender::Http2(sender) => {
                // HTTP/2 carries the authority in the target, and no Host field.
                let req = Request::get(format!("{}://{}/metrics", backend.scheme, backend.authority))
                    .header(USER_AGENT, AGENT)
                    .body(Empty::<Bytes>::new())
                    .ok()?;
                sender.ready().await.ok()?;
                sender.send_request(req).await.ok()?
            }
        };
        let status = resp.status();
        let body = Limited::new(resp.into_body(), BODY_LIMIT)
            .collect()
            .await
            .ok()?
            .to_bytes();
        Some((status, body))
    };
    tokio::time::timeout(WATCH_INTERVAL * 2, exchange).await.ok().flatten()
}

/// A kept-alive connection (HTTP/1.1, or HTTP/2 when the replicas speak it) whose end is
/// noted, and the address it reached.
async fn connect(connector: &BackendConnector, uri: &Uri, http2: bool) -> Option<(Kept, SocketAddr)> {
    let stream = connector.connect(uri).await.ok()?;
    let peer = stream.peer_addr().ok()?;
    let closed_at = Arc::new(Mutex::new(None));
    let noted = Arc::clone(&closed_at);
    let note_end = move || *lock(&noted) = Some(Instant::now());
    let (sender, driver) = if http2 {
        let executor = hyper_util::rt::TokioExecutor::new();
        let (sender, conn) = hyper::client::conn::http2::handshake(executor, stream).await.ok()?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
            note_end();
        });
        (Sender::Http2(sender), driver)
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(stream).await.ok()?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
            note_end();
        });
        (Sender::Http1(sender), driver)
    };
    let kept = Kept {
        sender,
        closed_at,
        last_used: Instant::now(),
        _driver: tokio_util::task::AbortOnDropHandle::new(driver),
    };
    Some((kept, peer))
}

/// Counter series of a Prometheus text exposition (`*_total` and histograms' `*_count`), by
/// series (name and labels) to value.
pub fn counters(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(open) => match line[open..].find('}') {
                Some(close) => line.split_at(open + close + 1),
                None => continue,
            },
            None => match line.split_once(char::is_whitespace) {
                Some(pair) => pair,
                None => continue,
            },
        };
        let name = series.split('{').next().unwrap_or("");
        if !(name.ends_with("_total") || name.ends_with("_count")) {
            continue;
        }
        if let Some(Ok(v)) = rest.split_whitespace().next().map(str::parse::<f64>) {
            out.insert(series.to_owned(), v);
        }
    }
    out
}

/// The first series lower now than before, if any.
pub(crate) fn went_back(before: &HashMap<String, f64>, now: &HashMap<String, f64>) -> Option<(String, f64, f64)> {
    let mut back: Vec<_> = now
        .iter()
        .filter_map(|(k, v)| before.get(k).filter(|b| v < b).map(|b| (k.clone(), *b, *v)))
        .collect();
    back.sort_by(|a, b| a.0.cmp(&b.0));
    back.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_and_a_new_process_is_seen() {
        let before = counters(
            "# HELP kbs_http_requests_total x\n# TYPE kbs_http_requests_total counter\nkbs_http_requests_total 120\nkbs_auth_requests_total{tee=\"sample\"} 7 1700000000\nkbs_http_active_connections 3\nkbs_http_request_duration_seconds_count 120\n",
        );
        assert_eq!(before.len(), 3, "{before:?}");
        assert_eq!(before["kbs_auth_requests_total{tee=\"sample\"}"], 7.0);
        let later = counters("kbs_http_requests_total 130\nkbs_auth_requests_total{tee=\"sample\"} 7\n");
        assert_eq!(went_back(&before, &later), None);
        let restarted = counters("kbs_http_requests_total 3\n");
        assert_eq!(
            went_back(&later, &restarted),
            Some(("kbs_http_requests_total".into(), 130.0, 3.0))
        );
        assert!(counters("garbage {\nno_value_total\n").is_empty());
    }

    fn write(method: Method) -> AdminWrite {
        AdminWrite::new(
            method,
            "/kbs/v0/resource/a/b/c".into(),
            &http::HeaderMap::new(),
            Bytes::new(),
        )
    }

    #[test]
    fn replay_answers_are_classified() {
        let not_found = br#"{"type":"https://github.com/confidential-containers/kbs/errors/PluginError","detail":"Plugin error: No such file or directory (os error 2)"}"#;
        let auth = br#"{"type":"https://github.com/confidential-containers/kbs/errors/AdminAuth","detail":"Admin auth error: token expired"}"#;
        let del = write(Method::DELETE);
        let set = write(Method::POST);
        assert!(matches!(classify(&set, StatusCode::OK, b""), Replayed::Applied));
        assert!(matches!(
            classify(&del, StatusCode::UNAUTHORIZED, not_found),
            Replayed::Applied
        ));
        assert!(matches!(classify(&del, StatusCode::NOT_FOUND, b""), Replayed::Applied));
        assert!(matches!(
            classify(&del, StatusCode::UNAUTHORIZED, auth),
            Replayed::Unauthorized(_)
        ));
        assert!(matches!(
            classify(&set, StatusCode::UNAUTHORIZED, auth),
            Replayed::Unauthorized(_)
        ));
        assert!(matches!(
            classify(&set, StatusCode::FORBIDDEN, b""),
            Replayed::Unauthorized(_)
        ));
        assert!(matches!(
            classify(&set, StatusCode::BAD_REQUEST, b""),
            Replayed::Refused(_)
        ));
        assert!(matches!(
            classify(&set, StatusCode::BAD_GATEWAY, b""),
            Replayed::Failed(_)
        ));
    }
}
