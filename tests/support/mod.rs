//! Shared test support: real servers on ephemeral loopback ports, bound before anything runs.
#![allow(dead_code)] // each test binary uses part of it

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use kbs_proxy::config::Settings;
use kbs_proxy::control::{self, ControlPlane};
use kbs_proxy::dataplane::proxy::{Proxy, ProxyBody};
use kbs_proxy::{control::admin, dataplane::server};
use kbs_proxy_harness::sim::{SimConfig, SimKbs};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The cookie secret the tests configure, so they can mint cookies of their own.
pub const SECRET: &str = "test-secret-0123456789abcdef0123";

/// A proxy serving on the test's runtime, with its control plane (and admin port, when the
/// settings ask for one: it is bound on 127.0.0.1:0 whatever they say).
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub proxy: Proxy,
    pub control: Arc<ControlPlane>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin.expect("admin port configured"))
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `s` with health checks driven by hand (TCP, one result flips the verdict; the interval is
/// an hour) and the admin port on.
pub fn health_by_hand(s: Settings) -> Settings {
    Settings {
        health_check: Some("tcp".into()),
        health_check_interval: Some("3600s".into()),
        health_fall: Some(1),
        health_rise: Some(1),
        admin_listen: Some("127.0.0.1:0".into()),
        ..s
    }
}

/// `/metrics` from the proxy's admin port.
pub async fn metrics(proxy: &TestProxy) -> String {
    let (status, body) = admin_get(proxy, "/metrics").await;
    assert_eq!(status, http::StatusCode::OK);
    String::from_utf8(body.to_vec()).unwrap()
}

/// The value of the sample whose line starts with `prefix` (name and labels); 0 when absent.
pub fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A resolver the test controls: these addresses, or a lookup error while there are none.
#[derive(Clone, Default)]
pub struct FakeDns(pub Arc<std::sync::Mutex<Vec<SocketAddr>>>);

impl kbs_proxy::control::discovery::Resolve for FakeDns {
    fn resolve<'a>(
        &'a self,
        _: &'a kbs_proxy::config::DnsSource,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        let addrs = self.0.lock().unwrap().clone();
        Box::pin(async move {
            match addrs.is_empty() {
                true => Err(std::io::Error::other("SERVFAIL")),
                false => Ok(addrs),
            }
        })
    }
}

/// `GET path` on the proxy's admin port: status and body.
pub async fn admin_get(proxy: &TestProxy, path: &str) -> (http::StatusCode, Bytes) {
    let (parts, body) = send(
        Request::get(format!("{}{path}", proxy.admin_url()))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    (parts.status, body)
}

/// Settings for a proxy in front of `backends` (`NAME=URL` each), with the test secret.
pub fn settings(backends: Vec<String>) -> Settings {
    Settings {
        backend: Some(backends),
        cookie_secret: Some(SECRET.into()),
        listen: Some("127.0.0.1:0".into()),
        shutdown_grace: Some("1s".into()),
        access_log: Some("off".into()),
        ..Settings::default()
    }
}

/// `NAME=URL` for each replica.
pub fn backends_of(sims: &[SimKbs]) -> Vec<String> {
    sims.iter().map(|s| format!("{}={}", s.name(), s.url())).collect()
}

/// Starts a proxy with `settings` on 127.0.0.1:0.
pub async fn start_proxy(settings: Settings) -> TestProxy {
    start_proxy_with(settings, |c| c).await
}

/// How a test proxy starts, beyond its settings.
#[derive(Default)]
pub struct StartOptions {
    /// Leave the control plane's loop off: the test runs its rounds (health, watch, catch-up,
    /// reconciliation) by hand, in the order it wants.
    pub by_hand: bool,
    /// Bind the admin port here (a restarted proxy keeps its address) instead of 127.0.0.1:0.
    pub admin_addr: Option<SocketAddr>,
    /// The fast path's runtime: [`server::FastLoop::Tokio`] for tests on paused time.
    pub fast_loop: server::FastLoop,
}

/// The same, letting the test adjust the control plane (a resolver, a reload source).
pub async fn start_proxy_with(settings: Settings, adjust: impl FnOnce(ControlPlane) -> ControlPlane) -> TestProxy {
    start_proxy_opts(settings, adjust, StartOptions::default()).await
}

/// A proxy whose control plane runs only when the test says (see [`StartOptions::by_hand`]).
pub async fn start_proxy_by_hand(settings: Settings) -> TestProxy {
    let opts = StartOptions {
        by_hand: true,
        ..StartOptions::default()
    };
    start_proxy_opts(settings, |c| c, opts).await
}

/// The most general start.
pub async fn start_proxy_opts(
    settings: Settings,
    adjust: impl FnOnce(ControlPlane) -> ControlPlane,
    opts: StartOptions,
) -> TestProxy {
    let config = settings.validate().expect("valid test config");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let proxy = Proxy::new(&config).unwrap();
    let tls = control::tls_settings(&config).unwrap();
    let tls_server = tls.as_ref().map(|(_, s)| Arc::clone(s));
    let control = Arc::new(adjust(ControlPlane::new(proxy.clone(), config.clone(), tls)));
    let shutdown = CancellationToken::new();
    control.refresh_dns().await;
    control.check_health().await;
    if !opts.by_hand {
        tokio::spawn(Arc::clone(&control).run(shutdown.clone()));
    }
    let admin = match &config.admin {
        Some(a) => {
            let l = bind_again(opts.admin_addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())).await;
            let admin_addr = l.local_addr().unwrap();
            tokio::spawn(admin::serve(l, Arc::clone(&control), a.token.clone(), shutdown.clone()));
            Some(admin_addr)
        }
        None => None,
    };
    let options = server::ServeOptions {
        fast_loop: opts.fast_loop,
        ..server::ServeOptions::from_config(&config, tls_server)
    };
    let task = tokio::spawn(server::serve(proxy.worker(), listener, options, shutdown.clone()));
    TestProxy {
        addr,
        admin,
        proxy,
        control,
        shutdown,
        task,
    }
}

/// Binds `addr`; an address a stopped server of this test held may take a moment to be free
/// again (bounded: 2 s).
pub async fn bind_again(addr: SocketAddr) -> TcpListener {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::task::yield_now().await;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => panic!("cannot bind {addr} again: {e}"),
        }
    }
}

/// Starts simulated replicas named `kbs-0`, `kbs-1`, ...
pub async fn start_sims(n: usize) -> Vec<SimKbs> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(SimKbs::start_local(SimConfig::new(format!("kbs-{i}"))).await.unwrap());
    }
    out
}

/// Two replicas and a proxy in front of them.
pub async fn two_replicas() -> (Vec<SimKbs>, TestProxy) {
    let sims = start_sims(2).await;
    let proxy = start_proxy(settings(backends_of(&sims))).await;
    (sims, proxy)
}

/// An address where nothing listens: bound, then closed.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A backend that accepts connections and never answers (nor closes them).
pub async fn start_silent_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    addr
}

/// Starts an HTTP server running `f` for every request.
pub async fn start_backend<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let f = f.clone();
            let conn = builder
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req| {
                        let f = f.clone();
                        async move { Ok::<_, Infallible>(f(req).await) }
                    }),
                )
                .into_owned();
            tokio::spawn(conn);
        }
    });
    addr
}

/// A backend that streams every request body straight back and reports the request's headers
/// as JSON in the `x-seen-headers` response header.
pub async fn start_echo() -> SocketAddr {
    start_backend(|req: Request<Incoming>| async move {
        let seen: serde_json::Map<String, serde_json::Value> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    serde_json::Value::String(v.to_str().unwrap_or("?").into()),
                )
            })
            .collect();
        let mut resp = Response::new(ProxyBody::Stream(req.into_body(), None));
        let json = serde_json::Value::Object(seen).to_string();
        resp.headers_mut().insert("x-seen-headers", json.parse().unwrap());
        resp.headers_mut().insert("keep-alive", "timeout=5".parse().unwrap());
        resp
    })
    .await
}

/// A plain HTTP/1.1 client.
pub fn client() -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// Sends `req` and collects the response.
pub async fn send(req: Request<Full<Bytes>>) -> (http::response::Parts, Bytes) {
    let resp = client().request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    (parts, body.collect().await.expect("body").to_bytes())
}

/// Waits until `done()` holds, at most `limit` (the caller then asserts what it expects). For
/// state the proxy changes on its own threads just after a client has seen the answer (a
/// backend's in-flight count, a connection slot, a pooled buffer): the client can be a step ahead.
pub async fn eventually(limit: std::time::Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Every log line of the test binary, captured as JSON: the proxy's `tracing` events and its
/// access lines (through its own batched writer, as the binary writes them).
pub mod logs {
    use std::io::Write;
    use std::sync::{Mutex, OnceLock};

    static LINES: Mutex<Vec<u8>> = Mutex::new(Vec::new());

    struct Capture;

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            LINES.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Installs the process-wide subscriber once: the fast path logs from its own threads, so a
    /// thread-local one would not see it.
    pub fn capture() {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_writer(|| Capture)
                .with_max_level(tracing::Level::INFO)
                .init();
            kbs_proxy::telemetry::access::install(kbs_proxy::config::LogFormat::Json, Capture);
        });
    }

    /// What was logged so far.
    pub fn captured() -> String {
        String::from_utf8_lossy(&LINES.lock().unwrap()).into_owned()
    }

    /// Drops the lines logged so far that contain `marker`, so a case can be sent again.
    pub fn forget(marker: &str) {
        let mut lines = LINES.lock().unwrap();
        let kept: Vec<u8> = String::from_utf8_lossy(&lines)
            .lines()
            .filter(|l| !l.contains(marker))
            .flat_map(|l| l.bytes().chain([b'\n']))
            .collect();
        *lines = kept;
    }

    /// The access lines whose path contains `marker`.
    pub fn access_lines(marker: &str) -> Vec<serde_json::Value> {
        captured()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "access" && v["path"].as_str().is_some_and(|p| p.contains(marker)))
            .collect()
    }
}

/// A throw-away PKI: a CA and certificates it signs, as PEM files in a temporary folder.
pub mod pki {
    use std::path::PathBuf;
    use std::sync::Arc;

    use kbs_proxy::config::TlsFiles;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    /// Marks `files` changed for the certificate store's mtime check, `secs` ahead, so the
    /// change shows even on coarse-grained file systems.
    pub fn touch_later(files: &[&std::path::Path], secs: u64) {
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(secs);
        for f in files {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(later)
                .unwrap();
        }
    }

    pub struct Pki {
        pub dir: tempfile::TempDir,
        ca: rcgen::Certificate,
        ca_key: KeyPair,
        pub ca_path: PathBuf,
    }

    impl Pki {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, "test CA");
            let ca = params.self_signed(&ca_key).unwrap();
            let ca_path = dir.path().join("ca.pem");
            std::fs::write(&ca_path, ca.pem()).unwrap();
            Self {
                dir,
                ca,
                ca_key,
                ca_path,
            }
        }

        /// A certificate for `sans` (DNS names or IPs), written as `<file>.pem` / `<file>.key`.
        pub fn issue(&self, file: &str, sans: &[&str]) -> TlsFiles {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
            let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
            let files = TlsFiles {
                cert: self.dir.path().join(format!("{file}.pem")),
                key: self.dir.path().join(format!("{file}.key")),
            };
            std::fs::write(&files.cert, cert.pem()).unwrap();
            std::fs::write(&files.key, key.serialize_pem()).unwrap();
            files
        }

        /// A client configuration trusting this CA, offering `alpn`.
        pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_file(&self.ca_path).unwrap())
                .unwrap();
            let mut c = rustls::ClientConfig::builder_with_provider(kbs_proxy::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(c)
        }

        /// A server configuration for `files`; with `require_client_cert`, clients must present
        /// a certificate signed by this CA.
        pub fn server_config(&self, files: &TlsFiles, require_client_cert: bool) -> Arc<rustls::ServerConfig> {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(&files.key).unwrap();
            let builder = rustls::ServerConfig::builder_with_provider(kbs_proxy::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap();
            let builder = if require_client_cert {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_file(&self.ca_path).unwrap())
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    kbs_proxy::tls::provider(),
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_no_client_auth()
            };
            Arc::new(builder.with_single_cert(certs, key).unwrap())
        }
    }
}

/// A plain round-robin reverse proxy with no affinity at all: what a load balancer without
/// sticky sessions does in front of KBS replicas.
pub async fn start_round_robin(backends: Vec<SocketAddr>) -> SocketAddr {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Incoming>();
    start_backend(move |req: Request<Incoming>| {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % backends.len();
        let target = backends[i];
        let client = client.clone();
        async move {
            let (mut parts, body) = req.into_parts();
            let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            parts.uri = format!("http://{target}{pq}").parse().unwrap();
            let resp = client.request(Request::from_parts(parts, body)).await.unwrap();
            let (parts, body) = resp.into_parts();
            Response::from_parts(parts, ProxyBody::Stream(body, None))
        }
    })
    .await
}

/// A route cookie value pinning `backend`, signed with the test secret now.
pub fn route_value(backend: kbs_proxy::routing::route_cookie::BackendId) -> String {
    let codec = kbs_proxy::routing::route_cookie::RouteCookieCodec::new(
        &kbs_proxy::routing::route_cookie::CookieSecret::new(SECRET.as_bytes().to_vec()).unwrap(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    String::from_utf8(codec.mint(backend, now).to_vec()).unwrap()
}
