//! A simulated Trustee KBS replica, faithful where routing and replica state are concerned (see
//! `shared/kbs-protocol.md`; every "upstream" path below is in the `confidential-containers/trustee`
//! repository):
//!
//! - Sessions live in this replica's memory only; the `kbs-session-id` cookie is 32 hex digits
//!   with an `Expires`; unknown sessions get the real 401 bodies (JSON, no content type).
//! - Tokens are signed with this replica's own key unless a shared signer is given, and that key
//!   is drawn anew at every (re)start, as a Trustee without a shared signer does.
//! - Admin writes change this replica only. Admin calls run insecure, behind a static bearer, or
//!   behind an expiring admin JWT (Trustee's `AuthenticatedAuthorization`), see [`SimConfig`].
//! - `/metrics` is Trustee-shaped (or absent, like Trustee v0.11); every counter starts at 0 when
//!   the simulated process starts.
//! - [`SimKbs::restart_empty`] models a pod restart with `LocalFs`/`LocalJson` storage on an
//!   `emptyDir`: same address, nothing written through the admin API survives.
//! - A clock offset ([`SimConfig::clock_offset`]) lets a test restart a replica "hours later".
//!
//! Through a plain round-robin balancer a client's `attest` lands on the other replica and fails,
//! exactly as with the real KBS. Every response names the replica in `x-kbs-replica`, which the
//! real KBS does not send; it is there for the demo table and for `curl`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use kbs_proxy::kbs::{error_body, API_PREFIX, PROTOCOL_VERSION, SESSION_COOKIE};
use kbs_proxy::routing::route_cookie::cookie_values;

/// The response header naming the replica that answered (the simulator's own addition).
pub const REPLICA_HEADER: &str = "x-kbs-replica";
/// Largest request body the simulator reads (the real KBS has a similar limit).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// How long [`SimKbs::restart_empty`] keeps trying to bind the old address.
const REBIND_WINDOW: Duration = Duration::from_secs(2);
/// Pause between two bind attempts while the old listener is still closing.
const REBIND_STEP: Duration = Duration::from_millis(10);
/// Clock skew allowed on a JWT's `exp`: Trustee verifies admin JWTs with `jsonwebtoken`'s
/// `Validation::new(alg)` (upstream `kbs/src/crypto/jwt.rs`, `decode_token_claims`), whose
/// default leeway is 60 seconds.
const JWT_LEEWAY_SECS: u64 = 60;
/// `version` label of `kbs_build_info`.
const BUILD_VERSION: &str = env!("CARGO_PKG_VERSION");
/// `build_date` label of `kbs_build_info` (fixed: a restarted pod runs the same image).
const BUILD_DATE: &str = "1970-01-01T00:00:00Z";

/// How a simulated replica behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The replica's name, returned in `x-kbs-replica`.
    pub name: String,
    /// Session lifetime (`[attestation_service] timeout`, 5 minutes by default).
    pub session_timeout: Duration,
    /// Lifetime of issued tokens.
    pub token_ttl: Duration,
    /// Token signing key. `None`: a random key of this replica's own, drawn at every (re)start,
    /// so its tokens are accepted by this process alone (a real deployment without a shared
    /// signer generates its key when it starts).
    pub token_key: Option<Vec<u8>>,
    /// When set (and [`SimConfig::admin_jwt_key`] is not), admin calls need
    /// `Authorization: Bearer <this>`, and a refusal has the body of the older Trustee admin
    /// (`[admin] auth_public_key`): 401 `AdminAuth`, `Admin auth error: ...` (upstream
    /// `kbs/src/error.rs` before the admin rework, `AdminAuth(#[from] kbs_proxy::control::admin::Error)`).
    pub admin_token: Option<String>,
    /// Admin authorization like Trustee's `AuthenticatedAuthorization` with a bearer-JWT
    /// identity provider: admin calls need `Authorization: Bearer <JWT>` signed (HS256 here, the
    /// simulator's stand-in for the provider's public key) with this key, carrying a `role`
    /// claim and an `exp` not past by the replica's clock (60 s leeway, as upstream). Mint one
    /// with [`admin_jwt`]. Takes precedence over [`SimConfig::admin_token`].
    pub admin_jwt_key: Option<Vec<u8>>,
    /// Resources present at start, path `repo/type/tag` → content.
    pub resources: Vec<(String, Bytes)>,
    /// The resource policy the replica boots with (the body a `POST resource-policy` would
    /// carry); `None`: Trustee's permissive default policy.
    pub resource_policy: Option<Bytes>,
    /// Added to the wall clock wherever the replica asks for "now": session expiry, token and
    /// admin-JWT `exp` checks, issued expiries. Lets a test restart a replica "3 hours later".
    pub clock_offset: Duration,
    /// Whether `GET /metrics` exists. `false` models Trustee v0.11, which has no `/metrics`:
    /// the path is then answered like any unknown path outside `/kbs/v0/` (404, empty body).
    pub metrics: bool,
}

impl SimConfig {
    /// Defaults for a replica called `name`: 5-minute sessions, own token key, insecure admin,
    /// one resource `default/key/demo`, the default resource policy, no clock offset, and
    /// `/metrics`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            session_timeout: Duration::from_secs(300),
            token_ttl: Duration::from_secs(300),
            token_key: None,
            admin_token: None,
            admin_jwt_key: None,
            resources: vec![("default/key/demo".into(), Bytes::from_static(b"demo-secret-value"))],
            resource_policy: None,
            clock_offset: Duration::ZERO,
            metrics: true,
        }
    }
}

/// Mints an admin JWT that a replica with [`SimConfig::admin_jwt_key`] `= key` accepts until
/// `exp_unix` (seconds since the epoch, by the replica's clock): HS256, claims `sub`, `role`
/// (Trustee's bearer-JWT verifier requires one), `iat` (now) and `exp`.
pub fn admin_jwt(key: &[u8], exp_unix: u64) -> String {
    let claims = json!({
        "sub": "kbs-admin",
        "role": "admin",
        "iat": unix(SystemTime::now()),
        "exp": exp_unix,
    });
    sign_hs256(&hmac_key(key), &claims)
}

/// Counters of what a replica answered, for tests (Trustee's own counters are on `/metrics`).
#[derive(Debug, Default)]
pub struct SimCounters {
    /// `auth` answered 200.
    pub auth: AtomicU64,
    /// `attest` answered 200.
    pub attest: AtomicU64,
    /// Resource GETs answered 200.
    pub resource: AtomicU64,
    /// Admin writes accepted.
    pub admin_writes: AtomicU64,
    /// Requests refused with 401 because the session or token was unknown to this replica.
    pub unknown_session: AtomicU64,
    /// Admin calls (writes and reads) refused for authorization.
    pub admin_refused: AtomicU64,
}

/// The counters Trustee exports on `/metrics`, as far as the simulator models them. Where each
/// is incremented follows upstream: `kbs_http_requests_total` in `prometheus_metrics_middleware`
/// (`kbs/src/api_server.rs`), the auth and attestation ones in `__auth`/`__attest`
/// (`kbs/src/attestation/backend.rs`), the policy ones around the resource policy evaluation
/// (`kbs/src/api_server.rs`).
#[derive(Debug, Default)]
struct TrusteeMetrics {
    http_requests: AtomicU64,
    auth_requests: AtomicU64,
    auth_successes: AtomicU64,
    auth_errors: AtomicU64,
    attestation_requests: AtomicU64,
    attestation_errors: AtomicU64,
    policy_evaluations: AtomicU64,
    policy_approvals: AtomicU64,
    policy_violations: AtomicU64,
}

#[derive(Debug)]
struct Session {
    nonce: String,
    expires: SystemTime,
    /// The token issued by `attest`; `Some` once attested.
    token: Option<String>,
    /// Protocol steps this replica served for the session, in order.
    steps: Vec<&'static str>,
}

#[derive(Debug, Default)]
struct Store {
    sessions: HashMap<String, Session>,
    resources: HashMap<String, Bytes>,
    resource_policy: Option<Bytes>,
    attestation_policies: HashMap<String, Bytes>,
    reference_values: HashMap<String, Bytes>,
}

/// A running simulated replica. Dropping the handle does not stop it; [`SimKbs::stop`] does.
#[derive(Clone)]
pub struct SimKbs {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stop: CancellationToken,
    /// Cancelled once the accept loop has returned, i.e. the listener is closed.
    closed: CancellationToken,
}

struct Inner {
    config: SimConfig,
    token_key: Hmac<Sha256>,
    admin_jwt_key: Option<Hmac<Sha256>>,
    store: Mutex<Store>,
    counters: SimCounters,
    metrics: TrusteeMetrics,
}

impl std::fmt::Debug for SimKbs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimKbs")
            .field("name", &self.inner.config.name)
            .field("addr", &self.addr)
            .finish()
    }
}

impl SimKbs {
    /// Starts serving on `listener` in the current runtime, as a freshly started process: no
    /// sessions, the configured resources and resource policy, counters at 0.
    pub fn start(listener: TcpListener, config: SimConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let key = config
            .token_key
            .clone()
            .unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec());
        let store = Store {
            resources: config.resources.iter().cloned().collect(),
            resource_policy: config.resource_policy.clone(),
            ..Store::default()
        };
        let inner = Arc::new(Inner {
            token_key: hmac_key(&key),
            admin_jwt_key: config.admin_jwt_key.as_deref().map(hmac_key),
            config,
            store: Mutex::new(store),
            counters: SimCounters::default(),
            metrics: TrusteeMetrics::default(),
        });
        let stop = CancellationToken::new();
        let closed = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&inner), stop.clone(), closed.clone()));
        Ok(Self {
            inner,
            addr,
            stop,
            closed,
        })
    }

    /// Binds `127.0.0.1:0` and starts; for tests and the demo.
    pub async fn start_local(config: SimConfig) -> std::io::Result<Self> {
        Self::start(TcpListener::bind("127.0.0.1:0").await?, config)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The replica's name.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// What it answered so far (this process only: a restarted replica starts from 0).
    pub fn counters(&self) -> &SimCounters {
        &self.inner.counters
    }

    /// The steps this replica served for `session_id` (empty when it never saw the session).
    pub fn session_steps(&self, session_id: &str) -> Vec<&'static str> {
        self.inner
            .store()
            .sessions
            .get(session_id)
            .map(|s| s.steps.clone())
            .unwrap_or_default()
    }

    /// The content of a resource on this replica only.
    pub fn resource(&self, path: &str) -> Option<Bytes> {
        self.inner.store().resources.get(path).cloned()
    }

    /// The replica's whole resource store, `(path, content)` sorted by path.
    pub fn resources(&self) -> Vec<(String, Bytes)> {
        let mut all: Vec<_> = self
            .inner
            .store()
            .resources
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The resource policy as last set (the body of the last `POST resource-policy`), or the
    /// boot one ([`SimConfig::resource_policy`]).
    pub fn resource_policy(&self) -> Option<Bytes> {
        self.inner.store().resource_policy.clone()
    }

    /// The attestation policy `id` as set by `POST attestation-policy` (its body; the id is the
    /// body's `policy_id`, `default` when absent).
    pub fn attestation_policy(&self, id: &str) -> Option<Bytes> {
        self.inner.store().attestation_policies.get(id).cloned()
    }

    /// The reference value `id` as set by `POST reference-value` (its body; the id is the body's
    /// `name`, `default` when absent).
    pub fn reference_value(&self, id: &str) -> Option<Bytes> {
        self.inner.store().reference_values.get(id).cloned()
    }

    /// Stops like a crashed replica: the listener and every open connection close at once, and
    /// the sessions are gone with it.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Restarts like a Trustee pod whose storage is `LocalFs`/`LocalJson` on an `emptyDir`:
    /// [`stop`](Self::stop)s this replica (a crash: listener and connections close), binds the
    /// same address again and starts a fresh replica with the same config. Sessions, admin
    /// writes, attestation policies and reference values are gone, the resources and resource
    /// policy are the configured ones, counters and `/metrics` start from 0, and the token key
    /// is new unless [`SimConfig::token_key`] is set (tokens issued before no longer verify).
    ///
    /// The returned handle is the new replica; this one stays stopped.
    pub async fn restart_empty(&self) -> std::io::Result<SimKbs> {
        self.restart_empty_with(self.inner.config.clone()).await
    }

    /// [`restart_empty`](Self::restart_empty) with a changed config (say a clock offset, or
    /// another admin authorization), still on this replica's address.
    pub async fn restart_empty_with(&self, config: SimConfig) -> std::io::Result<SimKbs> {
        self.stop();
        // The accept loop closes the listener as soon as it runs; wait for it, bounded, then
        // bind (retrying for the same window, should the close not have been seen).
        let _ = tokio::time::timeout(REBIND_WINDOW, self.closed.cancelled()).await;
        let listener = rebind(self.addr).await?;
        SimKbs::start(listener, config)
    }
}

/// Binds `addr`, retrying while it is still in use, for [`REBIND_WINDOW`] at most.
async fn rebind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let deadline = Instant::now() + REBIND_WINDOW;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(REBIND_STEP).await;
            }
            Err(e) => return Err(e),
        }
    }
}

impl Inner {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the maps half-written in a way that
        // matters to a simulator; keep serving.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The replica's "now": the wall clock plus the configured offset.
    fn now(&self) -> SystemTime {
        SystemTime::now() + self.config.clock_offset
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, stop: CancellationToken, closed: CancellationToken) {
    // Dropped (listener first, it was declared earlier) when the loop returns or the task is
    // dropped with its runtime.
    let _closed = closed.drop_guard();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(_) => continue,
            },
            () = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let inner = Arc::clone(&inner);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| {
                    let inner = Arc::clone(&inner);
                    async move { Ok::<_, Infallible>(handle(&inner, req).await) }
                }),
            )
            .into_owned();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                () = stop.cancelled() => {} // dropping the connection closes the socket
            }
        });
    }
}

type Resp = Response<Full<Bytes>>;

async fn handle(inner: &Inner, req: Request<Incoming>) -> Resp {
    let mut resp = route(inner, req).await;
    if let Ok(v) = HeaderValue::from_str(&inner.config.name) {
        resp.headers_mut().insert(REPLICA_HEADER, v);
    }
    resp
}

/// The real KBS's error: JSON body, no content-type header.
fn kbs_error(status: StatusCode, variant: &str, detail: &str) -> Resp {
    let mut r = Response::new(Full::new(error_body(variant, detail)));
    *r.status_mut() = status;
    r
}

fn with_type(mut r: Resp, content_type: &'static str) -> Resp {
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_ok(v: Value) -> Resp {
    with_type(Response::new(Full::new(Bytes::from(v.to_string()))), "application/json")
}

fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// What an admin call is to Trustee's router, which decides the refusal's error variant.
#[derive(Debug, Clone, Copy)]
enum AdminCall {
    /// A built-in admin endpoint (`resource-policy`, `attestation-policy`, `reference-value`).
    Builtin(&'static str),
    /// A plugin call that the plugin marks as admin (`POST`/`DELETE resource/...`).
    Plugin,
}

/// Routes like Trustee's `ApiServer` (upstream `kbs/src/api_server.rs`): `/kbs/v0/{path:.*}`
/// for GET, POST, PUT and DELETE, dispatched on the first path segment (`auth`, `attest`,
/// `resource-policy`, `attestation-policy`, `reference-value`, else a plugin: `resource`, or
/// `PluginNotFound`); `/metrics` (GET; POST answers 405); `/healthz` (GET). Anything else is
/// actix-web's default service: 404 with an empty body.
async fn route(inner: &Inner, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    // `prometheus_metrics_middleware` counts only paths starting with `/kbs` ("Ignore requests
    // like /metrics for metrics collection"), whatever the answer.
    if path.starts_with("/kbs") {
        inner.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
    }
    match path.as_str() {
        // Kept in every mode: the proxy's HTTP health check asks for it (Trustee v0.11 has no
        // `/healthz` either; model that release with a TCP health check).
        "/healthz" if method == Method::GET => return empty(StatusCode::OK),
        "/healthz" => return empty(StatusCode::METHOD_NOT_ALLOWED),
        "/metrics" if inner.config.metrics => {
            return if method == Method::GET {
                metrics(inner)
            } else {
                empty(StatusCode::METHOD_NOT_ALLOWED)
            };
        }
        _ => {}
    }
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return empty(StatusCode::NOT_FOUND);
    };
    if ![Method::GET, Method::POST, Method::PUT, Method::DELETE].contains(&method) {
        return empty(StatusCode::METHOD_NOT_ALLOWED);
    }
    let (plugin, sub) = rest.split_once('/').unwrap_or((rest, ""));
    let (plugin, sub) = (plugin.to_owned(), sub.to_owned());
    let session = session_cookie(&req);
    let bearer = bearer(&req);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return kbs_error(
                StatusCode::UNAUTHORIZED,
                "HTTPFailed",
                "Failed to read the request body",
            )
        }
    };
    let bearer = bearer.as_deref();
    match (plugin.as_str(), &method) {
        ("auth", &Method::POST) => auth(inner, &body),
        ("attest", &Method::POST) => attest(inner, session.as_deref(), &body),
        ("resource-policy", &Method::POST) => admin_write(inner, bearer, AdminCall::Builtin("resource-policy"), |s| {
            s.resource_policy = Some(body.clone());
        })
        .unwrap_or_else(|| empty(StatusCode::OK)),
        ("resource-policy", &Method::GET) => match admin_check(inner, bearer, AdminCall::Builtin("resource-policy")) {
            Some(denied) => denied,
            None => {
                let p = inner.store().resource_policy.clone().unwrap_or_default();
                json_ok(json!({ "policy": String::from_utf8_lossy(&p) }))
            }
        },
        ("attestation-policy", &Method::POST) => {
            let id = body_id(&body, "policy_id");
            admin_write(inner, bearer, AdminCall::Builtin("attestation-policy"), |s| {
                s.attestation_policies.insert(id, body.clone());
            })
            .unwrap_or_else(|| empty(StatusCode::OK))
        }
        ("reference-value", &Method::POST) => {
            let id = body_id(&body, "name");
            admin_write(inner, bearer, AdminCall::Builtin("reference-value"), |s| {
                s.reference_values.insert(id, body.clone());
            })
            .unwrap_or_else(|| with_type(empty(StatusCode::OK), "application/json"))
        }
        ("reference-value", &Method::GET) => match admin_check(inner, bearer, AdminCall::Builtin("reference-value")) {
            Some(denied) => denied,
            None => match inner.store().reference_values.get(sub.as_str()) {
                Some(v) => json_ok(serde_json::from_slice(v).unwrap_or(Value::Null)),
                None => json_ok(Value::Array(vec![])),
            },
        },
        ("resource", m) => resource(inner, m, &sub, session.as_deref(), bearer, &body),
        (other, _) => kbs_error(
            StatusCode::NOT_FOUND,
            "PluginNotFound",
            &format!("Plugin {other} not found"),
        ),
    }
}

/// The `resource` plugin (upstream `kbs/src/plugins/implementations/resource/mod.rs`):
/// `POST`/`DELETE` with a path and `GET` without one are admin calls, answered 200
/// `content-type: text/xml` with the handler's (here empty) output; a `GET` with a path needs a
/// token. `DELETE` of a resource that is not there succeeds: the key-value storage's `delete`
/// answers `Ok(None)` for a missing key (`deps/key-value-storage/src/local_fs/mod.rs`) and
/// `KvStorage::delete_secret_resource` only logs "resource was already absent during deletion"
/// (`kbs/src/plugins/implementations/resource/kv_storage.rs`, test
/// `delete_resource_is_idempotent`).
fn resource(
    inner: &Inner,
    method: &Method,
    path: &str,
    session: Option<&str>,
    bearer: Option<&str>,
    body: &Bytes,
) -> Resp {
    let plugin_ok = || with_type(empty(StatusCode::OK), "text/xml");
    match *method {
        Method::POST | Method::DELETE => {
            let key = path.to_owned();
            let delete = *method == Method::DELETE;
            admin_write(inner, bearer, AdminCall::Plugin, |s| {
                if delete {
                    s.resources.remove(&key);
                } else {
                    s.resources.insert(key, body.clone());
                }
            })
            .unwrap_or_else(plugin_ok)
        }
        Method::GET if path.is_empty() => match admin_check(inner, bearer, AdminCall::Plugin) {
            Some(denied) => denied,
            None => {
                let mut keys: Vec<String> = inner.store().resources.keys().cloned().collect();
                keys.sort();
                let list = serde_json::to_vec(&keys).unwrap_or_default();
                with_type(Response::new(Full::new(Bytes::from(list))), "text/xml")
            }
        },
        Method::GET => get_resource(inner, session, bearer, path),
        _ => kbs_error(StatusCode::UNAUTHORIZED, "PluginInternalError", "Plugin internal error"),
    }
}

/// The `policy_id`/`name` field of an admin body, `default` when absent.
fn body_id(body: &[u8], field: &str) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get(field).and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "default".into())
}

/// `RCAR` auth, counting like upstream `__auth` (`kbs/src/attestation/backend.rs`): every call
/// is a request; a body that does not parse or a protocol version mismatch is an error; else a
/// success.
fn auth(inner: &Inner, body: &[u8]) -> Resp {
    let m = &inner.metrics;
    m.auth_requests.fetch_add(1, Ordering::Relaxed);
    let failed = |detail: String| {
        m.auth_errors.fetch_add(1, Ordering::Relaxed);
        let detail = format!("Attestation error: RCAR handshake Auth failed: {detail}");
        kbs_error(StatusCode::UNAUTHORIZED, "AttestationError", &detail)
    };
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return failed(format!("deserialize Request: {e}")),
    };
    let version = req.get("version").and_then(Value::as_str).unwrap_or("");
    if version != PROTOCOL_VERSION {
        return failed(format!(
            "KBS Client Protocol Version Mismatch: expect {PROTOCOL_VERSION} while the request is {version}"
        ));
    }
    let id = hex(&rand::random::<[u8; 16]>());
    let nonce = STANDARD.encode(rand::random::<[u8; 32]>());
    let now = inner.now();
    let expires = now + inner.config.session_timeout;
    {
        let mut store = inner.store();
        // Sweep expired sessions now and then so memory stays bounded under load.
        if store.sessions.len() % 1024 == 1023 {
            store.sessions.retain(|_, s| s.expires > now);
        }
        let session = Session {
            nonce: nonce.clone(),
            expires,
            token: None,
            steps: vec!["auth"],
        };
        store.sessions.insert(id.clone(), session);
    }
    m.auth_successes.fetch_add(1, Ordering::Relaxed);
    inner.counters.auth.fetch_add(1, Ordering::Relaxed);
    let mut resp = json_ok(json!({ "nonce": nonce, "extra-params": "" }));
    set_session_cookie(&mut resp, &id, expires);
    resp
}

/// `RCAR` attest, in upstream `__attest`'s order (`kbs/src/attestation/backend.rs`): no cookie,
/// a body that is not JSON or an unknown session is an attestation error; an expired session or
/// a nonce mismatch fails without one; an already attested session gets its token again.
fn attest(inner: &Inner, session: Option<&str>, body: &[u8]) -> Resp {
    let m = &inner.metrics;
    m.attestation_requests.fetch_add(1, Ordering::Relaxed);
    let failed = |counted: bool| {
        if counted {
            m.attestation_errors.fetch_add(1, Ordering::Relaxed);
        }
        inner.counters.unknown_session.fetch_add(1, Ordering::Relaxed);
        kbs_error(
            StatusCode::UNAUTHORIZED,
            "AttestationError",
            "Attestation error: RCAR handshake Attest failed",
        )
    };
    let Some(id) = session else { return failed(true) };
    let Ok(attestation) = serde_json::from_slice::<Value>(body) else {
        return failed(true);
    };
    let nonce_given = attestation.pointer("/runtime-data/nonce").and_then(Value::as_str);
    let now = inner.now();
    let mut store = inner.store();
    let Some(s) = store.sessions.get_mut(id) else {
        drop(store);
        return failed(true);
    };
    if s.expires <= now {
        drop(store);
        return failed(false);
    }
    let token = match &s.token {
        Some(token) => token.clone(),
        None if nonce_given == Some(s.nonce.as_str()) => {
            let token = sign_token(inner, now);
            s.token = Some(token.clone());
            token
        }
        None => {
            drop(store);
            return failed(false);
        }
    };
    s.steps.push("attest");
    let expires = s.expires;
    drop(store);
    inner.counters.attest.fetch_add(1, Ordering::Relaxed);
    let mut resp = json_ok(json!({ "token": token }));
    set_session_cookie(&mut resp, id, expires);
    resp
}

/// A resource GET: the token comes from the attested session of the cookie, else from the
/// bearer header (upstream `ApiServer::get_attestation_token`), and is then verified, expiry
/// included, by the replica's clock.
fn get_resource(inner: &Inner, session: Option<&str>, bearer: Option<&str>, path: &str) -> Resp {
    let now = inner.now();
    let from_session = session.and_then(|id| {
        let mut store = inner.store();
        let s = store.sessions.get_mut(id)?;
        let token = s.token.clone().filter(|_| s.expires > now)?;
        s.steps.push("resource");
        Some(token)
    });
    let Some(token) = from_session.or_else(|| bearer.map(str::to_owned)) else {
        inner.counters.unknown_session.fetch_add(1, Ordering::Relaxed);
        return kbs_error(StatusCode::UNAUTHORIZED, "TokenNotFound", "Attestation Token not found");
    };
    if !verify_token(inner, &token, now) {
        inner.counters.unknown_session.fetch_add(1, Ordering::Relaxed);
        return kbs_error(StatusCode::UNAUTHORIZED, "TokenVerifierError", "Token Verifier error");
    }
    // The simulator's resource policy allows every verified token.
    inner.metrics.policy_evaluations.fetch_add(1, Ordering::Relaxed);
    inner.metrics.policy_approvals.fetch_add(1, Ordering::Relaxed);
    let Some(content) = inner.store().resources.get(path).cloned() else {
        return kbs_error(StatusCode::UNAUTHORIZED, "PluginError", "Resource not found");
    };
    inner.counters.resource.fetch_add(1, Ordering::Relaxed);
    // JWE-shaped; the simulator does not encrypt (alg "sim"), the client only decodes.
    let protected = URL_SAFE_NO_PAD.encode(br#"{"alg":"sim","enc":"none"}"#);
    json_ok(json!({
        "protected": protected,
        "encrypted_key": "",
        "iv": "",
        "ciphertext": URL_SAFE_NO_PAD.encode(&content),
        "tag": "",
    }))
}

/// Admin authorization, with the refusal the real KBS sends in each mode (always 401, the KBS
/// JSON error, no content type):
///
/// - bearer JWT ([`SimConfig::admin_jwt_key`]), like `AuthenticatedAuthorization`: the
///   authentication error is the bearer-JWT verifier's (upstream
///   `kbs/src/admin/authentication/bearer_jwt.rs`): `Failed to parse HTTP Auth Bearer header`
///   without a bearer, `Admin access denied: Cannot verify token with any of the issuers` for a
///   bad signature or an expired token, `Admin access denied: Failed to parse claims ...` without
///   a `role`. The router wraps it (upstream `kbs/src/api_server.rs`, `kbs/src/error.rs`): a
///   built-in endpoint in `AdminAuthAccess` (`admin access denied for endpoint <name>: ...`), a
///   plugin call (`POST`/`DELETE resource`) through `?`, i.e. `From<admin::Error>`, which is
///   `AdminAuthInitialization` (`failed to initialize [admin] configuration: ...`).
/// - static bearer ([`SimConfig::admin_token`]), like the older `auth_public_key` admin:
///   `AdminAuth`, `Admin auth error: Admin Token verification failed` (or `... Failed to parse
///   HTTP Auth Bearer header` without a bearer).
///
/// Returns the refusal, `None` when the call is authorized.
fn admin_check(inner: &Inner, bearer: Option<&str>, call: AdminCall) -> Option<Resp> {
    let refused = |variant: &str, detail: String| {
        inner.counters.admin_refused.fetch_add(1, Ordering::Relaxed);
        Some(kbs_error(StatusCode::UNAUTHORIZED, variant, &detail))
    };
    if let Some(key) = &inner.admin_jwt_key {
        let source = match bearer {
            None => "Failed to parse HTTP Auth Bearer header",
            Some(token) => match verify_admin_jwt(key, token, inner.now()) {
                AdminJwt::Valid => return None,
                AdminJwt::Unverified => {
                    "Admin access denied: Cannot verify token with any of the issuers"
                }
                AdminJwt::NoRole => {
                    "Admin access denied: Failed to parse claims from token: AdminAccessDenied { reason: \"Missing required `role` claim in JWT\" }"
                }
            },
        };
        return match call {
            AdminCall::Builtin(endpoint) => refused(
                "AdminAuthAccess",
                format!("admin access denied for endpoint {endpoint}: {source}"),
            ),
            AdminCall::Plugin => refused(
                "AdminAuthInitialization",
                format!("failed to initialize [admin] configuration: {source}"),
            ),
        };
    }
    match (&inner.config.admin_token, bearer) {
        (None, _) => None,
        (Some(want), Some(got)) if want == got => None,
        (Some(_), Some(_)) => refused("AdminAuth", "Admin auth error: Admin Token verification failed".into()),
        (Some(_), None) => refused(
            "AdminAuth",
            "Admin auth error: Failed to parse HTTP Auth Bearer header".into(),
        ),
    }
}

/// An admin write: applies `write` and counts it when authorized; returns the refusal, `None`
/// when applied.
fn admin_write(inner: &Inner, bearer: Option<&str>, call: AdminCall, write: impl FnOnce(&mut Store)) -> Option<Resp> {
    if let Some(denied) = admin_check(inner, bearer, call) {
        return Some(denied);
    }
    write(&mut inner.store());
    inner.counters.admin_writes.fetch_add(1, Ordering::Relaxed);
    None
}

/// Trustee's `/metrics` (upstream `kbs/docs/metrics.md`, `prometheus_metrics_handler` in
/// `kbs/src/api_server.rs`): Prometheus text, families sorted by name like the `prometheus`
/// crate's encoder. Unlabelled counters are present from the start at 0; the labelled ones
/// (`kbs_attestation_successes_total{tee_type}`, `kbs_resource_reads_total{resource_path}`, ...)
/// and the histograms are not modelled. The `kbs_sim_*` lines are the simulator's own.
fn metrics(inner: &Inner) -> Resp {
    let m = &inner.metrics;
    let mut out = String::new();
    for (name, help, v) in [
        (
            "kbs_attestation_errors_total",
            "Total count of errors during attestation processing (e.g. malformed requests).",
            &m.attestation_errors,
        ),
        (
            "kbs_attestation_requests_total",
            "Total count of attestation requests.",
            &m.attestation_requests,
        ),
        (
            "kbs_auth_errors_total",
            "Total count of errors during authentication processing.",
            &m.auth_errors,
        ),
        (
            "kbs_auth_requests_total",
            "Total count of authentication (RCAR handshake) requests.",
            &m.auth_requests,
        ),
        (
            "kbs_auth_successes_total",
            "Total count of successful authentication requests.",
            &m.auth_successes,
        ),
    ] {
        counter(&mut out, name, help, v);
    }
    let _ = write!(
        out,
        "# HELP kbs_build_info KBS binary build information.\n# TYPE kbs_build_info gauge\n\
         kbs_build_info{{version=\"{BUILD_VERSION}\",git_hash=\"sim\",build_date=\"{BUILD_DATE}\"}} 1\n"
    );
    for (name, help, v) in [
        (
            "kbs_http_requests_total",
            "Total count of HTTP requests to KBS protocol endpoints.",
            &m.http_requests,
        ),
        (
            "kbs_policy_approvals_total",
            "Total count of requests approved by KBS policy.",
            &m.policy_approvals,
        ),
        (
            "kbs_policy_evaluations_total",
            "Total count of KBS policy evaluations.",
            &m.policy_evaluations,
        ),
        (
            "kbs_policy_violations_total",
            "Total count of requests denied by KBS policy.",
            &m.policy_violations,
        ),
    ] {
        counter(&mut out, name, help, v);
    }
    let c = &inner.counters;
    for (name, v) in [
        ("admin_refused", &c.admin_refused),
        ("admin_writes", &c.admin_writes),
        ("attest", &c.attest),
        ("auth", &c.auth),
        ("resource", &c.resource),
        ("unknown_session", &c.unknown_session),
    ] {
        let _ = writeln!(out, "kbs_sim_{name}_total {}", v.load(Ordering::Relaxed));
    }
    with_type(Response::new(Full::new(Bytes::from(out))), "text/plain; version=0.0.4")
}

fn counter(out: &mut String, name: &str, help: &str, v: &AtomicU64) {
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
        v.load(Ordering::Relaxed)
    );
}

fn set_session_cookie(resp: &mut Resp, id: &str, expires: SystemTime) {
    let v = format!("{SESSION_COOKIE}={id}; Expires={}", httpdate::fmt_http_date(expires));
    // A hex id and an HTTP date are always a valid header value; skip the cookie otherwise.
    if let Ok(v) = HeaderValue::from_str(&v) {
        resp.headers_mut().append(SET_COOKIE, v);
    }
}

fn session_cookie(req: &Request<Incoming>) -> Option<String> {
    req.headers().get_all(COOKIE).iter().find_map(|h| {
        cookie_values(h.as_bytes(), SESSION_COOKIE.as_bytes())
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    })
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    let v = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(|t| t.trim().to_owned())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hmac_key(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: `new_from_slice` never fails for it.
    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length")
}

/// `header.claims.signature`, HS256 over `header.claims`.
fn sign_hs256(key: &Hmac<Sha256>, claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let mut mac = key.clone();
    mac.update(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// The header and claims of an HS256 JWT whose signature verifies with `key`.
fn verified_jwt(key: &Hmac<Sha256>, token: &str) -> Option<(Value, Value)> {
    let (signing_input, sig) = token.rsplit_once('.')?;
    let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
    let mut mac = key.clone();
    mac.update(signing_input.as_bytes());
    mac.verify_slice(&sig).ok()?;
    let (header, claims) = signing_input.split_once('.')?;
    let part = |p: &str| {
        URL_SAFE_NO_PAD
            .decode(p)
            .ok()
            .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
    };
    Some((part(header)?, part(claims)?))
}

fn sign_token(inner: &Inner, now: SystemTime) -> String {
    let claims = json!({ "iss": inner.config.name, "exp": unix(now + inner.config.token_ttl) });
    sign_hs256(&inner.token_key, &claims)
}

/// Whether an attestation token was signed with this replica's key and has not expired.
fn verify_token(inner: &Inner, token: &str, now: SystemTime) -> bool {
    verified_jwt(&inner.token_key, token)
        .and_then(|(_, claims)| claims.get("exp").and_then(Value::as_u64))
        .is_some_and(|exp| exp > unix(now))
}

/// The outcome of an admin JWT check.
enum AdminJwt {
    Valid,
    /// Bad signature, not HS256, no `exp`, or expired.
    Unverified,
    /// Verified, but without the `role` claim Trustee's bearer-JWT verifier requires.
    NoRole,
}

/// Checks an admin JWT as `jsonwebtoken` with `Validation::new(alg)` does (signature, `exp`
/// required and not before `now` minus the leeway), then the `role` claim.
fn verify_admin_jwt(key: &Hmac<Sha256>, token: &str, now: SystemTime) -> AdminJwt {
    let Some((header, claims)) = verified_jwt(key, token) else {
        return AdminJwt::Unverified;
    };
    if header.get("alg").and_then(Value::as_str) != Some("HS256") {
        return AdminJwt::Unverified;
    }
    let fresh = claims
        .get("exp")
        .and_then(Value::as_u64)
        .is_some_and(|exp| exp.saturating_add(JWT_LEEWAY_SECS) >= unix(now));
    if !fresh {
        return AdminJwt::Unverified;
    }
    if claims.get("role").and_then(Value::as_str).is_none() {
        return AdminJwt::NoRole;
    }
    AdminJwt::Valid
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::Client;

    type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

    const KEY: &[u8] = b"sim-test-admin-key-0123456789abc";

    fn client() -> TestClient {
        // No pooling: a restarted replica must not be reached over a connection of the old one.
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http()
    }

    struct Answer {
        status: StatusCode,
        headers: http::HeaderMap,
        body: Bytes,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap_or(Value::Null)
        }
    }

    async fn call(sim: &SimKbs, method: Method, path: &str, body: &str, headers: &[(&str, String)]) -> Answer {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", sim.url()));
        for (n, v) in headers {
            req = req.header(*n, v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        let resp = client().request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    fn bearer(token: &str) -> Vec<(&'static str, String)> {
        vec![("authorization", format!("Bearer {token}"))]
    }

    /// Runs auth and attest; returns the session id and the token.
    async fn handshake(sim: &SimKbs) -> (String, String) {
        let auth = call(
            sim,
            Method::POST,
            "/kbs/v0/auth",
            r#"{"version":"0.4.0","tee":"sample","extra-params":{}}"#,
            &[],
        )
        .await;
        assert_eq!(auth.status, StatusCode::OK);
        let cookie = auth.headers[SET_COOKIE].to_str().unwrap().to_owned();
        let id = cookie
            .split(';')
            .next()
            .and_then(|kv| kv.split_once('='))
            .map(|(_, v)| v.to_owned())
            .unwrap();
        let nonce = auth.json()["nonce"].as_str().unwrap().to_owned();
        let attest = call(
            sim,
            Method::POST,
            "/kbs/v0/attest",
            &json!({"runtime-data": {"nonce": nonce, "tee-pubkey": {}}, "tee-evidence": {}}).to_string(),
            &[("cookie", format!("{SESSION_COOKIE}={id}"))],
        )
        .await;
        assert_eq!(attest.status, StatusCode::OK);
        (id, attest.json()["token"].as_str().unwrap().to_owned())
    }

    async fn scrape(sim: &SimKbs) -> HashMap<String, u64> {
        let m = call(sim, Method::GET, "/metrics", "", &[]).await;
        assert_eq!(m.status, StatusCode::OK);
        assert_eq!(m.headers[CONTENT_TYPE], "text/plain; version=0.0.4");
        String::from_utf8_lossy(&m.body)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
            .collect()
    }

    fn unix_now() -> u64 {
        unix(SystemTime::now())
    }

    #[tokio::test]
    async fn restart_empty_keeps_the_address_and_loses_the_state() {
        let boot_policy = Bytes::from_static(br#"{"policy":"Ym9vdA"}"#);
        let sim = SimKbs::start_local(SimConfig {
            resource_policy: Some(boot_policy.clone()),
            ..SimConfig::new("kbs-0")
        })
        .await
        .unwrap();
        let (_, token) = handshake(&sim).await;
        for (path, body) in [
            ("/kbs/v0/resource/default/key/rotated", "v2"),
            ("/kbs/v0/resource-policy", r#"{"policy":"c3RyaWN0"}"#),
            ("/kbs/v0/attestation-policy", r#"{"policy_id":"default","policy":"cA"}"#),
            ("/kbs/v0/reference-value", r#"{"name":"rv1","value":"abc"}"#),
        ] {
            let a = call(&sim, Method::POST, path, body, &[]).await;
            assert_eq!(a.status, StatusCode::OK, "{path}");
        }
        assert_eq!(sim.resources().len(), 2);
        assert_eq!(sim.resource_policy().as_deref(), Some(&br#"{"policy":"c3RyaWN0"}"#[..]));
        assert!(sim.attestation_policy("default").is_some());
        assert!(sim.reference_value("rv1").is_some());
        let before = scrape(&sim).await;
        // auth + attest + 4 admin writes; the scrape itself is not a KBS request.
        assert_eq!(before["kbs_http_requests_total"], 6);
        assert_eq!(before["kbs_auth_successes_total"], 1);
        assert!(before.keys().any(|k| k.starts_with("kbs_build_info{")));
        let got = call(
            &sim,
            Method::GET,
            "/kbs/v0/resource/default/key/demo",
            "",
            &bearer(&token),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK);

        let restarted = sim.restart_empty().await.unwrap();
        assert_eq!(restarted.addr(), sim.addr());
        assert_eq!(restarted.name(), "kbs-0");
        assert_eq!(
            restarted.resources(),
            vec![("default/key/demo".to_owned(), Bytes::from_static(b"demo-secret-value"))]
        );
        assert_eq!(restarted.resource_policy(), Some(boot_policy));
        assert_eq!(restarted.attestation_policy("default"), None);
        assert_eq!(restarted.reference_value("rv1"), None);
        assert_eq!(restarted.counters().admin_writes.load(Ordering::Relaxed), 0);
        let after = scrape(&restarted).await;
        for name in [
            "kbs_http_requests_total",
            "kbs_auth_requests_total",
            "kbs_auth_successes_total",
            "kbs_attestation_requests_total",
        ] {
            assert_eq!(after[name], 0, "{name}");
        }
        // A new token key: the old token no longer verifies, and the old session is gone.
        let got = call(
            &restarted,
            Method::GET,
            "/kbs/v0/resource/default/key/demo",
            "",
            &bearer(&token),
        )
        .await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED);
        assert!(got.json()["type"].as_str().unwrap().ends_with("/TokenVerifierError"));
        assert_eq!(scrape(&restarted).await["kbs_http_requests_total"], 1);
        // The old handle stays stopped; the new one restarts in turn.
        let again = restarted.restart_empty().await.unwrap();
        assert_eq!(again.addr(), sim.addr());
        again.stop();
    }

    #[tokio::test]
    async fn admin_jwt_expiry_is_checked_by_the_replica_clock() {
        let sim = SimKbs::start_local(SimConfig {
            admin_jwt_key: Some(KEY.to_vec()),
            ..SimConfig::new("kbs-0")
        })
        .await
        .unwrap();
        let path = "/kbs/v0/resource/default/key/new";
        // No bearer, an expired token, a token signed with another key: refused.
        let expired = admin_jwt(KEY, unix_now() - 3600);
        let foreign = admin_jwt(b"another-key", unix_now() + 3600);
        for headers in [vec![], bearer(&expired), bearer(&foreign)] {
            let a = call(&sim, Method::POST, path, "v", &headers).await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED);
            assert!(a.headers.get(CONTENT_TYPE).is_none());
            let v = a.json();
            assert_eq!(
                v["type"],
                "https://github.com/confidential-containers/kbs/errors/AdminAuthInitialization"
            );
            assert!(v["detail"]
                .as_str()
                .unwrap()
                .starts_with("failed to initialize [admin]"));
        }
        let a = call(&sim, Method::POST, "/kbs/v0/resource-policy", "{}", &bearer(&expired)).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            a.json()["detail"],
            "admin access denied for endpoint resource-policy: Admin access denied: Cannot verify token with any of the issuers"
        );
        assert_eq!(sim.counters().admin_refused.load(Ordering::Relaxed), 4);
        assert!(sim.resource("default/key/new").is_none());

        // A fresh token is accepted.
        let fresh = admin_jwt(KEY, unix_now() + 2 * 3600);
        let a = call(&sim, Method::POST, path, "v", &bearer(&fresh)).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.headers[CONTENT_TYPE], "text/xml");
        assert_eq!(sim.resource("default/key/new").as_deref(), Some(&b"v"[..]));

        // Three hours later by the replica's clock, the same token has expired.
        let later = sim
            .restart_empty_with(SimConfig {
                admin_jwt_key: Some(KEY.to_vec()),
                clock_offset: Duration::from_secs(3 * 3600),
                ..SimConfig::new("kbs-0")
            })
            .await
            .unwrap();
        let a = call(&later, Method::POST, path, "v", &bearer(&fresh)).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(later.counters().admin_refused.load(Ordering::Relaxed), 1);
        let a = call(
            &later,
            Method::POST,
            path,
            "v",
            &bearer(&admin_jwt(KEY, unix_now() + 4 * 3600)),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
        later.stop();
    }

    #[tokio::test]
    async fn the_static_admin_token_refusal_is_the_older_admin_auth_error() {
        let sim = SimKbs::start_local(SimConfig {
            admin_token: Some("admin-token".into()),
            ..SimConfig::new("kbs-0")
        })
        .await
        .unwrap();
        let a = call(&sim, Method::POST, "/kbs/v0/resource/a/b/c", "x", &bearer("wrong")).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            a.json()["type"],
            "https://github.com/confidential-containers/kbs/errors/AdminAuth"
        );
        let a = call(
            &sim,
            Method::POST,
            "/kbs/v0/resource/a/b/c",
            "x",
            &bearer("admin-token"),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(sim.counters().admin_refused.load(Ordering::Relaxed), 1);
        sim.stop();
    }

    #[tokio::test]
    async fn without_metrics_the_path_is_an_unknown_one() {
        let sim = SimKbs::start_local(SimConfig {
            metrics: false,
            ..SimConfig::new("kbs-0")
        })
        .await
        .unwrap();
        let a = call(&sim, Method::GET, "/metrics", "", &[]).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        assert!(a.body.is_empty());
        let a = call(&sim, Method::GET, "/nothing", "", &[]).await;
        assert_eq!((a.status, a.body.is_empty()), (StatusCode::NOT_FOUND, true));
        let a = call(&sim, Method::GET, "/kbs/v0/nothing", "", &[]).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        assert_eq!(a.json()["detail"], "Plugin nothing not found");
        assert_eq!(
            call(&sim, Method::GET, "/healthz", "", &[]).await.status,
            StatusCode::OK
        );
        sim.stop();
    }

    #[tokio::test]
    async fn deleting_a_missing_resource_succeeds_and_counters_follow_trustee() {
        let sim = SimKbs::start_local(SimConfig::new("kbs-0")).await.unwrap();
        for _ in 0..2 {
            let a = call(&sim, Method::DELETE, "/kbs/v0/resource/default/key/absent", "", &[]).await;
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(a.headers[CONTENT_TYPE], "text/xml");
            assert!(a.body.is_empty());
        }
        // A bad auth body and an attest without a session are counted as errors.
        let a = call(&sim, Method::POST, "/kbs/v0/auth", "not json", &[]).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        let a = call(&sim, Method::POST, "/kbs/v0/attest", "{}", &[]).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        let (id, token) = handshake(&sim).await;
        // Attesting again returns the session's token.
        let again = call(
            &sim,
            Method::POST,
            "/kbs/v0/attest",
            "{}",
            &[("cookie", format!("{SESSION_COOKIE}={id}"))],
        )
        .await;
        assert_eq!(again.json()["token"].as_str(), Some(token.as_str()));
        let m = scrape(&sim).await;
        assert_eq!(m["kbs_auth_requests_total"], 2);
        assert_eq!(m["kbs_auth_errors_total"], 1);
        assert_eq!(m["kbs_auth_successes_total"], 1);
        assert_eq!(m["kbs_attestation_requests_total"], 3);
        assert_eq!(m["kbs_attestation_errors_total"], 1);
        assert_eq!(m["kbs_http_requests_total"], 7);
        assert_eq!(sim.session_steps(&id), vec!["auth", "attest", "attest"]);
        sim.stop();
    }
}
