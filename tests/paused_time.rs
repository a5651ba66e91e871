//! The fast path's timeouts on tokio's paused clock: the fast path runs on the test's own
//! runtime ([`FastLoop::Tokio`]), so a minute-long timeout passes without a minute of waiting,
//! and the time it took is exact.

mod support;

use std::time::Duration;

use kbs_proxy::config::Settings;
use kbs_proxy::dataplane::server::FastLoop;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

async fn start_on_tokio(settings: Settings) -> TestProxy {
    let opts = StartOptions {
        fast_loop: FastLoop::Tokio,
        ..StartOptions::default()
    };
    start_proxy_opts(settings, |c| c, opts).await
}

/// Sends `request` on a new connection and reads until the proxy closes it.
async fn exchange(proxy: &TestProxy, request: &[u8]) -> (Vec<u8>, Duration) {
    let mut conn = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    conn.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    (answer, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_backend_silent_past_the_response_timeout_gets_504_at_that_time() {
    let addr = start_silent_backend().await;
    let proxy = start_on_tokio(Settings {
        health_check: Some("off".into()),
        backend_response_timeout: Some("60s".into()),
        ..settings(vec![format!("http://{addr}")])
    })
    .await;
    let (answer, took) = exchange(
        &proxy,
        b"GET /kbs/v0/resource/a/b/c HTTP/1.1\r\nHost: kbs\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("GatewayTimeout"), "the KBS error shape: {answer}");
    assert!(
        (Duration::from_secs(60)..Duration::from_secs(61)).contains(&took),
        "answered when the response timeout ran out, not before or much after: {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_client_is_closed_when_its_idle_timeout_runs_out() {
    let sims = start_sims(1).await;
    let proxy = start_on_tokio(Settings {
        health_check: Some("off".into()),
        client_idle_timeout: Some("90s".into()),
        ..settings(backends_of(&sims))
    })
    .await;
    // One request answered on the fast path, then nothing: the connection stays open for the
    // idle timeout, counted from the answer, and is then closed.
    let (answer, took) = exchange(&proxy, b"GET /healthz HTTP/1.1\r\nHost: kbs\r\n\r\n").await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        (Duration::from_secs(90)..Duration::from_secs(92)).contains(&took),
        "closed when the idle timeout ran out: {took:?}"
    );
}
