//! The `kbs-affinity-proxy` binary: command line, configuration layers, signals.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kbs_proxy::config::{self, ConfigError, Settings};
use kbs_proxy::control::{self, ControlPlane};
use kbs_proxy::dataplane::proxy::Proxy;
use kbs_proxy::{dataplane::server, telemetry};
use kbs_proxy_harness::demo;
use kbs_proxy_harness::sim::{SimConfig, SimKbs};
use tokio_util::sync::CancellationToken;

mod loadgen_cli;

/// EX_USAGE from sysexits.h: bad command line or configuration.
const EX_USAGE: u8 = 64;

/// Session-affine reverse proxy for Trustee KBS replicas.
///
/// Pins each client to one replica with a signed route cookie, so its auth, attest and resource
/// calls reach the replica that holds its session.
#[derive(Parser, Debug)]
#[command(name = "kbs-affinity-proxy", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    proxy: ProxyArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Two simulated KBS replicas behind the proxy, four sessions, a table; then serve until Ctrl-C.
    Demo(Box<ProxyArgs>),
    /// Run one simulated KBS replica (for manual tests and benchmarks).
    Sim(SimArgs),
    /// Drive full KBS sessions against a URL and report latencies, errors and affinity.
    Loadgen(loadgen_cli::LoadgenArgs),
    /// Exit 0 when URL answers 2xx within 2 s (container health checks without curl).
    Healthcheck {
        /// The URL to GET, e.g. http://127.0.0.1:9090/healthz.
        #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
        url: String,
    },
}

/// Proxy options. Each `--foo` is also the config-file key `foo`; flags win over the file.
#[derive(Args, Debug, Default, Clone)]
struct ProxyArgs {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to accept clients on [default: 0.0.0.0:8080; demo: 127.0.0.1:8080].
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<String>,
    /// A KBS replica: URL or NAME=URL (repeat for each replica). NAME defaults to host:port.
    #[arg(long = "backend", value_name = "[NAME=]URL")]
    backend: Vec<String>,
    /// Route cookie name [default: route].
    #[arg(long, value_name = "NAME")]
    cookie_name: Option<String>,
    /// Route cookie lifetime in seconds [default: 172800].
    #[arg(long, value_name = "SECONDS")]
    cookie_max_age: Option<u64>,
    /// File with the cookie signing secret (at least 16 bytes). Also: env KBS_AFFINITY_PROXY_COOKIE_SECRET.
    #[arg(long, value_name = "FILE")]
    cookie_secret_file: Option<PathBuf>,
    /// Route cookie Path attribute [default: /].
    #[arg(long, value_name = "PATH")]
    cookie_path: Option<String>,
    /// Route cookie Domain attribute [default: none].
    #[arg(long, value_name = "DOMAIN")]
    cookie_domain: Option<String>,
    /// Route cookie SameSite attribute: strict, lax or none [default: not set].
    #[arg(long, value_name = "MODE")]
    cookie_same_site: Option<String>,
    /// How new sessions are spread: round-robin or least-requests [default: round-robin].
    #[arg(long, value_name = "POLICY")]
    balance: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Time limit for connecting to a replica, e.g. 5s or 500ms [default: 5s].
    #[arg(long, value_name = "DURATION")]
    backend_connect_timeout: Option<String>,
    /// Time limit for a replica's response head [default: 60s].
    #[arg(long, value_name = "DURATION")]
    backend_response_timeout: Option<String>,
    /// Largest auth request body, bytes (buffered so it can be re-sent) [default: 65536].
    #[arg(long, value_name = "BYTES")]
    auth_body_limit: Option<usize>,
    /// Serving threads, each with its own runtime [default: number of CPUs].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Time in-flight requests get to finish on SIGTERM/SIGINT [default: 10s].
    #[arg(long, value_name = "DURATION")]
    shutdown_grace: Option<String>,
    /// Backends from DNS: every address of HOST is a backend (e.g. a headless Service). Repeatable.
    #[arg(long = "backend-dns", value_name = "[https://]HOST:PORT")]
    backend_dns: Vec<String>,
    /// How often --backend-dns names are re-resolved [default: 10s].
    #[arg(long, value_name = "DURATION")]
    backend_dns_interval: Option<String>,
    /// How long a drained or vanished backend keeps serving its pinned sessions [default: 300s].
    #[arg(long, value_name = "DURATION")]
    drain_timeout: Option<String>,
    /// PEM certificate chain: serve clients over TLS (h2 and http/1.1 by ALPN).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates to trust for https:// backends [default: the system's].
    #[arg(long, value_name = "FILE")]
    backend_ca: Option<PathBuf>,
    /// PEM client certificate for mTLS to backends.
    #[arg(long, value_name = "FILE")]
    backend_client_cert: Option<PathBuf>,
    /// PEM key for --backend-client-cert.
    #[arg(long, value_name = "FILE")]
    backend_client_key: Option<PathBuf>,
    /// Accept any backend certificate. For testing only: anyone on the path can impersonate a replica.
    #[arg(long)]
    backend_insecure_skip_verify: bool,
    /// Active health check: tcp, http or off [default: tcp].
    #[arg(long, value_name = "MODE")]
    health_check: Option<String>,
    /// Path of the http health check [default: /healthz].
    #[arg(long, value_name = "PATH")]
    health_check_path: Option<String>,
    /// Time between health checks of a backend [default: 5s].
    #[arg(long, value_name = "DURATION")]
    health_check_interval: Option<String>,
    /// Limit on one health check [default: 2s].
    #[arg(long, value_name = "DURATION")]
    health_check_timeout: Option<String>,
    /// Consecutive failed checks that mark a backend down [default: 3].
    #[arg(long, value_name = "N")]
    health_fall: Option<u32>,
    /// Consecutive good checks that mark it up again [default: 2].
    #[arg(long, value_name = "N")]
    health_rise: Option<u32>,
    /// Admin port: /healthz /readyz /metrics /backends, drain/undrain [default: off].
    #[arg(long, value_name = "IP:PORT")]
    admin_listen: Option<String>,
    /// File with the bearer token that allows admin writes from other than loopback.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// One log line per request: on or off [default: on].
    #[arg(long, value_name = "on|off")]
    access_log: Option<String>,
    /// Admin writes (set-resource, policies, reference values): broadcast to every replica, or passthrough [default: broadcast].
    #[arg(long, value_name = "MODE")]
    admin_writes: Option<String>,
    /// An admin write to broadcast, as "METHOD /path-prefix" (repeat; replaces the default list).
    #[arg(long = "admin-write-route", value_name = "METHOD /PREFIX")]
    admin_write_routes: Vec<String>,
    /// Largest admin write body, bytes [default: 8388608].
    #[arg(long, value_name = "BYTES")]
    admin_body_limit: Option<usize>,
    /// Directory keeping the admin journal across restarts (files 0600: they hold secrets) [default: memory only].
    #[arg(long, value_name = "DIR")]
    admin_journal: Option<PathBuf>,
    /// Admin writes kept in the journal [default: 10000].
    #[arg(long, value_name = "N")]
    admin_journal_max: Option<usize>,
    /// How often the whole compacted journal is re-applied to every replica [default: 30s].
    #[arg(long, value_name = "DURATION")]
    admin_reconcile_interval: Option<String>,
    /// File with the proxy's own KBS admin bearer token for replays, re-read at each use; clients' tokens are then not journaled.
    #[arg(long, value_name = "FILE")]
    admin_replay_token_file: Option<PathBuf>,
    /// The journal owner's admin port (http://HOST:PORT): forward admin writes there and take the replicas' sync state from it [default: this proxy owns its journal].
    #[arg(long, value_name = "URL")]
    journal_owner: Option<String>,
    /// Watch each replica every second (its /metrics over a kept-alive connection) for a restart that lost its state: on or off [default: on].
    #[arg(long, value_name = "on|off")]
    replica_watch: Option<String>,
    /// Learned kbs-session-ids and tokens kept, for clients without the route cookie [default: 100000].
    #[arg(long, value_name = "N")]
    session_table_size: Option<usize>,
    /// How long a learned kbs-session-id is kept at most [default: 300s].
    #[arg(long, value_name = "DURATION")]
    session_lifetime: Option<String>,
    /// The replicas share a token signer: bearer resource requests may go to any replica.
    #[arg(long)]
    tokens_portable: bool,
    /// Time a client gets to send a request head; idle keep-alive connections close after it [default: 60s].
    #[arg(long, value_name = "DURATION")]
    client_idle_timeout: Option<String>,
    /// Client connections open at once; more wait in the listen backlog [default: 10000].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Largest request head (HTTP/1.1) or header list (HTTP/2), bytes; over it: 431 [default: 65536].
    #[arg(long, value_name = "BYTES")]
    max_header_bytes: Option<usize>,
    /// Plain HTTP/1.1 on the proxy's own fast path (on), or hyper for everything (off) [default: on].
    #[arg(long, value_name = "on|off")]
    fast_path: Option<String>,
    /// HTTP/1.1 to the backends, pooled (http1), or HTTP/2, one multiplexed connection per backend
    /// and worker, by prior knowledge over TCP and ALPN over TLS; turns the fast path off (http2)
    /// [default: http1].
    #[arg(long, value_name = "http1|http2")]
    backend_protocol: Option<String>,
}

impl ProxyArgs {
    fn into_settings(self) -> (Option<PathBuf>, Settings) {
        let settings = Settings {
            listen: self.listen,
            backend: (!self.backend.is_empty()).then_some(self.backend),
            cookie_name: self.cookie_name,
            cookie_max_age: self.cookie_max_age,
            cookie_secret_file: self.cookie_secret_file,
            cookie_secret: None,
            cookie_path: self.cookie_path,
            cookie_domain: self.cookie_domain,
            cookie_same_site: self.cookie_same_site,
            balance: self.balance,
            log_format: self.log_format,
            backend_connect_timeout: self.backend_connect_timeout,
            backend_response_timeout: self.backend_response_timeout,
            auth_body_limit: self.auth_body_limit,
            workers: self.workers,
            shutdown_grace: self.shutdown_grace,
            backend_dns: (!self.backend_dns.is_empty()).then_some(self.backend_dns),
            backend_dns_interval: self.backend_dns_interval,
            drain_timeout: self.drain_timeout,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            backend_ca: self.backend_ca,
            backend_client_cert: self.backend_client_cert,
            backend_client_key: self.backend_client_key,
            backend_insecure_skip_verify: self.backend_insecure_skip_verify.then_some(true),
            health_check: self.health_check,
            health_check_path: self.health_check_path,
            health_check_interval: self.health_check_interval,
            health_check_timeout: self.health_check_timeout,
            health_fall: self.health_fall,
            health_rise: self.health_rise,
            admin_listen: self.admin_listen,
            admin_token_file: self.admin_token_file,
            access_log: self.access_log,
            admin_writes: self.admin_writes,
            admin_write_routes: (!self.admin_write_routes.is_empty()).then_some(self.admin_write_routes),
            admin_body_limit: self.admin_body_limit,
            admin_journal: self.admin_journal,
            admin_journal_max: self.admin_journal_max,
            admin_reconcile_interval: self.admin_reconcile_interval,
            admin_replay_token_file: self.admin_replay_token_file,
            journal_owner: self.journal_owner,
            replica_watch: self.replica_watch,
            session_table_size: self.session_table_size,
            session_lifetime: self.session_lifetime,
            tokens_portable: self.tokens_portable.then_some(true),
            client_idle_timeout: self.client_idle_timeout,
            max_connections: self.max_connections,
            max_header_bytes: self.max_header_bytes,
            fast_path: self.fast_path,
            backend_protocol: self.backend_protocol,
        };
        (self.config, settings)
    }

    /// File, then environment, then flags, each layer over the one before.
    fn layered(self) -> Result<Settings, ConfigError> {
        let (file, flags) = self.into_settings();
        let base = match file {
            Some(path) => Settings::from_file(&path)?,
            None => Settings::default(),
        };
        let env = Settings {
            cookie_secret: std::env::var(config::SECRET_ENV).ok(),
            ..Settings::default()
        };
        Ok(base.merge(env).merge(flags))
    }
}

#[derive(Args, Debug)]
struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081", value_name = "IP:PORT")]
    listen: std::net::SocketAddr,
    /// Replica name, returned in the x-kbs-replica header.
    #[arg(long, default_value = "kbs-sim")]
    name: String,
    /// Session lifetime in seconds.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    session_timeout: u64,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let result = match cli.command {
        None => run_proxy(cli.proxy),
        Some(Command::Demo(args)) => run_demo(*args),
        Some(Command::Sim(args)) => run_sim(args),
        Some(Command::Loadgen(args)) => loadgen_cli::run(args),
        Some(Command::Healthcheck { url }) => healthcheck(&url),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(ce) = e.downcast_ref::<ConfigError>() {
                eprintln!("kbs-affinity-proxy: {ce}");
                return ExitCode::from(EX_USAGE);
            }
            eprintln!("kbs-affinity-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let watch = args.config.clone();
    let reload_args = args.clone();
    let config = args.layered()?.validate()?;
    telemetry::init(config.log_format);
    warn_if_generated_secret(&config);
    if config.backend_tls.insecure_skip_verify {
        tracing::warn!("--backend-insecure-skip-verify: backend certificates are NOT verified; anyone on the path can impersonate a KBS replica");
    }
    // Bind everything before serving anything: a port in use fails here, with nothing started.
    let listeners = server::bind_listeners(config.listen, config.workers)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin_listener = match &config.admin {
        Some(admin) => Some(
            std::net::TcpListener::bind(admin.listen)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .with_context(|| format!("cannot listen on {} (admin)", admin.listen))?,
        ),
        None => None,
    };
    let bound = listeners[0].local_addr()?;
    let proxy = Proxy::new(&config)?;
    let tls = control::tls_settings(&config)?;
    let tls_server = tls.as_ref().map(|(_, settings)| std::sync::Arc::clone(settings));
    let source: control::ReloadSource = Box::new(move || reload_args.clone().layered()?.validate());
    let control = std::sync::Arc::new(ControlPlane::new(proxy.clone(), config.clone(), tls).with_reload(source, watch));
    let shutdown = CancellationToken::new();
    let admin = admin_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string());
    let token = config.admin.as_ref().and_then(|a| a.token.clone());
    let control_thread = spawn_control_plane(control, admin_listener, token, shutdown.clone())?;
    let backends: Vec<String> = config
        .backends
        .iter()
        .map(|b| format!("{}={}", b.name, b.authority))
        .collect();
    let dns: Vec<String> = config
        .backend_dns
        .iter()
        .map(|d| format!("{}:{}", d.host, d.port))
        .collect();
    tracing::info!(
        listen = %bound,
        tls = config.tls.is_some(),
        admin = admin.as_deref().unwrap_or("off"),
        workers = config.workers,
        ?backends,
        ?dns,
        "kbs-affinity-proxy serving"
    );
    server::run_workers(
        &proxy,
        listeners,
        server::ServeOptions::from_config(&config, tls_server),
        shutdown.clone(),
    )?;
    shutdown.cancel();
    let _ = control_thread.join();
    tracing::info!("stopped");
    Ok(())
}

/// The control plane's thread: health checks, discovery, reloads, the admin port and signals.
fn spawn_control_plane(
    control: std::sync::Arc<ControlPlane>,
    admin: Option<std::net::TcpListener>,
    token: Option<config::AdminToken>,
    shutdown: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Signal handlers before anything else: a SIGHUP must never meet the default action (exit).
    let signals = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::hangup())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new().name("control".into()).spawn(move || {
        rt.block_on(async move {
            // DNS and health first, so the workers' first requests see real backends.
            control.refresh_dns().await;
            control.check_health().await;
            tokio::spawn(std::sync::Arc::clone(&control).run(shutdown.clone()));
            if let Some(listener) = admin.and_then(|l| tokio::net::TcpListener::from_std(l).ok()) {
                let control = std::sync::Arc::clone(&control);
                tokio::spawn(kbs_proxy::control::admin::serve(
                    listener,
                    control,
                    token,
                    shutdown.clone(),
                ));
            }
            let _ = ready_tx.send(());
            handle_signals(&control, signals, &shutdown).await;
        });
    })?;
    ready_rx.recv().context("the control plane did not start")?;
    Ok(handle)
}

type Signals = (
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
    tokio::signal::unix::Signal,
);

/// SIGHUP reloads; SIGINT/SIGTERM start the graceful shutdown.
async fn handle_signals(control: &ControlPlane, (mut hup, mut term, mut int): Signals, shutdown: &CancellationToken) {
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            () = shutdown.cancelled() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                let _ = control.reload();
            }
        }
    }
    tracing::info!("shutting down: no new connections, finishing open requests");
    shutdown.cancel();
}

fn warn_if_generated_secret(config: &config::Config) {
    if config.cookie.secret_generated {
        tracing::warn!(
            "no cookie secret configured (--cookie-secret-file, cookie-secret, {}): generated one; \
             several proxy replicas will not agree on cookies, and a restart breaks every pin",
            config::SECRET_ENV
        );
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn run_demo(args: ProxyArgs) -> anyhow::Result<()> {
    if !args.backend.is_empty() {
        return Err(ConfigError::Invalid {
            key: "backend",
            value: args.backend.join(" "),
            reason: "the demo starts its own simulated replicas; run without `demo` to proxy real ones".into(),
        }
        .into());
    }
    let mut settings = args.layered()?;
    settings.listen.get_or_insert_with(|| "127.0.0.1:8080".into());
    // Validate the listen address (and everything else) before binding anything.
    let checked = Settings {
        backend: Some(vec!["http://127.0.0.1:1".into()]),
        ..settings.clone()
    }
    .validate()?;
    telemetry::init(checked.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(checked.listen)
            .await
            .with_context(|| format!("cannot listen on {} (use --listen IP:PORT)", checked.listen))?;
        let demo = demo::start(settings, listener).await?;
        let url = format!("http://{}", demo.proxy_addr);
        for r in &demo.replicas {
            println!("simulated KBS replica {} on {}", r.name(), r.url());
        }
        println!("proxy on {url}\n");
        let reports = demo::run_sessions(&url, 4).await;
        println!("{}", demo::render(&reports));
        println!("Try it (keep cookies with -b/-c, as the KBS client does):");
        println!("  curl -si -c jar -b jar -X POST {url}/kbs/v0/auth -d '{{\"version\":\"0.4.0\",\"tee\":\"sample\",\"extra-params\":{{}}}}'");
        println!("  curl -si -c jar -b jar {url}/kbs/v0/resource/{}", demo::DEMO_RESOURCE);
        println!("Serving until Ctrl-C.");
        wait_for_signal().await;
        demo.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), demo.task).await;
        Ok(())
    })
}

fn run_sim(args: SimArgs) -> anyhow::Result<()> {
    telemetry::init(config::LogFormat::Text);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let config = SimConfig {
            session_timeout: Duration::from_secs(args.session_timeout),
            ..SimConfig::new(args.name)
        };
        let sim = SimKbs::start(listener, config)?;
        tracing::info!(name = sim.name(), addr = %sim.addr(), "simulated KBS replica serving");
        wait_for_signal().await;
        sim.stop();
        Ok(())
    })
}

fn healthcheck(url: &str) -> anyhow::Result<()> {
    let uri: http::Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let resp = tokio::time::timeout(Duration::from_secs(2), client.get(uri))
            .await
            .context("timed out")?
            .context("request failed")?;
        anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
        Ok(())
    })
}
