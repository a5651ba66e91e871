//! The admin port, off the data path: liveness, readiness, metrics, the backend table,
//! drain/undrain and resync. Writes are allowed from loopback, or with the bearer token when one
//! is set.
//!
//! On the journal owner it also takes the KBS admin writes that other proxies forward
//! (`POST`/`DELETE /kbs/v0/...` on the admin write routes) and runs them through the same
//! request pipeline as the data port: broadcast, journal, answer. They need no admin-port
//! token: the KBS itself authorizes each write with the client's own `Authorization`, exactly
//! as when the client reaches this proxy's data port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AdminToken;
use crate::control::metrics::exposition::{to_text_004, Format};
use crate::control::{ActionError, ControlPlane};
use crate::dataplane::proxy::{ConnInfo, ProxyBody, ProxyError, Worker};
use crate::kbs::RouteKind;

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    control: Arc<ControlPlane>,
    token: Option<AdminToken>,
    shutdown: CancellationToken,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let token = Arc::new(token);
    // Forwarded admin writes run through a worker of their own on this runtime.
    let worker = Arc::new(control.proxy().worker());
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
        let worker = Arc::clone(&worker);
        let conn = builder
            .serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| {
                    let control = Arc::clone(&control);
                    let token = Arc::clone(&token);
                    let worker = Arc::clone(&worker);
                    async move {
                        let resp = handle(&control, &worker, token.as_ref().as_ref(), peer, req).await;
                        Ok::<_, Infallible>(resp)
                    }
                }),
            )
            .into_owned();
        // Connections end with the proxy: a kept-alive peer (another proxy forwarding writes)
        // must not go on talking to a control plane that has stopped.
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                () = shutdown.cancelled() => {}
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    reply(status, "text/plain; charset=utf-8", body)
}

async fn handle(
    control: &ControlPlane,
    worker: &Worker,
    token: Option<&AdminToken>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if !control.ready() {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy backend that is not draining\n",
                );
            }
            let behind = control.out_of_sync();
            if behind.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                // Still ready: failing here would take every proxy out of service when every
                // replica is behind, which leaves zero serving. The balancer prefers replicas
                // in sync and falls back to these only when none is.
                reply(
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    format!(
                        "ready; behind on admin writes (no new sessions while another replica is in sync): {}\n",
                        behind.join(", ")
                    ),
                )
            }
        }
        (m, p) if p.starts_with(crate::kbs::API_PREFIX) => {
            let routing = control.proxy().routing();
            let is_write = routing.admin_fanout.as_ref().is_some_and(|f| f.matches(m, p));
            if !is_write {
                return reply(
                    StatusCode::NOT_FOUND,
                    "application/json",
                    crate::kbs::error_body(
                        "InvalidRequestPath",
                        "the admin port takes only the KBS admin writes the journal owner broadcasts",
                    ),
                );
            }
            if control.proxy().journal_owner().is_some() {
                return ProxyError::JournalLoop.into_response(RouteKind::Admin, control.proxy().stats());
            }
            worker.handle(req, &ConnInfo::new(peer, false)).await
        }
        (&Method::GET, "/metrics") => {
            let proxy = control.proxy();
            let body = crate::control::metrics::render(proxy.stats(), proxy.routing_handle());
            let accept = req.headers().get(http::header::ACCEPT).map(HeaderValue::as_bytes);
            match Format::negotiate(accept) {
                Format::OpenMetrics => reply(StatusCode::OK, Format::OpenMetrics.content_type(), body),
                Format::Text004 => reply(StatusCode::OK, Format::Text004.content_type(), to_text_004(&body)),
            }
        }
        (&Method::GET, "/backends") => reply(StatusCode::OK, "application/json", control.backends_json().to_string()),
        (&Method::POST, p) if p.starts_with("/backends/") => {
            if !write_allowed(token, peer, &req) {
                return text(
                    StatusCode::FORBIDDEN,
                    "admin writes need loopback or the admin bearer token\n",
                );
            }
            let rest = &p["/backends/".len()..];
            let result = match rest.rsplit_once('/') {
                Some((name, "drain")) => control.drain(name),
                Some((name, "undrain")) => control.undrain(name),
                Some((name, "resync")) => control.resync(name).await,
                _ => {
                    return text(
                        StatusCode::NOT_FOUND,
                        "POST /backends/NAME/drain, /backends/NAME/undrain or /backends/NAME/resync\n",
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

/// Equal in time that depends on the lengths only (`subtle`: the compiler is kept from
/// short-circuiting; a hand-written fold is not guaranteed that).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
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
