//! The request path: read the route cookie, decide, forward over a pooled connection, and answer.
//!
//! [`Proxy`] holds what all workers share; [`Worker`] adds the backend client, whose connection
//! pool lives on the runtime that created it (one per worker thread).

mod body;
mod error;
pub mod headers;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST, SET_COOKIE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use body::ProxyBody;
pub use error::ProxyError;

use crate::affinity::{decide, read_route_cookie, Decision};
use crate::backend::{Backend, Backends};
use crate::balance::Balancer;
use crate::config::{Config, CookieConfig, SameSite};
use crate::kbs::RouteKind;
use crate::route_cookie::{BackendId, RouteCookieCodec};

/// How long an idle pooled backend connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The proxy's shared state: configuration, backends and balancer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Proxy {
    /// Shared by every worker.
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The backend set, swapped whole when it changes.
    backends: ArcSwap<Backends>,
    /// Picks backends for unpinned requests.
    balancer: Balancer,
    /// Mints and checks route cookies.
    cookie: CookieIssuer,
    /// Limit on connecting to a backend.
    connect_timeout: Duration,
    /// Limit on waiting for a backend's response head.
    response_timeout: Duration,
    /// Largest `auth` body buffered for a re-send.
    auth_body_limit: usize,
}

/// The route cookie's codec plus its pre-built `Set-Cookie` attributes.
#[derive(Debug)]
struct CookieIssuer {
    /// Signs and verifies values.
    codec: RouteCookieCodec,
    /// Cookie name.
    name: String,
    /// Lifetime in seconds.
    max_age: u64,
    /// `; Path=/; Max-Age=...; HttpOnly...` for plain-text clients, built once.
    attrs_plain: String,
    /// The same with `; Secure`, for TLS clients.
    attrs_tls: String,
}

impl CookieIssuer {
    fn new(c: &CookieConfig) -> Self {
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
            codec: RouteCookieCodec::new(&c.secret),
            name: c.name.clone(),
            max_age: c.max_age,
            attrs_tls: format!("{attrs}; Secure"),
            attrs_plain: attrs,
        }
    }

    /// The `Set-Cookie` value pinning `backend`.
    fn set_cookie(&self, backend: BackendId, now: u64, tls: bool) -> HeaderValue {
        let attrs = if tls {
            &self.attrs_tls
        } else {
            &self.attrs_plain
        };
        let value = self.codec.mint(backend, now);
        let mut buf = BytesMut::with_capacity(self.name.len() + 1 + value.len() + attrs.len());
        buf.put_slice(self.name.as_bytes());
        buf.put_u8(b'=');
        buf.put_slice(&value);
        buf.put_slice(attrs.as_bytes());
        HeaderValue::from_maybe_shared(buf.freeze()).expect("validated at config time")
    }
}

impl Proxy {
    /// Builds the proxy from a validated configuration. Binds nothing.
    pub fn new(config: &Config) -> Self {
        let list = config
            .backends
            .iter()
            .map(|b| {
                Arc::new(Backend::new(
                    b.name.clone(),
                    b.scheme.clone(),
                    b.authority.clone(),
                ))
            })
            .collect();
        Self {
            shared: Arc::new(Shared {
                backends: ArcSwap::from_pointee(Backends { list }),
                balancer: Balancer::new(config.balance),
                cookie: CookieIssuer::new(&config.cookie),
                connect_timeout: config.connect_timeout,
                response_timeout: config.response_timeout,
                auth_body_limit: config.auth_body_limit,
            }),
        }
    }

    /// The current backend snapshot.
    pub fn backends(&self) -> Arc<Backends> {
        self.shared.backends.load_full()
    }

    /// A worker for the runtime this is called on: its backend connection pool lives there.
    pub fn worker(&self) -> Worker {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(self.shared.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Worker {
            shared: Arc::clone(&self.shared),
            client,
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
        let peer_ip =
            HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a valid header value");
        Self { peer_ip, tls }
    }
}

/// Serves requests on one runtime: the shared state plus this runtime's backend client.
#[derive(Debug)]
pub struct Worker {
    /// Shared with every other worker.
    shared: Arc<Shared>,
    /// Pooled HTTP/1.1 client to the backends; the pool keys by backend authority.
    client: Client<HttpConnector, ProxyBody>,
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
        let kind = RouteKind::classify(req.method(), req.uri().path());
        match self.handle_inner(req, kind, conn).await {
            Ok(resp) => resp,
            Err(err) => {
                tracing::warn!(route = kind.as_str(), error = %err, cause = ?std::error::Error::source(&err), "answered by the proxy");
                err.into_response(kind)
            }
        }
    }

    async fn handle_inner(
        &self,
        req: Request<Incoming>,
        kind: RouteKind,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let shared = &*self.shared;
        let now = unix_now();
        let cookie = &shared.cookie;
        let state = read_route_cookie(
            req.headers(),
            &cookie.name,
            &cookie.codec,
            now,
            cookie.max_age,
        );
        let mut target = {
            let backends = shared.backends.load();
            match decide(kind, state, &backends, now, cookie.max_age) {
                Decision::Pinned { backend, refresh } => Target {
                    backend: Arc::clone(backend),
                    issue_cookie: refresh,
                    session_bound: kind.needs_session(),
                },
                Decision::Balance => Target {
                    backend: self.balance(&backends, &[]).ok_or(ProxyError::NoBackend)?,
                    issue_cookie: true,
                    session_bound: false,
                },
                Decision::SessionLost => return Err(ProxyError::SessionLost),
            }
        };

        let (parts, body) = req.into_parts();
        let body = self.prepare_body(kind, &parts.headers, body).await?;
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

        // Re-sending to another backend is allowed only after a failed connect (nothing reached
        // a backend), for a body we still hold, and never for a request bound to its session.
        let mut tried: Vec<BackendId> = Vec::new();
        loop {
            let may_retry = replayable
                && !target.session_bound
                && shared.backends.load().list.len() > tried.len() + 1;
            let req = if may_retry {
                outgoing.copy_for(&target.backend)
            } else {
                outgoing.take_request(&target.backend)
            };
            let in_flight = target.backend.start_request();
            let sent =
                tokio::time::timeout(shared.response_timeout, self.client.request(req)).await;
            match sent {
                Ok(Ok(resp)) => {
                    target.backend.record_success();
                    let (mut parts, body) = resp.into_parts();
                    headers::remove_hop_by_hop(&mut parts.headers);
                    if target.issue_cookie {
                        let value = cookie.set_cookie(target.backend.id, now, conn.tls);
                        parts.headers.append(SET_COOKIE, value);
                    }
                    return Ok(Response::from_parts(
                        parts,
                        ProxyBody::Stream(body, Some(in_flight)),
                    ));
                }
                Ok(Err(e)) if e.is_connect() => {
                    target.backend.record_connect_failure();
                    let backend = target.backend.name.clone();
                    if target.session_bound {
                        tracing::warn!(
                            backend,
                            route = kind.as_str(),
                            "pinned replica unreachable"
                        );
                        return Err(ProxyError::SessionLost);
                    }
                    if !may_retry {
                        return Err(ProxyError::Unreachable { backend, source: e });
                    }
                    tried.push(target.backend.id);
                    let backends = shared.backends.load();
                    let Some(next) = self.balance(&backends, &tried) else {
                        return Err(ProxyError::Unreachable { backend, source: e });
                    };
                    tracing::info!(
                        from = backend,
                        to = next.name,
                        "re-sent after a failed connect"
                    );
                    target = Target {
                        backend: next,
                        issue_cookie: true,
                        session_bound: false,
                    };
                }
                Ok(Err(e)) => {
                    return Err(ProxyError::Backend {
                        backend: target.backend.name.clone(),
                        source: e,
                    });
                }
                Err(_elapsed) => {
                    return Err(ProxyError::Timeout {
                        backend: target.backend.name.clone(),
                    })
                }
            }
            // Only reached when `may_retry` held, so `outgoing` was copied, not taken.
        }
    }

    /// A backend for an unpinned request, skipping `exclude`. Prefers available backends; when
    /// none is, tries any (they may have come back) rather than refuse outright.
    fn balance(&self, backends: &Backends, exclude: &[BackendId]) -> Option<Arc<Backend>> {
        let balancer: &Balancer = &self.shared.balancer;
        let not_excluded = |b: &Backend| !exclude.contains(&b.id);
        balancer
            .select(&backends.list, |b| b.is_available() && not_excluded(b))
            .or_else(|| balancer.select(&backends.list, not_excluded))
            .cloned()
    }

    /// `auth` bodies are buffered (they are small and must be re-sendable when the pinned replica
    /// is gone); empty bodies stay empty; everything else streams.
    async fn prepare_body(
        &self,
        kind: RouteKind,
        headers: &HeaderMap,
        body: Incoming,
    ) -> Result<ProxyBody, ProxyError> {
        if body.is_end_stream() {
            return Ok(ProxyBody::Empty);
        }
        if kind != RouteKind::Auth {
            return Ok(ProxyBody::Stream(body, None));
        }
        let limit = self.shared.auth_body_limit;
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
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(backend.scheme.clone());
        parts.authority = Some(backend.authority.clone());
        parts.path_and_query = Some(self.path.clone());
        Uri::from_parts(parts).expect("scheme, authority and path are set")
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

/// Rewrites the client's headers for the backend: hop-by-hop out, `Host` kept (taken from the
/// URI for HTTP/2 clients, which send `:authority` instead), `X-Forwarded-*` set.
fn forward_headers(mut headers: HeaderMap, uri: &Uri, conn: &ConnInfo) -> HeaderMap {
    headers::remove_hop_by_hop(&mut headers);
    let host = match headers.get(HOST) {
        Some(h) => Some(h.clone()),
        None => {
            let from_uri = uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
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
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
