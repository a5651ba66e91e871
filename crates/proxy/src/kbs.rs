//! What the proxy knows of Trustee's KBS protocol: which step a request is, and the error shape
//! the real client parses.

use bytes::Bytes;
use http::Method;

/// The common prefix of every KBS API path.
pub const API_PREFIX: &str = "/kbs/v0/";
/// The protocol version string the KBS and its client exchange in `auth`.
pub const PROTOCOL_VERSION: &str = "0.4.0";
/// The session cookie the KBS sets on `auth` and `attest`.
pub const SESSION_COOKIE: &str = "kbs-session-id";
/// Prefix of the `type` field of every KBS error body.
pub const ERROR_TYPE_PREFIX: &str = "https://github.com/confidential-containers/kbs/errors/";

/// What a request is, from the proxy's point of view. Decided from the method and path bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// `POST /kbs/v0/auth`: a session starts; may go anywhere and re-pins.
    Auth,
    /// `POST /kbs/v0/attest`: must reach the replica holding the session.
    Attest,
    /// `GET /kbs/v0/resource/...`: must reach the replica holding the (cookie) session.
    Resource,
    /// Any other `/kbs/v0/` call: admin writes and reads (policies, reference values, resources).
    Admin,
    /// Anything outside `/kbs/v0/`: the replicas' `/healthz`, `/metrics`.
    Other,
}

impl RouteKind {
    /// Classifies a request. Only `POST auth`/`POST attest`/`GET resource` are session steps.
    pub fn classify(method: &Method, path: &str) -> Self {
        let Some(rest) = path.strip_prefix(API_PREFIX) else {
            return Self::Other;
        };
        match (method, rest) {
            (&Method::POST, "auth") => Self::Auth,
            (&Method::POST, "attest") => Self::Attest,
            (&Method::GET, r) if r.starts_with("resource/") => Self::Resource,
            _ => Self::Admin,
        }
    }

    /// Whether the path is under `/kbs/v0/`, where errors must have the KBS JSON shape.
    pub(crate) fn is_kbs(self) -> bool {
        !matches!(self, Self::Other)
    }

    /// Whether the request is part of a session that lives on one replica only.
    pub(crate) fn needs_session(self) -> bool {
        matches!(self, Self::Attest | Self::Resource)
    }

    /// A short label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::Attest => "attest",
            Self::Resource => "resource",
            Self::Admin => "admin",
            Self::Other => "other",
        }
    }
}

/// The JSON error body of the KBS: `{"type":"<prefix><variant>","detail":"<detail>"}`.
///
/// The real client parses every non-2xx body as this; anything else is a hard client error.
pub fn error_body(variant: &str, detail: &str) -> Bytes {
    let body = serde_json::json!({
        "type": format!("{ERROR_TYPE_PREFIX}{variant}"),
        "detail": detail,
    });
    Bytes::from(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_protocol_steps() {
        use RouteKind::*;
        let cases = [
            (Method::POST, "/kbs/v0/auth", Auth),
            (Method::POST, "/kbs/v0/attest", Attest),
            (Method::GET, "/kbs/v0/resource/default/key/1", Resource),
            (Method::POST, "/kbs/v0/resource/default/key/1", Admin),
            (Method::DELETE, "/kbs/v0/resource/default/key/1", Admin),
            (Method::POST, "/kbs/v0/resource-policy", Admin),
            (Method::GET, "/kbs/v0/auth", Admin),
            (Method::GET, "/kbs/v0/resource-policy", Admin),
            (Method::GET, "/healthz", Other),
            (Method::GET, "/kbs/v0", Other),
        ];
        for (m, p, want) in cases {
            assert_eq!(RouteKind::classify(&m, p), want, "{m} {p}");
        }
    }

    #[test]
    fn error_body_has_the_kbs_shape() {
        let v: serde_json::Value = serde_json::from_slice(&error_body("TokenNotFound", "x \"y\"")).unwrap();
        assert_eq!(
            v["type"],
            "https://github.com/confidential-containers/kbs/errors/TokenNotFound"
        );
        assert_eq!(v["detail"], "x \"y\"");
    }
}
