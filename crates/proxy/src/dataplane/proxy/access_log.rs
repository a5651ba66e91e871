//! The observe step both transports share: one access-log line per request, proxied or answered
//! by the proxy itself, in one format.

use super::*;

/// One access-log line per request: method, path (no query: it may carry tokens), status,
/// backend, duration and routing decision. Cookies, tokens and bodies are never logged.
pub(super) struct AccessLog {
    /// Off: nothing is recorded.
    pub(super) enabled: bool,
    pub(super) method: Method,
    pub(super) path: Option<String>,
    /// The backend the request went (or was pinned) to.
    pub(super) backend: Option<String>,
    /// How the backend was chosen.
    pub(super) decision: &'static str,
}

impl AccessLog {
    pub(super) fn begin(enabled: bool, req: &Request<Incoming>) -> Self {
        Self::new(enabled, req.method().clone(), req.uri().path())
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
            );
        }
    }
}

/// Writes one access-log line: the one format both transports use.
pub(super) fn log_request(
    method: &str,
    path: &str,
    status: u16,
    backend: &str,
    kind: RouteKind,
    decision: &str,
    elapsed: std::time::Duration,
) {
    crate::telemetry::access::record(&crate::telemetry::access::Line {
        method,
        path,
        status,
        backend,
        route: kind.as_str(),
        decision,
        elapsed,
    });
}
