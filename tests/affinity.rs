//! Session affinity end to end: simulated KBS replicas behind the proxy, clients with cookie jars.

mod support;

use bytes::Bytes;
use http::header::{COOKIE, SET_COOKIE};
use http::{Request, StatusCode};
use http_body_util::Full;
use kbs_proxy::routing::route_cookie::{BackendId, CookieSecret, RouteCookieCodec};
use kbs_proxy_harness::demo;
use kbs_proxy_harness::kbs_client::{ClientError, KbsClient};
use kbs_proxy_harness::sim::{SimKbs, REPLICA_HEADER};
use support::*;

const RESOURCE: &str = "default/key/demo";

/// Which replicas saw which steps of the client's session.
fn steps_by_replica(sims: &[SimKbs], client: &KbsClient) -> Vec<(String, Vec<&'static str>)> {
    let id = client.session_id().expect("session cookie");
    sims.iter()
        .map(|s| (s.name().to_owned(), s.session_steps(id)))
        .filter(|(_, steps)| !steps.is_empty())
        .collect()
}

#[tokio::test]
async fn eight_sessions_each_stay_on_one_replica_and_both_replicas_serve() {
    let (sims, proxy) = two_replicas().await;
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let mut c = KbsClient::new(proxy.url());
        c.auth().await.unwrap();
        c.attest().await.unwrap();
        assert_eq!(&c.fetch_resource(RESOURCE).await.unwrap()[..], b"demo-secret-value");
        // The replicas' own records: one replica saw the whole session.
        let seen = steps_by_replica(&sims, &c);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].1, ["auth", "attest", "resource"]);
        // And every response came from that replica.
        let replicas = c.replicas();
        assert!(
            replicas.iter().all(|r| r.as_deref() == Some(seen[0].0.as_str())),
            "{replicas:?}"
        );
        served.insert(seen[0].0.clone());
    }
    assert_eq!(served.len(), 2, "both replicas serve sessions: {served:?}");
}

#[tokio::test]
async fn the_real_client_flow_get_resource_first_then_handshake() {
    let (sims, proxy) = two_replicas().await;
    for _ in 0..4 {
        let mut c = KbsClient::new(proxy.url());
        assert_eq!(&c.get_resource(RESOURCE).await.unwrap()[..], b"demo-secret-value");
        let steps: Vec<_> = c.log.iter().map(|e| (e.step, e.status.as_u16())).collect();
        assert_eq!(
            steps,
            [("resource", 401), ("auth", 200), ("attest", 200), ("resource", 200)]
        );
        assert_eq!(steps_by_replica(&sims, &c).len(), 1);
    }
}

#[tokio::test]
async fn through_a_plain_round_robin_balancer_sessions_fail() {
    // The real failure the proxy exists for: without affinity the attest lands on the other
    // replica, which does not know the session.
    let sims = start_sims(2).await;
    let plain = start_round_robin(sims.iter().map(|s| s.addr()).collect()).await;
    for _ in 0..4 {
        let mut c = KbsClient::new(format!("http://{plain}"));
        c.auth().await.unwrap();
        match c.attest().await {
            Err(ClientError::Kbs {
                status,
                error_type,
                detail,
            }) => {
                assert_eq!(status, StatusCode::UNAUTHORIZED);
                assert_eq!(error_type, "AttestationError");
                assert_eq!(detail, "Attestation error: RCAR handshake Attest failed");
            }
            other => panic!("round robin sends every attest to the other replica: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_client_that_drops_the_route_cookie_stays_pinned_by_its_kbs_session_id() {
    let (sims, proxy) = two_replicas().await;
    for _ in 0..6 {
        let mut c = KbsClient::new(proxy.url());
        c.auth().await.unwrap();
        c.forget_cookie("route");
        c.attest().await.unwrap();
        c.forget_cookie("route");
        c.fetch_resource(RESOURCE).await.unwrap();
        assert_eq!(steps_by_replica(&sims, &c).len(), 1, "{:?}", c.log);
    }
}

/// Sends `POST /kbs/v0/auth` with the given Cookie header; returns (replica, Set-Cookie route value).
async fn auth_with(proxy: &TestProxy, cookie: Option<&str>) -> (String, Option<String>) {
    let mut req = Request::post(format!("{}/kbs/v0/auth", proxy.url()));
    if let Some(c) = cookie {
        req = req.header(COOKIE, c);
    }
    let body = Full::new(Bytes::from_static(
        br#"{"version":"0.4.0","tee":"sample","extra-params":{}}"#,
    ));
    let (parts, _) = send(req.body(body).unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    let replica = parts.headers[REPLICA_HEADER].to_str().unwrap().to_owned();
    let route = parts
        .headers
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with("route="));
    (replica, route)
}

fn route_value(set_cookie: &str) -> &str {
    set_cookie.strip_prefix("route=").unwrap().split(';').next().unwrap()
}

#[tokio::test]
async fn the_cookie_is_issued_once_with_its_attributes_and_then_followed() {
    let (_sims, proxy) = two_replicas().await;
    let (first, set) = auth_with(&proxy, None).await;
    let set = set.expect("a route cookie on the first auth");
    let attrs: Vec<&str> = set.split("; ").skip(1).collect();
    assert_eq!(attrs, ["Path=/", "Max-Age=172800", "HttpOnly"]);
    let cookie = format!("route={}", route_value(&set));
    for _ in 0..4 {
        let (replica, again) = auth_with(&proxy, Some(&cookie)).await;
        assert_eq!(replica, first, "a repeated auth follows the cookie");
        assert_eq!(again, None, "nothing changed, so no new cookie");
    }
}

#[tokio::test]
async fn forged_tampered_truncated_expired_and_foreign_cookies_count_as_absent() {
    let (sims, proxy) = two_replicas().await;
    let codec = RouteCookieCodec::new(&CookieSecret::new(SECRET.as_bytes().to_vec()).unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let id = BackendId::from_name(sims[0].name());
    let valid = String::from_utf8(codec.mint(id, now).to_vec()).unwrap();
    let mut tampered = valid.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    let expired = String::from_utf8(codec.mint(id, now - 172_800 - 5).to_vec()).unwrap();
    let other = RouteCookieCodec::new(&CookieSecret::new(vec![42; 32]).unwrap());
    let foreign = String::from_utf8(other.mint(id, now).to_vec()).unwrap();
    let bad_values = [
        "forged-by-hand".to_owned(),
        String::from_utf8(tampered).unwrap(),
        valid[..30].to_owned(),
        expired,
        foreign,
        String::new(),
    ];
    for bad in &bad_values {
        let mut replicas = std::collections::BTreeSet::new();
        for _ in 0..4 {
            let (replica, set) = auth_with(&proxy, Some(&format!("route={bad}"))).await;
            let set = set.expect("a bad cookie is replaced with a good one");
            assert!(codec.verify(route_value(&set).as_bytes(), now, 172_800).is_ok());
            replicas.insert(replica);
        }
        assert_eq!(replicas.len(), 2, "{bad:?}: treated as absent, so balanced");
    }
    // The valid one pins, even next to junk cookies of the same name.
    for _ in 0..4 {
        let (replica, set) = auth_with(&proxy, Some(&format!("route=junk; route={valid}"))).await;
        assert_eq!((replica.as_str(), set), (sims[0].name(), None));
    }
}

#[tokio::test]
async fn two_proxies_sharing_a_secret_route_a_cookie_identically() {
    let sims = start_sims(3).await;
    let p1 = start_proxy(settings(backends_of(&sims))).await;
    // The second proxy lists the backends in another order: ids come from names, not positions.
    let mut reversed = backends_of(&sims);
    reversed.reverse();
    let p2 = start_proxy(settings(reversed)).await;
    for i in 0..6 {
        let (start, then) = if i % 2 == 0 { (&p1, &p2) } else { (&p2, &p1) };
        let mut c = KbsClient::new(start.url());
        c.auth().await.unwrap();
        // Same jar, other proxy: attest and resource land where the first proxy pinned.
        c.retarget(then.url());
        c.attest().await.unwrap();
        c.fetch_resource(RESOURCE).await.unwrap();
        let r = c.replicas();
        assert!(r.iter().all(|x| x.is_some() && x == &r[0]), "{r:?}");
        assert_eq!(steps_by_replica(&sims, &c).len(), 1);
    }
}

#[tokio::test]
async fn pinned_replica_lost_mid_session_gives_kbs_401_and_the_client_recovers() {
    let (sims, proxy) = two_replicas().await;
    let mut c = KbsClient::new(proxy.url());
    c.auth().await.unwrap();
    c.attest().await.unwrap();
    let pinned = c.replicas()[0].clone().unwrap();
    let (lost, other) = if sims[0].name() == pinned {
        (&sims[0], &sims[1])
    } else {
        (&sims[1], &sims[0])
    };
    lost.stop();

    // The resource call is not sent to the other replica: a KBS-shaped 401 comes back.
    match c.fetch_resource(RESOURCE).await {
        Err(ClientError::Kbs { status, error_type, .. }) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(error_type, "TokenNotFound");
        }
        other => panic!("expected a KBS 401, got {other:?}"),
    }
    assert_eq!(
        other
            .counters()
            .unknown_session
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // The real client's reaction to that 401: a new handshake (re-pinned) and the GET again.
    c.log.clear();
    assert_eq!(&c.get_resource(RESOURCE).await.unwrap()[..], b"demo-secret-value");
    assert_eq!(c.log[0].replica, None, "the 401 is the proxy's own");
    assert!(
        c.replicas()[1..].iter().all(|r| r.as_deref() == Some(other.name())),
        "{:?}",
        c.log
    );
    assert_eq!(
        other.session_steps(c.session_id().unwrap()),
        ["auth", "attest", "resource"]
    );
}

#[tokio::test]
async fn pinned_replica_lost_between_auth_and_attest_gives_the_attest_401() {
    let (sims, proxy) = two_replicas().await;
    let mut c = KbsClient::new(proxy.url());
    c.auth().await.unwrap();
    let pinned = c.replicas()[0].clone().unwrap();
    sims.iter().find(|s| s.name() == pinned).unwrap().stop();
    match c.attest().await {
        Err(ClientError::Kbs {
            status,
            error_type,
            detail,
        }) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(error_type, "AttestationError");
            assert!(
                detail.starts_with("Attestation error: RCAR handshake Attest failed"),
                "{detail}"
            );
        }
        other => panic!("expected a KBS 401, got {other:?}"),
    }
    // The next handshake re-pins to the replica that is left.
    c.handshake().await.unwrap();
    c.fetch_resource(RESOURCE).await.unwrap();
}

#[tokio::test]
async fn auth_is_re_sent_when_a_replica_refuses_connections() {
    let sims = start_sims(1).await;
    let dead = dead_addr().await;
    let mut backends = vec![format!("dead=http://{dead}")];
    backends.extend(backends_of(&sims));
    let proxy = start_proxy(settings(backends)).await;
    for _ in 0..4 {
        let mut c = KbsClient::new(proxy.url());
        c.get_resource(RESOURCE).await.unwrap();
        assert!(
            c.replicas().iter().all(|r| r.as_deref() == Some("kbs-0")),
            "{:?}",
            c.log
        );
    }
}

#[tokio::test]
async fn http2_and_http1_clients_both_keep_their_sessions() {
    let (sims, proxy) = two_replicas().await;
    for h2 in [true, false, true, false] {
        let mut c = if h2 {
            KbsClient::http2(proxy.url())
        } else {
            KbsClient::new(proxy.url())
        };
        c.get_resource(RESOURCE).await.unwrap();
        assert_eq!(steps_by_replica(&sims, &c).len(), 1);
    }
}

#[tokio::test]
async fn token_authenticated_resource_calls_follow_the_cookie_too() {
    let (sims, proxy) = two_replicas().await;
    let mut c = KbsClient::new(proxy.url()).with_token_auth();
    c.handshake().await.unwrap();
    for _ in 0..3 {
        c.fetch_resource(RESOURCE).await.unwrap();
    }
    let r = c.replicas();
    assert!(r.iter().all(|x| x == &r[0]), "{r:?}");
    let _ = sims;
}

#[tokio::test]
async fn non_kbs_paths_are_balanced() {
    let (_sims, proxy) = two_replicas().await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (parts, body) = send(
            Request::get(format!("{}/healthz", proxy.url()))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(parts.status, StatusCode::OK);
        assert!(body.is_empty());
        seen.insert(parts.headers[REPLICA_HEADER].to_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2);
}

#[tokio::test]
async fn the_demo_prints_one_replica_per_session() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let settings = kbs_proxy::config::Settings::default();
    let d = demo::start(settings, listener).await.unwrap();
    let reports = demo::run_sessions(&format!("http://{}", d.proxy_addr), 4).await;
    let table = demo::render(&reports);
    assert!(reports.iter().all(|r| r.result.is_ok()), "{table}");
    for r in &reports {
        assert!(r.replicas.iter().all(|x| x.is_some() && x == &r.replicas[0]), "{table}");
    }
    assert!(table.contains("kbs-a") && table.contains("kbs-b"), "{table}");
    d.shutdown.cancel();
}
