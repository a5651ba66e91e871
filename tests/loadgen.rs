//! The load generator end to end: simulated replicas behind the proxy, bounded loads.

mod support;

use std::time::Duration;

use kbs_affinity_proxy::loadgen::{self, LoadOptions, Phase};
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
    assert!(json["latency"]["session"]["p99_us"].as_u64().unwrap() > 0);
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

#[tokio::test]
async fn without_the_route_cookie_the_check_fails_as_with_a_plain_balancer() {
    let (_sims, proxy) = two_replicas().await;
    let opts = LoadOptions {
        drop_route_cookie: true,
        ..bounded(proxy.url())
    };
    let report = loadgen::run(opts, |_| {}).await;

    // Round-robin without affinity sends about every other attest to the replica that never
    // saw the session; it answers the KBS's own 401.
    assert!(report.sessions_failed > 0, "{}", report.render_table());
    assert!(report.affinity_violations > 0, "{}", report.render_table());
    assert_eq!(report.sessions_ok + report.sessions_failed, 40);
    let attest_failures = report
        .errors
        .get("attest: AttestationError (401)")
        .copied()
        .unwrap_or(0);
    assert!(attest_failures > 0, "{:?}", report.errors);
    assert!(report.render_table().contains("attest: AttestationError (401)"));
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
