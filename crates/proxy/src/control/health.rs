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

/// Why a check failed: what the log line of a backend marked down says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckFailure {
    /// No connection (refused, unreachable, TLS refused) within the check.
    #[error("connect failed: {0}")]
    Connect(String),
    /// Connected, but no HTTP answer (the request or the handshake failed, or it closed).
    #[error("no HTTP answer: {0}")]
    NoAnswer(String),
    /// Answered with a status other than 2xx.
    #[error("answered {0}")]
    Status(u16),
    /// Nothing within the check timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Checks one backend once, speaking HTTP/2 for HTTP checks when `http2`.
pub async fn check(
    backend: &Backend,
    mode: &HealthMode,
    http2: bool,
    timeout: Duration,
    connector: &BackendConnector,
) -> Result<(), CheckFailure> {
    let uri: Uri = format!("{}://{}/", backend.scheme, backend.authority)
        .parse()
        .map_err(|e: http::uri::InvalidUri| CheckFailure::Connect(e.to_string()))?;
    let work = async {
        match mode {
            HealthMode::Off => Ok(()),
            HealthMode::Tcp => connector
                .connect(&uri)
                .await
                .map(drop)
                .map_err(|e| CheckFailure::Connect(e.to_string())),
            HealthMode::Http(path) => http_check(backend, &uri, path, http2, connector).await,
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(CheckFailure::Timeout(timeout)))
}

/// `GET path` answered 2xx, over HTTP/1.1 or, with `http2`, HTTP/2.
async fn http_check(
    backend: &Backend,
    uri: &Uri,
    path: &str,
    http2: bool,
    connector: &BackendConnector,
) -> Result<(), CheckFailure> {
    const AGENT: HeaderValue = HeaderValue::from_static("kbs-affinity-proxy-health-check");
    let no_answer = |e: &dyn std::fmt::Display| CheckFailure::NoAnswer(e.to_string());
    let stream = connector
        .connect(uri)
        .await
        .map_err(|e| CheckFailure::Connect(e.to_string()))?;
    if http2 {
        // Prior knowledge, or `h2` negotiated by the connector's TLS: the authority goes in the
        // target, and no `Connection` field (HTTP/2 has none).
        let authority = uri.authority().ok_or_else(|| no_answer(&"no authority"))?;
        let target = format!("{}://{authority}{path}", uri.scheme_str().unwrap_or("http"));
        let req = Request::get(target)
            .header(USER_AGENT, AGENT)
            .body(Empty::<Bytes>::new())
            .map_err(|e| no_answer(&e))?;
        let executor = hyper_util::rt::TokioExecutor::new();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(executor, stream)
            .await
            .map_err(|e| no_answer(&e))?;
        answered_2xx(conn, sender.send_request(req)).await
    } else {
        let host = HeaderValue::from_str(backend.authority.as_str()).map_err(|e| no_answer(&e))?;
        let req = Request::get(path)
            .header(HOST, host)
            .header(CONNECTION, "close")
            .header(USER_AGENT, AGENT)
            .body(Empty::<Bytes>::new())
            .map_err(|e| no_answer(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(stream)
            .await
            .map_err(|e| no_answer(&e))?;
        answered_2xx(conn, sender.send_request(req)).await
    }
}

/// Awaits `answer` while the connection task `conn` runs; true on a 2xx. The task ends with the
/// check: on the answer, on the check's timeout (dropped), or when the backend closes.
async fn answered_2xx<C>(
    conn: C,
    answer: impl Future<Output = hyper::Result<Response<Incoming>>>,
) -> Result<(), CheckFailure>
where
    C: Future + Send + 'static,
    C::Output: Send + 'static,
{
    let _driver = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
    match answer.await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(CheckFailure::Status(r.status().as_u16())),
        Err(e) => Err(CheckFailure::NoAnswer(e.to_string())),
    }
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
            let result = check(&backend, &mode, http2, timeout, &connector).await;
            let transition = backend.record_check(result.is_ok(), rise, fall);
            match (transition, &result) {
                (Some(Transition::Up), _) => tracing::info!(
                    backend = backend.name,
                    reason = format!("{rise} consecutive checks passed"),
                    "backend is up"
                ),
                (Some(Transition::Down), Err(why)) => tracing::warn!(
                    backend = backend.name,
                    reason = format!("{fall} consecutive checks failed, the last: {why}"),
                    "backend is down"
                ),
                _ => {}
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
