//! The binary as an operator runs it: several workers on one port, real signals.

mod support;

use std::process::Stdio;
use std::time::Duration;

use kbs_affinity_proxy::kbs_client::KbsClient;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_sessions_on_every_worker_and_stops_on_sigterm() {
    let sims = start_sims(2).await;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kbs-affinity-proxy"));
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "2", "--log-format", "json"])
        .env("KBS_AFFINITY_PROXY_COOKIE_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for b in backends_of(&sims) {
        cmd.arg("--backend").arg(b);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();

    // The start-up line says where it listens: no port guessing, no sleeping.
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
            if v["message"] == "kbs-affinity-proxy serving" {
                return v["listen"].as_str().unwrap().to_owned();
            }
        }
        panic!("the proxy exited before serving");
    })
    .await
    .unwrap();
    let log = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push(line);
        }
        all
    });

    // Many short connections so both SO_REUSEPORT workers get some; each session stays put.
    for _ in 0..16 {
        let mut c = KbsClient::new(format!("http://{addr}"));
        c.get_resource("default/key/demo").await.unwrap();
        let r = c.replicas();
        assert!(r[1..].iter().all(|x| x.is_some() && x == &r[1]), "{r:?}");
    }

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "a clean exit on SIGTERM");
    let log = log.await.unwrap();
    assert!(log.iter().any(|l| l.contains("shutting down")), "{log:?}");
    // No cookie value or token ever reaches the log.
    assert!(
        !log.iter().any(|l| l.contains(SECRET) || l.contains("kbs-session-id=")),
        "{log:?}"
    );
}
