//! The process-wide harness: one runtime, the mirror backend and two proxies in front of it (fast
//! path on, fast path off), all on 127.0.0.1:0; a second pair whose only backend refuses
//! connections (so every answer is the proxy's own: 502, or 401 for a pinned session); and the
//! client side of an exchange.
//!
//! The proxies are started as `tests/support/mod.rs` `start_proxy` does, minus the control plane:
//! health checks and DNS would only add background traffic and state between inputs (the
//! backend starts healthy, and passive health is reset before each input, see
//! [`Harness::reset_passive_health`]).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kbs_proxy::config::Settings;
use kbs_proxy::dataplane::proxy::Proxy;
use kbs_proxy::routing::route_cookie::{BackendId, CookieSecret, RouteCookieCodec};
use kbs_proxy::dataplane::server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use super::http::{read_answers, Expected, Transcript};

/// The cookie secret both proxies share, so one route cookie means the same to both.
const SECRET: &str = "fuzz-secret-0123456789abcdef0123";
/// The mirror's backend name; route cookies name it by a hash of it.
const BACKEND: &str = "mirror";
/// The refusing backend's name.
const DEAD: &str = "dead";

/// Route cookie values the inputs may carry, by placeholder (see `input.rs`).
pub struct Cookies {
    /// `@ROUTE@`: valid, for the mirror.
    pub valid: String,
    /// `@GONE@`: valid signature, for a backend not in the set.
    pub gone: String,
    /// `@OLD@`: for the mirror, past its max-age.
    pub expired: String,
    /// `@DEAD@`: valid, for the refusing backend.
    pub dead: String,
}

/// Which pair of proxies an input goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Mirror,
    /// Connections refused: the proxies answer themselves.
    Dead,
}

/// The two proxies in front of one backend.
pub struct Pair {
    pub fast: Side,
    pub hyper: Side,
}

/// One proxy under test.
pub struct Side {
    pub addr: SocketAddr,
    proxy: Proxy,
}

/// Everything that lives for the whole fuzzing process.
pub struct Harness {
    /// Multi-threaded with one worker: the proxies and the mirror run there while the fuzzing
    /// thread blocks on an exchange.
    rt: Runtime,
    pub mirror: Pair,
    pub dead: Pair,
    pub cookies: Cookies,
    /// Never cancelled: the servers run until the process exits.
    _shutdown: CancellationToken,
}

/// How long the client side waits.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// Stop when nothing arrived for this long (a request the proxies wait on: both wait).
    pub quiet: Duration,
    /// Stop after this long in any case.
    pub total: Duration,
}

pub fn get() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(Harness::start)
}

fn settings(name: &str, backend: SocketAddr, fast_path: &str) -> Settings {
    Settings {
        backend: Some(vec![format!("{name}=http://{backend}")]),
        cookie_secret: Some(SECRET.into()),
        listen: Some("127.0.0.1:0".into()),
        shutdown_grace: Some("1s".into()),
        access_log: Some("off".into()),
        health_check: Some("off".into()),
        fast_path: Some(fast_path.into()),
        ..Settings::default()
    }
}

/// Starts a proxy on 127.0.0.1:0 on the current runtime (tests/support `start_proxy_with`,
/// without the control plane).
async fn start_proxy(settings: Settings, shutdown: &CancellationToken) -> Side {
    let config = settings.validate().expect("valid harness config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a proxy");
    let addr = listener.local_addr().expect("proxy address");
    let proxy = Proxy::new(&config).expect("proxy");
    let options = server::ServeOptions::from_config(&config, None);
    tokio::spawn(server::serve(proxy.worker(), listener, options, shutdown.clone()));
    Side { addr, proxy }
}

impl Harness {
    fn start() -> Self {
        // libFuzzer's `main` is not Rust's, which ignores SIGPIPE: without this a write to a
        // socket the peer has reset kills the whole process instead of failing with EPIPE, as it
        // does in the proxy binary.
        // SAFETY: setting a signal's disposition to SIG_IGN, before any thread of ours runs.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let shutdown = CancellationToken::new();
        let (mirror, dead) = rt.block_on(async {
            let pair = |name: &'static str, backend: SocketAddr| {
                let shutdown = shutdown.clone();
                async move {
                    Pair {
                        fast: start_proxy(settings(name, backend, "on"), &shutdown).await,
                        hyper: start_proxy(settings(name, backend, "off"), &shutdown).await,
                    }
                }
            };
            let mirror = super::mirror::start().await;
            // Bound, then closed: connections to it are refused at once.
            let refusing = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind")
                .local_addr()
                .expect("address");
            (pair(BACKEND, mirror).await, pair(DEAD, refusing).await)
        });
        let codec = RouteCookieCodec::new(&CookieSecret::new(SECRET.as_bytes().to_vec()).expect("secret"));
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
        let mint = |name: &str, at: u64| {
            String::from_utf8(codec.mint(BackendId::from_name(name), at).to_vec()).expect("ASCII")
        };
        let cookies = Cookies {
            valid: mint(BACKEND, now),
            gone: mint("gone", now),
            // The default max-age is two days.
            expired: mint(BACKEND, now - 3 * 86_400),
            dead: mint(DEAD, now),
        };
        Self {
            rt,
            mirror,
            dead,
            cookies,
            _shutdown: shutdown,
        }
    }

    /// Ends any passive back-off a previous input caused, so each input starts from the same
    /// state on both proxies (a backend in back-off refuses pinned requests).
    pub fn reset_passive_health(&self) {
        for side in [&self.mirror.fast, &self.mirror.hyper, &self.dead.fast, &self.dead.hyper] {
            for b in &side.proxy.routing().backends.list {
                if b.in_backoff() {
                    b.record_success();
                }
            }
        }
    }

    /// Sends `request` to both proxies in front of `backend` at once, each on a new connection;
    /// what each client got.
    pub fn exchange_both(
        &self,
        backend: Backend,
        request: &[u8],
        sent: &[Expected],
        patience: Patience,
    ) -> (Transcript, Transcript) {
        let pair = match backend {
            Backend::Mirror => &self.mirror,
            Backend::Dead => &self.dead,
        };
        self.rt.block_on(async {
            tokio::join!(
                exchange(pair.fast.addr, request, sent, patience),
                exchange(pair.hyper.addr, request, sent, patience)
            )
        })
    }
}

/// One client connection: writes `request`, reads until the proxy closes, every expected answer
/// is in, or the proxy is quiet for `patience.quiet`. The write half is never shut down: hyper
/// treats a half-close as the client going away (`http1_half_close` is off), the fast path does
/// not, and that difference is not what this target looks for.
async fn exchange(addr: SocketAddr, request: &[u8], sent: &[Expected], patience: Patience) -> Transcript {
    let mut s = TcpStream::connect(addr).await.expect("connect to a proxy");
    let _ = s.set_nodelay(true);
    let (mut rd, mut wr) = s.split();
    let write = async {
        let _ = wr.write_all(request).await;
    };
    let read = async {
        let deadline = tokio::time::Instant::now() + patience.total;
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let wait = patience
                .quiet
                .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            match tokio::time::timeout(wait, rd.read(&mut chunk)).await {
                Err(_elapsed) => return (got, End::Quiet),
                // A reset after the last answer (unread request bytes at close) ends it as well.
                Ok(Ok(0)) | Ok(Err(_)) => return (got, End::Closed),
                Ok(Ok(n)) => {
                    got.extend_from_slice(&chunk[..n]);
                    // When the last request closes, read on to the close: bytes after its answer
                    // are a finding (a body where there must be none), not timing.
                    if sent.last().is_some_and(|e| !e.closes) && read_answers(&got, sent, false).finals() >= sent.len()
                    {
                        return (got, End::AllAnswered);
                    }
                }
            }
        }
    };
    let ((), (got, end)) = tokio::join!(write, read);
    let mut t = read_answers(&got, sent, end == End::Closed);
    if end == End::AllAnswered {
        t.keep_finals(sent.len());
    }
    t
}

/// Why the client stopped reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Closed,
    Quiet,
    /// Every answer the harness expects is in (more may be on the way if it expected too few).
    AllAnswered,
}
