//! The routing table: everything a request needs to be routed, in one immutable snapshot that
//! is swapped whole (`ArcSwap`) when backends, cookie or balance settings change.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use http::HeaderValue;

use crate::config::{AdminFanout, BackendSpec, Config, CookieConfig, SameSite};
use crate::routing::balance::Balancer;
use crate::routing::route_cookie::{BackendId, RouteCookieCodec};
use crate::upstream::backend::{Backend, Backends};

/// One routing snapshot.
#[derive(Debug)]
pub struct Routing {
    /// The backends, including retired ones still draining.
    pub backends: Backends,
    /// Picks backends for unpinned requests.
    pub balancer: Arc<Balancer>,
    /// Mints and checks route cookies.
    pub cookie: Arc<CookieIssuer>,
    /// Limit on waiting for a backend's response head.
    pub response_timeout: Duration,
    /// Largest `auth` body buffered for a re-send.
    pub auth_body_limit: usize,
    /// One log line per request.
    pub access_log: bool,
    /// Clients whose `X-Forwarded-For` chain the access log shows.
    pub trusted_proxies: Arc<[crate::config::Cidr]>,
    /// Admin writes broadcast to every replica (`None`: passthrough).
    pub admin_fanout: Option<AdminFanout>,
    /// How long a learned session id is kept at most.
    pub session_lifetime: Duration,
    /// Replicas share a token signer: bearer requests need no particular replica.
    pub tokens_portable: bool,
}

impl Routing {
    /// A table for `config`, with `discovered` backends besides the configured ones. Backends of
    /// `previous` that keep their name and address are carried over with their state.
    pub fn new(config: &Config, discovered: &[BackendSpec], previous: Option<&Routing>) -> Self {
        let specs: Vec<&BackendSpec> = config.backends.iter().chain(discovered).collect();
        Self {
            backends: rebuild(previous.map(|p| &p.backends), &specs, config.drain_timeout),
            balancer: Arc::new(Balancer::new(config.balance)),
            cookie: Arc::new(CookieIssuer::new(&config.cookie)),
            response_timeout: config.response_timeout,
            auth_body_limit: config.auth_body_limit,
            access_log: config.access_log,
            trusted_proxies: config.trusted_proxies.clone().into(),
            admin_fanout: config.admin_fanout.clone(),
            session_lifetime: config.session_lifetime,
            tokens_portable: config.tokens_portable,
        }
    }

    /// The same table with another backend set (discovery changed, or a drain expired).
    pub(crate) fn with_backends(&self, config_backends: &[BackendSpec], discovered: &[BackendSpec]) -> Self {
        let specs: Vec<&BackendSpec> = config_backends.iter().chain(discovered).collect();
        Self {
            backends: rebuild(Some(&self.backends), &specs, self.backends.drain_timeout),
            balancer: Arc::clone(&self.balancer),
            cookie: Arc::clone(&self.cookie),
            response_timeout: self.response_timeout,
            auth_body_limit: self.auth_body_limit,
            access_log: self.access_log,
            trusted_proxies: Arc::clone(&self.trusted_proxies),
            admin_fanout: self.admin_fanout.clone(),
            session_lifetime: self.session_lifetime,
            tokens_portable: self.tokens_portable,
        }
    }
}

/// The new backend list: `specs` in order, reusing `old` backends with the same name, scheme,
/// address and certificate name; old backends no longer wanted are retired (drained) and kept until their drain
/// expires, so the sessions pinned to them can finish.
fn rebuild(old: Option<&Backends>, specs: &[&BackendSpec], drain_timeout: Duration) -> Backends {
    let same = |b: &Backend, s: &BackendSpec| {
        b.name == s.name && b.scheme == s.scheme && b.authority == s.authority && b.tls_name == s.tls_name
    };
    let mut list: Vec<Arc<Backend>> = Vec::with_capacity(specs.len());
    for spec in specs {
        if list.iter().any(|b| b.name == spec.name) {
            continue; // a discovered address that is also configured: keep the first
        }
        let reused = old.and_then(|o| o.list.iter().find(|b| same(b, spec))).cloned();
        let backend = match reused {
            Some(b) => {
                b.unretire();
                b
            }
            None => Arc::new(Backend::with_tls_name(
                spec.name.clone(),
                spec.scheme.clone(),
                spec.authority.clone(),
                spec.tls_name.clone(),
            )),
        };
        list.push(backend);
    }
    for b in old.map_or(&[][..], |o| &o.list[..]) {
        let wanted = list.iter().any(|n| Arc::ptr_eq(n, b) || n.name == b.name);
        if !wanted {
            b.retire();
            if !b.drain_expired(drain_timeout) {
                list.push(Arc::clone(b));
            }
        }
    }
    Backends { list, drain_timeout }
}

/// The route cookie's codec plus its pre-built `Set-Cookie` attributes.
#[derive(Debug)]
pub struct CookieIssuer {
    /// Signs and verifies values.
    pub codec: RouteCookieCodec,
    /// Cookie name.
    pub name: String,
    /// Lifetime in seconds.
    pub max_age: u64,
    /// `; Path=/; Max-Age=...; HttpOnly...` for plain-text clients, built once.
    attrs_plain: String,
    /// The same with `; Secure`, for TLS clients.
    attrs_tls: String,
    /// Values minted this second, per backend and TLS-ness: the issue time has one-second
    /// resolution, so every cookie for a backend within a second is the same bytes, and new
    /// sessions need not pay an HMAC and an allocation each.
    minted: std::sync::Mutex<Vec<Minted>>,
}

/// A `Set-Cookie` value minted for `backend` at `second`.
#[derive(Debug)]
struct Minted {
    backend: BackendId,
    tls: bool,
    second: u64,
    value: HeaderValue,
}

impl CookieIssuer {
    /// An issuer for the configured cookie.
    pub fn new(c: &CookieConfig) -> Self {
        let mut attrs = format!("; Path={}; Max-Age={}; HttpOnly", c.path, c.max_age);
        if let Some(d) = &c.domain {
            attrs.push_str("; Domain=");
            attrs.push_str(d);
        }
        match c.same_site {
            Some(SameSite::Strict) => attrs.push_str("; SameSite=Strict"),
            Some(SameSite::Lax) => attrs.push_str("; SameSite=Lax"),
            Some(SameSite::None) => attrs.push_str("; SameSite=None"),
            None => {}
        }
        Self {
            codec: RouteCookieCodec::with_keys(&c.secrets[0], &c.secrets[1..]),
            name: c.name.clone(),
            max_age: c.max_age,
            attrs_tls: format!("{attrs}; Secure"),
            attrs_plain: attrs,
            minted: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The `Set-Cookie` value pinning `backend`, issued at `now`.
    pub fn set_cookie(&self, backend: BackendId, now: u64, tls: bool) -> HeaderValue {
        let mut minted = self.minted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = minted.iter_mut().find(|m| m.backend == backend && m.tls == tls) {
            if m.second != now {
                m.value = self.mint(backend, now, tls);
                m.second = now;
            }
            return m.value.clone();
        }
        let value = self.mint(backend, now, tls);
        // Bounded by the backends there are (a retired one's entry is harmless and small).
        if minted.len() < 1024 {
            minted.push(Minted {
                backend,
                tls,
                second: now,
                value: value.clone(),
            });
        }
        value
    }

    fn mint(&self, backend: BackendId, now: u64, tls: bool) -> HeaderValue {
        let attrs = if tls { &self.attrs_tls } else { &self.attrs_plain };
        let value = self.codec.mint(backend, now);
        let mut buf = BytesMut::with_capacity(self.name.len() + 1 + value.len() + attrs.len());
        buf.put_slice(self.name.as_bytes());
        buf.put_u8(b'=');
        buf.put_slice(&value);
        buf.put_slice(attrs.as_bytes());
        HeaderValue::from_maybe_shared(buf.freeze()).expect("validated at config time")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_backend;

    #[test]
    fn rebuild_keeps_state_and_drains_what_left() {
        let a = parse_backend("a=http://127.0.0.1:1").unwrap();
        let b = parse_backend("b=http://127.0.0.1:2").unwrap();
        let first = rebuild(None, &[&a, &b], Duration::from_secs(300));
        first.list[0].record_failure();
        let second = rebuild(Some(&first), &[&a], Duration::from_secs(300));
        assert!(
            Arc::ptr_eq(&first.list[0], &second.list[0]),
            "same name and address: same state"
        );
        assert_eq!(second.list.len(), 2, "b drains before it goes");
        assert!(second.list[1].is_retired() && !second.list[1].accepts_new_sessions());
        let third = rebuild(Some(&second), &[&a], Duration::ZERO);
        assert_eq!(third.list.len(), 1, "drain over: b is dropped");
        let back = rebuild(Some(&second), &[&a, &b], Duration::from_secs(300));
        assert!(back.list[1].accepts_new_sessions(), "b came back");
        let moved = parse_backend("a=http://127.0.0.1:3").unwrap();
        let fourth = rebuild(Some(&first), &[&moved], Duration::from_secs(300));
        let a_entries: Vec<_> = fourth.list.iter().filter(|x| x.name == "a").collect();
        assert_eq!(
            a_entries.len(),
            1,
            "the same name at a new address replaces the old one"
        );
        assert_eq!(a_entries[0].authority.as_str(), "127.0.0.1:3");
    }
}
