//! `kbs-affinity-proxy demo`: two simulated KBS replicas and the proxy in one process, four
//! client sessions through it, and a table of which replica served each step.

use std::fmt::Write as _;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::kbs_client::{ClientError, KbsClient};
use crate::sim::{SimConfig, SimKbs};
use kbs_proxy::config::Settings;
use kbs_proxy::dataplane::proxy::Proxy;
use kbs_proxy::dataplane::server;

/// The resource every demo session fetches (preset on each simulated replica).
pub const DEMO_RESOURCE: &str = "default/key/demo";

/// A running demo: replicas and proxy.
#[derive(Debug)]
pub struct Demo {
    /// The simulated replicas.
    pub replicas: Vec<SimKbs>,
    /// Where the proxy listens.
    pub proxy_addr: SocketAddr,
    /// Cancel to stop the proxy.
    pub shutdown: CancellationToken,
    /// The proxy's serving task.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts two replicas on ephemeral loopback ports and the proxy on `listener`, configured with
/// `settings` (its backends are the replicas; any given are refused by the caller).
pub async fn start(settings: Settings, listener: TcpListener) -> anyhow::Result<Demo> {
    let mut replicas = Vec::new();
    for name in ["kbs-a", "kbs-b"] {
        replicas.push(SimKbs::start_local(SimConfig::new(name)).await?);
    }
    let backends = replicas.iter().map(|r| format!("{}={}", r.name(), r.url())).collect();
    let settings = Settings {
        backend: Some(backends),
        ..settings
    };
    let config = settings.validate()?;
    let proxy = Proxy::new(&config)?;
    let proxy_addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server::serve(
        proxy.worker(),
        listener,
        server::ServeOptions::from_config(&config, None),
        shutdown.clone(),
    ));
    Ok(Demo {
        replicas,
        proxy_addr,
        shutdown,
        task,
    })
}

/// What one session saw.
#[derive(Debug)]
pub struct SessionReport {
    /// Replica per step: auth, attest, resource.
    pub replicas: [Option<String>; 3],
    /// The outcome.
    pub result: Result<(), ClientError>,
}

/// Runs `n` independent sessions (each its own cookie jar): auth → attest → get resource.
pub async fn run_sessions(proxy_url: &str, n: usize) -> Vec<SessionReport> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut client = KbsClient::new(proxy_url);
        let result = async {
            client.auth().await?;
            client.attest().await?;
            client.fetch_resource(DEMO_RESOURCE).await.map(drop)
        }
        .await;
        let mut replicas = [None, None, None];
        for (slot, ex) in replicas.iter_mut().zip(&client.log) {
            *slot = ex.replica.clone();
        }
        out.push(SessionReport { replicas, result });
    }
    out
}

/// The table printed by the demo.
pub fn render(reports: &[SessionReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<9} {:<8} {:<8} {:<9} result",
        "session", "auth", "attest", "resource"
    );
    for (i, r) in reports.iter().enumerate() {
        let name = |k: usize| r.replicas[k].clone().unwrap_or_else(|| "-".into());
        let result = match &r.result {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("FAILED: {e}"),
        };
        let _ = writeln!(s, "{:<9} {:<8} {:<8} {:<9} {result}", i + 1, name(0), name(1), name(2));
    }
    s
}
