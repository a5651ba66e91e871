//! `X-Request-Id` and the client in the access log, alike on both transports: the client's id
//! when acceptable, else a generated one, always the one the backend gets and the log shows;
//! the `X-Forwarded-For` chain logged only from trusted proxies.

mod support;

use std::time::Duration;

use http::Request;
use http_body_util::Full;
use kbs_proxy::config::Settings;
use support::*;

/// Sends `GET /<marker>` with `headers` to `proxy`; returns the request id the backend saw
/// (there must be exactly one) and the request's access line.
async fn through(proxy: &TestProxy, marker: &str, headers: &[(&str, &str)]) -> (String, serde_json::Value) {
    let mut req = Request::get(format!("{}/{marker}", proxy.url()));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let (parts, _) = send(req.body(Full::default()).unwrap()).await;
    let seen: serde_json::Value = serde_json::from_slice(parts.headers["x-seen-headers"].as_bytes()).unwrap();
    eventually(Duration::from_secs(5), || logs::access_lines(marker).len() == 1).await;
    let line = logs::access_lines(marker).pop().expect("one access line");
    (seen["x-request-id"].as_str().unwrap().to_owned(), line)
}

fn generated(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn the_request_id_is_kept_or_made_and_reaches_backend_and_log_on_both_transports() {
    logs::capture();
    let echo = start_echo().await;
    let long = "x".repeat(129);
    for fast in ["on", "off"] {
        let proxy = start_proxy(Settings {
            fast_path: Some(fast.into()),
            access_log: Some("on".into()),
            ..settings(vec![format!("echo=http://{echo}")])
        })
        .await;
        let m = |case: &str| format!("rid-{fast}-{case}");

        let (id, line) = through(&proxy, &m("none"), &[]).await;
        assert!(generated(&id), "{fast}: {id}");
        assert_eq!(line["request_id"], id.as_str(), "{fast}: the id the backend got");
        assert_eq!(line["client"], "127.0.0.1");
        assert!(line.get("forwarded_for").is_none(), "{fast}: not a trusted proxy");

        let (id, line) = through(&proxy, &m("given"), &[("x-request-id", "ingress-7f3a")]).await;
        assert_eq!(
            (id.as_str(), &line["request_id"]),
            ("ingress-7f3a", &"ingress-7f3a".into())
        );

        for bad in [long.as_str(), "two words", "caf\u{e9}"] {
            let (id, line) = through(&proxy, &m("bad"), &[("x-request-id", bad)]).await;
            assert!(generated(&id), "{fast}: {bad:?} replaced: {id}");
            assert_eq!(line["request_id"], id.as_str());
            logs::forget(&m("bad"));
        }

        // Several: the first acceptable one, alone.
        let (id, _) = through(
            &proxy,
            &m("many"),
            &[("x-request-id", "a b"), ("x-request-id", "second")],
        )
        .await;
        assert_eq!(id, "second", "{fast}");
    }
}

#[tokio::test]
async fn the_forwarded_chain_is_logged_only_from_trusted_proxies() {
    logs::capture();
    let echo = start_echo().await;
    for fast in ["on", "off"] {
        for (trusted, expect) in [
            (vec!["127.0.0.0/8".to_owned()], Some("203.0.113.7, 10.1.1.1")),
            (vec!["10.0.0.0/8".to_owned()], None),
        ] {
            let proxy = start_proxy(Settings {
                fast_path: Some(fast.into()),
                access_log: Some("on".into()),
                trusted_proxies: Some(trusted.clone()),
                ..settings(vec![format!("echo=http://{echo}")])
            })
            .await;
            let marker = format!("xff-{fast}-{}", expect.is_some());
            let headers = [("x-forwarded-for", "203.0.113.7"), ("x-forwarded-for", "10.1.1.1")];
            let (_, line) = through(&proxy, &marker, &headers).await;
            assert_eq!(line["forwarded_for"].as_str(), expect, "{fast} {trusted:?}: {line}");
            assert_eq!(line["client"], "127.0.0.1");
        }
    }
}
