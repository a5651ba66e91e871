//! `backend-protocol = "http2"`: HTTP/2 to the backends (prior knowledge over TCP, ALPN `h2` over
//! TLS), on the hyper path, with sessions pinned as over HTTP/1.1 and health checks in HTTP/2.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kbs_proxy::config::Settings;
use kbs_proxy_harness::kbs_client::KbsClient;
use support::pki::Pki;
use support::*;
use tokio::net::TcpListener;

/// A backend that speaks HTTP/2 only (an HTTP/1.1 request fails its connection), over TCP or,
/// with `tls`, over TLS offering ALPN `h2` alone. Answers `x-backend: NAME` and the version it
/// saw; counts the health checks (`GET /healthz`) that reached it.
async fn start_h2_backend(
    name: &'static str,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let checks = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&checks);
    let acceptor = tls.map(|mut config| {
        Arc::make_mut(&mut config).alpn_protocols = vec![b"h2".to_vec()];
        tokio_rustls::TlsAcceptor::from(config)
    });
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (checks, acceptor) = (Arc::clone(&counted), acceptor.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    if req.uri().path() == "/healthz" {
                        checks.fetch_add(1, Ordering::Relaxed);
                    }
                    let r = Response::builder()
                        .header("x-backend", name)
                        .header("x-version", format!("{:?}", req.version()))
                        .body(Full::new(Bytes::from_static(b"ok")))
                        .unwrap();
                    async move { Ok::<_, Infallible>(r) }
                });
                let h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                match acceptor {
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(tcp).await else { return };
                        let _ = h2.serve_connection(TokioIo::new(tls), svc).await;
                    }
                    None => {
                        let _ = h2.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                }
            });
        }
    });
    (addr, checks)
}

fn http2(backends: Vec<String>) -> Settings {
    Settings {
        backend_protocol: Some("http2".into()),
        ..settings(backends)
    }
}

async fn get(url: String, cookie: Option<&str>) -> (http::response::Parts, Bytes) {
    let mut req = Request::get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    send(req.body(Full::default()).unwrap()).await
}

#[tokio::test]
async fn http2_to_the_backends_pins_sessions_and_checks_health_in_http2() {
    let (a, a_checks) = start_h2_backend("a", None).await;
    let (b, b_checks) = start_h2_backend("b", None).await;
    let proxy = start_proxy(Settings {
        health_check: Some("http".into()),
        ..http2(vec![format!("a=http://{a}"), format!("b=http://{b}")])
    })
    .await;
    // The proxy ran its HTTP checks once at start: they reached both backends, in HTTP/2.
    assert!(a_checks.load(Ordering::Relaxed) >= 1 && b_checks.load(Ordering::Relaxed) >= 1);

    let (first, _) = get(format!("{}/kbs/v0/resource/a/b/c", proxy.url()), None).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["x-version"], "HTTP/2.0");
    let pinned = first.headers["x-backend"].to_str().unwrap().to_owned();
    let cookie = first.headers["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_owned();
    for _ in 0..10 {
        let (parts, body) = get(format!("{}/kbs/v0/resource/a/b/c", proxy.url()), Some(&cookie)).await;
        assert_eq!((parts.status, &body[..]), (StatusCode::OK, &b"ok"[..]));
        assert_eq!(parts.headers["x-backend"], pinned.as_str());
        assert_eq!(parts.headers["x-version"], "HTTP/2.0");
    }

    // More health checks keep both up: after them, cookie-less requests still reach both.
    for _ in 0..3 {
        proxy.control.check_health().await;
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (parts, _) = get(format!("{}/x", proxy.url()), None).await;
        assert_eq!(parts.status, StatusCode::OK);
        seen.insert(parts.headers["x-backend"].to_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test]
async fn a_kbs_session_through_http2_to_simulated_replicas_stays_on_one() {
    // The simulated replicas serve HTTP/1.1 and HTTP/2 with prior knowledge alike.
    let sims = start_sims(2).await;
    let proxy = start_proxy(http2(backends_of(&sims))).await;
    for _ in 0..4 {
        let mut c = KbsClient::new(proxy.url());
        c.auth().await.unwrap();
        c.attest().await.unwrap();
        assert_eq!(
            &c.fetch_resource("default/key/demo").await.unwrap()[..],
            b"demo-secret-value"
        );
        let id = c.session_id().expect("a session").to_owned();
        let saw: Vec<_> = sims.iter().filter(|s| !s.session_steps(&id).is_empty()).collect();
        assert_eq!(saw.len(), 1);
        assert_eq!(saw[0].session_steps(&id), ["auth", "attest", "resource"]);
    }
}

#[tokio::test]
async fn over_tls_the_proxy_offers_h2_by_alpn_only_when_asked() {
    let pki = Pki::new();
    let files = pki.issue("kbs", &["localhost"]);
    let (addr, _) = start_h2_backend("tls", Some(pki.server_config(&files, false))).await;
    let backend = vec![format!("kbs=https://localhost:{}", addr.port())];

    let proxy = start_proxy(Settings {
        backend_ca: Some(pki.ca_path.clone()),
        ..http2(backend.clone())
    })
    .await;
    let (parts, _) = get(format!("{}/x", proxy.url()), None).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["x-version"], "HTTP/2.0");

    // Over HTTP/1.1 the proxy offers only `http/1.1`: this backend refuses the handshake.
    let proxy = start_proxy(Settings {
        backend_ca: Some(pki.ca_path.clone()),
        ..settings(backend)
    })
    .await;
    let (parts, body) = get(format!("{}/kbs/v0/resource/a/b/c", proxy.url()), None).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert!(String::from_utf8_lossy(&body).contains("/errors/BadGateway"));
}

#[test]
fn an_unknown_backend_protocol_is_refused_by_its_key() {
    let err = Settings {
        backend_protocol: Some("h3".into()),
        ..settings(vec!["a=http://127.0.0.1:1".into()])
    }
    .validate()
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("backend-protocol") && text.contains("h3"), "{text}");
}

#[tokio::test]
async fn a_reload_cannot_switch_the_backend_protocol_of_running_workers() {
    let (a, checks) = start_h2_backend("a", None).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let write = |protocol: &str| {
        let text = format!(
            "backend = [\"a=http://{a}\"]\ncookie-secret = \"{SECRET}\"\nlisten = \"127.0.0.1:0\"\n\
             health-check = \"http\"\nbackend-protocol = \"{protocol}\"\n"
        );
        std::fs::write(&file, text).unwrap();
    };
    write("http2");
    let path = file.clone();
    let source = move || Settings::from_file(&path)?.validate();
    let proxy = start_proxy_with(Settings::from_file(&file).unwrap(), |c| {
        c.with_reload(Box::new(source), None)
    })
    .await;
    write("http1");
    proxy.control.reload().unwrap();
    // The workers still speak HTTP/2, and so do the health checks: the backend stays up.
    let before = checks.load(Ordering::Relaxed);
    for _ in 0..4 {
        proxy.control.check_health().await;
    }
    assert!(checks.load(Ordering::Relaxed) >= before + 4);
    let (parts, _) = get(format!("{}/x", proxy.url()), None).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["x-version"], "HTTP/2.0");
}
