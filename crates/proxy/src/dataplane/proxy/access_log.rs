//! The observe step both transports share: one access-log line per request, proxied or answered
//! by the proxy itself, in one format.

use super::*;

/// One access-log line per request: method, path (no query: it may carry tokens), status,
/// backend, duration, routing decision and who asked. Cookies, tokens and bodies are never
/// logged.
pub(super) struct AccessLog {
    /// Off: nothing is recorded.
    pub(super) enabled: bool,
    pub(super) method: Method,
    pub(super) path: Option<String>,
    /// The backend the request went (or was pinned) to.
    pub(super) backend: Option<String>,
    /// How the backend was chosen.
    pub(super) decision: &'static str,
    /// Who asked (recorded when enabled). Boxed: the fast path keeps a local answer's line in
    /// its connection's task, which this would otherwise grow.
    pub(super) requester: Option<Box<Requester>>,
}

/// Who asked, for the access log: the request's id, the client's address, and the
/// `X-Forwarded-For` chain it sent when it is a trusted proxy (from others it could be forged).
pub(super) struct Requester {
    pub(super) request_id: String,
    pub(super) client: HeaderValue,
    pub(super) forwarded_for: Option<String>,
}

impl Requester {
    /// The requester of a request with `request_id` on `conn`; `chain` gives the client's
    /// `X-Forwarded-For` values, read only when the client is one of `trusted`.
    pub(super) fn new<'a, I>(request_id: &[u8], conn: &ConnInfo, trusted: &[Cidr], chain: impl FnOnce() -> I) -> Self
    where
        I: Iterator<Item = &'a [u8]>,
    {
        let forwarded_for = if trusted.iter().any(|net| net.contains(conn.peer)) {
            let joined = chain().map(String::from_utf8_lossy).collect::<Vec<_>>().join(", ");
            (!joined.is_empty()).then_some(joined)
        } else {
            None
        };
        Self {
            request_id: String::from_utf8_lossy(request_id).into_owned(),
            client: conn.peer_ip.clone(),
            forwarded_for,
        }
    }
}

impl AccessLog {
    /// The line of `req` on `conn`, whose `X-Request-Id` is already the one it goes on with.
    pub(super) fn begin(enabled: bool, req: &Request<Incoming>, conn: &ConnInfo, trusted: &[Cidr]) -> Self {
        let mut log = Self::new(enabled, req.method().clone(), req.uri().path());
        if enabled {
            let id = req
                .headers()
                .get(request_id::NAME)
                .map_or(&b""[..], HeaderValue::as_bytes);
            let chain = || {
                req.headers()
                    .get_all(&headers::X_FORWARDED_FOR)
                    .iter()
                    .map(HeaderValue::as_bytes)
            };
            log.requester = Some(Box::new(Requester::new(id, conn, trusted, chain)));
        }
        log
    }

    /// The line of a request `method path` (the path without its query), recorded when
    /// `enabled`; for either transport.
    pub(super) fn new(enabled: bool, method: Method, path: &str) -> Self {
        Self {
            enabled,
            method,
            path: enabled.then(|| path.to_owned()),
            backend: None,
            decision: "none",
            requester: None,
        }
    }

    /// The proxy answers `err` itself: the decision says so when the pinned session is lost.
    pub(super) fn answered_locally(&mut self, err: &ProxyError) {
        if let ProxyError::SessionLost = err {
            self.decision = "session-lost";
        }
    }

    pub(super) fn finish(self, kind: RouteKind, status: u16, elapsed: std::time::Duration) {
        if self.enabled {
            let path = self.path.as_deref().unwrap_or("");
            let backend = self.backend.as_deref().unwrap_or("-");
            log_request(
                self.method.as_str(),
                path,
                status,
                backend,
                kind,
                self.decision,
                elapsed,
                self.requester.as_deref(),
            );
        }
    }
}

/// Writes one access-log line: the one format both transports use.
#[allow(clippy::too_many_arguments)] // one per field of the line: a struct would only rename them
pub(super) fn log_request(
    method: &str,
    path: &str,
    status: u16,
    backend: &str,
    kind: RouteKind,
    decision: &str,
    elapsed: std::time::Duration,
    requester: Option<&Requester>,
) {
    crate::telemetry::access::record(&crate::telemetry::access::Line {
        method,
        path,
        status,
        backend,
        route: kind.as_str(),
        decision,
        elapsed,
        request_id: requester.map_or("-", |r| r.request_id.as_str()),
        client: requester.and_then(|r| r.client.to_str().ok()).unwrap_or("-"),
        forwarded_for: requester.and_then(|r| r.forwarded_for.as_deref()),
    });
}
