//! Active health checks: a TCP connect, or `GET <path>` answered 2xx (over HTTP/1.1, or HTTP/2
//! when the backends speak it), within a timeout. Results feed each backend's hysteresis
//! ([`crate::backend::Backend::record_check`]).

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http::{HeaderValue, Request, Uri};
use http_body_util::Empty;

use crate::backend::{Backend, Transition};
use crate::config::{HealthConfig, HealthMode};
use crate::connector::BackendConnector;

/// Checks one backend once, speaking HTTP/2 for HTTP checks when `http2`; true when healthy.
pub async fn check(
    backend: &Backend,
    mode: &HealthMode,
    http2: bool,
    timeout: Duration,
    connector: &BackendConnector,
) -> bool {
    let uri: Uri = match format!("{}://{}/", backend.scheme, backend.authority).parse() {
        Ok(u) => u,
        Err(_) => return false,
    };
    let work = async {
        match mode {
            HealthMode::Off => true,
            HealthMode::Tcp => connector.connect(&uri).await.is_ok(),
            HealthMode::Http(path) if http2 => http2_check(&uri, path, connector).await,
            HealthMode::Http(path) => http_check(backend, &uri, path, connector).await,
        }
    };
    tokio::time::timeout(timeout, work).await.unwrap_or(false)
}

async fn http_check(backend: &Backend, uri: &Uri, path: &str, connector: &BackendConnector) -> bool {
    let Ok(stream) = connector.connect(uri).await else {
        return false;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(stream).await else {
        return false;
    };
    // The connection task ends with the check (timeout or answer) or when the backend closes.
    let driver = tokio::spawn(conn);
    let Ok(host) = HeaderValue::from_str(backend.authority.as_str()) else {
        return false;
    };
    let req = Request::get(path)
        .header(HOST, host)
        .header(CONNECTION, "close")
        .header(USER_AGENT, "kbs-affinity-proxy-health-check")
        .body(Empty::new());
    let ok = match req {
        Ok(req) => sender.send_request(req).await.is_ok_and(|r| r.status().is_success()),
        Err(_) => false,
    };
    driver.abort();
    ok
}

/// The HTTP check over HTTP/2 (prior knowledge, or `h2` negotiated by the connector's TLS): the
/// authority goes in the request's URI, and no `Connection` field (HTTP/2 has none).
async fn http2_check(uri: &Uri, path: &str, connector: &BackendConnector) -> bool {
    let Ok(stream) = connector.connect(uri).await else {
        return false;
    };
    let executor = hyper_util::rt::TokioExecutor::new();
    let Ok((mut sender, conn)) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(executor, stream).await
    else {
        return false;
    };
    let driver = tokio::spawn(conn);
    let Some(authority) = uri.authority() else {
        return false;
    };
    let target = format!("{}://{authority}{path}", uri.scheme_str().unwrap_or("http"));
    let req = Request::get(target)
        .header(USER_AGENT, "kbs-affinity-proxy-health-check")
        .body(Empty::new());
    let ok = match req {
        Ok(req) => sender.send_request(req).await.is_ok_and(|r| r.status().is_success()),
        Err(_) => false,
    };
    driver.abort();
    ok
}

/// Checks every backend of the current table once, concurrently, and applies the hysteresis;
/// logs each transition.
pub async fn check_all(routing: &crate::routing::Routing, health: &HealthConfig, connector: &BackendConnector) {
    if health.mode == HealthMode::Off {
        return;
    }
    let mut set = tokio::task::JoinSet::new();
    for backend in &routing.backends.list {
        let backend = std::sync::Arc::clone(backend);
        let mode = health.mode.clone();
        let connector = connector.clone();
        let (timeout, rise, fall, http2) = (health.timeout, health.rise, health.fall, health.http2);
        set.spawn(async move {
            let ok = check(&backend, &mode, http2, timeout, &connector).await;
            match backend.record_check(ok, rise, fall) {
                Some(Transition::Up) => tracing::info!(backend = backend.name, "backend is up"),
                Some(Transition::Down) => tracing::warn!(backend = backend.name, "backend is down"),
                None => {}
            }
        });
    }
    while set.join_next().await.is_some() {}
}
