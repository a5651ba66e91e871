//! Each metric moves when its event happens: backend failures by cause, retries, the proxy's
//! own answers by KBS error type and response times (on both transports), DNS lookups,
//! certificate reloads, evicted learned sessions.

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use kbs_proxy::config::Settings;
use kbs_proxy_harness::kbs_client::KbsClient;
use kbs_proxy_harness::sim::{SimConfig, SimKbs};
use support::pki::{self, Pki};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A backend that reads each request head, then writes `answer` (maybe nothing) and closes.
async fn start_raw_backend(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
            });
        }
    });
    addr
}

/// A GET of a KBS resource through `proxy` (the fast path takes it when it is on).
async fn get_resource(proxy: &TestProxy) -> StatusCode {
    let (parts, _) = send(
        Request::get(format!("{}/kbs/v0/resource/a/b/c", proxy.url()))
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await;
    parts.status
}

fn one_backend(fast: &str, url: String) -> Settings {
    Settings {
        fast_path: Some(fast.into()),
        health_check: Some("off".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        backend_response_timeout: Some("200ms".into()),
        ..settings(vec![format!("b={url}")])
    }
}

#[tokio::test]
async fn upstream_errors_local_answers_and_response_times_are_counted_on_both_transports() {
    let sim = SimKbs::start_local(SimConfig::new("kbs-0")).await.unwrap();
    let cases = [
        (sim.url(), StatusCode::UNAUTHORIZED, None, None),
        (
            format!("http://{}", dead_addr().await),
            StatusCode::BAD_GATEWAY,
            Some("connect_refused"),
            Some("BadGateway"),
        ),
        (
            format!("http://{}", start_silent_backend().await),
            StatusCode::GATEWAY_TIMEOUT,
            Some("response_timeout"),
            Some("GatewayTimeout"),
        ),
        (
            format!("http://{}", start_raw_backend(b"").await),
            StatusCode::BAD_GATEWAY,
            Some("reset"),
            Some("BadGateway"),
        ),
        (
            format!("http://{}", start_raw_backend(b"SSH-2.0-not-http\r\n\r\n").await),
            StatusCode::BAD_GATEWAY,
            Some("bad_response"),
            Some("BadGateway"),
        ),
    ];
    for fast in ["on", "off"] {
        for (url, status, cause, error) in &cases {
            let proxy = start_proxy(one_backend(fast, url.clone())).await;
            assert_eq!(get_resource(&proxy).await, *status, "{fast} {url}");
            let text = metrics(&proxy).await;
            let timed = sample(
                &text,
                "kbs_proxy_backend_response_duration_seconds_count{backend=\"b\"}",
            );
            let answered = sample(
                &text,
                "kbs_proxy_backend_response_duration_seconds_bucket{le=\"+Inf\",backend=\"b\"}",
            );
            let total_errors: f64 = text
                .lines()
                .filter(|l| l.starts_with("kbs_proxy_upstream_errors_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            let local: f64 = text
                .lines()
                .filter(|l| l.starts_with("kbs_proxy_local_answers_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            match (cause, error) {
                (Some(cause), Some(error)) => {
                    let series = format!("kbs_proxy_upstream_errors_total{{backend=\"b\",cause=\"{cause}\"}}");
                    assert_eq!(sample(&text, &series), 1.0, "{fast} {cause}: {text}");
                    assert_eq!(total_errors, 1.0, "{fast} {cause}: only that cause");
                    let series = format!("kbs_proxy_local_answers_total{{error=\"{error}\"}}");
                    assert_eq!(sample(&text, &series), 1.0, "{fast} {cause}: {text}");
                    assert_eq!(local, 1.0, "{fast} {cause}");
                    assert_eq!(timed, 0.0, "{fast} {cause}: no response head, no response time");
                }
                _ => {
                    assert_eq!((total_errors, local), (0.0, 0.0), "{fast}: {text}");
                    assert_eq!((timed, answered), (1.0, 1.0), "{fast}: {text}");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_refused_connect_counts_an_error_and_a_retry_on_both_transports() {
    let sim = SimKbs::start_local(SimConfig::new("kbs-0")).await.unwrap();
    let dead = dead_addr().await;
    for fast in ["on", "off"] {
        let proxy = start_proxy(Settings {
            fast_path: Some(fast.into()),
            health_check: Some("off".into()),
            admin_listen: Some("127.0.0.1:0".into()),
            ..settings(vec![format!("live={}", sim.url()), format!("dead=http://{dead}")])
        })
        .await;
        // Round-robin sends one of the two to the dead replica; it is re-sent to the live one.
        for _ in 0..2 {
            assert_eq!(get_resource(&proxy).await, StatusCode::UNAUTHORIZED, "{fast}");
        }
        let text = metrics(&proxy).await;
        assert_eq!(
            sample(&text, "kbs_proxy_retries_total{backend=\"dead\"}"),
            1.0,
            "{fast}: {text}"
        );
        assert_eq!(
            sample(&text, "kbs_proxy_retries_total{backend=\"live\"}"),
            0.0,
            "{fast}"
        );
        let refused = "kbs_proxy_upstream_errors_total{backend=\"dead\",cause=\"connect_refused\"}";
        assert_eq!(sample(&text, refused), 1.0, "{fast}");
        assert_eq!(
            sample(
                &text,
                "kbs_proxy_backend_response_duration_seconds_count{backend=\"live\"}"
            ),
            2.0,
            "{fast}"
        );
    }
}

#[tokio::test]
async fn dns_lookups_and_the_backends_they_give_are_counted() {
    let dns = FakeDns::default();
    *dns.0.lock().unwrap() = vec!["127.0.0.1:1".parse().unwrap(), "127.0.0.2:1".parse().unwrap()];
    let s = Settings {
        backend: None,
        backend_dns: Some(vec!["kbs-headless:8080".into()]),
        backend_dns_namespace: Some("trustee".into()),
        health_check: Some("off".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        ..settings(vec![])
    };
    // The proxy resolves once as it starts; the test drives the rest.
    let proxy = start_proxy_by_hand_with(s, dns.clone()).await;
    let name = "name=\"kbs-headless.trustee.svc\"";
    let lookups = |text: &str, result: &str| {
        sample(
            text,
            &format!("kbs_proxy_dns_lookups_total{{{name},result=\"{result}\"}}"),
        )
    };
    let text = metrics(&proxy).await;
    let ok = lookups(&text, "ok");
    assert!(ok >= 1.0, "{text}");
    assert_eq!(lookups(&text, "error"), 0.0);
    assert_eq!(sample(&text, &format!("kbs_proxy_dns_backends{{{name}}}")), 2.0);

    // A failed lookup keeps the last addresses: the gauge stays.
    dns.0.lock().unwrap().clear();
    proxy.control.refresh_dns().await;
    let text = metrics(&proxy).await;
    assert_eq!((lookups(&text, "ok"), lookups(&text, "error")), (ok, 1.0), "{text}");
    assert_eq!(sample(&text, &format!("kbs_proxy_dns_backends{{{name}}}")), 2.0);

    dns.0.lock().unwrap().push("127.0.0.3:1".parse().unwrap());
    proxy.control.refresh_dns().await;
    let text = metrics(&proxy).await;
    assert_eq!(lookups(&text, "ok"), ok + 1.0);
    assert_eq!(sample(&text, &format!("kbs_proxy_dns_backends{{{name}}}")), 1.0);
}

async fn start_proxy_by_hand_with(s: Settings, dns: FakeDns) -> TestProxy {
    let opts = StartOptions {
        by_hand: true,
        ..StartOptions::default()
    };
    start_proxy_opts(s, |c| c.with_resolver(dns), opts).await
}

#[tokio::test]
async fn certificate_reloads_are_counted_by_result() {
    let pki = Pki::new();
    let files = pki.issue("proxy", &["localhost"]);
    let sims = start_sims(1).await;
    // The control loop off: only the housekeeping rounds below reload, so the counts are known.
    let proxy = start_proxy_by_hand(Settings {
        tls_cert: Some(files.cert.clone()),
        tls_key: Some(files.key.clone()),
        admin_listen: Some("127.0.0.1:0".into()),
        ..settings(backends_of(&sims))
    })
    .await;
    let reloads = |text: &str| {
        (
            sample(text, "kbs_proxy_tls_reloads_total{result=\"ok\"}"),
            sample(text, "kbs_proxy_tls_reloads_total{result=\"error\"}"),
        )
    };
    proxy.control.housekeeping();
    assert_eq!(reloads(&metrics(&proxy).await), (0.0, 0.0), "unchanged: no reload");

    let renewed = pki.issue("renewed", &["localhost"]);
    std::fs::copy(&renewed.cert, &files.cert).unwrap();
    std::fs::copy(&renewed.key, &files.key).unwrap();
    pki::touch_later(&[&files.cert, &files.key], 5);
    proxy.control.housekeeping();
    assert_eq!(reloads(&metrics(&proxy).await), (1.0, 0.0));

    // A file that does not load: counted (at each round until it is fixed).
    std::fs::write(&files.cert, "not a certificate").unwrap();
    pki::touch_later(&[&files.cert], 10);
    proxy.control.housekeeping();
    assert_eq!(reloads(&metrics(&proxy).await), (1.0, 1.0));
}

#[tokio::test]
async fn learned_sessions_dropped_for_room_are_counted() {
    let sims = start_sims(1).await;
    // 64 entries at most, one per shard: 40 sessions all but surely share a shard.
    let proxy = start_proxy(Settings {
        session_table_size: Some(1),
        health_check: Some("off".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        ..settings(backends_of(&sims))
    })
    .await;
    for _ in 0..40 {
        KbsClient::new(proxy.url()).auth().await.unwrap();
    }
    let text = metrics(&proxy).await;
    let held = proxy.proxy.learned_entries().0 as f64;
    let evicted = sample(&text, "kbs_proxy_sessions_evicted_total{by=\"session_id\"}");
    assert_eq!(evicted, 40.0 - held, "{text}");
    assert!(evicted > 0.0);
    assert_eq!(sample(&text, "kbs_proxy_sessions_evicted_total{by=\"token\"}"), 0.0);
}
