//! The request pipeline. Every request goes through the same steps, written once:
//!
//! 1. **classify**: which KBS step it is ([`crate::kbs::RouteKind`]);
//! 2. **decide**: [`route`] reads the route cookie and what was learned, and picks the backend
//!    (the rules themselves are pure, in [`crate::routing`]);
//! 3. **forward**, with [`retry`] choosing the next attempt after a refused connection;
//! 4. **observe**: [`access_log`], the counters and latency shards, the answers the proxy makes
//!    itself ([`ProxyError`], in the KBS error shape).
//!
//! Two transports run these steps and keep only what is really transport: [`hyper_path`]
//! (HTTP/2, anything unusual, on hyper) and [`fast`] (HTTP/1.1, plain or over TLS, parsed and
//! relayed from the connection's own buffers). Admin writes go to every replica through [`fanout`].
//!
//! [`Proxy`] holds what all workers share; [`Worker`] adds the backend client, whose connection
//! pool lives on the runtime that created it (one per worker thread).

mod access_log;
mod body;
mod error;
mod fanout;
mod fast;
pub mod headers;
mod hyper_path;
mod request_id;
mod retry;
mod route;

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
pub(crate) use fast::{ClientIo, Handoff, Plain, TlsClient};

use access_log::{AccessLog, LineFields};
use hyper_path::forward_headers;
use retry::{AfterRefusal, Attempts};
use route::{balance, Route};

use crate::config::{BackendSpec, Cidr, Config};
use crate::control::journal::Journal;
use crate::control::metrics::ProxyStats;
use crate::kbs::RouteKind;
use crate::kbs::SESSION_COOKIE;
use crate::routing::affinity::{decide, read_route_cookie_with, CookieState, Decision, HeaderView, Learned};
use crate::routing::route_cookie::{cookie_values, BackendId, Rejection};
use crate::routing::sessions::{hash_key, jwt_expiry, session_from_set_cookie, session_key, AffinityTable};
use crate::routing::Routing;
use crate::tls::TlsError;
use crate::upstream::backend::{Backend, UpstreamCause};
use crate::upstream::connector::BackendConnector;

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
    pub(crate) fn routing_handle(&self) -> &Arc<ArcSwap<Routing>> {
        &self.shared.routing
    }

    /// The proxy's counters.
    pub fn stats(&self) -> &Arc<ProxyStats> {
        &self.shared.stats
    }

    /// Installs a new configuration's routing settings (cookie, balance, backends, timeouts),
    /// keeping the state of backends that stay. Listen addresses, workers and TLS client
    /// settings need a restart.
    pub(crate) fn apply(&self, config: &Config, discovered: &[BackendSpec]) {
        let old = self.shared.routing.load_full();
        self.shared
            .routing
            .store(Arc::new(Routing::new(config, discovered, Some(&old))));
    }

    /// Replaces the backend set, keeping every other setting.
    pub(crate) fn set_backends(&self, configured: &[BackendSpec], discovered: &[BackendSpec]) {
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
        let latency = self.shared.stats.latency_shard();
        Worker {
            request_ids: request_id::RequestIds::new(latency.slot),
            latency,
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
    /// The same, to check against `trusted-proxies`.
    peer: std::net::IpAddr,
    /// Whether the client connected over TLS (`Secure` cookies, `X-Forwarded-Proto: https`).
    tls: bool,
}

impl ConnInfo {
    /// Info for a client at `peer`.
    pub fn new(peer: std::net::SocketAddr, tls: bool) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a valid header value");
        Self {
            peer_ip,
            peer: peer.ip(),
            tls,
        }
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
    /// Makes the `X-Request-Id`s of requests that come without an acceptable one.
    request_ids: request_id::RequestIds,
}

impl Worker {
    /// Counters shared with the other workers (the server counts connections in them).
    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
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

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
