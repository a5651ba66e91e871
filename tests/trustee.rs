//! Trustee-aware behaviour: admin writes reach every replica (and replicas that missed some are
//! caught up before they take sessions); affinity for clients without the route cookie.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use kbs_proxy::config::Settings;
use kbs_proxy_harness::kbs_client::KbsClient;
use kbs_proxy_harness::sim::{SimConfig, SimKbs};
use support::*;
use tokio::net::TcpListener;

async fn admin(proxy: &TestProxy, method: Method, path: &str, body: &'static str) -> (StatusCode, serde_json::Value) {
    let req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", proxy.url()))
        .header("authorization", "Bearer admin-token")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let (parts, body) = send(req).await;
    (
        parts.status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

async fn backends_json(proxy: &TestProxy) -> Vec<serde_json::Value> {
    let (_, body) = admin_get(proxy, "/backends").await;
    serde_json::from_slice::<serde_json::Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn an_admin_write_reaches_every_replica() {
    let (sims, proxy) = two_replicas().await;
    let (status, _) = admin(&proxy, Method::POST, "/kbs/v0/resource/default/key/new", "v1").await;
    assert_eq!(status, StatusCode::OK);
    for s in &sims {
        assert_eq!(
            s.resource("default/key/new").as_deref(),
            Some(&b"v1"[..]),
            "{}",
            s.name()
        );
    }
    let (status, _) = admin(&proxy, Method::DELETE, "/kbs/v0/resource/default/key/new", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(sims.iter().all(|s| s.resource("default/key/new").is_none()));
    for path in [
        "/kbs/v0/resource-policy",
        "/kbs/v0/attestation-policy",
        "/kbs/v0/reference-value",
    ] {
        let (status, _) = admin(&proxy, Method::POST, path, r#"{"policy":"cGFja2FnZSBwb2xpY3k="}"#).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    for s in &sims {
        assert_eq!(
            s.counters().admin_writes.load(std::sync::atomic::Ordering::Relaxed),
            5,
            "{}",
            s.name()
        );
    }
    // Reads go to one replica.
    let (status, _) = admin(&proxy, Method::GET, "/kbs/v0/resource-policy", "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn the_admin_authorization_travels_and_a_refusal_by_all_is_passed_on() {
    let mut sims = Vec::new();
    for i in 0..2 {
        let config = SimConfig {
            admin_token: Some("admin-token".into()),
            ..SimConfig::new(format!("kbs-{i}"))
        };
        sims.push(SimKbs::start_local(config).await.unwrap());
    }
    let proxy = start_proxy(settings(backends_of(&sims))).await;
    let (status, _) = admin(&proxy, Method::POST, "/kbs/v0/resource/a/b/c", "x").await;
    assert_eq!(status, StatusCode::OK, "the admin bearer token reaches every replica");
    let req = Request::post(format!("{}/kbs/v0/resource/a/b/c", proxy.url()))
        .body(Full::from("y"))
        .unwrap();
    let (parts, body) = send(req).await;
    assert_eq!(parts.status, StatusCode::UNAUTHORIZED);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(v["type"].as_str().unwrap().ends_with("/AdminAuth"), "{v}");
    assert!(sims.iter().all(|s| s.resource("a/b/c").as_deref() == Some(&b"x"[..])));
    assert_eq!(
        proxy.proxy.journal().len(),
        1,
        "a write nobody accepted is not journaled"
    );
}

#[tokio::test]
async fn a_replica_that_was_down_reports_partial_failure_and_is_caught_up_before_new_sessions() {
    let sims = start_sims(2).await;
    let addr1 = sims[1].addr();
    let proxy = start_proxy(health_by_hand(settings(backends_of(&sims)))).await;
    sims[1].stop();

    let (status, body) = admin(&proxy, Method::POST, "/kbs/v0/resource/default/key/rotated", "v2").await;
    assert_eq!(
        status,
        StatusCode::BAD_GATEWAY,
        "no partial success reported as success: {body}"
    );
    assert!(
        body["type"].as_str().unwrap().ends_with("/AdminWriteIncomplete"),
        "{body}"
    );
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("applied on 1 of 2")
            && detail.contains("kbs-0: accepted")
            && detail.contains("kbs-1: unreachable"),
        "{detail}"
    );
    assert_eq!(sims[0].resource("default/key/rotated").as_deref(), Some(&b"v2"[..]));

    // The replica comes back, empty, on the same address.
    let back = SimKbs::start(TcpListener::bind(addr1).await.unwrap(), SimConfig::new("kbs-1")).unwrap();
    let b = backends_json(&proxy).await;
    assert_eq!(
        (b[1]["admin_writes_behind"].as_u64(), b[1]["in_sync"].as_bool()),
        (Some(1), Some(false)),
        "{b:?}"
    );
    for _ in 0..4 {
        let mut c = KbsClient::new(proxy.url());
        c.auth().await.unwrap();
        assert_eq!(
            c.replicas()[0].as_deref(),
            Some("kbs-0"),
            "a replica behind takes no new session"
        );
    }
    // A second write while it is behind is not sent to it (order), and says so.
    let (status, body) = admin(&proxy, Method::POST, "/kbs/v0/resource/default/key/second", "v3").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("catching up"), "{body}");

    proxy.control.check_health().await;
    assert_eq!(back.resource("default/key/rotated").as_deref(), Some(&b"v2"[..]));
    assert_eq!(back.resource("default/key/second").as_deref(), Some(&b"v3"[..]));
    let b = backends_json(&proxy).await;
    assert_eq!(b[1]["in_sync"], true, "{b:?}");
    let m = send(
        Request::get(format!("{}/metrics", proxy.admin_url()))
            .body(Full::default())
            .unwrap(),
    )
    .await
    .1;
    assert!(String::from_utf8_lossy(&m).contains("kbs_proxy_backend_admin_writes_behind{backend=\"kbs-1\"} 0"));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let mut c = KbsClient::new(proxy.url());
        c.auth().await.unwrap();
        seen.insert(c.replicas()[0].clone().unwrap());
    }
    assert_eq!(seen.len(), 2, "caught up: it takes sessions again");
}

#[tokio::test]
async fn a_replica_added_later_receives_the_journal() {
    let sims = start_sims(1).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    let write_config = |backends: &[String]| {
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        std::fs::write(
            &file,
            format!("backend = [{}]\ncookie-secret = \"{SECRET}\"\n", list.join(",")),
        )
        .unwrap();
    };
    write_config(&backends_of(&sims));
    let path = file.clone();
    let source = move || Settings::from_file(&path)?.validate();
    let proxy = start_proxy_with(settings(backends_of(&sims)), |c| c.with_reload(Box::new(source), None)).await;
    admin(&proxy, Method::POST, "/kbs/v0/resource/a/b/one", "1").await;
    admin(&proxy, Method::POST, "/kbs/v0/reference-value", r#"{"name":"rv1"}"#).await;

    let late = SimKbs::start_local(SimConfig::new("kbs-late")).await.unwrap();
    let mut all = backends_of(&sims);
    all.push(format!("kbs-late={}", late.url()));
    write_config(&all);
    proxy.control.reload().unwrap();
    proxy.control.catch_up().await;
    assert_eq!(late.resource("a/b/one").as_deref(), Some(&b"1"[..]));
    assert_eq!(
        late.counters().admin_writes.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[tokio::test]
async fn the_journal_survives_a_proxy_restart() {
    let sims = start_sims(2).await;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let with_journal = |backends: Vec<String>| Settings {
        admin_journal: Some(journal.clone()),
        ..settings(backends)
    };
    {
        let proxy = start_proxy(with_journal(backends_of(&sims))).await;
        let (status, _) = admin(&proxy, Method::POST, "/kbs/v0/resource/a/b/kept", "persisted").await;
        assert_eq!(status, StatusCode::OK);
    }
    let third = SimKbs::start_local(SimConfig::new("kbs-2")).await.unwrap();
    let mut backends = backends_of(&sims);
    backends.push(format!("kbs-2={}", third.url()));
    let proxy = start_proxy(with_journal(backends)).await;
    assert_eq!(proxy.proxy.journal().len(), 1);
    proxy.control.catch_up().await;
    assert_eq!(third.resource("a/b/kept").as_deref(), Some(&b"persisted"[..]));
    for s in &sims {
        assert_eq!(
            s.counters().admin_writes.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "no replay for replicas in sync"
        );
    }
}

#[tokio::test]
async fn passthrough_mode_and_the_admin_body_limit() {
    let sims = start_sims(2).await;
    let proxy = start_proxy(Settings {
        admin_writes: Some("passthrough".into()),
        ..settings(backends_of(&sims))
    })
    .await;
    admin(&proxy, Method::POST, "/kbs/v0/resource/a/b/c", "x").await;
    let holders = sims.iter().filter(|s| s.resource("a/b/c").is_some()).count();
    assert_eq!(holders, 1, "passthrough: one replica");

    let proxy = start_proxy(Settings {
        admin_body_limit: Some(16),
        ..settings(backends_of(&sims))
    })
    .await;
    let (status, body) = admin(
        &proxy,
        Method::POST,
        "/kbs/v0/resource/a/b/big",
        "more than sixteen bytes",
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(body["type"].as_str().unwrap().ends_with("/PayloadTooLarge"));
}

#[tokio::test]
async fn bearer_requests_follow_the_issuing_replica_unless_tokens_are_portable() {
    let (sims, proxy) = two_replicas().await;
    for _ in 0..4 {
        let mut c = KbsClient::new(proxy.url()).with_token_auth();
        c.handshake().await.unwrap();
        let issuer = c.replicas()[1].clone();
        // Only the token is left: no route cookie, no session cookie.
        c.forget_cookie("route");
        c.forget_cookie("kbs-session-id");
        for _ in 0..3 {
            c.fetch_resource("default/key/demo").await.unwrap();
            c.forget_cookie("route");
        }
        assert!(c.replicas()[2..].iter().all(|r| r == &issuer), "{:?}", c.log);
    }
    drop(sims);

    // Replicas that share a token signer: bearer requests are balanced over both.
    let mut shared = Vec::new();
    for i in 0..2 {
        let config = SimConfig {
            token_key: Some(b"one signer for every replica".to_vec()),
            ..SimConfig::new(format!("kbs-{i}"))
        };
        shared.push(SimKbs::start_local(config).await.unwrap());
    }
    let proxy = start_proxy(Settings {
        tokens_portable: Some(true),
        ..settings(backends_of(&shared))
    })
    .await;
    let mut c = KbsClient::new(proxy.url()).with_token_auth();
    c.handshake().await.unwrap();
    c.forget_cookie("route");
    c.forget_cookie("kbs-session-id");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        c.fetch_resource("default/key/demo").await.unwrap();
        c.forget_cookie("route");
        seen.insert(c.log.last().unwrap().replica.clone());
    }
    assert_eq!(seen.len(), 2, "portable tokens are balanced");
}

#[tokio::test]
async fn the_learned_table_stays_within_its_bound() {
    let sims = start_sims(2).await;
    let proxy = start_proxy(Settings {
        session_table_size: Some(128),
        ..settings(backends_of(&sims))
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for _ in 0..600 {
        assert!(tokio::time::Instant::now() < deadline, "bounded in time");
        let mut c = KbsClient::new(proxy.url());
        c.auth().await.unwrap();
    }
    let (sessions, _) = proxy.proxy.learned_entries();
    assert!(
        sessions <= proxy.proxy.learned_capacity(),
        "{sessions} > {}",
        proxy.proxy.learned_capacity()
    );
    assert!(sessions >= 64, "it does learn: {sessions}");
}
