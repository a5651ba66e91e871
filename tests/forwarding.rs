//! Forwarding: streaming bodies, header rewriting, and the answers the proxy makes itself.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use kbs_proxy::config::Settings;
use sha2::{Digest, Sha256};
use support::*;

async fn echo_proxy() -> TestProxy {
    let echo = start_echo().await;
    start_proxy(settings(vec![format!("echo=http://{echo}")])).await
}

#[tokio::test]
async fn ten_mib_streams_through_both_ways() {
    let proxy = echo_proxy().await;
    let body: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let want = Sha256::digest(&body);
    // Chunks from a stream, so the request has no Content-Length: chunked all the way.
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = body
        .chunks(64 * 1024)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let req = Request::post(format!("{}/upload", proxy.url()))
        .body(StreamBody::new(futures_stream(chunks)))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), body.len());
    assert_eq!(Sha256::digest(&got), want);
}

fn futures_stream<T: Send + 'static>(items: Vec<T>) -> impl futures_core::Stream<Item = T> + Send {
    tokio_stream::iter(items)
}

#[tokio::test]
async fn bodies_are_not_buffered_the_echo_starts_before_the_upload_ends() {
    let proxy = echo_proxy().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    let req = Request::post(format!("{}/stream", proxy.url()))
        .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    tx.send(Ok(Frame::data(Bytes::from_static(b"first")))).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap()
        .unwrap();
    let mut body = resp.into_body();
    // The first chunk comes back while the request body is still open.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first");
    tx.send(Ok(Frame::data(Bytes::from_static(b"second")))).await.unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second");
}

#[tokio::test]
async fn hop_by_hop_headers_go_and_forwarded_headers_come() {
    let proxy = echo_proxy().await;
    let req = Request::get(format!("{}/headers", proxy.url()))
        .header("host", "kbs.example:8443")
        .header("connection", "keep-alive, x-private-hop")
        .header("x-private-hop", "1")
        .header("keep-alive", "timeout=9")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-host", "spoofed.example")
        .header("authorization", "Bearer admin-token")
        .body(Full::default())
        .unwrap();
    let (parts, _) = send(req).await;
    assert_eq!(parts.status, StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_str(parts.headers["x-seen-headers"].to_str().unwrap()).unwrap();
    for gone in ["x-private-hop", "keep-alive", "te", "proxy-authorization"] {
        assert!(seen.get(gone).is_none(), "{gone} must not reach the backend: {seen}");
    }
    assert_eq!(seen["host"], "kbs.example:8443", "the client's Host is kept");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "kbs.example:8443");
    assert_eq!(seen["authorization"], "Bearer admin-token", "end-to-end headers pass");
    assert!(
        parts.headers.get("keep-alive").is_none(),
        "the backend's hop-by-hop headers go too"
    );
}

#[tokio::test]
async fn http2_clients_get_host_from_their_authority() {
    let proxy = echo_proxy().await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let resp = client
        .request(
            Request::get(format!("{}/headers", proxy.url()))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let seen: serde_json::Value = serde_json::from_str(resp.headers()["x-seen-headers"].to_str().unwrap()).unwrap();
    assert_eq!(seen["host"], proxy.addr.to_string());
    assert_eq!(seen["x-forwarded-host"], proxy.addr.to_string());
}

fn assert_kbs_error(parts: &http::response::Parts, body: &[u8], status: StatusCode, variant: &str) {
    assert_eq!(parts.status, status);
    let v: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
    assert_eq!(
        v["type"],
        format!("https://github.com/confidential-containers/kbs/errors/{variant}")
    );
    assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()));
}

#[tokio::test]
async fn unreachable_backends_get_a_kbs_shaped_502_on_kbs_paths_and_text_elsewhere() {
    let dead = dead_addr().await;
    let proxy = start_proxy(settings(vec![format!("http://{dead}")])).await;
    let auth = Request::post(format!("{}/kbs/v0/auth", proxy.url()))
        .body(Full::from("{}"))
        .unwrap();
    let (parts, body) = send(auth).await;
    assert_kbs_error(&parts, &body, StatusCode::BAD_GATEWAY, "BadGateway");
    let (parts, body) = send(
        Request::get(format!("{}/healthz", proxy.url()))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert!(String::from_utf8_lossy(&body).contains("unreachable"));
}

#[tokio::test]
async fn a_backend_that_never_answers_gives_504_in_the_kbs_shape() {
    let addr = start_silent_backend().await;
    let proxy = start_proxy(Settings {
        backend_response_timeout: Some("300ms".into()),
        ..settings(vec![format!("http://{addr}")])
    })
    .await;
    let req = Request::get(format!("{}/kbs/v0/resource/a/b/c", proxy.url()))
        .body(Full::default())
        .unwrap();
    let (parts, body) = tokio::time::timeout(Duration::from_secs(10), send(req)).await.unwrap();
    assert_kbs_error(&parts, &body, StatusCode::GATEWAY_TIMEOUT, "GatewayTimeout");
}

#[tokio::test]
async fn an_oversized_auth_body_gets_413_in_the_kbs_shape() {
    let sims = start_sims(1).await;
    let proxy = start_proxy(Settings {
        auth_body_limit: Some(1024),
        ..settings(backends_of(&sims))
    })
    .await;
    let big = vec![b'x'; 4096];
    let req = Request::post(format!("{}/kbs/v0/auth", proxy.url()))
        .body(Full::from(big))
        .unwrap();
    let (parts, body) = send(req).await;
    assert_kbs_error(&parts, &body, StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge");
}
