//! The `kbs-affinity-proxy` binary: command line, configuration layers, signals.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use kbs_proxy::config::{self, ConfigError, Settings};
use kbs_proxy::control::{self, ControlPlane};
use kbs_proxy::dataplane::proxy::Proxy;
use kbs_proxy::{dataplane::server, telemetry};
use kbs_proxy_harness::demo;
use kbs_proxy_harness::sim::{SimConfig, SimKbs};
use tokio_util::sync::CancellationToken;

mod bench_chart_cli;
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

impl Cli {
    /// Whether this runs the proxy (plain, or in the demo), which takes the settings.
    fn runs_proxy(&self) -> bool {
        matches!(self.command, None | Some(Command::Demo(_)))
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Two simulated KBS replicas behind the proxy, four sessions, a table; then serve until Ctrl-C.
    Demo(Box<ProxyArgs>),
    /// Run one simulated KBS replica (for manual tests and benchmarks).
    Sim(SimArgs),
    /// Drive full KBS sessions against a URL and report latencies, errors and affinity.
    Loadgen(loadgen_cli::LoadgenArgs),
    /// Draw a bar chart (SVG) of a benches/compare.sh runs file: ratios to HAProxy per mode.
    BenchChart(bench_chart_cli::BenchChartArgs),
    /// Exit 0 when URL answers 2xx within 2 s (container health checks without curl).
    Healthcheck {
        /// The URL to GET, e.g. http://127.0.0.1:9090/healthz.
        #[arg(long, default_value = "http://127.0.0.1:9090/healthz")]
        url: String,
    },
}

/// Proxy options: the config file, and every setting as a flag (with its environment variable).
#[derive(Args, Debug, Default, Clone)]
struct ProxyArgs {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

impl ProxyArgs {
    /// Whether the logs are to be JSON: the flag or the variable, else the file, when it reads.
    fn json_logs(&self) -> bool {
        let from_file = || {
            let file = Settings::from_file(self.config.as_ref()?).ok()?;
            file.log_format
        };
        self.settings.log_format.clone().or_else(from_file).as_deref() == Some("json")
    }

    /// The file, then the environment and the flags (clap has put the flags over the environment).
    fn layered(self) -> Result<Settings, ConfigError> {
        let base = match &self.config {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        Ok(base.merge(self.settings))
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

/// The command line, each setting given its environment variable and its default in the help.
fn command() -> clap::Command {
    config::describe(Cli::command()).mut_subcommand("demo", config::describe)
}

fn main() -> ExitCode {
    let cli = match parse(&command()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let json = match &cli.command {
        None => cli.proxy.json_logs(),
        Some(Command::Demo(args)) => args.json_logs(),
        Some(_) => false,
    };
    let result = match cli.command {
        None => run_proxy(cli.proxy),
        Some(Command::Demo(args)) => run_demo(*args),
        Some(Command::Sim(args)) => run_sim(args),
        Some(Command::Loadgen(args)) => loadgen_cli::run(args),
        Some(Command::BenchChart(args)) => bench_chart_cli::run(args),
        Some(Command::Healthcheck { url }) => healthcheck(&url),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<ConfigError>() {
            Some(ce) => usage_error(ce, json),
            None => {
                report(json, None, &format!("{e:#}"));
                ExitCode::FAILURE
            }
        },
    }
}

/// The command line, or, when it is wrong or asks for help or the version, the exit code after
/// saying so.
fn parse(command: &clap::Command) -> Result<Cli, ExitCode> {
    let error = match command.clone().try_get_matches() {
        Ok(matches) => {
            let proxy = matches.subcommand_matches("demo").unwrap_or(&matches);
            config::refuse_secret_flag(proxy).map_err(|e| usage_error(&e, json_in_raw_args()))?;
            match Cli::from_arg_matches(&matches) {
                Ok(cli) => return Ok(cli),
                Err(e) => e,
            }
        }
        Err(e) => e,
    };
    if let Some(from_env) = config::env_error(command, &error) {
        // clap reads the proxy's variables before it sees a subcommand: the others do without them.
        return match Cli::try_parse() {
            Ok(cli) if !cli.runs_proxy() => Ok(cli),
            _ => Err(usage_error(&from_env, json_in_raw_args())),
        };
    }
    let _ = error.print();
    Err(if error.use_stderr() {
        ExitCode::from(EX_USAGE)
    } else {
        ExitCode::SUCCESS
    })
}

/// A configuration error: one line naming the key, exit code 64.
fn usage_error(e: &ConfigError, json: bool) -> ExitCode {
    report(json, Some(e.key().unwrap_or("config")), &e.to_string());
    ExitCode::from(EX_USAGE)
}

/// Says why the proxy stops: a plain line, or in JSON mode a JSON line like all the others (a
/// log collector parses every line of a JSON-mode proxy).
fn report(json: bool, key: Option<&str>, error: &str) {
    if !json {
        eprintln!("kbs-affinity-proxy: {error}");
        return;
    }
    if !tracing::dispatcher::has_been_set() {
        telemetry::init(config::LogFormat::Json);
    }
    match key {
        Some(key) => tracing::error!(key, error, "invalid configuration; not starting"),
        None => tracing::error!(error, "stopping on an error"),
    }
}

/// Whether the raw command line or the environment asks for JSON logs: for the errors found
/// before the settings are parsed.
fn json_in_raw_args() -> bool {
    let var = std::env::var(format!("{}LOG_FORMAT", config::ENV_PREFIX));
    let mut args = std::env::args().skip(1);
    let mut flag = None;
    while let Some(arg) = args.next() {
        match arg.strip_prefix("--log-format") {
            Some("") => flag = args.next(),
            Some(v) if v.starts_with('=') => flag = Some(v[1..].to_owned()),
            _ => {}
        }
    }
    flag.or(var.ok()).as_deref() == Some("json")
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
    // One line per backend and DNS name, each a field of its own (no list stringified into one
    // field, which JSON log collectors cannot query), then the summary.
    for b in &config.backends {
        tracing::info!(backend = b.name, address = %b.authority, scheme = %b.scheme, "backend configured");
    }
    for d in &config.backend_dns {
        tracing::info!(name = d.host, port = d.port, scheme = %d.scheme, "backends from DNS");
    }
    tracing::info!(
        listen = %bound,
        tls = config.tls.is_some(),
        admin = admin.as_deref().unwrap_or("off"),
        workers = config.workers,
        backends = config.backends.len(),
        dns_names = config.backend_dns.len(),
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
    // The lines of the last requests, drained during the grace, are still in the buffers.
    kbs_proxy::telemetry::access::flush();
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
    if let Some(backend) = &args.settings.backend {
        return Err(ConfigError::Invalid {
            key: "backend",
            value: backend.join(" "),
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
    // The demo's own sessions are logged after its table, not above it: their access lines
    // wait behind a gate that opens once the table is printed.
    let gate = HeldUntilOpen::default();
    kbs_proxy::telemetry::access::install(checked.log_format, gate.clone());
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
        println!("Serving until Ctrl-C; access log below.\n");
        gate.open();
        wait_for_signal().await;
        demo.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), demo.task).await;
        kbs_proxy::telemetry::access::flush();
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

/// Stderr, once opened: writes wait until then (the access log's writer thread waits there).
#[derive(Clone, Default)]
struct HeldUntilOpen(std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl HeldUntilOpen {
    fn open(&self) {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.0 .1.notify_all();
    }
}

impl std::io::Write for HeldUntilOpen {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut open = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        while !*open {
            open = self.0 .1.wait(open).unwrap_or_else(|p| p.into_inner());
        }
        drop(open);
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
