//! Active health checks: a TCP connect, or `GET <path>` answered 2xx (over HTTP/1.1, or HTTP/2
//! when the backends speak it), within a timeout. Results feed each backend's hysteresis
//! ([`crate::upstream::backend::Backend::record_check`]).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Empty;
use hyper::body::Incoming;

use crate::config::{HealthConfig, HealthMode};
use crate::upstream::backend::{Backend, Transition};
use crate::upstream::connector::BackendConnector;

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
            HealthMode::Http(path) => http_check(backend, &uri, path, http2, connector).await,
        }
    };
    tokio::time::timeout(timeout, work).await.unwrap_or(false)
}

/// `GET path` answered 2xx, over HTTP/1.1 or, with `http2`, HTTP/2.
async fn http_check(backend: &Backend, uri: &Uri, path: &str, http2: bool, connector: &BackendConnector) -> bool {
    const AGENT: HeaderValue = HeaderValue::from_static("kbs-affinity-proxy-health-check");
    let Ok(stream) = connector.connect(uri).await else {
        return false;
    };
    if http2 {
        // Prior knowledge, or `h2` negotiated by the connector's TLS: the authority goes in the
        // target, and no `Connection` field (HTTP/2 has none).
        let Some(authority) = uri.authority() else {
            return false;
        };
        let target = format!("{}://{authority}{path}", uri.scheme_str().unwrap_or("http"));
        let Ok(req) = Request::get(target)
            .header(USER_AGENT, AGENT)
            .body(Empty::<Bytes>::new())
        else {
            return false;
        };
        let executor = hyper_util::rt::TokioExecutor::new();
        let Ok((mut sender, conn)) = hyper::client::conn::http2::handshake(executor, stream).await else {
            return false;
        };
        answered_2xx(conn, sender.send_request(req)).await
    } else {
        let Ok(host) = HeaderValue::from_str(backend.authority.as_str()) else {
            return false;
        };
        let req = Request::get(path)
            .header(HOST, host)
            .header(CONNECTION, "close")
            .header(USER_AGENT, AGENT)
            .body(Empty::<Bytes>::new());
        let Ok(req) = req else {
            return false;
        };
        let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(stream).await else {
            return false;
        };
        answered_2xx(conn, sender.send_request(req)).await
    }
}

/// Awaits `answer` while the connection task `conn` runs; true on a 2xx. The task ends with the
/// check: on the answer, on the check's timeout (dropped), or when the backend closes.
async fn answered_2xx<C>(conn: C, answer: impl Future<Output = hyper::Result<Response<Incoming>>>) -> bool
where
    C: Future + Send + 'static,
    C::Output: Send + 'static,
{
    let _driver = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
    answer.await.is_ok_and(|r| r.status().is_success())
}

/// Checks every backend of the current table once, concurrently (HTTP checks in HTTP/2 when
/// `http2`), and applies the hysteresis; logs each transition. Returns the backends that came
/// back up (they may have restarted and lost their state).
pub(crate) async fn check_all(
    routing: &crate::routing::Routing,
    health: &HealthConfig,
    http2: bool,
    connector: &BackendConnector,
) -> Vec<std::sync::Arc<Backend>> {
    let mut came_up = Vec::new();
    if health.mode == HealthMode::Off {
        return came_up;
    }
    let mut set = tokio::task::JoinSet::new();
    for backend in &routing.backends.list {
        let backend = std::sync::Arc::clone(backend);
        let mode = health.mode.clone();
        let connector = connector.clone();
        let (timeout, rise, fall) = (health.timeout, health.rise, health.fall);
        set.spawn(async move {
            let ok = check(&backend, &mode, http2, timeout, &connector).await;
            let transition = backend.record_check(ok, rise, fall);
            match transition {
                Some(Transition::Up) => tracing::info!(backend = backend.name, "backend is up"),
                Some(Transition::Down) => tracing::warn!(backend = backend.name, "backend is down"),
                None => {}
            }
            (transition == Some(Transition::Up)).then_some(backend)
        });
    }
    while let Some(done) = set.join_next().await {
        if let Ok(Some(backend)) = done {
            came_up.push(backend);
        }
    }
    came_up
}
