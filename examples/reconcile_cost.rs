//! What keeping replicas in sync costs: two simulated replicas behind a proxy, a journal of
//! `N` admin writes (default 1,000), then
//! - one reconciliation pass (the whole compacted journal to every replica): writes sent, time;
//! - a replica restarted empty: the time from the restart to the end of the watch round that
//!   found it and replayed the journal, with and without `/metrics`.
//!
//! `cargo run --release --example reconcile_cost [-- N]`. Everything runs on loopback.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kbs_proxy::config::Settings;
use kbs_proxy::control::ControlPlane;
use kbs_proxy::dataplane::proxy::Proxy;
use kbs_proxy::dataplane::server;
use kbs_proxy_harness::sim::{SimConfig, SimKbs};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(1000);
    for metrics in [true, false] {
        run(n, metrics).await?;
    }
    Ok(())
}

async fn run(n: usize, metrics: bool) -> anyhow::Result<()> {
    let mut sims = Vec::new();
    for i in 0..2 {
        sims.push(
            SimKbs::start_local(SimConfig {
                metrics,
                ..SimConfig::new(format!("kbs-{i}"))
            })
            .await?,
        );
    }
    let settings = Settings {
        backend: Some(sims.iter().map(|s| format!("{}={}", s.name(), s.url())).collect()),
        cookie_secret: Some("reconcile-cost-secret-0123456789abcdef".into()),
        listen: Some("127.0.0.1:0".into()),
        access_log: Some("off".into()),
        health_check: Some("tcp".into()),
        health_check_interval: Some("3600s".into()),
        ..Settings::default()
    };
    let config = settings.validate()?;
    let proxy = Proxy::new(&config)?;
    let control = Arc::new(ControlPlane::new(proxy.clone(), config.clone(), None));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    tokio::spawn(server::serve(
        proxy.worker(),
        listener,
        server::ServeOptions::from_config(&config, None),
        shutdown.clone(),
    ));

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for i in 0..n {
        let req = http::Request::post(format!("{url}/kbs/v0/resource/default/key/k{i}"))
            .body(Full::new(Bytes::from(format!("value-{i}"))))?;
        let status = client.request(req).await?.status();
        anyhow::ensure!(status.is_success(), "write {i}: {status}");
    }
    control.watch_replicas().await;

    let started = Instant::now();
    let sent = control.reconcile().await;
    let pass = started.elapsed();
    println!(
        "metrics={metrics} journal={} reconciliation: {sent} writes in {:.1} ms ({:.0} µs per write)",
        proxy.journal().len(),
        pass.as_secs_f64() * 1e3,
        pass.as_secs_f64() * 1e6 / sent.max(1) as f64
    );

    let started = Instant::now();
    let restarted = sims[1].restart_empty().await?;
    control.watch_replicas().await;
    let found = started.elapsed();
    let restored = restarted.resources().len();
    println!(
        "metrics={metrics} restart to caught up in one watch round: {:.1} ms ({restored} resources back)",
        found.as_secs_f64() * 1e3
    );
    shutdown.cancel();
    for s in &sims {
        s.stop();
    }
    restarted.stop();
    Ok(())
}
