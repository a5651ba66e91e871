//! The admin port, off the data path: liveness, readiness, metrics, the backend table, and
//! drain/undrain. Writes are allowed from loopback, or with the bearer token when one is set.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AdminToken;
use crate::control::{ActionError, ControlPlane};

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    control: Arc<ControlPlane>,
    token: Option<AdminToken>,
    shutdown: CancellationToken,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let token = Arc::new(token);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let control = Arc::clone(&control);
        let token = Arc::clone(&token);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| {
                    let resp = handle(&control, token.as_ref().as_ref(), peer, &req);
                    async move { Ok::<_, Infallible>(resp) }
                }),
            )
            .into_owned();
        tokio::spawn(conn);
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    reply(status, "text/plain; charset=utf-8", body)
}

fn handle(
    control: &ControlPlane,
    token: Option<&AdminToken>,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if control.ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no backend takes new sessions\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let proxy = control.proxy();
            let body = crate::metrics::render(proxy.stats(), proxy.routing_handle());
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            )
        }
        (&Method::GET, "/backends") => reply(StatusCode::OK, "application/json", control.backends_json().to_string()),
        (&Method::POST, p) if p.starts_with("/backends/") => {
            if !write_allowed(token, peer, req) {
                return text(
                    StatusCode::FORBIDDEN,
                    "admin writes need loopback or the admin bearer token\n",
                );
            }
            let rest = &p["/backends/".len()..];
            let result = match rest.rsplit_once('/') {
                Some((name, "drain")) => control.drain(name),
                Some((name, "undrain")) => control.undrain(name),
                _ => {
                    return text(
                        StatusCode::NOT_FOUND,
                        "POST /backends/NAME/drain or /backends/NAME/undrain\n",
                    )
                }
            };
            match result {
                Ok(()) => reply(StatusCode::OK, "application/json", control.backends_json().to_string()),
                Err(e @ ActionError::UnknownBackend(_)) => {
                    reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", format!("{e}\n"))
                }
                Err(e @ ActionError::Retired(_)) => {
                    reply(StatusCode::CONFLICT, "text/plain; charset=utf-8", format!("{e}\n"))
                }
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /healthz /readyz /metrics /backends\n",
        ),
    }
}

/// Loopback peers may write; others need `Authorization: Bearer <token>` (compared in constant
/// time) when a token is configured.
fn write_allowed(token: Option<&AdminToken>, peer: SocketAddr, req: &Request<Incoming>) -> bool {
    if peer.ip().is_loopback() {
        return true;
    }
    let (Some(want), Some(got)) = (token, req.headers().get(AUTHORIZATION)) else {
        return false;
    };
    let Some(got) = got.as_bytes().strip_prefix(b"Bearer ") else {
        return false;
    };
    constant_time_eq(want.0.as_bytes(), got)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
