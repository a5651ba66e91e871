//! Every answer the proxy makes itself, in one place: which error, whose fault, which status.

use http::{header, HeaderValue, Response, StatusCode};

use super::body::ProxyBody;
use crate::control::metrics::ProxyStats;
use crate::kbs::{self, RouteKind};

/// Why the proxy answered instead of a backend.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Us: no backend is configured or none could be chosen.
    #[error("no KBS replica is available")]
    NoBackend,
    /// Backend: the replica holding this session cannot be reached or is no longer configured.
    /// The client must start a new session; its next `auth` is re-pinned.
    #[error("the KBS replica holding this session is unavailable; start a new session")]
    SessionLost,
    /// Client: a body that must be buffered is larger than the limit.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// Client: the request body could not be read.
    #[error("reading the request body failed")]
    ClientBody(#[source] hyper::Error),
    /// Backend: no connection could be made.
    #[error("KBS replica {backend} is unreachable")]
    Unreachable {
        /// The backend's name.
        backend: String,
        /// The connect error.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// Backend: its response body could not be read (or was too large where it is read).
    #[error("KBS replica {backend} sent a response body that could not be read")]
    BackendBody {
        /// The backend's name.
        backend: String,
    },
    /// Backends: an admin write was not applied on every replica; `detail` says where it was.
    #[error("{detail}")]
    AdminWrite {
        /// The worst status among the replicas' answers.
        status: StatusCode,
        /// Which replicas accepted, refused or missed the write, and why.
        detail: String,
    },
    /// Us: this proxy forwards admin writes to the journal owner, which could not be reached or
    /// did not answer; nothing was acknowledged.
    #[error("{detail}")]
    JournalOwner {
        /// What failed, and that the write may not be applied.
        detail: String,
    },
    /// Us: a forwarded admin write reached a proxy that forwards too (`journal-owner` set on
    /// both): refused rather than sent around in a loop.
    #[error("this proxy is not the journal owner (journal-owner is set on it too); fix the configuration")]
    JournalLoop,
    /// Backend: no connection could be made (fast path).
    #[error("KBS replica {backend} is unreachable")]
    Connect {
        /// The backend's name.
        backend: String,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// Backend: it closed, reset or answered something that is not an HTTP/1.1 response.
    #[error("KBS replica {backend} sent no valid response")]
    BadResponse {
        /// The backend's name.
        backend: String,
    },
    /// Backend: no response head within the response timeout.
    #[error("KBS replica {backend} did not answer in time")]
    Timeout {
        /// The backend's name.
        backend: String,
    },
    /// Backend: the exchange failed after connecting (reset, malformed response).
    #[error("KBS replica {backend} failed")]
    Backend {
        /// The backend's name.
        backend: String,
        /// What went wrong.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
}

impl ProxyError {
    /// Status and KBS error variant. No catch-all: a new error must choose its answer here.
    fn status_and_variant(&self, kind: RouteKind) -> (StatusCode, &'static str) {
        match self {
            Self::NoBackend => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            // The statuses and variants the real KBS gives for a session it does not know, so the
            // real client reacts the same way: a 401 on GET resource makes it redo the handshake.
            Self::SessionLost => match kind {
                RouteKind::Attest => (StatusCode::UNAUTHORIZED, "AttestationError"),
                RouteKind::Resource => (StatusCode::UNAUTHORIZED, "TokenNotFound"),
                RouteKind::Auth | RouteKind::Admin | RouteKind::Other => (StatusCode::UNAUTHORIZED, "SessionLost"),
            },
            Self::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLarge"),
            Self::ClientBody(_) => (StatusCode::BAD_REQUEST, "InvalidRequest"),
            Self::Unreachable { .. }
            | Self::Connect { .. }
            | Self::Backend { .. }
            | Self::BackendBody { .. }
            | Self::BadResponse { .. } => (StatusCode::BAD_GATEWAY, "BadGateway"),
            Self::AdminWrite { status, .. } => (*status, "AdminWriteIncomplete"),
            Self::JournalOwner { .. } => (StatusCode::SERVICE_UNAVAILABLE, "JournalOwnerUnavailable"),
            Self::JournalLoop => (StatusCode::LOOP_DETECTED, "JournalOwnerLoop"),
            Self::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "GatewayTimeout"),
        }
    }

    /// The response for this error: the KBS JSON error shape on `/kbs/v0/*`, plain text
    /// elsewhere; counted in `stats` by its KBS error type.
    pub(crate) fn into_response(self, kind: RouteKind, stats: &ProxyStats) -> Response<ProxyBody> {
        let (status, variant) = self.status_and_variant(kind);
        stats.count_local_error(variant);
        let detail = match (&self, kind) {
            (Self::SessionLost, RouteKind::Attest) => {
                format!("Attestation error: RCAR handshake Attest failed: {self}")
            }
            (Self::SessionLost, RouteKind::Resource) => {
                format!("Attestation Token not found: {self}")
            }
            _ => self.to_string(),
        };
        let (body, content_type) = if kind.is_kbs() {
            (kbs::error_body(variant, &detail), "application/json")
        } else {
            (format!("{detail}\n").into(), "text/plain; charset=utf-8")
        };
        let mut resp = Response::new(ProxyBody::full(body));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::metrics::KBS_ERROR_TYPES;

    #[test]
    fn every_kbs_error_type_has_a_counter() {
        let io = || std::io::Error::other("x");
        let errors = || {
            vec![
                ProxyError::NoBackend,
                ProxyError::SessionLost,
                ProxyError::BodyTooLarge { limit: 1 },
                ProxyError::BackendBody { backend: "b".into() },
                ProxyError::AdminWrite {
                    status: StatusCode::BAD_GATEWAY,
                    detail: String::new(),
                },
                ProxyError::JournalOwner { detail: String::new() },
                ProxyError::JournalLoop,
                ProxyError::Connect {
                    backend: "b".into(),
                    source: io(),
                },
                ProxyError::BadResponse { backend: "b".into() },
                ProxyError::Timeout { backend: "b".into() },
            ]
        };
        let mut seen = std::collections::BTreeSet::new();
        for kind in crate::upstream::backend::ROUTES {
            for e in errors() {
                let (_, variant) = e.status_and_variant(kind);
                assert!(KBS_ERROR_TYPES.contains(&variant), "{variant}");
                seen.insert(variant);
            }
        }
        // ClientBody's InvalidRequest needs a hyper error to build; the rest are all used.
        assert_eq!(seen.len(), KBS_ERROR_TYPES.len() - 1);
        let stats = ProxyStats::default();
        ProxyError::SessionLost.into_response(RouteKind::Resource, &stats);
        ProxyError::NoBackend.into_response(RouteKind::Resource, &stats);
        assert_eq!(stats.local_errors("TokenNotFound"), 1);
        assert_eq!(stats.local_errors("ServiceUnavailable"), 1);
        assert_eq!(stats.local_errors("BadGateway"), 0);
    }
}
