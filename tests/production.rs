//! Running it in production: TLS both ways, health with hysteresis, draining and discovery,
//! the admin port and its metrics, reloads, graceful shutdown.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kbs_proxy::config::Settings;
use kbs_proxy::dataplane::proxy::ProxyBody;
use kbs_proxy::dataplane::server;
use kbs_proxy_harness::kbs_client::{ClientError, KbsClient};
use kbs_proxy_harness::sim::{SimConfig, SimKbs};
use rustls::pki_types::ServerName;
use support::pki::Pki;
use support::*;
use tokio::net::TcpListener;

const RESOURCE: &str = "default/key/demo";

/// GET `path` over TLS with `config`; returns the negotiated ALPN, status, headers and body.
async fn tls_get(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
) -> (Option<Vec<u8>>, http::response::Parts, Bytes) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let req = Request::get(format!("https://localhost{path}"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = if alpn.as_deref() == Some(b"h2") {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let mut req = req;
        req.headers_mut().insert("host", "localhost".parse().unwrap());
        send.send_request(req).await.unwrap()
    };
    let (parts, body) = resp.into_parts();
    (alpn, parts, body.collect().await.unwrap().to_bytes())
}

async fn cert_serial(config: Arc<rustls::ClientConfig>, addr: SocketAddr) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn tls_termination_speaks_h2_and_http1_by_alpn_and_marks_the_cookie_secure() {
    let pki = Pki::new();
    let files = pki.issue("proxy", &["localhost"]);
    let sims = start_sims(2).await;
    let proxy = start_proxy(Settings {
        tls_cert: Some(files.cert.clone()),
        tls_key: Some(files.key.clone()),
        ..settings(backends_of(&sims))
    })
    .await;
    for (offer, want) in [
        (&[&b"h2"[..], b"http/1.1"][..], &b"h2"[..]),
        (&[&b"http/1.1"[..]][..], b"http/1.1"),
    ] {
        let (alpn, parts, _) = tls_get(proxy.addr, pki.client_config(offer), "/healthz").await;
        assert_eq!(alpn.as_deref(), Some(want));
        assert_eq!(parts.status, StatusCode::OK);
        let cookie = parts.headers["set-cookie"].to_str().unwrap();
        assert!(cookie.ends_with("; HttpOnly; Secure"), "{cookie}");
    }
}

/// Opens a TLS connection to `addr`, makes one HTTP/1.1 request on it (so the client reads
/// the tickets that follow the handshake) and says how its handshake went.
async fn handshake_kind(config: Arc<rustls::ClientConfig>, addr: SocketAddr) -> rustls::HandshakeKind {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    assert!(!conn.is_early_data_accepted(), "no 0-RTT");
    let kind = conn.handshake_kind().unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/healthz")
        .header("host", "localhost")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), StatusCode::OK);
    kind
}

#[tokio::test]
async fn a_tls_session_resumes_on_another_worker_without_early_data() {
    let pki = Pki::new();
    let files = pki.issue("proxy", &["localhost"]);
    let sims = start_sims(1).await;
    let config = Settings {
        tls_cert: Some(files.cert.clone()),
        tls_key: Some(files.key.clone()),
        ..settings(backends_of(&sims))
    }
    .validate()
    .unwrap();
    // Two workers, as run_workers starts them: one proxy, one TLS configuration, two listeners.
    let proxy = kbs_proxy::dataplane::proxy::Proxy::new(&config).unwrap();
    let (_, tls) = kbs_proxy::control::tls_settings(&config).unwrap().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let options = server::ServeOptions::from_config(&config, Some(Arc::clone(&tls)));
        tokio::spawn(server::serve(proxy.worker(), listener, options, shutdown.clone()));
    }
    let mut client = (*pki.client_config(&[b"http/1.1"])).clone();
    // The client would send early data if the server allowed it.
    client.enable_early_data = true;
    let client = Arc::new(client);

    // A full handshake and a request on the first worker: the client reads its tickets.
    let (_, parts, _) = tls_get(addrs[0], Arc::clone(&client), "/healthz").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(
        handshake_kind(Arc::clone(&client), addrs[1]).await,
        rustls::HandshakeKind::Resumed,
        "the ticket from worker 0 resumes on worker 1"
    );
    // A reload builds a new server configuration; tickets issued before it still resume.
    let (_, reloaded) = kbs_proxy::control::tls_settings(&config).unwrap().unwrap();
    tls.store(reloaded.load_full());
    assert_eq!(
        handshake_kind(Arc::clone(&client), addrs[0]).await,
        rustls::HandshakeKind::Resumed,
        "stateless tickets outlive a reload"
    );
    // Without a ticket (a client that keeps none) it is a full handshake, as before.
    let mut fresh = (*client).clone();
    fresh.resumption = rustls::client::Resumption::disabled();
    assert_eq!(
        handshake_kind(Arc::new(fresh), addrs[1]).await,
        rustls::HandshakeKind::Full
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_certificate_swapped_on_disk_is_served_to_new_connections() {
    let pki = Pki::new();
    let files = pki.issue("proxy", &["localhost"]);
    let sims = start_sims(1).await;
    let proxy = start_proxy(Settings {
        tls_cert: Some(files.cert.clone()),
        tls_key: Some(files.key.clone()),
        ..settings(backends_of(&sims))
    })
    .await;
    let client = pki.client_config(&[b"http/1.1"]);
    let before = cert_serial(client.clone(), proxy.addr).await;
    // A long-lived connection opened before the swap keeps working after it.
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut old_conn, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);

    let renewed = pki.issue("renewed", &["localhost"]);
    std::fs::copy(&renewed.cert, &files.cert).unwrap();
    std::fs::copy(&renewed.key, &files.key).unwrap();
    support::pki::touch_later(&[&files.cert, &files.key], 5);
    proxy.control.housekeeping();
    let after = cert_serial(client, proxy.addr).await;
    assert_ne!(before, after, "new connections get the new certificate");
    let req = Request::get("/healthz")
        .header("host", "localhost")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(old_conn.send_request(req).await.unwrap().status(), StatusCode::OK);
}

/// An HTTPS echo backend: reports the SNI it got and whether the client showed a certificate.
async fn start_tls_backend(config: Arc<rustls::ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
                let client_cert = tls.get_ref().1.peer_certificates().is_some();
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let mut r = Response::new(Full::new(Bytes::from_static(b"tls ok")));
                    r.headers_mut().insert("x-sni", sni.parse().unwrap());
                    r.headers_mut()
                        .insert("x-client-cert", if client_cert { "yes" } else { "no" }.parse().unwrap());
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_backends_with_a_private_ca_sni_and_client_certificates() {
    let pki = Pki::new();
    let server = pki.issue("kbs", &["localhost"]);
    let client = pki.issue("proxy-client", &["kbs-affinity-proxy"]);

    // Server name from the URL's host, verified against the private CA.
    let plain = start_tls_backend(pki.server_config(&server, false)).await;
    let proxy = start_proxy(Settings {
        backend_ca: Some(pki.ca_path.clone()),
        ..settings(vec![format!("kbs=https://localhost:{}", plain.port())])
    })
    .await;
    let (parts, body) = send(
        Request::get(format!("{}/x", proxy.url()))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!((parts.status, &body[..]), (StatusCode::OK, &b"tls ok"[..]));
    assert_eq!(parts.headers["x-sni"], "localhost");
    assert_eq!(parts.headers["x-client-cert"], "no");

    // mTLS: the backend requires a client certificate; the proxy presents one.
    let mtls = start_tls_backend(pki.server_config(&server, true)).await;
    let proxy = start_proxy(Settings {
        backend_ca: Some(pki.ca_path.clone()),
        backend_client_cert: Some(client.cert.clone()),
        backend_client_key: Some(client.key.clone()),
        ..settings(vec![format!("kbs=https://localhost:{}", mtls.port())])
    })
    .await;
    let (parts, _) = send(
        Request::get(format!("{}/x", proxy.url()))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["x-client-cert"], "yes");

    // Without trusting the CA, the handshake fails: 502 in the KBS shape on KBS paths.
    let proxy = start_proxy(settings(vec![format!("kbs=https://localhost:{}", plain.port())])).await;
    let (parts, body) = send(
        Request::get(format!("{}/kbs/v0/resource/a/b/c", proxy.url()))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert!(String::from_utf8_lossy(&body).contains("/errors/BadGateway"));
}

#[tokio::test]
async fn backend_tls_name_verifies_a_certificate_naming_neither_the_address_nor_the_host() {
    let pki = Pki::new();
    // The replica's certificate names only the KBS's service name, which the proxy never
    // connects to: it connects to 127.0.0.1, or to localhost.
    let server = pki.issue("kbs", &["kbs.trustee.example"]);
    let addr = start_tls_backend(pki.server_config(&server, false)).await;
    let by_ip = format!("https://127.0.0.1:{}", addr.port());
    let by_host = format!("https://localhost:{}", addr.port());
    let get = |proxy: TestProxy| async move {
        let resp = send(
            Request::get(format!("{}/kbs/v0/resource/a/b/c", proxy.url()))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        (resp, proxy)
    };

    // Without the name: the handshake fails, and the client gets the KBS-shaped 502.
    for url in [&by_ip, &by_host] {
        let ((parts, body), _proxy) = get(start_proxy(Settings {
            backend_ca: Some(pki.ca_path.clone()),
            ..settings(vec![url.clone()])
        })
        .await)
        .await;
        assert_eq!(parts.status, StatusCode::BAD_GATEWAY, "{url}");
        assert!(String::from_utf8_lossy(&body).contains("/errors/BadGateway"));
    }

    // With it, for every backend (and checked the same way by the health checks).
    for url in [&by_ip, &by_host] {
        let ((parts, body), proxy) = get(start_proxy(Settings {
            backend_ca: Some(pki.ca_path.clone()),
            backend_tls_name: Some("kbs.trustee.example".into()),
            ..manual_health("http").merge(settings(vec![url.clone()]))
        })
        .await)
        .await;
        assert_eq!((parts.status, &body[..]), (StatusCode::OK, &b"tls ok"[..]), "{url}");
        assert_eq!(parts.headers["x-sni"], "kbs.trustee.example");
        // Two checks would mark it down (fall 2) if they verified another name.
        proxy.control.check_health().await;
        proxy.control.check_health().await;
        let backends = backends_json(&proxy).await;
        assert_eq!(backends[0]["healthy"], true, "{backends}");
    }

    // Or per backend, in its spec; it wins over the setting.
    let ((parts, _), _proxy) = get(start_proxy(Settings {
        backend_ca: Some(pki.ca_path.clone()),
        backend_tls_name: Some("wrong.example".into()),
        ..settings(vec![format!("kbs={by_ip};tls-name=kbs.trustee.example")])
    })
    .await)
    .await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["x-sni"], "kbs.trustee.example");
}

fn manual_health(mode: &str) -> Settings {
    Settings {
        health_check: Some(mode.into()),
        // Checks run once at start; the test drives the rest by hand.
        health_check_interval: Some("3600s".into()),
        health_fall: Some(2),
        health_rise: Some(2),
        admin_listen: Some("127.0.0.1:0".into()),
        ..Settings::default()
    }
}

async fn backends_json(proxy: &TestProxy) -> serde_json::Value {
    let (_, body) = admin_get(proxy, "/backends").await;
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn a_backend_going_down_and_up_follows_the_hysteresis() {
    for mode in ["tcp", "http"] {
        let sims = start_sims(2).await;
        let addr = sims[0].addr();
        let proxy = start_proxy(Settings {
            ..manual_health(mode).merge(settings(backends_of(&sims)))
        })
        .await;
        let up = |v: &serde_json::Value| v[0]["healthy"].as_bool().unwrap();

        sims[0].stop();
        proxy.control.check_health().await;
        assert!(
            up(&backends_json(&proxy).await),
            "{mode}: one failure is not enough (fall 2)"
        );
        proxy.control.check_health().await;
        assert!(!up(&backends_json(&proxy).await), "{mode}: two failures mark it down");
        // New sessions avoid it.
        for _ in 0..4 {
            let mut c = KbsClient::new(proxy.url());
            c.get_resource(RESOURCE).await.unwrap();
            assert!(
                c.replicas()[1..].iter().all(|r| r.as_deref() == Some("kbs-1")),
                "{:?}",
                c.log
            );
        }

        // The replica comes back on the same address.
        let _back = SimKbs::start(TcpListener::bind(addr).await.unwrap(), SimConfig::new("kbs-0")).unwrap();
        proxy.control.check_health().await;
        assert!(
            !up(&backends_json(&proxy).await),
            "{mode}: one success is not enough (rise 2)"
        );
        proxy.control.check_health().await;
        assert!(up(&backends_json(&proxy).await), "{mode}: two successes mark it up");
        let m = metrics(&proxy).await;
        assert_eq!(
            sample(
                &m,
                "kbs_proxy_backend_health_transitions_total{backend=\"kbs-0\",to=\"down\"}"
            ),
            1.0,
            "{m}"
        );
        assert_eq!(
            sample(
                &m,
                "kbs_proxy_backend_health_transitions_total{backend=\"kbs-0\",to=\"up\"}"
            ),
            1.0,
            "{m}"
        );
    }
}

#[tokio::test]
async fn readyz_follows_the_backends_and_healthz_the_process() {
    let sims = start_sims(1).await;
    let proxy = start_proxy(manual_health("tcp").merge(settings(backends_of(&sims)))).await;
    let status = |p: &'static str| {
        let url = format!("{}{p}", proxy.admin_url());
        async move { send(Request::get(url).body(Full::default()).unwrap()).await.0.status }
    };
    assert_eq!(status("/readyz").await, StatusCode::OK);
    sims[0].stop();
    proxy.control.check_health().await;
    proxy.control.check_health().await;
    assert_eq!(status("/readyz").await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(status("/healthz").await, StatusCode::OK);
}

async fn admin_post(proxy: &TestProxy, path: &str) -> StatusCode {
    send(
        Request::post(format!("{}{path}", proxy.admin_url()))
            .body(Full::default())
            .unwrap(),
    )
    .await
    .0
    .status
}

#[tokio::test]
async fn a_drained_backend_keeps_its_sessions_but_gets_no_new_ones() {
    let sims = start_sims(2).await;
    let proxy = start_proxy(manual_health("tcp").merge(settings(backends_of(&sims)))).await;
    // A session pinned to kbs-0 (round robin starts there).
    let mut pinned = KbsClient::new(proxy.url());
    pinned.auth().await.unwrap();
    assert_eq!(pinned.replicas()[0].as_deref(), Some("kbs-0"));

    assert_eq!(admin_post(&proxy, "/backends/kbs-0/drain").await, StatusCode::OK);
    assert_eq!(backends_json(&proxy).await[0]["draining"], true);
    pinned.attest().await.unwrap();
    pinned.fetch_resource(RESOURCE).await.unwrap();
    assert!(
        pinned.replicas().iter().all(|r| r.as_deref() == Some("kbs-0")),
        "{:?}",
        pinned.log
    );
    for _ in 0..4 {
        let mut c = KbsClient::new(proxy.url());
        c.handshake().await.unwrap();
        assert!(
            c.replicas().iter().all(|r| r.as_deref() == Some("kbs-1")),
            "{:?}",
            c.log
        );
    }

    assert_eq!(admin_post(&proxy, "/backends/kbs-0/undrain").await, StatusCode::OK);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let mut c = KbsClient::new(proxy.url());
        c.auth().await.unwrap();
        seen.insert(c.replicas()[0].clone());
    }
    assert_eq!(seen.len(), 2);
    assert_eq!(admin_post(&proxy, "/backends/nope/drain").await, StatusCode::NOT_FOUND);
    assert_eq!(
        admin_post(&proxy, "/backends/kbs-0/reboot").await,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn admin_writes_from_other_than_loopback_need_the_token() {
    // The admin API itself only ever listens on loopback in tests, so this checks the rule's
    // pieces: loopback writes pass without a token (above); the token file is validated.
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("t");
    std::fs::write(&short, "x").unwrap();
    let s = Settings {
        admin_listen: Some("127.0.0.1:0".into()),
        admin_token_file: Some(short),
        ..settings(vec!["http://127.0.0.1:1".into()])
    };
    assert!(s.validate().unwrap_err().to_string().contains("admin-token-file"));
}

#[tokio::test]
async fn discovered_backends_come_and_drain_when_their_address_goes() {
    let sims = start_sims(2).await;
    let dns = FakeDns::default();
    *dns.0.lock().unwrap() = vec![sims[0].addr()];
    let s = Settings {
        backend: None,
        backend_dns: Some(vec!["kbs-headless.test.svc:8080".into()]),
        ..manual_health("off").merge(settings(vec![]))
    };
    let proxy = start_proxy_with(s, |c| c.with_resolver(dns.clone())).await;
    let name0 = sims[0].addr().to_string();
    assert_eq!(
        backends_json(&proxy).await[0]["name"],
        name0.as_str(),
        "named by address"
    );

    let mut pinned = KbsClient::new(proxy.url());
    pinned.auth().await.unwrap();

    // A new pod appears: it starts receiving new sessions.
    dns.0.lock().unwrap().push(sims[1].addr());
    proxy.control.refresh_dns().await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let mut c = KbsClient::new(proxy.url());
        c.auth().await.unwrap();
        seen.insert(c.replicas()[0].clone().unwrap());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // The first pod's address disappears: drained, pinned session continues, no new sessions.
    dns.0.lock().unwrap().remove(0);
    proxy.control.refresh_dns().await;
    let b = backends_json(&proxy).await;
    let gone = b
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name0.as_str())
        .unwrap();
    assert_eq!(
        (gone["draining"].as_bool(), gone["retired"].as_bool()),
        (Some(true), Some(true))
    );
    pinned.attest().await.unwrap();
    pinned.fetch_resource(RESOURCE).await.unwrap();
    assert!(pinned.replicas().iter().all(|r| r.as_deref() == Some("kbs-0")));
    for _ in 0..4 {
        let mut c = KbsClient::new(proxy.url());
        c.auth().await.unwrap();
        assert_eq!(c.replicas()[0].as_deref(), Some("kbs-1"));
    }
    // An operator cannot undrain a backend that left the set.
    let path = format!("/backends/{name0}/undrain");
    assert_eq!(admin_post(&proxy, &path).await, StatusCode::CONFLICT);
}

#[tokio::test]
async fn a_vanished_backend_is_dropped_after_the_drain_timeout_and_its_sessions_get_the_kbs_401() {
    let sims = start_sims(2).await;
    let dns = FakeDns::default();
    *dns.0.lock().unwrap() = vec![sims[0].addr(), sims[1].addr()];
    let s = Settings {
        backend: None,
        backend_dns: Some(vec!["kbs:8080".into()]),
        drain_timeout: Some("1ms".into()),
        ..manual_health("off").merge(settings(vec![]))
    };
    let proxy = start_proxy_with(s, |c| c.with_resolver(dns.clone())).await;
    let mut pinned = KbsClient::new(proxy.url());
    pinned.auth().await.unwrap();
    let first = pinned.replicas()[0].clone().unwrap();
    let (gone, stays) = if first == "kbs-0" {
        (sims[0].addr(), "kbs-1")
    } else {
        (sims[1].addr(), "kbs-0")
    };
    dns.0.lock().unwrap().retain(|a| *a != gone);
    proxy.control.refresh_dns().await;
    tokio::time::sleep(Duration::from_millis(5)).await; // let the 1 ms drain run out
    proxy.control.housekeeping();
    assert_eq!(backends_json(&proxy).await.as_array().unwrap().len(), 1);
    match pinned.attest().await {
        Err(ClientError::Kbs {
            status: StatusCode::UNAUTHORIZED,
            error_type,
            ..
        }) => assert_eq!(error_type, "AttestationError"),
        other => panic!("{other:?}"),
    }
    pinned.log.clear();
    pinned.get_resource(RESOURCE).await.unwrap();
    assert!(pinned.replicas()[1..].iter().all(|r| r.as_deref() == Some(stays)));
}

#[tokio::test]
async fn metrics_move_as_traffic_flows() {
    let sims = start_sims(2).await;
    let proxy = start_proxy(manual_health("off").merge(settings(backends_of(&sims)))).await;
    let before = metrics(&proxy).await;
    for _ in 0..3 {
        KbsClient::new(proxy.url()).get_resource(RESOURCE).await.unwrap();
    }
    // A forged cookie is counted.
    let req = Request::get(format!("{}/healthz", proxy.url()))
        .header("cookie", "route=forged")
        .body(Full::default())
        .unwrap();
    send(req).await;
    let after = metrics(&proxy).await;
    let total = |text: &str, route: &str, class: &str| -> f64 {
        ["kbs-0", "kbs-1"]
            .iter()
            .map(|b| {
                sample(
                    text,
                    &format!("kbs_proxy_requests_total{{backend=\"{b}\",route=\"{route}\",class=\"{class}\"}}"),
                )
            })
            .sum()
    };
    assert_eq!(total(&before, "auth", "2xx"), 0.0);
    assert_eq!(total(&after, "auth", "2xx"), 3.0, "{after}");
    assert_eq!(total(&after, "attest", "2xx"), 3.0);
    assert_eq!(total(&after, "resource", "2xx"), 3.0);
    assert_eq!(
        total(&after, "resource", "4xx"),
        3.0,
        "the first GET of each get-resource is a 401"
    );
    assert_eq!(sample(&after, "kbs_proxy_cookies_issued_total"), 4.0, "{after}");
    assert_eq!(
        sample(&after, "kbs_proxy_cookies_rejected_total{reason=\"malformed\"}"),
        1.0
    );
    assert!(
        sample(&after, "kbs_proxy_request_duration_seconds_count{route=\"auth\"}") >= 3.0,
        "{after}"
    );
    assert!(after.contains("kbs_proxy_active_connections"));
    assert_eq!(sample(&after, "kbs_proxy_backend_up{backend=\"kbs-0\"}"), 1.0);
}

#[tokio::test]
async fn a_reload_with_a_bad_file_keeps_the_old_configuration() {
    let sims = start_sims(1).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let write = |cookie: &str| {
        let text = format!(
            "backend = [\"{}\"]\ncookie-name = \"{cookie}\"\ncookie-secret = \"{SECRET}\"\nlisten = \"127.0.0.1:0\"\n",
            backends_of(&sims)[0]
        );
        std::fs::write(&file, text).unwrap();
    };
    write("first");
    let path = file.clone();
    let source = move || Settings::from_file(&path)?.validate();
    let proxy = start_proxy_with(Settings::from_file(&file).unwrap(), |c| {
        c.with_reload(Box::new(source), None)
    })
    .await;
    let cookie_name = || async {
        let (parts, _) = send(
            Request::get(format!("{}/healthz", proxy.url()))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        parts.headers["set-cookie"]
            .to_str()
            .unwrap()
            .split('=')
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(cookie_name().await, "first");
    std::fs::write(&file, "cookie-name = \"no spaces allowed\"\n").unwrap();
    assert!(proxy.control.reload().is_err());
    assert_eq!(cookie_name().await, "first", "a bad file changes nothing");
    write("second");
    proxy.control.reload().unwrap();
    assert_eq!(cookie_name().await, "second");
}

#[tokio::test]
async fn graceful_shutdown_finishes_an_in_flight_slow_request() {
    let slow = start_backend(|_req| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Response::new(ProxyBody::full("slow but sure"))
    })
    .await;
    let proxy = start_proxy(Settings {
        shutdown_grace: Some("10s".into()),
        ..settings(vec![format!("http://{slow}")])
    })
    .await;
    let url = format!("{}/slow", proxy.url());
    let in_flight = tokio::spawn(async move { send(Request::get(url).body(Full::default()).unwrap()).await });
    // Wait until the request is at the backend, then stop.
    let routing = proxy.proxy.routing();
    eventually(Duration::from_secs(1), || routing.backends.list[0].in_flight() > 0).await;
    assert_eq!(routing.backends.list[0].in_flight(), 1);
    proxy.shutdown.cancel();
    let (parts, body) = in_flight.await.unwrap();
    assert_eq!((parts.status, &body[..]), (StatusCode::OK, &b"slow but sure"[..]));
    let mut proxy = proxy;
    tokio::time::timeout(Duration::from_secs(5), &mut proxy.task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(proxy.addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_health_check_says_why() {
    use kbs_proxy::config::HealthMode;
    use kbs_proxy::control::health::{check, CheckFailure};
    let answering_503 = start_backend(|_req| async {
        let mut r = Response::new(ProxyBody::full(Bytes::new()));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r
    })
    .await;
    let silent = start_silent_backend().await;
    let dead = dead_addr().await;
    let config = settings(vec![
        format!("a=http://{answering_503}"),
        format!("b=http://{silent}"),
        format!("c=http://{dead}"),
    ])
    .validate()
    .unwrap();
    let proxy = kbs_proxy::dataplane::proxy::Proxy::new(&config).unwrap();
    let connector = proxy.connector();
    let routing = proxy.routing();
    let by_name = |n: &str| routing.backends.list.iter().find(|b| b.name == n).unwrap().clone();
    let http = HealthMode::Http("/healthz".into());
    let limit = Duration::from_secs(2);
    assert_eq!(
        check(&by_name("a"), &http, false, limit, &connector).await,
        Err(CheckFailure::Status(503))
    );
    assert_eq!(
        check(&by_name("b"), &http, false, limit, &connector).await,
        Err(CheckFailure::Timeout(limit))
    );
    let refused = check(&by_name("c"), &HealthMode::Tcp, false, limit, &connector).await;
    assert!(matches!(refused, Err(CheckFailure::Connect(_))), "{refused:?}");
    assert!(refused.unwrap_err().to_string().starts_with("connect failed: "));
}
