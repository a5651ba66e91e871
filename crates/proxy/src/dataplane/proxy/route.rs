//! The routing step both transports share: read the route cookie and what was learned from
//! earlier answers, decide (with [`crate::routing::affinity::decide`]), choose a backend for an
//! unpinned request; and learn sessions and tokens from the answers.

use super::*;

/// Largest `attest` response read to learn its token (real ones are a few KiB).
const ATTEST_BODY_LIMIT: usize = 256 * 1024;

/// Where a request goes, with how it was decided: the routing step both paths share.
pub(super) struct Route {
    pub(super) backend: Arc<Backend>,
    /// Whether the response gets a new route cookie.
    pub(super) issue_cookie: bool,
    /// Whether the request belongs to the session on this backend, so it must not go elsewhere.
    pub(super) session_bound: bool,
    /// For the access log: `pinned`, `balanced`, `repinned`, `pinned-session-id`, ...
    pub(super) decision: &'static str,
}

impl Worker {
    /// Reads the route cookie (with `verify`), what was learned, decides and counts. An error is
    /// what to answer instead (`SessionLost`, `NoBackend`) with the pinned backend's name.
    pub(super) fn route(
        &self,
        headers: &(impl HeaderView + ?Sized),
        kind: RouteKind,
        routing: &Routing,
        now: u64,
        verify: impl FnMut(&[u8]) -> Result<crate::routing::route_cookie::Pin, Rejection>,
    ) -> Result<Route, (ProxyError, Option<Arc<Backend>>)> {
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
                Err((ProxyError::SessionLost, Some(Arc::clone(backend))))
            }
        }
    }
}

impl Worker {
    /// What the proxy learned about a request that has no valid route cookie: the replica that
    /// issued its `kbs-session-id`, else (resource calls, unless tokens are portable) the one
    /// that issued its bearer token.
    pub(super) fn learned_pin(
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
    pub(super) fn learn_session(&self, headers: &HeaderMap, backend: &Backend, routing: &Routing, now: u64) {
        let lifetime = routing.session_lifetime.as_secs();
        for sc in headers.get_all(SET_COOKIE) {
            if let Some((value, expires)) = session_from_set_cookie(sc.as_bytes()) {
                let until = expires.unwrap_or(u64::MAX).min(now + lifetime);
                if self.shared.sessions.insert(session_key(value), backend.id, until, now) {
                    self.shared.stats.count_evicted(false);
                }
            }
        }
    }

    /// Reads an `attest` response (small JSON) to remember which backend issued its token, until
    /// the token's `exp`. Bodies over the limit pass through unread.
    pub(super) async fn learn_token(
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
            if self
                .shared
                .tokens
                .insert(hash_key(token.as_bytes()), backend.id, until, now)
            {
                self.shared.stats.count_evicted(true);
            }
        }
        Ok(ProxyBody::full(bytes))
    }
}

/// The token of an `Authorization: Bearer` header.
pub(super) fn bearer_token(headers: &(impl HeaderView + ?Sized)) -> Option<&[u8]> {
    let v = headers.values("authorization").next()?;
    let t = v.strip_prefix(b"Bearer ")?.trim_ascii();
    (!t.is_empty()).then_some(t)
}

/// A backend for an unpinned request, skipping `exclude`. Prefers backends that take new
/// sessions; when none does, a healthy one that is behind on admin writes (so replicas that
/// cannot be brought in sync never leave zero serving; the control plane reports it), then any
/// one that is not draining (it may have come back) rather than refuse outright.
pub(super) fn balance(routing: &Routing, exclude: &[BackendId]) -> Option<Arc<Backend>> {
    let list = &routing.backends.list;
    let not_excluded = |b: &Backend| !exclude.contains(&b.id);
    routing
        .balancer
        .select(list, |b| b.accepts_new_sessions() && not_excluded(b))
        .or_else(|| routing.balancer.select(list, |b| b.is_serving() && not_excluded(b)))
        .or_else(|| routing.balancer.select(list, |b| !b.is_draining() && not_excluded(b)))
        .cloned()
}
