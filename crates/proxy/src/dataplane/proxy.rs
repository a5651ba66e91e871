//! The request path: read the route cookie, decide, forward over a pooled connection, and answer.
//!
//! [`Proxy`] holds what all workers share; [`Worker`] adds the backend client, whose connection
//! pool lives on the runtime that created it (one per worker thread).

mod body;
mod error;
mod fanout;
mod fast;
pub mod headers;
mod retry;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, SET_COOKIE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use body::ProxyBody;
pub use error::ProxyError;
pub use fast::{fast_buffers_in_use, FastRuntime, FastState, Pool, Rewind};

use retry::{AfterRefusal, Attempts};

use crate::config::{BackendSpec, Config};
use crate::control::journal::Journal;
use crate::control::metrics::ProxyStats;
use crate::kbs::RouteKind;
use crate::kbs::SESSION_COOKIE;
use crate::routing::affinity::{decide, read_route_cookie_with, CookieState, Decision, HeaderView, Learned};
use crate::routing::route_cookie::{cookie_values, BackendId, Rejection};
use crate::routing::sessions::{hash_key, jwt_expiry, session_from_set_cookie, session_key, AffinityTable};
use crate::routing::Routing;
use crate::tls::TlsError;
use crate::upstream::backend::Backend;
use crate::upstream::connector::BackendConnector;

/// Largest `attest` response read to learn its token (real ones are a few KiB).
const ATTEST_BODY_LIMIT: usize = 256 * 1024;

/// How long an idle pooled backend connection is kept.
const POOL_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The proxy's shared state: the routing table, counters, backend TLS. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Proxy {
    /// Shared by every worker.
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The routing table, swapped whole when backends or settings change.
    routing: Arc<ArcSwap<Routing>>,
    /// Counters for `/metrics`.
    stats: Arc<ProxyStats>,
    /// Limit on connecting (TCP and TLS) to a backend.
    connect_timeout: std::time::Duration,
    /// TLS client settings for `https://` backends.
    backend_tls: Arc<rustls::ClientConfig>,
    /// The backend client speaks HTTP/2 (`backend-protocol = "http2"`).
    backend_http2: bool,
    /// `kbs-session-id` → backend, learned from `auth` responses.
    sessions: AffinityTable,
    /// Attestation token (hashed) → backend, learned from `attest` responses.
    tokens: AffinityTable,
    /// Admin writes accepted so far, and how far each replica applied them (empty on a proxy
    /// that forwards to a journal owner).
    journal: Arc<Journal>,
    /// The journal owner's admin port, when this proxy forwards admin writes there.
    journal_owner: Option<http::Uri>,
}

/// Why the proxy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The backend TLS settings do not load.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The admin journal directory cannot be opened or is damaged.
    #[error("admin journal: {0}")]
    Journal(#[from] std::io::Error),
}

impl Proxy {
    /// Builds the proxy from a validated configuration. Binds nothing.
    pub fn new(config: &Config) -> Result<Self, InitError> {
        let journal = Arc::new(Journal::open_with(
            config.admin_journal.as_deref(),
            config.admin_journal_max,
            config.admin_replay_token_file.is_some(),
        )?);
        let routing = Routing::new(config, &[], None);
        journal.refresh_lags(&routing.backends);
        Ok(Self {
            shared: Arc::new(Shared {
                routing: Arc::new(ArcSwap::from_pointee(routing)),
                stats: Arc::new(ProxyStats::default()),
                connect_timeout: config.connect_timeout,
                backend_tls: crate::tls::client_config(&config.backend_tls, config.backend_http2)?,
                backend_http2: config.backend_http2,
                sessions: AffinityTable::new(config.session_table_size),
                tokens: AffinityTable::new(config.session_table_size),
                journal,
                journal_owner: config.journal_owner.clone(),
            }),
        })
    }

    /// The admin journal.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.shared.journal
    }

    /// The journal owner's admin port, when this proxy is not the owner.
    pub fn journal_owner(&self) -> Option<&http::Uri> {
        self.shared.journal_owner.as_ref()
    }

    /// Learned session ids and tokens held now.
    pub fn learned_entries(&self) -> (usize, usize) {
        (self.shared.sessions.len(), self.shared.tokens.len())
    }

    /// The capacity of each learned table.
    pub fn learned_capacity(&self) -> usize {
        self.shared.sessions.capacity()
    }

    /// The current routing table.
    pub fn routing(&self) -> Arc<Routing> {
        self.shared.routing.load_full()
    }

    /// The swappable routing table, for the control plane and metrics.
    pub fn routing_handle(&self) -> &Arc<ArcSwap<Routing>> {
        &self.shared.routing
    }

    /// The proxy's counters.
    pub fn stats(&self) -> &Arc<ProxyStats> {
        &self.shared.stats
    }

    /// Installs a new configuration's routing settings (cookie, balance, backends, timeouts),
    /// keeping the state of backends that stay. Listen addresses, workers and TLS client
    /// settings need a restart.
    pub fn apply(&self, config: &Config, discovered: &[BackendSpec]) {
        let old = self.shared.routing.load_full();
        self.shared
            .routing
            .store(Arc::new(Routing::new(config, discovered, Some(&old))));
    }

    /// Replaces the backend set, keeping every other setting.
    pub fn set_backends(&self, configured: &[BackendSpec], discovered: &[BackendSpec]) {
        let old = self.shared.routing.load_full();
        self.shared
            .routing
            .store(Arc::new(old.with_backends(configured, discovered)));
    }

    /// A connector to the backends with the proxy's timeouts and TLS settings.
    pub fn connector(&self) -> BackendConnector {
        BackendConnector::new(
            self.shared.connect_timeout,
            Arc::clone(&self.shared.backend_tls),
            Arc::clone(&self.shared.routing),
        )
    }

    /// A worker for the runtime this is called on: its backend connection pool lives there.
    pub fn worker(&self) -> Worker {
        let connector = self.connector();
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .http2_only(self.shared.backend_http2)
            .build(connector);
        Worker {
            latency: self.shared.stats.latency_shard(),
            shared: Arc::clone(&self.shared),
            client,
            fast: fast::FastState::default(),
        }
    }
}

/// Facts about one client connection, computed once per connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's IP, ready for `X-Forwarded-For`.
    peer_ip: HeaderValue,
    /// Whether the client connected over TLS (`Secure` cookies, `X-Forwarded-Proto: https`).
    tls: bool,
}

impl ConnInfo {
    /// Info for a client at `peer`.
    pub fn new(peer: std::net::SocketAddr, tls: bool) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a valid header value");
        Self { peer_ip, tls }
    }
}

/// Serves requests on one runtime: the shared state plus this runtime's backend client.
#[derive(Debug)]
pub struct Worker {
    /// Shared with every other worker.
    shared: Arc<Shared>,
    /// Pooled HTTP/1.1 client to the backends; the pool keys by backend scheme and authority.
    client: Client<BackendConnector, ProxyBody>,
    /// The HTTP/1.1 fast path's idle backend connections and spare buffers.
    fast: fast::FastState,
    /// This worker's latency histograms (no lock shared with other workers).
    latency: Arc<crate::control::metrics::LatencyShard>,
}

impl Worker {
    /// Counters shared with the other workers (the server counts connections in them).
    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }
}

/// Where the request is going and what the response must carry.
struct Target {
    /// The backend to send to.
    backend: Arc<Backend>,
    /// Whether the response gets a new route cookie.
    issue_cookie: bool,
    /// Whether the request belongs to the session on this backend, so it must not go elsewhere.
    session_bound: bool,
}

impl Worker {
    /// Handles one request. Never fails: errors become responses here, in one place.
    pub async fn handle(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<ProxyBody> {
        let started = Instant::now();
        let kind = RouteKind::classify(req.method(), req.uri().path());
        let routing = self.shared.routing.load_full();
        let mut log = AccessLog::begin(routing.access_log, &req);
        let resp = match self.handle_inner(req, kind, conn, &routing, &mut log).await {
            Ok(resp) => resp,
            Err(err) => {
                log.answered_locally(&err);
                tracing::debug!(route = kind.as_str(), error = %err, cause = ?std::error::Error::source(&err), "answered by the proxy");
                let resp = err.into_response(kind);
                self.shared.stats.count_local(kind, resp.status().as_u16());
                resp
            }
        };
        let elapsed = started.elapsed();
        self.latency.observe(kind, elapsed);
        log.finish(kind, resp.status().as_u16(), elapsed);
        resp
    }

    async fn handle_inner(
        &self,
        req: Request<Incoming>,
        kind: RouteKind,
        conn: &ConnInfo,
        routing: &Routing,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if let Some(fanout) = &routing.admin_fanout {
            if fanout.matches(req.method(), req.uri().path()) {
                log.decision = "broadcast";
                return self.broadcast(req, conn, routing, fanout).await;
            }
        }
        let stats = &*self.shared.stats;
        let now = unix_now();
        let cookie = &*routing.cookie;
        let verify = |v: &[u8]| cookie.codec.verify(v, now, cookie.max_age);
        let route = match self.route(req.headers(), kind, routing, now, verify) {
            Ok(route) => route,
            Err((err, backend)) => {
                log.backend = backend;
                return Err(err);
            }
        };
        log.decision = route.decision;
        let mut target = Target {
            backend: route.backend,
            issue_cookie: route.issue_cookie,
            session_bound: route.session_bound,
        };

        let (parts, body) = req.into_parts();
        let body = prepare_body(kind, &parts.headers, body, routing.auth_body_limit).await?;
        let replayable = !matches!(body, ProxyBody::Stream(..));
        let headers = forward_headers(parts.headers, &parts.uri, conn);
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut outgoing = Outgoing {
            method: parts.method,
            path,
            headers,
            body,
        };

        // Re-sending to another backend is decided by the one retry policy (retry.rs).
        let mut attempts = Attempts::default();
        loop {
            log.backend = Some(target.backend.name.clone());
            let may_retry = attempts.may_retry(routing, target.session_bound, replayable);
            let req = if may_retry {
                outgoing.copy_for(&target.backend)
            } else {
                outgoing.take_request(&target.backend)
            };
            let in_flight = target.backend.start_request();
            let sent = tokio::time::timeout(routing.response_timeout, self.client.request(req)).await;
            match sent {
                Ok(Ok(resp)) => {
                    target.backend.record_success();
                    let (mut parts, body) = resp.into_parts();
                    target.backend.stats.count_response(kind, parts.status.as_u16());
                    if !headers::settle_decoded_framing(&mut parts.headers) {
                        target.backend.record_failure();
                        return Err(ProxyError::BadResponse {
                            backend: target.backend.name.clone(),
                        });
                    }
                    headers::remove_hop_by_hop(&mut parts.headers);
                    if matches!(kind, RouteKind::Auth | RouteKind::Attest) {
                        self.learn_session(&parts.headers, &target.backend, routing, now);
                    }
                    if target.issue_cookie {
                        let value = cookie.set_cookie(target.backend.id, now, conn.tls);
                        parts.headers.append(SET_COOKIE, value);
                        stats.cookies_issued.fetch_add(1, Ordering::Relaxed);
                        target.backend.stats.sessions_pinned.fetch_add(1, Ordering::Relaxed);
                    }
                    if kind == RouteKind::Attest && parts.status.is_success() && !routing.tokens_portable {
                        let body = self.learn_token(body, &target.backend, routing, now).await?;
                        return Ok(Response::from_parts(parts, body));
                    }
                    return Ok(Response::from_parts(parts, ProxyBody::Stream(body, Some(in_flight))));
                }
                Ok(Err(e)) if e.is_connect() => {
                    match attempts.refused(routing, &target.backend, kind, target.session_bound, replayable) {
                        AfterRefusal::RetryOn(next) => {
                            log.decision = "retried";
                            target = Target {
                                backend: next,
                                issue_cookie: true,
                                session_bound: false,
                            };
                        }
                        AfterRefusal::SessionLost => return Err(ProxyError::SessionLost),
                        AfterRefusal::GiveUp => {
                            return Err(ProxyError::Unreachable {
                                backend: target.backend.name.clone(),
                                source: e,
                            })
                        }
                    }
                }
                Ok(Err(e)) => {
                    return Err(ProxyError::Backend {
                        backend: target.backend.name.clone(),
                        source: e,
                    });
                }
                Err(_elapsed) => {
                    target.backend.record_failure();
                    return Err(ProxyError::Timeout {
                        backend: target.backend.name.clone(),
                    });
                }
            }
            // Only reached when `may_retry` held, so `outgoing` was copied, not taken.
        }
    }
}

impl Worker {
    /// What the proxy learned about a request that has no valid route cookie: the replica that
    /// issued its `kbs-session-id`, else (resource calls, unless tokens are portable) the one
    /// that issued its bearer token.
    fn learned_pin(
        &self,
        headers: &(impl HeaderView + ?Sized),
        kind: RouteKind,
        routing: &Routing,
        now: u64,
    ) -> Option<Learned> {
        let from_session = headers.values("cookie").find_map(|h| {
            cookie_values(h, SESSION_COOKIE.as_bytes()).find_map(|v| self.shared.sessions.get(session_key(v), now))
        });
        if let Some(b) = from_session {
            return Some(Learned::SessionId(b));
        }
        if kind != RouteKind::Resource || routing.tokens_portable {
            return None;
        }
        let token = bearer_token(headers)?;
        self.shared.tokens.get(hash_key(token), now).map(Learned::Token)
    }

    /// Remembers the `kbs-session-id` a backend set (on `auth` and `attest` responses).
    fn learn_session(&self, headers: &HeaderMap, backend: &Backend, routing: &Routing, now: u64) {
        let lifetime = routing.session_lifetime.as_secs();
        for sc in headers.get_all(SET_COOKIE) {
            if let Some((value, expires)) = session_from_set_cookie(sc.as_bytes()) {
                let until = expires.unwrap_or(u64::MAX).min(now + lifetime);
                self.shared.sessions.insert(session_key(value), backend.id, until, now);
            }
        }
    }

    /// Reads an `attest` response (small JSON) to remember which backend issued its token, until
    /// the token's `exp`. Bodies over the limit pass through unread.
    async fn learn_token(
        &self,
        body: Incoming,
        backend: &Backend,
        routing: &Routing,
        now: u64,
    ) -> Result<ProxyBody, ProxyError> {
        if body.size_hint().lower() > ATTEST_BODY_LIMIT as u64 {
            return Ok(ProxyBody::Stream(body, None));
        }
        let bytes = match Limited::new(body, ATTEST_BODY_LIMIT).collect().await {
            Ok(c) => c.to_bytes(),
            Err(_) => {
                return Err(ProxyError::BackendBody {
                    backend: backend.name.clone(),
                })
            }
        };
        let token = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_owned));
        if let Some(token) = token {
            let until = jwt_expiry(&token).unwrap_or(now + routing.session_lifetime.as_secs());
            self.shared
                .tokens
                .insert(hash_key(token.as_bytes()), backend.id, until, now);
        }
        Ok(ProxyBody::full(bytes))
    }
}

/// Where a request goes, with how it was decided: the routing step both paths share.
struct Route {
    backend: Arc<Backend>,
    /// Whether the response gets a new route cookie.
    issue_cookie: bool,
    /// Whether the request belongs to the session on this backend, so it must not go elsewhere.
    session_bound: bool,
    /// For the access log: `pinned`, `balanced`, `repinned`, `pinned-session-id`, ...
    decision: &'static str,
}

impl Worker {
    /// Reads the route cookie (with `verify`), what was learned, decides and counts. An error is
    /// what to answer instead (`SessionLost`, `NoBackend`) with the pinned backend's name.
    fn route(
        &self,
        headers: &(impl HeaderView + ?Sized),
        kind: RouteKind,
        routing: &Routing,
        now: u64,
        verify: impl FnMut(&[u8]) -> Result<crate::routing::route_cookie::Pin, Rejection>,
    ) -> Result<Route, (ProxyError, Option<String>)> {
        let stats = &*self.shared.stats;
        let cookie = &*routing.cookie;
        // A validly signed cookie for a backend not in the set counts as absent.
        let state = match read_route_cookie_with(headers, &cookie.name, verify) {
            CookieState::Valid(pin) if routing.backends.by_id(pin.backend).is_none() => {
                CookieState::Rejected(Rejection::UnknownBackend)
            }
            other => other,
        };
        if let CookieState::Rejected(why) = state {
            stats.count_rejected(why);
        }
        let bearer = kind == RouteKind::Resource && bearer_token(headers).is_some();
        // A resource call with a token every replica accepts does not need its session's replica.
        let session_bound = kind.needs_session() && !(bearer && routing.tokens_portable);
        let learned = match state {
            CookieState::Valid(_) => None,
            CookieState::Absent | CookieState::Rejected(_) => self.learned_pin(headers, kind, routing, now),
        };
        match decide(
            session_bound,
            kind,
            state,
            learned,
            &routing.backends,
            now,
            cookie.max_age,
        ) {
            Decision::Pinned {
                backend,
                refresh,
                learned,
            } => {
                if let Some(l) = learned {
                    stats.count_learned(l);
                }
                let decision = match (learned, refresh) {
                    (Some(Learned::SessionId(_)), _) => "pinned-session-id",
                    (Some(Learned::Token(_)), _) => "pinned-token",
                    (None, true) => "pinned-refreshed",
                    (None, false) => "pinned",
                };
                Ok(Route {
                    backend: Arc::clone(backend),
                    issue_cookie: refresh,
                    session_bound,
                    decision,
                })
            }
            Decision::Balance { repin } => {
                if repin {
                    stats.repinned.fetch_add(1, Ordering::Relaxed);
                }
                let decision = match (repin, bearer && routing.tokens_portable) {
                    (true, _) => "repinned",
                    (false, true) => "balanced-portable-token",
                    (false, false) => "balanced",
                };
                let backend = balance(routing, &[]).ok_or((ProxyError::NoBackend, None))?;
                Ok(Route {
                    backend,
                    issue_cookie: true,
                    session_bound: false,
                    decision,
                })
            }
            Decision::SessionLost(backend) => {
                backend.stats.pinned_refused.fetch_add(1, Ordering::Relaxed);
                Err((ProxyError::SessionLost, Some(backend.name.clone())))
            }
        }
    }
}

/// The token of an `Authorization: Bearer` header.
fn bearer_token(headers: &(impl HeaderView + ?Sized)) -> Option<&[u8]> {
    let v = headers.values("authorization").next()?;
    let t = v.strip_prefix(b"Bearer ")?.trim_ascii();
    (!t.is_empty()).then_some(t)
}

/// A backend for an unpinned request, skipping `exclude`. Prefers backends that take new
/// sessions; when none does, a healthy one that is behind on admin writes (so replicas that
/// cannot be brought in sync never leave zero serving; the control plane reports it), then any
/// one that is not draining (it may have come back) rather than refuse outright.
fn balance(routing: &Routing, exclude: &[BackendId]) -> Option<Arc<Backend>> {
    let list = &routing.backends.list;
    let not_excluded = |b: &Backend| !exclude.contains(&b.id);
    routing
        .balancer
        .select(list, |b| b.accepts_new_sessions() && not_excluded(b))
        .or_else(|| routing.balancer.select(list, |b| b.is_serving() && not_excluded(b)))
        .or_else(|| routing.balancer.select(list, |b| !b.is_draining() && not_excluded(b)))
        .cloned()
}

/// `auth` bodies are buffered (they are small and must be re-sendable when the pinned replica
/// is gone); empty bodies stay empty; everything else streams.
async fn prepare_body(
    kind: RouteKind,
    headers: &HeaderMap,
    body: Incoming,
    limit: usize,
) -> Result<ProxyBody, ProxyError> {
    if body.is_end_stream() {
        return Ok(ProxyBody::Empty);
    }
    if kind != RouteKind::Auth {
        return Ok(ProxyBody::Stream(body, None));
    }
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(ProxyBody::full(collected.to_bytes())),
        Err(e) => match e.downcast::<hyper::Error>() {
            Ok(e) => Err(ProxyError::ClientBody(*e)),
            Err(_length_limit) => Err(ProxyError::BodyTooLarge { limit }),
        },
    }
}

/// One access-log line per request: method, path (no query: it may carry tokens), status,
/// backend, duration and routing decision. Cookies, tokens and bodies are never logged.
struct AccessLog {
    /// Off: nothing is recorded.
    enabled: bool,
    method: Method,
    path: Option<String>,
    /// The backend the request went (or was pinned) to.
    backend: Option<String>,
    /// How the backend was chosen.
    decision: &'static str,
}

impl AccessLog {
    fn begin(enabled: bool, req: &Request<Incoming>) -> Self {
        Self::new(enabled, req.method().clone(), req.uri().path())
    }

    /// The line of a request `method path` (the path without its query), recorded when
    /// `enabled`; for either transport.
    fn new(enabled: bool, method: Method, path: &str) -> Self {
        Self {
            enabled,
            method,
            path: enabled.then(|| path.to_owned()),
            backend: None,
            decision: "none",
        }
    }

    /// The proxy answers `err` itself: the decision says so when the pinned session is lost.
    fn answered_locally(&mut self, err: &ProxyError) {
        if let ProxyError::SessionLost = err {
            self.decision = "session-lost";
        }
    }

    fn finish(self, kind: RouteKind, status: u16, elapsed: std::time::Duration) {
        if self.enabled {
            let path = self.path.as_deref().unwrap_or("");
            let backend = self.backend.as_deref().unwrap_or("-");
            log_request(
                self.method.as_str(),
                path,
                status,
                backend,
                kind,
                self.decision,
                elapsed,
            );
        }
    }
}

/// Writes one access-log line: the one format both transports use.
fn log_request(
    method: &str,
    path: &str,
    status: u16,
    backend: &str,
    kind: RouteKind,
    decision: &str,
    elapsed: std::time::Duration,
) {
    tracing::info!(
        target: "access",
        method = %method,
        path,
        status,
        backend,
        route = kind.as_str(),
        decision,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
}

/// The parts of a request that go to a backend, kept whole until the last attempt.
struct Outgoing {
    method: Method,
    path: PathAndQuery,
    headers: HeaderMap,
    body: ProxyBody,
}

impl Outgoing {
    fn uri(&self, backend: &Backend) -> Uri {
        backend_uri(backend, self.path.clone())
    }

    fn build(&self, backend: &Backend, headers: HeaderMap, body: ProxyBody) -> Request<ProxyBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri(backend);
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        req
    }

    /// A copy to send while keeping the original for another attempt (replayable bodies only).
    fn copy_for(&self, backend: &Backend) -> Request<ProxyBody> {
        let body = match &self.body {
            ProxyBody::Full(Some(b)) => ProxyBody::full(Bytes::clone(b)),
            ProxyBody::Full(None) | ProxyBody::Empty | ProxyBody::Stream(..) => ProxyBody::Empty,
        };
        self.build(backend, self.headers.clone(), body)
    }

    /// The request itself, for the last attempt: headers and body move out.
    fn take_request(&mut self, backend: &Backend) -> Request<ProxyBody> {
        let headers = std::mem::take(&mut self.headers);
        let body = std::mem::replace(&mut self.body, ProxyBody::Empty);
        self.build(backend, headers, body)
    }
}

/// `scheme://authority/path` of `backend`: rewriting the authority gives each backend its own
/// keep-alive pool in the client.
pub(crate) fn backend_uri(backend: &Backend, path: PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(backend.scheme.clone());
    parts.authority = Some(backend.authority.clone());
    parts.path_and_query = Some(path);
    Uri::from_parts(parts).expect("scheme, authority and path are set")
}

/// Rewrites the client's headers for the backend: hop-by-hop out, `Host` kept (taken from the
/// URI for HTTP/2 clients, which send `:authority` instead), `X-Forwarded-*` set.
fn forward_headers(mut headers: HeaderMap, uri: &Uri, conn: &ConnInfo) -> HeaderMap {
    headers::remove_hop_by_hop(&mut headers);
    let host = match headers.get(HOST) {
        Some(h) => Some(h.clone()),
        None => {
            let from_uri = uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok());
            if let Some(h) = &from_uri {
                headers.insert(HOST, h.clone());
            }
            from_uri
        }
    };
    headers::set_forwarded(&mut headers, &conn.peer_ip, conn.tls, host);
    headers
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
