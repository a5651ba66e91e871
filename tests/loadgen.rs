//! The load generator end to end: simulated replicas behind the proxy, bounded loads.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kbs_proxy::dataplane::proxy::ProxyBody;
use kbs_proxy_harness::loadgen::{self, LoadOptions, Phase};
use support::*;

/// A bounded load against `url`: 4 clients, 40 sessions, and a time limit as a backstop.
fn bounded(url: String) -> LoadOptions {
    LoadOptions {
        concurrency: 4,
        sessions: Some(40),
        duration: Some(Duration::from_secs(30)),
        request_timeout: Duration::from_secs(5),
        ..LoadOptions::new(url)
    }
}

#[tokio::test]
async fn through_the_proxy_every_session_succeeds_on_one_replica() {
    let (sims, proxy) = two_replicas().await;
    let mut ticks = 0;
    let report = loadgen::run(bounded(proxy.url()), |_| ticks += 1).await;

    assert_eq!(report.sessions_ok, 40, "{}", report.render_table());
    assert_eq!(report.sessions_failed, 0, "{:?}", report.errors);
    assert!(report.errors.is_empty());
    assert_eq!(report.affinity_violations, 0);
    assert_eq!(report.sessions_unattributed, 0);
    assert_eq!(report.requests, 120);
    // Both replicas got sessions, and their own counters agree with the report.
    assert_eq!(report.sessions_by_replica.len(), 2, "{:?}", report.sessions_by_replica);
    for sim in &sims {
        let served = sim.counters().resource.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(Some(&served), report.sessions_by_replica.get(sim.name()));
    }
    for phase in Phase::ALL {
        let l = report.latency[&phase];
        assert_eq!(l.count, 40, "{phase:?}");
        assert!(l.p50_us <= l.p99_us && l.p99_us <= l.max_us, "{phase:?}: {l:?}");
    }
    let json = report.to_json();
    assert_eq!(json["sessions_ok"], 40);
    assert_eq!(json["affinity_violations"], 0);
    assert_eq!(json["steps"][3]["step"], "session");
    assert!(json["steps"][3]["latency"]["p99_us"].as_u64().unwrap() > 0);
    let _ = ticks; // progress may or may not have ticked in so short a run
}

#[tokio::test]
async fn new_connections_per_session_work_too() {
    let (_sims, proxy) = two_replicas().await;
    let opts = LoadOptions {
        new_connection_per_session: true,
        sessions: Some(12),
        ..bounded(proxy.url())
    };
    let report = loadgen::run(opts, |_| {}).await;
    assert_eq!((report.sessions_ok, report.sessions_failed), (12, 0));
    assert_eq!(report.affinity_violations, 0);
}

/// A plain round-robin reverse proxy, no affinity of any kind: each request to the next
/// backend in turn. What a load balancer without sticky sessions does.
async fn round_robin_without_affinity(backends: Vec<SocketAddr>) -> SocketAddr {
    let next = Arc::new(AtomicUsize::new(0));
    let client = Client::builder(TokioExecutor::new()).build_http::<Incoming>();
    start_backend(move |req: Request<Incoming>| {
        let target = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
        let client = client.clone();
        async move {
            let (mut parts, body) = req.into_parts();
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            parts.uri = format!("http://{target}{path}").parse().unwrap();
            let resp = client.request(Request::from_parts(parts, body)).await.unwrap();
            let (parts, body) = resp.into_parts();
            Response::from_parts(parts, ProxyBody::Stream(body, None))
        }
    })
    .await
}

#[tokio::test]
async fn behind_a_plain_round_robin_balancer_the_check_fails() {
    let sims = start_sims(2).await;
    let balancer = round_robin_without_affinity(sims.iter().map(|s| s.addr()).collect()).await;
    let report = loadgen::run(bounded(format!("http://{balancer}")), |_| {}).await;

    // About every other attest lands on the replica that never saw the session, which
    // answers the KBS's own 401; the affinity check sees two replicas in those sessions.
    assert!(report.sessions_failed > 0, "{}", report.render_table());
    assert!(report.affinity_violations > 0, "{}", report.render_table());
    assert_eq!(report.sessions_ok + report.sessions_failed, 40);
    let attest_failures = report.errors.get("attest: AttestationError (401)");
    assert!(attest_failures.is_some_and(|&n| n > 0), "{:?}", report.errors);
    assert!(report.render_table().contains("attest: AttestationError (401)"));
    for sim in &sims {
        sim.stop();
    }
}

#[tokio::test]
async fn every_session_that_mixed_replicas_failed_and_no_other() {
    // A client that never sends the route cookie back: whether the proxy still keeps its
    // sessions together (by the KBS session id) or not, the replicas' verdicts and the
    // affinity check must agree: with simulated replicas a mixed session always fails.
    let (_sims, proxy) = two_replicas().await;
    let opts = LoadOptions {
        drop_route_cookie: true,
        ..bounded(proxy.url())
    };
    let report = loadgen::run(opts, |_| {}).await;
    assert_eq!(report.sessions_ok + report.sessions_failed, 40);
    assert_eq!(
        report.affinity_violations,
        report.sessions_failed,
        "{}",
        report.render_table()
    );
}

#[tokio::test]
async fn a_duration_bound_stops_the_run() {
    let (_sims, proxy) = two_replicas().await;
    let opts = LoadOptions {
        concurrency: 2,
        sessions: None,
        duration: Some(Duration::from_millis(300)),
        request_timeout: Duration::from_secs(5),
        ..LoadOptions::new(proxy.url())
    };
    let report = loadgen::run(opts, |_| {}).await;
    assert!(report.sessions_ok > 0);
    assert_eq!(report.sessions_failed, 0, "{:?}", report.errors);
    // Sessions under way at the deadline finish; none starts after it.
    assert!(report.elapsed < Duration::from_secs(10), "{:?}", report.elapsed);
}

/// Runs `kbs-affinity-proxy loadgen ARGS` (bounded by its session count, and a minute).
async fn loadgen_binary(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_kbs-affinity-proxy"))
        .arg("loadgen")
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn the_binary_writes_the_json_and_svg_reports_it_is_asked_for() {
    let (_sims, proxy) = two_replicas().await;
    let url = proxy.url();
    let dir = tempfile::tempdir().unwrap();
    let (json, svg) = (dir.path().join("report.json"), dir.path().join("report.svg"));
    let args = ["--url", &url, "--concurrency", "2", "--sessions", "10", "--report-json"];
    let mut args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
    args.extend([json.as_os_str(), "--report-svg".as_ref(), svg.as_os_str()]);
    let out = loadgen_binary(&args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("sessions: 10 ok, 0 failed"),
        "the table still goes to stdout: {stdout}"
    );

    let doc: loadgen::schema::ReportDoc = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc.run.target, url);
    assert_eq!((doc.sessions_ok, doc.run.flags.sessions), (10, Some(10)));
    assert_eq!(doc.steps.len(), Phase::ALL.len());
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
    assert_eq!(svg.matches("stroke-width=\"2\"").count(), Phase::ALL.len(), "{svg}");

    // A file that cannot be written fails the run and names the file.
    let args = [
        "--url",
        &url,
        "--sessions",
        "1",
        "--report-svg",
        "/nonexistent/dir/r.svg",
    ];
    let out = loadgen_binary(&args.map(|a| a.as_ref())).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dir/r.svg"));
}
