//! A KBS client that behaves like the real one (`kbs_protocol` in guest-components) where the
//! proxy is concerned: a cookie store that sends back every cookie it was given (the KBS's
//! `kbs-session-id` and the proxy's route cookie alike), the RCAR handshake, the get-resource
//! retry rule, and a hard failure on any error body that is not the KBS JSON shape.
//!
//! Used by the demo, the tests and the load generator, against the simulated KBS.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, SET_COOKIE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::kbs::{ERROR_TYPE_PREFIX, PROTOCOL_VERSION};
use crate::sim::REPLICA_HEADER;

/// How many resource GETs the real client makes at most before giving up.
pub const GET_RESOURCE_MAX_ATTEMPTS: usize = 3;

/// A client-side failure, as the real client would report it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The HTTP exchange itself failed.
    #[error("HTTP request failed: {0}")]
    Http(String),
    /// A non-2xx answer with a proper KBS error body.
    #[error("KBS error {status}: {error_type}: {detail}")]
    Kbs {
        /// HTTP status.
        status: StatusCode,
        /// The `type` field, without the common prefix.
        error_type: String,
        /// The `detail` field.
        detail: String,
    },
    /// A non-2xx answer whose body is not the KBS JSON error: the real client fails hard here.
    #[error("non-KBS error body with status {status}")]
    NotKbsJson {
        /// HTTP status.
        status: StatusCode,
    },
    /// A 2xx answer with a body that is not what the protocol says.
    #[error("malformed KBS response: {0}")]
    Malformed(&'static str),
}

impl ClientError {
    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Kbs { status, .. } | Self::NotKbsJson { status } => Some(*status),
            Self::Http(_) | Self::Malformed(_) => None,
        }
    }
}

/// One exchange, for the demo table and the tests.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// `auth`, `attest` or `resource`.
    pub step: &'static str,
    /// The status answered.
    pub status: StatusCode,
    /// The replica that answered (`x-kbs-replica`), when a simulated replica did.
    pub replica: Option<String>,
}

/// A client with its own cookie jar: one attester, one session at a time.
#[derive(Debug)]
pub struct KbsClient {
    /// `http://host:port`, no trailing slash.
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
    /// The cookie store: name → value, as the real client's reqwest store keeps per host.
    jar: Vec<(String, String)>,
    /// The nonce of the current handshake.
    nonce: Option<String>,
    /// The last attestation token.
    token: Option<String>,
    /// Send `Authorization: Bearer <token>` on resource GETs instead of relying on the session.
    use_token: bool,
    /// Every exchange so far, in order.
    pub log: Vec<Exchange>,
}

impl KbsClient {
    /// An HTTP/1.1 client for the KBS (or proxy) at `base` (`http://host:port`).
    pub fn new(base: impl Into<String>) -> Self {
        Self::build(base.into(), false)
    }

    /// The same over HTTP/2 with prior knowledge (h2c).
    pub fn http2(base: impl Into<String>) -> Self {
        Self::build(base.into(), true)
    }

    fn build(base: String, h2: bool) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let http = Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .build(connector);
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
            jar: Vec::new(),
            nonce: None,
            token: None,
            use_token: false,
            log: Vec::new(),
        }
    }

    /// Use the attestation token (`Authorization: Bearer`) on resource GETs.
    pub fn with_token_auth(mut self) -> Self {
        self.use_token = true;
        self
    }

    /// Points the client (its jar, nonce and token kept) at another address, e.g. another proxy.
    pub fn retarget(&mut self, base: impl Into<String>) {
        self.base = base.into().trim_end_matches('/').to_owned();
    }

    /// A cookie's value from the jar.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.jar
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Drops a cookie from the jar (a client that does not keep it).
    pub fn forget_cookie(&mut self, name: &str) {
        self.jar.retain(|(n, _)| n != name);
    }

    /// Puts a cookie in the jar, replacing one of that name.
    pub fn set_cookie(&mut self, name: &str, value: &str) {
        self.forget_cookie(name);
        self.jar.push((name.to_owned(), value.to_owned()));
    }

    /// The KBS session id (`kbs-session-id` cookie), if any.
    pub fn session_id(&self) -> Option<&str> {
        self.cookie(crate::kbs::SESSION_COOKIE)
    }

    /// The replicas that answered, in order.
    pub fn replicas(&self) -> Vec<Option<String>> {
        self.log.iter().map(|e| e.replica.clone()).collect()
    }

    /// `POST /kbs/v0/auth`: starts a session, keeps the nonce.
    pub async fn auth(&mut self) -> Result<(), ClientError> {
        let body = json!({ "version": PROTOCOL_VERSION, "tee": "sample", "extra-params": {} });
        let v = self
            .call("auth", Method::POST, "/kbs/v0/auth", Some(body))
            .await?;
        let v: Value =
            serde_json::from_slice(&v).map_err(|_| ClientError::Malformed("auth body"))?;
        let nonce = v
            .get("nonce")
            .and_then(Value::as_str)
            .ok_or(ClientError::Malformed("no nonce"))?;
        self.nonce = Some(nonce.to_owned());
        Ok(())
    }

    /// `POST /kbs/v0/attest` with sample evidence for the current nonce; keeps the token.
    pub async fn attest(&mut self) -> Result<(), ClientError> {
        let body = json!({
            "runtime-data": {
                "nonce": self.nonce.clone().unwrap_or_default(),
                "tee-pubkey": { "kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "sim", "y": "sim" },
            },
            "tee-evidence": { "svn": "1", "report_data": "sim" },
        });
        let v = self
            .call("attest", Method::POST, "/kbs/v0/attest", Some(body))
            .await?;
        let v: Value =
            serde_json::from_slice(&v).map_err(|_| ClientError::Malformed("attest body"))?;
        let token = v
            .get("token")
            .and_then(Value::as_str)
            .ok_or(ClientError::Malformed("no token"))?;
        self.token = Some(token.to_owned());
        Ok(())
    }

    /// `auth` then `attest`.
    pub async fn handshake(&mut self) -> Result<(), ClientError> {
        self.auth().await?;
        self.attest().await
    }

    /// One `GET /kbs/v0/resource/<path>`: the decoded resource.
    pub async fn fetch_resource(&mut self, path: &str) -> Result<Bytes, ClientError> {
        let uri = format!("/kbs/v0/resource/{path}");
        let body = self.call("resource", Method::GET, &uri, None).await?;
        let v: Value =
            serde_json::from_slice(&body).map_err(|_| ClientError::Malformed("resource body"))?;
        let ct = v
            .get("ciphertext")
            .and_then(Value::as_str)
            .ok_or(ClientError::Malformed("no ciphertext"))?;
        URL_SAFE_NO_PAD
            .decode(ct)
            .map(Bytes::from)
            .map_err(|_| ClientError::Malformed("ciphertext"))
    }

    /// get-resource as the real client does it: GET; on a 401, redo the handshake and GET again,
    /// at most [`GET_RESOURCE_MAX_ATTEMPTS`] GETs in all. A failed handshake is fatal.
    pub async fn get_resource(&mut self, path: &str) -> Result<Bytes, ClientError> {
        let mut last = None;
        for _ in 0..GET_RESOURCE_MAX_ATTEMPTS {
            match self.fetch_resource(path).await {
                Ok(bytes) => return Ok(bytes),
                Err(e) if e.status() == Some(StatusCode::UNAUTHORIZED) => {
                    self.handshake().await?;
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(ClientError::Malformed("no attempt made")))
    }

    async fn call(
        &mut self,
        step: &'static str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Bytes, ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if !self.jar.is_empty() {
            let cookies: Vec<String> = self.jar.iter().map(|(n, v)| format!("{n}={v}")).collect();
            req = req.header(COOKIE, cookies.join("; "));
        }
        if step == "resource" && self.use_token {
            if let Some(t) = &self.token {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
        }
        let body = match body {
            Some(v) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req
            .body(body)
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| ClientError::Http(format!("{e:?}")))?;
        let status = resp.status();
        let replica = resp
            .headers()
            .get(REPLICA_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        for sc in resp.headers().get_all(SET_COOKIE) {
            if let Some(c) = sc
                .to_str()
                .ok()
                .and_then(|s| cookie::Cookie::parse(s.to_owned()).ok())
            {
                self.set_cookie(c.name(), c.value());
            }
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        self.log.push(Exchange {
            step,
            status,
            replica,
        });
        if status.is_success() {
            return Ok(body);
        }
        let parsed: Option<(String, String)> =
            serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
                let t = v.get("type")?.as_str()?;
                let d = v.get("detail")?.as_str()?;
                Some((
                    t.strip_prefix(ERROR_TYPE_PREFIX).unwrap_or(t).to_owned(),
                    d.to_owned(),
                ))
            });
        match parsed {
            Some((error_type, detail)) => Err(ClientError::Kbs {
                status,
                error_type,
                detail,
            }),
            None => Err(ClientError::NotKbsJson { status }),
        }
    }
}
