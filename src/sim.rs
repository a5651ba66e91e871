//! A simulated Trustee KBS replica, faithful where routing is concerned (see
//! `shared/kbs-protocol.md`): sessions live in this replica's memory only, the `kbs-session-id`
//! cookie is 32 hex digits with an `Expires`, unknown sessions get the real 401 bodies (JSON, no
//! content type), tokens are signed with this replica's own key unless a shared signer is given,
//! and admin writes change this replica only.
//!
//! Through a plain round-robin balancer a client's `attest` lands on the other replica and fails,
//! exactly as with the real KBS. Every response names the replica in `x-kbs-replica`, which the
//! real KBS does not send; it is there for the demo table and for `curl`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{AUTHORIZATION, COOKIE, SET_COOKIE};
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

use crate::kbs::{error_body, API_PREFIX, PROTOCOL_VERSION, SESSION_COOKIE};
use crate::route_cookie::cookie_values;

/// The response header naming the replica that answered (the simulator's own addition).
pub const REPLICA_HEADER: &str = "x-kbs-replica";
/// Largest request body the simulator reads (the real KBS has a similar limit).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// How a simulated replica behaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The replica's name, returned in `x-kbs-replica`.
    pub name: String,
    /// Session lifetime (`[attestation_service] timeout`, 5 minutes by default).
    pub session_timeout: Duration,
    /// Lifetime of issued tokens.
    pub token_ttl: Duration,
    /// Token signing key. `None`: a random key of this replica's own, so its tokens are
    /// accepted by it alone (the default of a real deployment without a shared signer).
    pub token_key: Option<Vec<u8>>,
    /// When set, admin calls need `Authorization: Bearer <this>`; else they run insecure.
    pub admin_token: Option<String>,
    /// Resources present at start, path `repo/type/tag` → content.
    pub resources: Vec<(String, Bytes)>,
}

impl SimConfig {
    /// Defaults for a replica called `name`: 5-minute sessions, own token key, insecure admin,
    /// and one resource `default/key/demo`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            session_timeout: Duration::from_secs(300),
            token_ttl: Duration::from_secs(300),
            token_key: None,
            admin_token: None,
            resources: vec![("default/key/demo".into(), Bytes::from_static(b"demo-secret-value"))],
        }
    }
}

/// Counters of what a replica answered, for tests and `/metrics`.
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
}

#[derive(Debug)]
struct Session {
    nonce: String,
    expires: SystemTime,
    attested: bool,
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
    addr: std::net::SocketAddr,
    stop: CancellationToken,
}

struct Inner {
    config: SimConfig,
    token_key: Hmac<Sha256>,
    store: Mutex<Store>,
    counters: SimCounters,
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
    /// Starts serving on `listener` in the current runtime.
    pub fn start(listener: TcpListener, config: SimConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let key = config
            .token_key
            .clone()
            .unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec());
        let store = Store {
            resources: config.resources.iter().cloned().collect(),
            ..Store::default()
        };
        let inner = Arc::new(Inner {
            token_key: Hmac::new_from_slice(&key).expect("any key length"),
            config,
            store: Mutex::new(store),
            counters: SimCounters::default(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&inner), stop.clone()));
        Ok(Self { inner, addr, stop })
    }

    /// Binds `127.0.0.1:0` and starts; for tests and the demo.
    pub async fn start_local(config: SimConfig) -> std::io::Result<Self> {
        Self::start(TcpListener::bind("127.0.0.1:0").await?, config)
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
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

    /// What it answered so far.
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

    /// Stops like a crashed replica: the listener and every open connection close at once, and
    /// the sessions are gone with it.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Inner {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the maps half-written in a way that
        // matters to a simulator; keep serving.
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, stop: CancellationToken) {
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

fn json_ok(v: Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

async fn route(inner: &Inner, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    if method == Method::GET && path == "/healthz" {
        return empty(StatusCode::OK);
    }
    if method == Method::GET && path == "/metrics" {
        return metrics(inner);
    }
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return kbs_error(StatusCode::NOT_FOUND, "InvalidRequestPath", "Invalid Request Path");
    };
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
    match (&method, rest) {
        (&Method::POST, "auth") => auth(inner, &body),
        (&Method::POST, "attest") => attest(inner, session.as_deref(), &body),
        (&Method::GET, r) if r.starts_with("resource/") => {
            get_resource(inner, session.as_deref(), bearer.as_deref(), &r["resource/".len()..])
        }
        (m, r) if r.starts_with("resource/") && (m == Method::POST || m == Method::DELETE) => {
            admin(inner, bearer.as_deref(), |store| {
                let key = r["resource/".len()..].to_owned();
                if m == Method::POST {
                    store.resources.insert(key, body.clone());
                } else {
                    store.resources.remove(&key);
                }
            })
        }
        (&Method::POST, "resource-policy") => {
            admin(inner, bearer.as_deref(), |s| s.resource_policy = Some(body.clone()))
        }
        (&Method::GET, "resource-policy") => match admin_check(inner, bearer.as_deref()) {
            Some(denied) => denied,
            None => {
                let p = inner.store().resource_policy.clone().unwrap_or_default();
                json_ok(json!({ "policy": String::from_utf8_lossy(&p) }))
            }
        },
        (&Method::POST, "attestation-policy") => {
            let id = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("policy_id").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| "default".into());
            admin(inner, bearer.as_deref(), |s| {
                s.attestation_policies.insert(id, body.clone());
            })
        }
        (&Method::POST, "reference-value") => {
            let id = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| "default".into());
            admin(inner, bearer.as_deref(), |s| {
                s.reference_values.insert(id, body.clone());
            })
        }
        (&Method::GET, r) if r.starts_with("reference-value/") => {
            let id = &r["reference-value/".len()..];
            match inner.store().reference_values.get(id) {
                Some(v) => json_ok(serde_json::from_slice(v).unwrap_or(Value::Null)),
                None => json_ok(Value::Array(vec![])),
            }
        }
        _ => kbs_error(StatusCode::NOT_FOUND, "InvalidRequestPath", "Invalid Request Path"),
    }
}

fn auth(inner: &Inner, body: &[u8]) -> Resp {
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            let detail = format!("Attestation error: RCAR handshake Auth failed: {e}");
            return kbs_error(StatusCode::UNAUTHORIZED, "AttestationError", &detail);
        }
    };
    let version = req.get("version").and_then(Value::as_str).unwrap_or("");
    if version != PROTOCOL_VERSION {
        let detail = format!(
            "Attestation error: RCAR handshake Auth failed: KBS Client Protocol Version Mismatch: expect {PROTOCOL_VERSION} while the request is {version}"
        );
        return kbs_error(StatusCode::UNAUTHORIZED, "AttestationError", &detail);
    }
    let id = hex(&rand::random::<[u8; 16]>());
    let nonce = STANDARD.encode(rand::random::<[u8; 32]>());
    let expires = SystemTime::now() + inner.config.session_timeout;
    {
        let mut store = inner.store();
        let now = SystemTime::now();
        // Sweep expired sessions now and then so memory stays bounded under load.
        if store.sessions.len() % 1024 == 1023 {
            store.sessions.retain(|_, s| s.expires > now);
        }
        let session = Session {
            nonce: nonce.clone(),
            expires,
            attested: false,
            steps: vec!["auth"],
        };
        store.sessions.insert(id.clone(), session);
    }
    inner.counters.auth.fetch_add(1, Ordering::Relaxed);
    let mut resp = json_ok(json!({ "nonce": nonce, "extra-params": "" }));
    set_session_cookie(&mut resp, &id, expires);
    resp
}

fn attest(inner: &Inner, session: Option<&str>, body: &[u8]) -> Resp {
    let failed = || {
        inner.counters.unknown_session.fetch_add(1, Ordering::Relaxed);
        kbs_error(
            StatusCode::UNAUTHORIZED,
            "AttestationError",
            "Attestation error: RCAR handshake Attest failed",
        )
    };
    let Some(id) = session else { return failed() };
    let now = SystemTime::now();
    let nonce_given = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        v.pointer("/runtime-data/nonce")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let expires = {
        let mut store = inner.store();
        let Some(s) = store.sessions.get_mut(id).filter(|s| s.expires > now) else {
            return failed();
        };
        if nonce_given.as_deref() != Some(s.nonce.as_str()) {
            return failed();
        }
        s.attested = true;
        s.steps.push("attest");
        s.expires
    };
    let token = sign_token(inner, now);
    inner.counters.attest.fetch_add(1, Ordering::Relaxed);
    let mut resp = json_ok(json!({ "token": token }));
    set_session_cookie(&mut resp, id, expires);
    resp
}

fn get_resource(inner: &Inner, session: Option<&str>, bearer: Option<&str>, path: &str) -> Resp {
    let now = SystemTime::now();
    let authorized = match bearer {
        Some(token) => {
            if !verify_token(inner, token, now) {
                inner.counters.unknown_session.fetch_add(1, Ordering::Relaxed);
                return kbs_error(
                    StatusCode::UNAUTHORIZED,
                    "TokenVerifierError",
                    "Failed to verify Attestation Token",
                );
            }
            true
        }
        None => {
            let mut store = inner.store();
            match session.and_then(|id| store.sessions.get_mut(id)) {
                Some(s) if s.attested && s.expires > now => {
                    s.steps.push("resource");
                    true
                }
                _ => false,
            }
        }
    };
    if !authorized {
        inner.counters.unknown_session.fetch_add(1, Ordering::Relaxed);
        return kbs_error(StatusCode::UNAUTHORIZED, "TokenNotFound", "Attestation Token not found");
    }
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

fn admin_check(inner: &Inner, bearer: Option<&str>) -> Option<Resp> {
    match (&inner.config.admin_token, bearer) {
        (None, _) => None,
        (Some(want), Some(got)) if want == got => None,
        (Some(_), _) => Some(kbs_error(
            StatusCode::UNAUTHORIZED,
            "AdminAuth",
            "Admin auth error: unauthorized",
        )),
    }
}

fn admin(inner: &Inner, bearer: Option<&str>, write: impl FnOnce(&mut Store)) -> Resp {
    if let Some(denied) = admin_check(inner, bearer) {
        return denied;
    }
    write(&mut inner.store());
    inner.counters.admin_writes.fetch_add(1, Ordering::Relaxed);
    empty(StatusCode::OK)
}

fn metrics(inner: &Inner) -> Resp {
    let c = &inner.counters;
    let mut out = String::new();
    for (name, v) in [
        ("auth", &c.auth),
        ("attest", &c.attest),
        ("resource", &c.resource),
        ("admin_writes", &c.admin_writes),
        ("unknown_session", &c.unknown_session),
    ] {
        let _ = writeln!(out, "kbs_sim_{name}_total {}", v.load(Ordering::Relaxed));
    }
    let mut r = Response::new(Full::new(Bytes::from(out)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

fn set_session_cookie(resp: &mut Resp, id: &str, expires: SystemTime) {
    let v = format!("{SESSION_COOKIE}={id}; Expires={}", httpdate::fmt_http_date(expires));
    resp.headers_mut()
        .append(SET_COOKIE, HeaderValue::from_str(&v).expect("hex and a date"));
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

fn sign_token(inner: &Inner, now: SystemTime) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = json!({ "iss": inner.config.name, "exp": unix(now + inner.config.token_ttl) });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let mut mac = inner.token_key.clone();
    mac.update(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fn verify_token(inner: &Inner, token: &str, now: SystemTime) -> bool {
    let Some((signing_input, sig)) = token.rsplit_once('.') else {
        return false;
    };
    let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else {
        return false;
    };
    let mut mac = inner.token_key.clone();
    mac.update(signing_input.as_bytes());
    if mac.verify_slice(&sig).is_err() {
        return false;
    }
    let exp = signing_input
        .split('.')
        .nth(1)
        .and_then(|c| URL_SAFE_NO_PAD.decode(c).ok())
        .and_then(|c| serde_json::from_slice::<Value>(&c).ok())
        .and_then(|c| c.get("exp").and_then(Value::as_u64));
    exp.is_some_and(|exp| exp > unix(now))
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
