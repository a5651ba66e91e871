//! Starts simulated KBS replicas on loopback and prints the proxy flags that front them.
//!
//! ```text
//! cargo run --example sim_cluster -- 3
//! cargo run --release -- --listen 127.0.0.1:8080 <the printed --backend flags>
//! ```

use kbs_proxy_harness::sim::{SimConfig, SimKbs};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let mut flags = Vec::new();
    let mut replicas = Vec::new();
    for i in 0..n {
        let sim = SimKbs::start_local(SimConfig::new(format!("kbs-{i}"))).await?;
        flags.push(format!("--backend {}={}", sim.name(), sim.url()));
        replicas.push(sim);
    }
    println!("{n} simulated KBS replicas running; front them with:");
    println!("  kbs-affinity-proxy --listen 127.0.0.1:8080 {}", flags.join(" "));
    println!("Ctrl-C stops them.");
    tokio::signal::ctrl_c().await?;
    for r in &replicas {
        r.stop();
    }
    Ok(())
}
