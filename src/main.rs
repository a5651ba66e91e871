//! The `kbs-affinity-proxy` binary: command line, configuration layers, signals.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kbs_affinity_proxy::config::{self, ConfigError, Settings};
use kbs_affinity_proxy::proxy::Proxy;
use kbs_affinity_proxy::sim::{SimConfig, SimKbs};
use kbs_affinity_proxy::{demo, server, telemetry};
use tokio_util::sync::CancellationToken;

/// EX_USAGE from sysexits.h: bad command line or configuration.
const EX_USAGE: u8 = 64;

/// Session-affine reverse proxy for Trustee KBS replicas.
///
/// Pins each client to one replica with a signed route cookie, so its auth, attest and resource
/// calls reach the replica that holds its session.
#[derive(Parser, Debug)]
#[command(
    name = "kbs-affinity-proxy",
    version,
    args_conflicts_with_subcommands = true
)]
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
}

/// Proxy options. Each `--foo` is also the config-file key `foo`; flags win over the file.
#[derive(Args, Debug, Default)]
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
    let config = args.layered()?.validate()?;
    telemetry::init(config.log_format);
    warn_if_generated_secret(&config);
    let listeners = server::bind_listeners(config.listen, config.workers)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let bound = listeners[0].local_addr()?;
    let proxy = Proxy::new(&config);
    let backends: Vec<String> = config
        .backends
        .iter()
        .map(|b| format!("{}={}", b.name, b.authority))
        .collect();
    tracing::info!(listen = %bound, workers = config.workers, ?backends, "kbs-affinity-proxy serving");
    let shutdown = CancellationToken::new();
    spawn_signal_watcher(shutdown.clone())?;
    server::run_workers(&proxy, listeners, shutdown, config.shutdown_grace)?;
    tracing::info!("stopped");
    Ok(())
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

/// Cancels `shutdown` on SIGINT or SIGTERM, from a thread of its own.
fn spawn_signal_watcher(shutdown: CancellationToken) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                wait_for_signal().await;
                tracing::info!("shutting down: no new connections, finishing open requests");
                shutdown.cancel();
            });
        })?;
    Ok(())
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
            reason:
                "the demo starts its own simulated replicas; run without `demo` to proxy real ones"
                    .into(),
        }
        .into());
    }
    let mut settings = args.layered()?;
    settings
        .listen
        .get_or_insert_with(|| "127.0.0.1:8080".into());
    // Validate the listen address (and everything else) before binding anything.
    let checked = Settings {
        backend: Some(vec!["http://127.0.0.1:1".into()]),
        ..settings.clone()
    }
    .validate()?;
    telemetry::init(checked.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
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
