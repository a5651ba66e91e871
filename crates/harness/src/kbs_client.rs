//! A KBS client that behaves like the real one (`kbs_protocol` in guest-components) where the
//! proxy is concerned: a cookie store that sends back every cookie it was given (the KBS's
//! `kbs-session-id` and the proxy's route cookie alike), the RCAR handshake, the get-resource
//! retry rule, and a hard failure on any error body that is not the KBS JSON shape.
//!
//! Used by the demo, the tests and the load generator, against the simulated KBS.

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, SET_COOKIE};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::sim::REPLICA_HEADER;
use kbs_proxy::kbs::{ERROR_TYPE_PREFIX, PROTOCOL_VERSION};

/// How many resource GETs the real client makes at most before giving up.
pub(crate) const GET_RESOURCE_MAX_ATTEMPTS: usize = 3;

/// The hash algorithms the real client offers in `auth` (`supported-hash-algorithms`).
const SUPPORTED_HASH_ALGORITHMS: [&str; 3] = ["sha256", "sha384", "sha512"];

/// The TEE public key sent in `attest`, shaped as the real client's default key (EC P-256 for
/// `ECDH-ES+A256KW`, coordinates base64url without padding).
///
/// The point is the P-256 base point (the key whose private half is 1): a valid curve point, so
/// a real KBS can wrap a resource key to it, without pulling an EC library in for a client that
/// never decrypts. Its secrecy does not matter to a load or routing test.
const TEE_PUBKEY_X: [u8; 32] = [
    0x6b, 0x17, 0xd1, 0xf2, 0xe1, 0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4, 0x40, 0xf2, 0x77, 0x03, 0x7d,
    0x81, 0x2d, 0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45, 0xd8, 0x98, 0xc2, 0x96,
];
const TEE_PUBKEY_Y: [u8; 32] = [
    0x4f, 0xe3, 0x42, 0xe2, 0xfe, 0x1a, 0x7f, 0x9b, 0x8e, 0xe7, 0xeb, 0x4a, 0x7c, 0x0f, 0x9e, 0x16, 0x2b, 0xce, 0x33,
    0x57, 0x6b, 0x31, 0x5e, 0xce, 0xcb, 0xb6, 0x40, 0x68, 0x37, 0xbf, 0x51, 0xf5,
];

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
    /// The report-data hash the KBS selected in the `auth` answer (`selected-hash-algorithm`);
    /// `None` means the protocol default, SHA-384.
    hash_algorithm: Option<String>,
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
        // Small requests, answered at once: Nagle would only add delay (and skew latencies).
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new()).http2_only(h2).build(connector);
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
            jar: Vec::new(),
            nonce: None,
            hash_algorithm: None,
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

    /// Forgets the session: cookie jar, nonce, token and log, as a new attester would start; the
    /// connection pool is kept, so a load generator can run session after session on one
    /// keep-alive connection.
    pub fn reset_session(&mut self) {
        self.jar.clear();
        self.nonce = None;
        self.hash_algorithm = None;
        self.token = None;
        self.log.clear();
    }

    /// A cookie's value from the jar.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.jar.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
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
        self.cookie(kbs_proxy::kbs::SESSION_COOKIE)
    }

    /// The replicas that answered, in order.
    pub fn replicas(&self) -> Vec<Option<String>> {
        self.log.iter().map(|e| e.replica.clone()).collect()
    }

    /// `POST /kbs/v0/auth`: starts a session, keeps the nonce.
    pub async fn auth(&mut self) -> Result<(), ClientError> {
        let body = json!({
            "version": PROTOCOL_VERSION,
            "tee": "sample",
            "extra-params": { "supported-hash-algorithms": SUPPORTED_HASH_ALGORITHMS },
        });
        let v = self.call("auth", Method::POST, "/kbs/v0/auth", Some(body)).await?;
        let v: Value = serde_json::from_slice(&v).map_err(|_| ClientError::Malformed("auth body"))?;
        let nonce = v
            .get("nonce")
            .and_then(Value::as_str)
            .ok_or(ClientError::Malformed("no nonce"))?;
        self.nonce = Some(nonce.to_owned());
        // `extra-params` is "" when the KBS selects nothing: then the default hash applies.
        self.hash_algorithm = v
            .pointer("/extra-params/selected-hash-algorithm")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase);
        Ok(())
    }

    /// `POST /kbs/v0/attest` with the evidence of the `sample` attester for the current nonce,
    /// shaped as the real client sends it (see [`sample_attestation`]); keeps the token.
    pub async fn attest(&mut self) -> Result<(), ClientError> {
        let nonce = self.nonce.clone().unwrap_or_default();
        let body = sample_attestation(&nonce, self.hash_algorithm.as_deref())
            .ok_or(ClientError::Malformed("unsupported selected-hash-algorithm"))?;
        let v = self.call("attest", Method::POST, "/kbs/v0/attest", Some(body)).await?;
        let v: Value = serde_json::from_slice(&v).map_err(|_| ClientError::Malformed("attest body"))?;
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
        let v: Value = serde_json::from_slice(&body).map_err(|_| ClientError::Malformed("resource body"))?;
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
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.base));
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
        let req = req.body(body).map_err(|e| ClientError::Http(e.to_string()))?;
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
            if let Some(c) = sc.to_str().ok().and_then(|s| cookie::Cookie::parse(s.to_owned()).ok()) {
                self.set_cookie(c.name(), c.value());
            }
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        self.log.push(Exchange { step, status, replica });
        if status.is_success() {
            return Ok(body);
        }
        let parsed: Option<(String, String)> = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
            let t = v.get("type")?.as_str()?;
            let d = v.get("detail")?.as_str()?;
            Some((t.strip_prefix(ERROR_TYPE_PREFIX).unwrap_or(t).to_owned(), d.to_owned()))
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

/// The `attest` request body of the real client (`kbs_protocol`'s RCAR handshake) with the
/// `sample` attester of guest-components, for `nonce`; `None` for a hash it does not know.
///
/// The shape is kbs-types' `Attestation` (kebab-case keys): `init-data` (none), `runtime-data`
/// `{nonce, tee-pubkey}`, and `tee-evidence`, a composite evidence whose primary evidence is the
/// sample quote `{"svn":"1","report_data":<base64>}`. The report data binds the evidence to the
/// session: the selected hash (SHA-384 by default) of the canonical JSON (sorted keys, no
/// spaces) of `{"additional-evidence":"","nonce":...,"tee-pubkey":...}`.
pub(crate) fn sample_attestation(nonce: &str, hash_algorithm: Option<&str>) -> Option<Value> {
    let tee_pubkey = json!({
        "kty": "EC",
        "crv": "P-256",
        "alg": "ECDH-ES+A256KW",
        "x": URL_SAFE_NO_PAD.encode(TEE_PUBKEY_X),
        "y": URL_SAFE_NO_PAD.encode(TEE_PUBKEY_Y),
    });
    // serde_json's map keeps keys sorted (no `preserve_order`), and `to_string` adds no spaces:
    // for these ASCII keys that is the JCS canonical form the real client hashes.
    let bound = json!({
        "additional-evidence": "",
        "nonce": nonce,
        "tee-pubkey": tee_pubkey,
    })
    .to_string();
    let report_data = match hash_algorithm.unwrap_or("sha384") {
        "sha256" => Sha256::digest(bound.as_bytes()).to_vec(),
        "sha384" => Sha384::digest(bound.as_bytes()).to_vec(),
        "sha512" => Sha512::digest(bound.as_bytes()).to_vec(),
        _ => return None,
    };
    Some(json!({
        "init-data": null,
        "runtime-data": { "nonce": nonce, "tee-pubkey": tee_pubkey },
        "tee-evidence": {
            "primary_evidence": { "svn": "1", "report_data": STANDARD.encode(report_data) },
            "additional_evidence": "",
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_evidence_binds_the_nonce_and_key_as_the_real_client_does() {
        let body = sample_attestation("bm9uY2U=", None).unwrap();
        assert_eq!(body["runtime-data"]["nonce"], "bm9uY2U=");
        assert!(body["init-data"].is_null());
        let key = &body["runtime-data"]["tee-pubkey"];
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
        assert_eq!(key["alg"], "ECDH-ES+A256KW");
        assert_eq!(key["x"].as_str().unwrap().len(), 43, "32 bytes, base64url, no padding");
        let evidence = &body["tee-evidence"];
        assert_eq!(evidence["additional_evidence"], "");
        assert_eq!(evidence["primary_evidence"]["svn"], "1");
        // The canonical JSON, written out by hand: sorted keys at every level, no spaces.
        let canonical = format!(
            r#"{{"additional-evidence":"","nonce":"bm9uY2U=","tee-pubkey":{{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC","x":"{}","y":"{}"}}}}"#,
            key["x"].as_str().unwrap(),
            key["y"].as_str().unwrap()
        );
        let want = STANDARD.encode(Sha384::digest(canonical.as_bytes()));
        assert_eq!(evidence["primary_evidence"]["report_data"], want.as_str());
        // 48 bytes of SHA-384 → 64 base64 characters.
        assert_eq!(want.len(), 64);
    }

    #[test]
    fn the_selected_hash_changes_the_report_data_length() {
        let rd = |h| {
            let b = sample_attestation("n", Some(h)).unwrap();
            let s = b["tee-evidence"]["primary_evidence"]["report_data"]
                .as_str()
                .unwrap()
                .to_owned();
            STANDARD.decode(s).unwrap().len()
        };
        assert_eq!((rd("sha256"), rd("sha384"), rd("sha512")), (32, 48, 64));
        assert!(sample_attestation("n", Some("md5")).is_none());
    }
}
