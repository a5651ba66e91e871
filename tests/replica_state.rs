//! Replica state that holds: a Trustee replica that restarts empty is found and caught up before
//! it takes a new session; the reconciliation covers a KBS without `/metrics`; replays carry the
//! proxy's own credential and a refused one is reported, never counted; several proxies
//! converge through one journal owner. Every control-plane round runs by hand here, so each
//! test says exactly when the proxy looks.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use kbs_proxy::config::Settings;
use kbs_proxy_harness::kbs_client::KbsClient;
use kbs_proxy_harness::sim::{admin_jwt, SimConfig, SimKbs};
use support::*;

/// The admin JWT key the simulated replicas trust in the credential tests.
const ADMIN_KEY: &[u8] = b"admin-key-0123456789abcdef012345";

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

async fn write(
    url: &str,
    method: Method,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut req = Request::builder().method(method).uri(format!("{url}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let (parts, body) = send(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()).await;
    (parts.status, parts.headers, body)
}

async fn backend(proxy: &TestProxy, name: &str) -> serde_json::Value {
    let list: serde_json::Value = serde_json::from_slice(&admin_get(proxy, "/backends").await.1).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no backend {name} in {list}"))
}

async fn metrics(proxy: &TestProxy) -> String {
    String::from_utf8_lossy(&admin_get(proxy, "/metrics").await.1).into_owned()
}

/// Health checks by hand (TCP), the admin port on.
fn by_hand(backends: Vec<String>) -> Settings {
    health_by_hand(settings(backends))
}

async fn sims_with(n: usize, config: impl Fn(SimConfig) -> SimConfig) -> Vec<SimKbs> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            SimKbs::start_local(config(SimConfig::new(format!("kbs-{i}"))))
                .await
                .unwrap(),
        );
    }
    out
}

/// Everything a replica holds that an admin write can change.
#[derive(Debug, PartialEq)]
struct State {
    resources: Vec<(String, Bytes)>,
    resource_policy: Option<Bytes>,
    attestation_policy: Option<Bytes>,
    reference_value: Option<Bytes>,
}

fn state(sim: &SimKbs) -> State {
    State {
        resources: sim.resources(),
        resource_policy: sim.resource_policy(),
        attestation_policy: sim.attestation_policy("default"),
        reference_value: sim.reference_value("rv1"),
    }
}

/// Sets a resource, the resource policy, the default attestation policy and a reference value.
async fn write_all_kinds(url: &str, token: Option<&str>) {
    for (path, body) in [
        ("/kbs/v0/resource/default/key/rotated", "secret-v2"),
        ("/kbs/v0/resource-policy", r#"{"policy":"c3RyaWN0"}"#),
        (
            "/kbs/v0/attestation-policy",
            r#"{"type":"rego","policy_id":"default","policy":"cG9saWN5"}"#,
        ),
        ("/kbs/v0/reference-value", r#"{"name":"rv1","value":"abc"}"#),
    ] {
        let (status, _, body) = write(url, Method::POST, path, body, token).await;
        assert_eq!(status, StatusCode::OK, "{path}: {}", String::from_utf8_lossy(&body));
    }
}

#[tokio::test]
async fn a_replica_restarted_empty_between_health_checks_is_caught_up_before_a_new_session() {
    let sims = sims_with(2, |c| c).await;
    let proxy = start_proxy_by_hand(by_hand(backends_of(&sims))).await;
    write_all_kinds(&proxy.url(), None).await;
    let before = state(&sims[1]);
    assert!(
        before.resource_policy.is_some() && before.attestation_policy.is_some() && before.reference_value.is_some(),
        "{before:?}"
    );
    // A client pinned to kbs-1 before the restart.
    let mut pinned = KbsClient::new(proxy.url());
    loop {
        pinned.reset_session();
        pinned.handshake().await.unwrap();
        if pinned.replicas().last().cloned().flatten().as_deref() == Some("kbs-1") {
            break;
        }
    }
    proxy.control.watch_replicas().await; // the watch's connections and counters

    // kbs-1 restarts empty on the same address, between two health checks: never seen down.
    let restarted = sims[1].restart_empty().await.unwrap();
    assert_ne!(state(&restarted), before, "the restart lost the admin state");
    assert!(restarted.resources().iter().all(|(p, _)| p != "default/key/rotated"));

    // One watch round finds it (kept-alive connection closed, counters back at 0) and replays
    // the whole compacted journal before anything else can pick it for a new session.
    proxy.control.watch_replicas().await;
    assert_eq!(
        state(&restarted),
        before,
        "caught up: resources, both policies, reference values"
    );
    let b = backend(&proxy, "kbs-1").await;
    assert_eq!(b["state_resets"], 1, "{b}");
    assert_eq!(b["in_sync"], true, "{b}");
    let reason = b["last_state_reset"].as_str().unwrap();
    assert!(
        reason.contains("connection") || reason.contains("went back"),
        "{reason}"
    );
    assert!(metrics(&proxy)
        .await
        .contains("kbs_proxy_backend_state_resets_total{backend=\"kbs-1\"} 1"));

    // The session pinned to kbs-1 died with its memory: the client gets the KBS 401, redoes
    // its handshake and gets the resource.
    let got = pinned.get_resource("default/key/rotated").await.unwrap();
    assert_eq!(got, "secret-v2");
    let steps = pinned.replicas();
    assert!(steps.len() >= 4, "a 401, then auth, attest, GET: {steps:?}");
}

#[tokio::test]
async fn a_replica_that_cannot_be_replayed_to_takes_no_new_sessions_until_it_can() {
    // The replicas trust admin JWTs signed with ADMIN_KEY, checking `exp` like Trustee. The
    // proxy's replay credential starts valid; the test makes it expire, then rotates it.
    let sims = sims_with(2, |c| SimConfig {
        admin_jwt_key: Some(ADMIN_KEY.to_vec()),
        ..c
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("replay-token");
    std::fs::write(&token_file, admin_jwt(ADMIN_KEY, unix_now() + 10 * 3600)).unwrap();
    let proxy = start_proxy_by_hand(Settings {
        admin_replay_token_file: Some(token_file.clone()),
        ..by_hand(backends_of(&sims))
    })
    .await;
    // The client's own token lives two hours, as Trustee's tests make admin tokens.
    let client_token = admin_jwt(ADMIN_KEY, unix_now() + 2 * 3600);
    write_all_kinds(&proxy.url(), Some(&client_token)).await;
    let before = state(&sims[1]);
    proxy.control.watch_replicas().await;

    // Three hours later kbs-1 restarts empty: the client's token has expired, the proxy's has not.
    let later = |c: SimConfig| SimConfig {
        clock_offset: Duration::from_secs(3 * 3600),
        ..c
    };
    let cfg = later(SimConfig {
        admin_jwt_key: Some(ADMIN_KEY.to_vec()),
        ..SimConfig::new("kbs-1")
    });
    let kbs1 = sims[1].restart_empty_with(cfg.clone()).await.unwrap();
    proxy.control.watch_replicas().await;
    assert_eq!(state(&kbs1), before, "replayed with the proxy's own credential");
    let b = backend(&proxy, "kbs-1").await;
    assert_eq!(b["in_sync"], true, "{b}");

    // Now the proxy's credential has expired too (the file says so), and kbs-1 restarts again.
    std::fs::write(&token_file, admin_jwt(ADMIN_KEY, unix_now() + 60)).unwrap();
    let kbs1 = kbs1.restart_empty_with(cfg.clone()).await.unwrap();
    proxy.control.watch_replicas().await;
    assert!(kbs1.resources().iter().all(|(p, _)| p != "default/key/rotated"));
    let b = backend(&proxy, "kbs-1").await;
    assert_eq!(b["in_sync"], false, "a refused replay is not applied: {b}");
    assert!(b["admin_writes_behind"].as_u64().unwrap() > 0, "{b}");
    assert!(b["replay_error"].as_str().unwrap().contains("401"), "{b}");
    assert!(b["replays"]["unauthorized"].as_u64().unwrap() >= 1, "{b}");
    assert!(metrics(&proxy)
        .await
        .contains("kbs_proxy_backend_admin_replays_total{backend=\"kbs-1\",outcome=\"unauthorized\"}"));
    let (_, ready) = admin_get(&proxy, "/readyz").await;
    assert!(String::from_utf8_lossy(&ready).contains("kbs-1"), "readyz names it");
    // It takes no new session while kbs-0 is in sync.
    for _ in 0..6 {
        let mut c = KbsClient::new(proxy.url());
        c.handshake().await.unwrap();
        assert_eq!(c.replicas().last().cloned().flatten().as_deref(), Some("kbs-0"));
    }
    // Retried each round: still refused, still behind.
    proxy.control.catch_up().await;
    assert_eq!(backend(&proxy, "kbs-1").await["in_sync"], false);

    // The token rotates (a projected service-account token would): read again, applied.
    std::fs::write(&token_file, admin_jwt(ADMIN_KEY, unix_now() + 10 * 3600)).unwrap();
    proxy.control.catch_up().await;
    assert_eq!(state(&kbs1), before);
    let b = backend(&proxy, "kbs-1").await;
    assert_eq!(
        (b["in_sync"].as_bool(), b["replay_error"].is_null()),
        (Some(true), true),
        "{b}"
    );

    // The journal never held the client's token.
    assert!(proxy
        .proxy
        .journal()
        .entries()
        .iter()
        .all(|w| w.headers.iter().all(|(n, _)| n != http::header::AUTHORIZATION)));
}

#[tokio::test]
async fn without_metrics_the_reconciliation_restores_a_replica_no_signal_showed() {
    // Trustee v0.11: no /metrics. The restart is hidden from every signal here (the watch does
    // not look between the restart and the reconciliation).
    let sims = sims_with(2, |c| SimConfig { metrics: false, ..c }).await;
    let proxy = start_proxy_by_hand(by_hand(backends_of(&sims))).await;
    write_all_kinds(&proxy.url(), None).await;
    let before = state(&sims[1]);
    proxy.control.watch_replicas().await;
    assert_eq!(backend(&proxy, "kbs-1").await["has_metrics"], false);

    let restarted = sims[1].restart_empty().await.unwrap();
    assert_ne!(state(&restarted), before);
    let sent = proxy.control.reconcile().await;
    assert_eq!(sent, 4 * 2, "the whole compacted journal to each replica");
    assert_eq!(state(&restarted), before);
    assert_eq!(state(&sims[0]), before, "a replica that kept its state is unchanged");
}

#[tokio::test]
async fn deletes_replay_harmlessly_and_a_refusing_replica_does_not_block_the_other() {
    let sims = sims_with(2, |c| c).await;
    let proxy = start_proxy_by_hand(by_hand(backends_of(&sims))).await;
    let url = proxy.url();
    let path = "/kbs/v0/resource/default/key/gone";
    assert_eq!(write(&url, Method::POST, path, "v", None).await.0, StatusCode::OK);
    assert_eq!(write(&url, Method::DELETE, path, "", None).await.0, StatusCode::OK);
    assert_eq!(
        write(&url, Method::POST, "/kbs/v0/resource/default/key/kept", "k", None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(proxy.proxy.journal().len(), 2, "the delete superseded the set");
    // The delete replayed to replicas that do not have the resource, twice: applied both times.
    assert_eq!(proxy.control.reconcile().await, 4);
    assert_eq!(proxy.control.reconcile().await, 4);
    for name in ["kbs-0", "kbs-1"] {
        let b = backend(&proxy, name).await;
        assert_eq!(
            (b["in_sync"].as_bool(), b["replays"]["applied"].as_u64()),
            (Some(true), Some(4)),
            "{b}"
        );
    }

    // Both restart empty; kbs-1 now demands an admin token the proxy does not have.
    proxy.control.watch_replicas().await;
    let kbs0 = sims[0].restart_empty().await.unwrap();
    let kbs1 = sims[1]
        .restart_empty_with(SimConfig {
            admin_token: Some("a-token-the-proxy-lacks".into()),
            ..SimConfig::new("kbs-1")
        })
        .await
        .unwrap();
    proxy.control.watch_replicas().await;
    assert_eq!(kbs0.resource("default/key/kept").as_deref(), Some(&b"k"[..]));
    assert!(kbs0.resource("default/key/gone").is_none());
    let b0 = backend(&proxy, "kbs-0").await;
    assert_eq!(b0["in_sync"], true, "not blocked by kbs-1: {b0}");
    let b1 = backend(&proxy, "kbs-1").await;
    assert_eq!(b1["in_sync"], false, "{b1}");
    assert!(b1["replay_error"].as_str().unwrap().contains("401"), "{b1}");
    assert!(kbs1.resource("default/key/kept").is_none());
}

#[tokio::test]
async fn two_proxies_converge_through_the_journal_owner() {
    let sims = sims_with(2, |c| c).await;
    let dir = tempfile::tempdir().unwrap();
    let owner_settings = Settings {
        admin_journal: Some(dir.path().join("journal")),
        ..by_hand(backends_of(&sims))
    };
    let owner = start_proxy_by_hand(owner_settings.clone()).await;
    let follower = start_proxy_by_hand(Settings {
        journal_owner: Some(owner.admin_url()),
        ..by_hand(backends_of(&sims))
    })
    .await;
    let path = "/kbs/v0/resource/default/key/contended";
    // A hundred rounds of two writes to the same resource at once, one through each proxy.
    for round in 0..100 {
        let (owner_url, follower_url) = (owner.url(), follower.url());
        let (a_body, b_body) = (format!("owner-{round}"), format!("follower-{round}"));
        let a = write(&owner_url, Method::POST, path, &a_body, None);
        let b = write(&follower_url, Method::POST, path, &b_body, None);
        let (a, b) = tokio::join!(a, b);
        assert_eq!((a.0, b.0), (StatusCode::OK, StatusCode::OK), "round {round}");
        assert_eq!(b.1["kbs-affinity-proxy-journal"], "disk", "acknowledged once on disk");
    }
    let last = |p: &TestProxy| {
        p.proxy
            .journal()
            .entries()
            .iter()
            .rev()
            .find(|w| w.path == path)
            .map(|w| w.body.clone())
            .unwrap()
    };
    let journaled = last(&owner);
    assert!(journaled.starts_with(b"owner-99") || journaled.starts_with(b"follower-99"));
    assert!(follower.proxy.journal().is_empty(), "only the owner keeps a journal");
    let key = "default/key/contended";
    for s in &sims {
        assert_eq!(s.resource(key), Some(journaled.clone()), "{}", s.name());
    }

    // kbs-0 restarts empty; the follower sees it first and asks the owner to resync it.
    owner.control.watch_replicas().await;
    follower.control.watch_replicas().await;
    let kbs0 = sims[0].restart_empty().await.unwrap();
    follower.control.watch_replicas().await;
    assert_eq!(
        kbs0.resource(key),
        Some(journaled.clone()),
        "caught up by the owner on request"
    );
    follower.control.watch_replicas().await;
    assert_eq!(backend(&follower, "kbs-0").await["in_sync"], true);

    // The owner restarts (same journal, same admin address); a write through the follower
    // reaches it and every replica.
    let admin_addr = owner.admin.unwrap();
    owner.shutdown.cancel();
    drop(owner);
    let owner = start_proxy_opts(
        owner_settings,
        |c| c,
        StartOptions {
            by_hand: true,
            admin_addr: Some(admin_addr),
            ..StartOptions::default()
        },
    )
    .await;
    assert_eq!(last(&owner), journaled, "the journal survived");
    let (status, _, _) = write(&follower.url(), Method::POST, path, "after-restart", None).await;
    assert_eq!(status, StatusCode::OK);
    owner.control.reconcile().await;
    for s in [&kbs0, &sims[1]] {
        assert_eq!(s.resource(key).as_deref(), Some(&b"after-restart"[..]), "{}", s.name());
    }
}

#[tokio::test]
async fn a_follower_refuses_admin_writes_it_cannot_journal() {
    let sims = sims_with(2, |c| c).await;
    let gone = dead_addr().await;
    let follower = start_proxy_by_hand(Settings {
        journal_owner: Some(format!("http://{gone}")),
        ..by_hand(backends_of(&sims))
    })
    .await;
    let (status, headers, body) = write(&follower.url(), Method::POST, "/kbs/v0/resource/a/b/c", "x", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.get("kbs-affinity-proxy-journal").is_none());
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["type"],
        "https://github.com/confidential-containers/kbs/errors/JournalOwnerUnavailable"
    );
    assert!(v["detail"].as_str().unwrap().contains("not applied"), "{v}");
    for s in &sims {
        assert!(s.resource("a/b/c").is_none());
        assert_eq!(s.counters().admin_writes.load(Ordering::Relaxed), 0);
    }
    // A forwarded write reaching a proxy that forwards too is refused, not sent around.
    let (parts, _) = send(
        Request::post(format!("{}/kbs/v0/resource/a/b/c", follower.admin_url()))
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, StatusCode::LOOP_DETECTED);
}

#[tokio::test]
async fn the_watch_speaks_http2_to_replicas_that_do_and_can_be_turned_off() {
    // backend-protocol = http2: the simulated KBS answers h2 with prior knowledge.
    let sims = sims_with(2, |c| c).await;
    let proxy = start_proxy_by_hand(Settings {
        backend_protocol: Some("http2".into()),
        ..by_hand(backends_of(&sims))
    })
    .await;
    write_all_kinds(&proxy.url(), None).await;
    let before = state(&sims[0]);
    proxy.control.watch_replicas().await;
    assert_eq!(
        backend(&proxy, "kbs-0").await["has_metrics"],
        true,
        "scraped over HTTP/2"
    );
    let restarted = sims[0].restart_empty().await.unwrap();
    proxy.control.watch_replicas().await;
    assert_eq!(state(&restarted), before);
    assert_eq!(backend(&proxy, "kbs-0").await["state_resets"], 1);

    // replica-watch = off: no scrape, no sign seen; the reconciliation is what is left.
    let sims = sims_with(2, |c| c).await;
    let proxy = start_proxy_by_hand(Settings {
        replica_watch: Some("off".into()),
        ..by_hand(backends_of(&sims))
    })
    .await;
    write_all_kinds(&proxy.url(), None).await;
    let before = state(&sims[1]);
    proxy.control.watch_replicas().await;
    let restarted = sims[1].restart_empty().await.unwrap();
    proxy.control.watch_replicas().await;
    let b = backend(&proxy, "kbs-1").await;
    assert_eq!(
        (b["state_resets"].as_u64(), b["has_metrics"].is_null()),
        (Some(0), true),
        "{b}"
    );
    assert_ne!(state(&restarted), before);
    proxy.control.reconcile().await;
    assert_eq!(state(&restarted), before);
}

#[tokio::test]
async fn a_name_that_comes_back_with_a_new_address_gets_the_whole_journal_first() {
    let sims = sims_with(2, |c| c).await;
    // A new pod for kbs-1 elsewhere, empty; a reload will point kbs-1 at it.
    let replacement = SimKbs::start_local(SimConfig::new("kbs-1")).await.unwrap();
    let backends = std::sync::Arc::new(std::sync::Mutex::new(backends_of(&sims)));
    let source = {
        let backends = std::sync::Arc::clone(&backends);
        move || by_hand(backends.lock().unwrap().clone()).validate()
    };
    let proxy = start_proxy_opts(
        by_hand(backends_of(&sims)),
        |c| c.with_reload(Box::new(source), None),
        StartOptions {
            by_hand: true,
            ..StartOptions::default()
        },
    )
    .await;
    write_all_kinds(&proxy.url(), None).await;
    let before = state(&sims[1]);

    *backends.lock().unwrap() = vec![
        format!("kbs-0={}", sims[0].url()),
        format!("kbs-1={}", replacement.url()),
    ];
    proxy.control.reload().unwrap();
    // From the reload on, the new kbs-1 takes no new session: it has none of the journal.
    let b = proxy
        .proxy
        .routing()
        .backends
        .by_name("kbs-1")
        .map(|b| (b.journal_lag(), b.accepts_new_sessions()))
        .unwrap();
    assert_eq!(b, (4, false), "behind by the whole journal");
    for _ in 0..4 {
        let mut c = KbsClient::new(proxy.url());
        c.handshake().await.unwrap();
        assert_eq!(c.replicas().last().cloned().flatten().as_deref(), Some("kbs-0"));
    }
    proxy.control.watch_replicas().await;
    assert_eq!(state(&replacement), before, "caught up");
    let b = backend(&proxy, "kbs-1").await;
    assert_eq!(b["in_sync"], true, "{b}");
    assert!(b["last_state_reset"].as_str().unwrap().contains("new address"), "{b}");
}
