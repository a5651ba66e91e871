//! Configuration: [`Settings`] is one layer of raw values (a TOML file, the command line, the
//! environment), [`Settings::merge`] stacks layers, and [`Settings::validate`] turns the result
//! into a [`Config`] or one [`ConfigError`] that names the key. Nothing binds while configuring.
//!
//! Every command-line flag `--foo-bar` has the config-file key `foo-bar`. Precedence, highest
//! first: flags, then the environment (`KBS_AFFINITY_PROXY_COOKIE_SECRET` only), then the file,
//! then the defaults below.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;
use serde::Deserialize;

use crate::routing::balance::Policy;
use crate::routing::route_cookie::{CookieSecret, MIN_SECRET_LEN};

/// The environment variable that may hold the cookie secret.
pub const SECRET_ENV: &str = "KBS_AFFINITY_PROXY_COOKIE_SECRET";

/// Defaults, in one place so the README and `--help` can quote them.
pub mod defaults {
    /// `--listen`.
    pub(crate) const LISTEN: &str = "0.0.0.0:8080";
    /// `--cookie-name`.
    pub(crate) const COOKIE_NAME: &str = "route";
    /// `--cookie-max-age`, seconds: two days, as the ingress-nginx annotation examples use.
    pub(crate) const COOKIE_MAX_AGE: u64 = 172_800;
    /// `--cookie-path`.
    pub(crate) const COOKIE_PATH: &str = "/";
    /// `--backend-connect-timeout`, seconds.
    pub(crate) const CONNECT_TIMEOUT: u64 = 5;
    /// `--backend-response-timeout`, seconds: attestation can take a while on a loaded verifier.
    pub(crate) const RESPONSE_TIMEOUT: u64 = 60;
    /// `--auth-body-limit`, bytes: `auth` bodies are buffered so they can be re-sent elsewhere.
    pub(crate) const AUTH_BODY_LIMIT: usize = 64 * 1024;
    /// `--shutdown-grace`, seconds.
    pub(crate) const SHUTDOWN_GRACE: u64 = 10;
    /// `--drain-timeout`, seconds: the KBS's default session lifetime.
    pub(crate) const DRAIN_TIMEOUT: u64 = 300;
    /// `--backend-dns-interval`, seconds.
    pub(crate) const DNS_INTERVAL: u64 = 10;
    /// `--health-check-interval`, seconds.
    pub(crate) const HEALTH_INTERVAL: u64 = 5;
    /// `--health-check-timeout`, seconds.
    pub(crate) const HEALTH_TIMEOUT: u64 = 2;
    /// `--health-check-path`.
    pub(crate) const HEALTH_PATH: &str = "/healthz";
    /// `--health-fall`: consecutive failed checks that mark a backend down.
    pub(crate) const HEALTH_FALL: u32 = 3;
    /// `--health-rise`: consecutive good checks that mark it up again.
    pub(crate) const HEALTH_RISE: u32 = 2;
    /// `--admin-write-routes`: the admin writes broadcast to every replica.
    pub(crate) const ADMIN_WRITE_ROUTES: [&str; 5] = [
        "POST /kbs/v0/resource/",
        "DELETE /kbs/v0/resource/",
        "POST /kbs/v0/resource-policy",
        "POST /kbs/v0/attestation-policy",
        "POST /kbs/v0/reference-value",
    ];
    /// `--client-idle-timeout`, seconds.
    pub(crate) const CLIENT_IDLE_TIMEOUT: u64 = 60;
    /// `--max-connections`.
    pub(crate) const MAX_CONNECTIONS: usize = 10_000;
    /// `--max-header-bytes`: request line plus headers.
    pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;
    /// `--admin-body-limit`, bytes.
    pub(crate) const ADMIN_BODY_LIMIT: usize = 8 * 1024 * 1024;
    /// `--admin-journal-max`: writes kept in the journal.
    pub(crate) const ADMIN_JOURNAL_MAX: usize = 10_000;
    /// `--admin-reconcile-interval`, seconds: how often the whole compacted journal is re-applied
    /// to every replica, the floor under the detection of a replica that lost its state. Short
    /// enough that an undetected empty restart is repaired within half a minute; with a journal
    /// of 1,000 writes it sends ~33 small idempotent writes per second to each replica.
    pub(crate) const ADMIN_RECONCILE_INTERVAL: u64 = 30;
    /// `--session-table-size`: learned session ids and tokens kept.
    pub(crate) const SESSION_TABLE_SIZE: usize = 100_000;
    /// `--session-lifetime`, seconds: the KBS's default `[attestation_service] timeout`.
    pub(crate) const SESSION_LIFETIME: u64 = 300;
}

/// One layer of raw settings. Field names are the config-file keys (kebab-case).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Settings {
    /// `listen`: address to accept clients on.
    pub listen: Option<String>,
    /// `backend`: `URL` or `NAME=URL`, repeated.
    #[serde(alias = "backends")]
    pub backend: Option<Vec<String>>,
    /// `cookie-name`.
    pub cookie_name: Option<String>,
    /// `cookie-max-age`, seconds.
    pub cookie_max_age: Option<u64>,
    /// `cookie-secret-file`: file holding the signing secret.
    pub cookie_secret_file: Option<PathBuf>,
    /// `cookie-secret`: the secret itself (config file or environment only, never a flag).
    pub cookie_secret: Option<String>,
    /// `cookie-path`.
    pub cookie_path: Option<String>,
    /// `cookie-domain`.
    pub cookie_domain: Option<String>,
    /// `cookie-same-site`: `strict`, `lax` or `none`.
    pub cookie_same_site: Option<String>,
    /// `balance`: `round-robin` or `least-requests`.
    pub balance: Option<String>,
    /// `log-format`: `text` or `json`.
    pub log_format: Option<String>,
    /// `backend-connect-timeout`: `5s`, `500ms`, or a number of seconds.
    #[serde(default, deserialize_with = "text_or_number")]
    pub backend_connect_timeout: Option<String>,
    /// `backend-response-timeout`: time to the response head.
    #[serde(default, deserialize_with = "text_or_number")]
    pub backend_response_timeout: Option<String>,
    /// `auth-body-limit`, bytes.
    pub auth_body_limit: Option<usize>,
    /// `workers`: serving threads, each with its own single-threaded runtime.
    pub workers: Option<usize>,
    /// `shutdown-grace`: how long in-flight requests may finish after SIGTERM/SIGINT.
    #[serde(default, deserialize_with = "text_or_number")]
    pub shutdown_grace: Option<String>,
    /// `backend-dns`: `[https://]HOST:PORT` resolved to one backend per address, repeated.
    pub backend_dns: Option<Vec<String>>,
    /// `backend-dns-interval`: how often DNS sources are re-resolved.
    #[serde(default, deserialize_with = "text_or_number")]
    pub backend_dns_interval: Option<String>,
    /// `drain-timeout`: how long a drained backend keeps serving its pinned sessions.
    #[serde(default, deserialize_with = "text_or_number")]
    pub drain_timeout: Option<String>,
    /// `tls-cert`: PEM certificate chain for client-facing TLS.
    pub tls_cert: Option<PathBuf>,
    /// `tls-key`: PEM private key for `tls-cert`.
    pub tls_key: Option<PathBuf>,
    /// `backend-ca`: PEM CA certificates trusted for `https://` backends (instead of the system's).
    pub backend_ca: Option<PathBuf>,
    /// `backend-client-cert`: PEM client certificate chain for mTLS to backends.
    pub backend_client_cert: Option<PathBuf>,
    /// `backend-client-key`: PEM key for `backend-client-cert`.
    pub backend_client_key: Option<PathBuf>,
    /// `backend-insecure-skip-verify`: accept any backend certificate (testing only).
    pub backend_insecure_skip_verify: Option<bool>,
    /// `health-check`: `tcp`, `http` or `off`.
    pub health_check: Option<String>,
    /// `health-check-path`: path of the HTTP check.
    pub health_check_path: Option<String>,
    /// `health-check-interval`.
    #[serde(default, deserialize_with = "text_or_number")]
    pub health_check_interval: Option<String>,
    /// `health-check-timeout`.
    #[serde(default, deserialize_with = "text_or_number")]
    pub health_check_timeout: Option<String>,
    /// `health-fall`: consecutive failures to mark a backend down.
    pub health_fall: Option<u32>,
    /// `health-rise`: consecutive successes to mark it up.
    pub health_rise: Option<u32>,
    /// `admin-listen`: address of the admin port (off when unset).
    pub admin_listen: Option<String>,
    /// `admin-token-file`: bearer token allowing admin writes from other than loopback.
    pub admin_token_file: Option<PathBuf>,
    /// `access-log`: `on` or `off`.
    #[serde(default, deserialize_with = "text_or_bool")]
    pub access_log: Option<String>,
    /// `admin-writes`: `broadcast` (every replica gets each admin write) or `passthrough`.
    pub admin_writes: Option<String>,
    /// `admin-write-routes`: `METHOD /path-prefix` of the writes to broadcast.
    pub admin_write_routes: Option<Vec<String>>,
    /// `admin-body-limit`: largest admin write body, bytes (buffered to send it to every replica).
    pub admin_body_limit: Option<usize>,
    /// `admin-journal`: directory keeping the admin journal across restarts.
    pub admin_journal: Option<PathBuf>,
    /// `admin-journal-max`: writes kept in the journal.
    pub admin_journal_max: Option<usize>,
    /// `admin-reconcile-interval`: how often the compacted journal is re-applied to every replica.
    #[serde(default, deserialize_with = "text_or_number")]
    pub admin_reconcile_interval: Option<String>,
    /// `admin-replay-token-file`: the proxy's own KBS admin bearer token for replays, re-read at
    /// each use (a rotating projected service-account token works).
    pub admin_replay_token_file: Option<PathBuf>,
    /// `journal-owner`: URL of the journal owner's admin port; this proxy forwards admin writes
    /// there and takes the replicas' sync state from it.
    pub journal_owner: Option<String>,
    /// `replica-watch`: `on` (scrape each replica's `/metrics` every second over a kept-alive
    /// connection to see a restart) or `off`.
    #[serde(default, deserialize_with = "text_or_bool")]
    pub replica_watch: Option<String>,
    /// `session-table-size`: learned `kbs-session-id`s and tokens kept.
    pub session_table_size: Option<usize>,
    /// `session-lifetime`: how long a learned session id is kept at most.
    #[serde(default, deserialize_with = "text_or_number")]
    pub session_lifetime: Option<String>,
    /// `tokens-portable`: replicas share a token signer, so bearer requests may go anywhere.
    pub tokens_portable: Option<bool>,
    /// `client-idle-timeout`: time a client gets to send a request head, idle keep-alive included.
    #[serde(default, deserialize_with = "text_or_number")]
    pub client_idle_timeout: Option<String>,
    /// `max-connections`: client connections open at once; more wait in the listen backlog.
    pub max_connections: Option<usize>,
    /// `max-header-bytes`: largest request head (HTTP/1.1) or header list (HTTP/2).
    pub max_header_bytes: Option<usize>,
    /// `fast-path`: `on` (plain HTTP/1.1 on the proxy's own fast path) or `off` (hyper for all).
    #[serde(default, deserialize_with = "text_or_bool")]
    pub fast_path: Option<String>,
    /// `backend-protocol`: `http1` (pooled HTTP/1.1 connections) or `http2` (one multiplexed
    /// HTTP/2 connection per backend and worker: prior knowledge over TCP, ALPN `h2` over TLS).
    pub backend_protocol: Option<String>,
}

/// Durations in the file may be strings (`"5s"`) or numbers of seconds (`5`).
fn text_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Seconds(u64),
    }
    Ok(Option::<Raw>::deserialize(d)?.map(|r| match r {
        Raw::Text(t) => t,
        Raw::Seconds(n) => n.to_string(),
    }))
}

/// Switches in the file may be strings (`"on"`) or booleans (`true`).
fn text_or_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Switch(bool),
    }
    Ok(Option::<Raw>::deserialize(d)?.map(|r| match r {
        Raw::Text(t) => t,
        Raw::Switch(b) => if b { "on" } else { "off" }.to_owned(),
    }))
}

/// A configuration problem, naming the key. The binary prints it and exits 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("invalid value {value:?} for `{key}`: {reason}")]
    Invalid {
        /// The flag / config key.
        key: &'static str,
        /// What was given (never a secret).
        value: String,
        /// What was expected.
        reason: String,
    },
    /// A required value that nobody gave.
    #[error("missing `{key}`: {reason}")]
    Missing {
        /// The flag / config key.
        key: &'static str,
        /// What to do about it.
        reason: &'static str,
    },
    /// A file named by a key that cannot be read.
    #[error("cannot read `{key}` file {path}: {source}")]
    Read {
        /// The flag / config key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key; toml's message names the key.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// toml's message, one line.
        message: String,
    },
}

fn invalid(key: &'static str, value: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.into(),
        reason: reason.into(),
    }
}

/// `SameSite` attribute of the route cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    /// `SameSite=Strict`.
    Strict,
    /// `SameSite=Lax`.
    Lax,
    /// `SameSite=None`.
    None,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A backend as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Stable name; route cookies name the backend by a hash of it.
    pub name: String,
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host:port`.
    pub authority: Authority,
    /// For `https`: the name the backend's certificate must carry (sent as SNI).
    pub tls_name: String,
}

/// A DNS name whose addresses are the backends (a Kubernetes headless Service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSource {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// The name to resolve.
    pub host: String,
    /// The port of every address.
    pub port: u16,
}

/// Active health checking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthMode {
    /// No active checks; passive ones still apply.
    Off,
    /// A TCP connect (KBS releases without `/healthz`).
    Tcp,
    /// `GET <path>` answered 2xx (Trustee v0.12 and later answer `/healthz`).
    Http(String),
}

/// Active health check settings.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// What a check does.
    pub mode: HealthMode,
    /// Time between checks of one backend.
    pub interval: Duration,
    /// Limit on one check.
    pub timeout: Duration,
    /// Consecutive failures that mark a backend down.
    pub fall: u32,
    /// Consecutive successes that mark it up.
    pub rise: u32,
}

/// Client-facing TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// How the proxy talks TLS to `https://` backends.
#[derive(Debug, Clone, Default)]
pub struct BackendTls {
    /// Extra trusted CA file; the system's roots are not used when given.
    pub ca: Option<PathBuf>,
    /// Client certificate and key for mTLS.
    pub client_auth: Option<TlsFiles>,
    /// Accept any certificate.
    pub insecure_skip_verify: bool,
}

/// Admin writes sent to every replica (`--admin-writes broadcast`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminFanout {
    /// Which requests are admin writes: method and path prefix.
    pub routes: Vec<(http::Method, String)>,
    /// Largest body buffered; larger gets 413.
    pub body_limit: usize,
}

impl AdminFanout {
    /// Whether `method path` is an admin write to broadcast.
    pub fn matches(&self, method: &http::Method, path: &str) -> bool {
        self.routes
            .iter()
            .any(|(m, prefix)| m == method && path.starts_with(prefix.as_str()))
    }
}

/// The admin port.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Bearer token allowing writes from other than loopback.
    pub token: Option<AdminToken>,
}

/// The admin bearer token. Its `Debug` prints nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub String);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Route cookie settings.
#[derive(Debug, Clone)]
pub struct CookieConfig {
    /// Cookie name (`route`).
    pub name: String,
    /// Lifetime in seconds: `Max-Age`, and the age past which a presented cookie is refused.
    pub max_age: u64,
    /// `Path` attribute.
    pub path: String,
    /// `Domain` attribute, if any.
    pub domain: Option<String>,
    /// `SameSite` attribute, if any.
    pub same_site: Option<SameSite>,
    /// Signing keys: the first signs, all verify (rotation).
    pub secrets: Vec<CookieSecret>,
    /// True when no secret was configured and one was generated: proxy replicas will disagree.
    pub secret_generated: bool,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// The replicas, in order; at least one.
    pub backends: Vec<BackendSpec>,
    /// The route cookie.
    pub cookie: CookieConfig,
    /// How unpinned requests are spread.
    pub balance: Policy,
    /// Log format.
    pub log_format: LogFormat,
    /// Limit on establishing a backend connection.
    pub connect_timeout: Duration,
    /// Limit on waiting for a backend's response head.
    pub response_timeout: Duration,
    /// Largest `auth` body buffered for a possible re-send; larger gets 413.
    pub auth_body_limit: usize,
    /// Serving threads.
    pub workers: usize,
    /// Time in-flight requests get to finish on shutdown.
    pub shutdown_grace: Duration,
    /// DNS names whose addresses are backends.
    pub backend_dns: Vec<DnsSource>,
    /// How often DNS sources are re-resolved.
    pub dns_interval: Duration,
    /// How long a drained backend keeps serving its pinned sessions.
    pub drain_timeout: Duration,
    /// Client-facing TLS, when configured.
    pub tls: Option<TlsFiles>,
    /// TLS to `https://` backends.
    pub backend_tls: BackendTls,
    /// Active health checks.
    pub health: HealthConfig,
    /// The admin port, when configured.
    pub admin: Option<AdminConfig>,
    /// One log line per request.
    pub access_log: bool,
    /// Admin writes broadcast to every replica; `None` in passthrough mode.
    pub admin_fanout: Option<AdminFanout>,
    /// Where the admin journal is kept (in memory only when unset).
    pub admin_journal: Option<PathBuf>,
    /// Writes kept in the admin journal.
    pub admin_journal_max: usize,
    /// How often the compacted journal is re-applied to every replica.
    pub admin_reconcile_interval: Duration,
    /// The proxy's own KBS admin token for replays, re-read at each use; when set, clients'
    /// `Authorization` headers are not journaled.
    pub admin_replay_token_file: Option<PathBuf>,
    /// The journal owner's admin port, when this proxy is not the owner.
    pub journal_owner: Option<Uri>,
    /// Each replica watched every second for signs of a restart.
    pub replica_watch: bool,
    /// Learned session ids and tokens kept.
    pub session_table_size: usize,
    /// How long a learned session id is kept at most.
    pub session_lifetime: Duration,
    /// Replicas share a token signer: bearer requests are balanced freely.
    pub tokens_portable: bool,
    /// Client limits.
    pub limits: ClientLimits,
    /// Plain HTTP/1.1 on the fast path (off whenever `backend_http2` is on).
    pub fast_path: bool,
    /// HTTP/2 to the backends instead of pooled HTTP/1.1.
    pub backend_http2: bool,
}

/// Limits on what clients may hold or send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Time to send a request head; an idle keep-alive connection is closed after it too.
    pub idle_timeout: Duration,
    /// Client connections open at once, over all workers.
    pub max_connections: usize,
    /// Largest request head (HTTP/1.1) or header list (HTTP/2), bytes.
    pub max_header_bytes: usize,
}

impl Settings {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            key: "config",
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            message: e.to_string().replace('\n', " ").trim().to_owned(),
        })
    }

    /// Stacks `over` on top of `self`: every value `over` sets wins.
    pub fn merge(mut self, over: Settings) -> Settings {
        // The two secret sources are one setting: a layer naming either replaces both below it.
        if over.cookie_secret_file.is_some() || over.cookie_secret.is_some() {
            self.cookie_secret_file = None;
            self.cookie_secret = None;
        }
        macro_rules! pick {
            ($($f:ident),*) => { Settings { $($f: over.$f.or(self.$f)),* } };
        }
        pick!(
            listen,
            backend,
            cookie_name,
            cookie_max_age,
            cookie_secret_file,
            cookie_secret,
            cookie_path,
            cookie_domain,
            cookie_same_site,
            balance,
            log_format,
            backend_connect_timeout,
            backend_response_timeout,
            auth_body_limit,
            workers,
            shutdown_grace,
            backend_dns,
            backend_dns_interval,
            drain_timeout,
            tls_cert,
            tls_key,
            backend_ca,
            backend_client_cert,
            backend_client_key,
            backend_insecure_skip_verify,
            health_check,
            health_check_path,
            health_check_interval,
            health_check_timeout,
            health_fall,
            health_rise,
            admin_listen,
            admin_token_file,
            access_log,
            admin_writes,
            admin_write_routes,
            admin_body_limit,
            admin_journal,
            admin_journal_max,
            admin_reconcile_interval,
            admin_replay_token_file,
            journal_owner,
            replica_watch,
            session_table_size,
            session_lifetime,
            tokens_portable,
            client_idle_timeout,
            max_connections,
            max_header_bytes,
            fast_path,
            backend_protocol
        )
    }

    /// Validates every value and builds the [`Config`]; reads the secret file if one is named.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen_text = self.listen.as_deref().unwrap_or(defaults::LISTEN);
        let listen = listen_text
            .parse()
            .map_err(|_| invalid("listen", listen_text, "expected IP:PORT, e.g. 0.0.0.0:8080"))?;

        let backend_dns = self
            .backend_dns
            .unwrap_or_default()
            .iter()
            .map(|d| parse_dns_source(d))
            .collect::<Result<Vec<_>, _>>()?;
        let backends = parse_backends(self.backend.unwrap_or_default(), !backend_dns.is_empty())?;

        let name = self.cookie_name.unwrap_or_else(|| defaults::COOKIE_NAME.into());
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(invalid(
                "cookie-name",
                name,
                "expected an RFC 6265 token (letters, digits, -_.)",
            ));
        }
        if name == crate::kbs::SESSION_COOKIE {
            return Err(invalid("cookie-name", name, "that is the KBS's own session cookie"));
        }
        let max_age = self.cookie_max_age.unwrap_or(defaults::COOKIE_MAX_AGE);
        if max_age == 0 || max_age > u64::from(u32::MAX) {
            return Err(invalid(
                "cookie-max-age",
                max_age.to_string(),
                "expected 1 to 4294967295 seconds",
            ));
        }
        let path = self.cookie_path.unwrap_or_else(|| defaults::COOKIE_PATH.into());
        if !path.starts_with('/') || !path.bytes().all(is_attr_byte) {
            return Err(invalid(
                "cookie-path",
                path,
                "expected an absolute path without ';' or controls",
            ));
        }
        if let Some(d) = &self.cookie_domain {
            if d.is_empty() || !d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
                return Err(invalid("cookie-domain", d.as_str(), "expected a domain name"));
            }
        }
        let same_site = self
            .cookie_same_site
            .map(|s| match s.to_ascii_lowercase().as_str() {
                "strict" => Ok(SameSite::Strict),
                "lax" => Ok(SameSite::Lax),
                "none" => Ok(SameSite::None),
                _ => Err(invalid("cookie-same-site", s, "expected strict, lax or none")),
            })
            .transpose()?;
        let (secrets, secret_generated) = load_secrets(self.cookie_secret_file, self.cookie_secret)?;

        let balance = match self.balance.as_deref().unwrap_or("round-robin") {
            "round-robin" => Policy::RoundRobin,
            "least-requests" => Policy::LeastRequests,
            other => return Err(invalid("balance", other, "expected round-robin or least-requests")),
        };
        let log_format = match self.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("log-format", other, "expected text or json")),
        };
        let connect_timeout = duration(
            "backend-connect-timeout",
            self.backend_connect_timeout,
            defaults::CONNECT_TIMEOUT,
        )?;
        let response_timeout = duration(
            "backend-response-timeout",
            self.backend_response_timeout,
            defaults::RESPONSE_TIMEOUT,
        )?;
        let shutdown_grace = duration("shutdown-grace", self.shutdown_grace, defaults::SHUTDOWN_GRACE)?;
        let auth_body_limit = self.auth_body_limit.unwrap_or(defaults::AUTH_BODY_LIMIT);
        if auth_body_limit == 0 {
            return Err(invalid("auth-body-limit", "0", "expected a positive number of bytes"));
        }
        let dns_interval = duration(
            "backend-dns-interval",
            self.backend_dns_interval,
            defaults::DNS_INTERVAL,
        )?;
        let drain_timeout = duration("drain-timeout", self.drain_timeout, defaults::DRAIN_TIMEOUT)?;
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => {
                let files = TlsFiles { cert, key };
                crate::tls::server_config(&files)
                    .map_err(|e| invalid("tls-cert", files.cert.display().to_string(), e.to_string()))?;
                Some(files)
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Missing {
                    key: "tls-key",
                    reason: "--tls-cert needs --tls-key",
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::Missing {
                    key: "tls-cert",
                    reason: "--tls-key needs --tls-cert",
                })
            }
        };
        let client_auth = match (self.backend_client_cert, self.backend_client_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Missing {
                    key: "backend-client-key",
                    reason: "--backend-client-cert needs a key",
                })
            }
            (None, Some(_)) => {
                return Err(ConfigError::Missing {
                    key: "backend-client-cert",
                    reason: "--backend-client-key needs a cert",
                })
            }
        };
        let backend_tls = BackendTls {
            ca: self.backend_ca,
            client_auth,
            insecure_skip_verify: self.backend_insecure_skip_verify.unwrap_or(false),
        };
        let backend_http2 = match self.backend_protocol.as_deref().unwrap_or("http1") {
            "http1" => false,
            "http2" => true,
            other => return Err(invalid("backend-protocol", other, "expected http1 or http2")),
        };
        // Only files need checking: without them the system's roots load when the proxy starts.
        let has_files = backend_tls.ca.is_some() || backend_tls.client_auth.is_some();
        if has_files {
            crate::tls::client_config(&backend_tls, backend_http2).map_err(|e| {
                let (key, value) = match &backend_tls.ca {
                    Some(ca) => ("backend-ca", ca.display().to_string()),
                    None => ("backend-client-cert", "<files>".to_owned()),
                };
                invalid(key, value, e.to_string())
            })?;
        }
        let health = health_config(
            self.health_check,
            self.health_check_path,
            self.health_check_interval,
            self.health_check_timeout,
            self.health_fall,
            self.health_rise,
        )?;
        let admin = match self.admin_listen {
            None => None,
            Some(text) => {
                let listen = text
                    .parse()
                    .map_err(|_| invalid("admin-listen", text.as_str(), "expected IP:PORT, e.g. 127.0.0.1:9090"))?;
                let token = match self.admin_token_file {
                    None => None,
                    Some(path) => {
                        let raw = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                            key: "admin-token-file",
                            path: path.clone(),
                            source,
                        })?;
                        let t = raw.trim();
                        if t.len() < MIN_SECRET_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) {
                            return Err(invalid(
                                "admin-token-file",
                                "<redacted>",
                                format!("the token must be at least {MIN_SECRET_LEN} printable characters"),
                            ));
                        }
                        Some(AdminToken(t.to_owned()))
                    }
                };
                Some(AdminConfig { listen, token })
            }
        };
        let access_log = match self.access_log.as_deref().unwrap_or("on") {
            "on" | "true" => true,
            "off" | "false" => false,
            other => return Err(invalid("access-log", other, "expected on or off")),
        };
        let admin_fanout = match self.admin_writes.as_deref().unwrap_or("broadcast") {
            "passthrough" => None,
            "broadcast" => {
                let raw: Vec<String> = self
                    .admin_write_routes
                    .unwrap_or_else(|| defaults::ADMIN_WRITE_ROUTES.iter().map(|r| r.to_string()).collect());
                let mut routes = Vec::with_capacity(raw.len());
                for r in raw {
                    let parsed = r
                        .split_once(' ')
                        .and_then(|(m, p)| Some((http::Method::from_bytes(m.as_bytes()).ok()?, p.trim().to_owned())))
                        .filter(|(_, p)| p.starts_with('/'));
                    match parsed {
                        Some(route) => routes.push(route),
                        None => return Err(invalid("admin-write-routes", r, "expected METHOD /path-prefix")),
                    }
                }
                let body_limit = self.admin_body_limit.unwrap_or(defaults::ADMIN_BODY_LIMIT);
                if body_limit == 0 {
                    return Err(invalid("admin-body-limit", "0", "expected a positive number of bytes"));
                }
                Some(AdminFanout { routes, body_limit })
            }
            other => return Err(invalid("admin-writes", other, "expected broadcast or passthrough")),
        };
        let admin_journal_max = self.admin_journal_max.unwrap_or(defaults::ADMIN_JOURNAL_MAX);
        if admin_journal_max == 0 {
            return Err(invalid(
                "admin-journal-max",
                "0",
                "expected a positive number of writes",
            ));
        }
        let admin_reconcile_interval = duration(
            "admin-reconcile-interval",
            self.admin_reconcile_interval,
            defaults::ADMIN_RECONCILE_INTERVAL,
        )?;
        if let Some(path) = &self.admin_replay_token_file {
            // Read once now so a wrong path fails at start; it is read again at each replay.
            read_replay_token(path).map_err(|e| invalid("admin-replay-token-file", path.display().to_string(), e))?;
        }
        let journal_owner = match self.journal_owner {
            None => None,
            Some(text) => {
                let uri: Uri = text
                    .parse()
                    .ok()
                    // The admin port speaks plain HTTP (keep it on the pod network, see SECURITY.md).
                    .filter(|u: &Uri| u.scheme_str() == Some("http") && u.authority().is_some())
                    .ok_or_else(|| {
                        invalid(
                            "journal-owner",
                            text.as_str(),
                            "expected the owner's admin port as http://HOST:PORT (it speaks plain HTTP)",
                        )
                    })?;
                if self.admin_journal.is_some() {
                    return Err(invalid(
                        "journal-owner",
                        text.as_str(),
                        "a proxy with admin-journal owns the journal; set journal-owner only on the others",
                    ));
                }
                Some(uri)
            }
        };
        let session_table_size = self.session_table_size.unwrap_or(defaults::SESSION_TABLE_SIZE);
        if session_table_size == 0 {
            return Err(invalid(
                "session-table-size",
                "0",
                "expected a positive number of entries",
            ));
        }
        let session_lifetime = duration("session-lifetime", self.session_lifetime, defaults::SESSION_LIFETIME)?;
        let limits = ClientLimits {
            idle_timeout: duration(
                "client-idle-timeout",
                self.client_idle_timeout,
                defaults::CLIENT_IDLE_TIMEOUT,
            )?,
            max_connections: match self.max_connections.unwrap_or(defaults::MAX_CONNECTIONS) {
                0 => return Err(invalid("max-connections", "0", "expected a positive number")),
                n => n,
            },
            max_header_bytes: match self.max_header_bytes.unwrap_or(defaults::MAX_HEADER_BYTES) {
                n @ 8192..=16_777_216 => n,
                n => return Err(invalid("max-header-bytes", n.to_string(), "expected 8192 to 16777216")),
            },
        };
        let workers = match self.workers {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(n @ 1..=1024) => n,
            Some(n) => return Err(invalid("workers", n.to_string(), "expected 1 to 1024")),
        };

        Ok(Config {
            listen,
            backends,
            cookie: CookieConfig {
                name,
                max_age,
                path,
                domain: self.cookie_domain,
                same_site,
                secrets,
                secret_generated,
            },
            balance,
            log_format,
            connect_timeout,
            response_timeout,
            auth_body_limit,
            workers,
            shutdown_grace,
            backend_dns,
            dns_interval,
            drain_timeout,
            tls,
            backend_tls,
            health,
            admin,
            access_log,
            admin_fanout,
            admin_journal: self.admin_journal,
            admin_journal_max,
            admin_reconcile_interval,
            admin_replay_token_file: self.admin_replay_token_file,
            journal_owner,
            replica_watch: match self.replica_watch.as_deref().unwrap_or("on") {
                "on" | "true" => true,
                "off" | "false" => false,
                other => return Err(invalid("replica-watch", other, "expected on or off")),
            },
            session_table_size,
            session_lifetime,
            tokens_portable: self.tokens_portable.unwrap_or(false),
            limits,
            // The fast path speaks HTTP/1.1 to the backends: with HTTP/2 to them, hyper does all.
            fast_path: match self.fast_path.as_deref().unwrap_or("on") {
                "on" | "true" => !backend_http2,
                "off" | "false" => false,
                other => return Err(invalid("fast-path", other, "expected on or off")),
            },
            backend_http2,
        })
    }
}

fn health_config(
    mode: Option<String>,
    path: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    fall: Option<u32>,
    rise: Option<u32>,
) -> Result<HealthConfig, ConfigError> {
    let path = path.unwrap_or_else(|| defaults::HEALTH_PATH.into());
    if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(invalid(
            "health-check-path",
            path,
            "expected an absolute path such as /healthz",
        ));
    }
    let mode = match mode.as_deref().unwrap_or("tcp") {
        "tcp" => HealthMode::Tcp,
        "http" => HealthMode::Http(path),
        "off" => HealthMode::Off,
        other => return Err(invalid("health-check", other, "expected tcp, http or off")),
    };
    let count = |key: &'static str, v: Option<u32>, default: u32| match v.unwrap_or(default) {
        n @ 1..=100 => Ok(n),
        n => Err(invalid(key, n.to_string(), "expected 1 to 100")),
    };
    Ok(HealthConfig {
        mode,
        interval: duration("health-check-interval", interval, defaults::HEALTH_INTERVAL)?,
        timeout: duration("health-check-timeout", timeout, defaults::HEALTH_TIMEOUT)?,
        fall: count("health-fall", fall, defaults::HEALTH_FALL)?,
        rise: count("health-rise", rise, defaults::HEALTH_RISE)?,
    })
}

/// Parses `[http://|https://]HOST:PORT` for `backend-dns`.
pub(crate) fn parse_dns_source(item: &str) -> Result<DnsSource, ConfigError> {
    let (scheme, rest) = match item.split_once("://") {
        Some(("http", rest)) => (Scheme::HTTP, rest),
        Some(("https", rest)) => (Scheme::HTTPS, rest),
        Some(_) => {
            return Err(invalid(
                "backend-dns",
                item,
                "expected HOST:PORT, http://HOST:PORT or https://HOST:PORT",
            ))
        }
        None => (Scheme::HTTP, item),
    };
    let rest = rest.trim_end_matches('/');
    let parsed: Option<(String, u16)> = rest
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
        .filter(|(h, p)| {
            !h.is_empty() && *p != 0 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        });
    let Some((host, port)) = parsed else {
        return Err(invalid(
            "backend-dns",
            item,
            "expected HOST:PORT, e.g. kbs-headless.trustee-operator-system.svc:8080",
        ));
    };
    Ok(DnsSource { scheme, host, port })
}

fn parse_backends(raw: Vec<String>, have_dns: bool) -> Result<Vec<BackendSpec>, ConfigError> {
    if raw.is_empty() && !have_dns {
        return Err(ConfigError::Missing {
            key: "backend",
            reason: "give at least one --backend URL (or NAME=URL), or --backend-dns HOST:PORT",
        });
    }
    let mut out: Vec<BackendSpec> = Vec::with_capacity(raw.len());
    for item in raw {
        let spec = parse_backend(&item)?;
        if out.iter().any(|b| b.name == spec.name) {
            return Err(invalid("backend", item, "duplicate backend name; give each NAME=URL"));
        }
        out.push(spec);
    }
    Ok(out)
}

/// Parses `URL` or `NAME=URL`.
pub(crate) fn parse_backend(item: &str) -> Result<BackendSpec, ConfigError> {
    let (name, url) = match item.split_once('=') {
        Some((name, url)) if !name.contains("://") => (Some(name), url),
        _ => (None, item),
    };
    let uri: Uri = url
        .parse()
        .map_err(|_| invalid("backend", item, "expected http://HOST:PORT or NAME=http://HOST:PORT"))?;
    let (scheme, default_port) = match uri.scheme_str() {
        Some("http") => (Scheme::HTTP, 80),
        Some("https") => (Scheme::HTTPS, 443),
        _ => return Err(invalid("backend", item, "expected an http:// or https:// URL")),
    };
    let Some(authority) = uri.authority() else {
        return Err(invalid("backend", item, "the URL has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(invalid(
            "backend",
            item,
            "credentials in backend URLs are not supported",
        ));
    }
    if !matches!(uri.path_and_query().map(|p| p.as_str()), None | Some("/") | Some("")) {
        return Err(invalid(
            "backend",
            item,
            "a backend URL takes no path; requests keep their own",
        ));
    }
    let authority: Authority = match authority.port_u16() {
        Some(_) => authority.clone(),
        None => format!("{}:{default_port}", authority.host())
            .parse()
            .map_err(|_| invalid("backend", item, "bad host"))?,
    };
    let name = match name {
        Some(n) if n.is_empty() || !n.bytes().all(|b| b.is_ascii_graphic()) => {
            return Err(invalid(
                "backend",
                item,
                "the NAME before '=' must be printable, without spaces",
            ));
        }
        Some(n) => n.to_owned(),
        None => authority.as_str().to_owned(),
    };
    let tls_name = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok(BackendSpec {
        name,
        scheme,
        authority,
        tls_name,
    })
}

/// One secret per line (first signs, all verify: rotation), from the file or the inline value.
fn load_secrets(file: Option<PathBuf>, inline: Option<String>) -> Result<(Vec<CookieSecret>, bool), ConfigError> {
    let (key, text) = match (file, inline) {
        (Some(path), _) => {
            let bytes = std::fs::read(&path).map_err(|source| ConfigError::Read {
                key: "cookie-secret-file",
                path: path.clone(),
                source,
            })?;
            ("cookie-secret-file", bytes)
        }
        (None, Some(s)) => ("cookie-secret", s.into_bytes()),
        (None, None) => return Ok((vec![CookieSecret::generate()], true)),
    };
    let mut secrets = Vec::new();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let len = line.len();
        let secret = CookieSecret::new(line.to_vec()).ok_or_else(|| {
            invalid(
                key,
                "<redacted>",
                format!(
                    "secret on line {} has {len} bytes; at least {MIN_SECRET_LEN} are needed (e.g. `openssl rand -base64 32`)",
                    i + 1
                ),
            )
        })?;
        secrets.push(secret);
    }
    if secrets.is_empty() {
        return Err(invalid(key, "<redacted>", "no secret in it"));
    }
    Ok((secrets, false))
}

/// Reads the replay token file: one bearer token, surrounding whitespace ignored.
pub(crate) fn read_replay_token(path: &Path) -> Result<String, String> {
    let raw = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let t = raw.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("expected one bearer token (printable characters, no spaces)".into());
    }
    Ok(t.to_owned())
}

/// Parses a duration as `humantime` does (`250ms`, `5s`, `2m`, `1h 30m`), or a bare number of
/// seconds; it must be positive.
fn duration(key: &'static str, value: Option<String>, default_secs: u64) -> Result<Duration, ConfigError> {
    let Some(text) = value else {
        return Ok(Duration::from_secs(default_secs));
    };
    let t = text.trim();
    let parsed = match t.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(t),
    };
    match parsed {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(invalid(
            key,
            text,
            "expected a positive duration such as 500ms, 5s or 2m",
        )),
    }
}

/// RFC 6265 §4.1.1 cookie-name = token (RFC 9110 §5.6.2).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_attr_byte(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && b != b';'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_backends() -> Settings {
        Settings {
            backend: Some(vec!["http://127.0.0.1:9001".into()]),
            ..Settings::default()
        }
    }

    #[test]
    fn defaults_apply() {
        let c = with_backends().validate().unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.cookie.name, "route");
        assert_eq!(c.cookie.max_age, 172_800);
        assert!(c.cookie.secret_generated);
        assert_eq!(c.backends[0].name, "127.0.0.1:9001");
        assert_eq!(c.balance, Policy::RoundRobin);
    }

    #[test]
    fn backend_forms() {
        let b = parse_backend("kbs-a=http://10.0.0.1:8080").unwrap();
        assert_eq!((b.name.as_str(), b.authority.as_str()), ("kbs-a", "10.0.0.1:8080"));
        assert_eq!(parse_backend("http://kbs").unwrap().authority.as_str(), "kbs:80");
        for bad in ["ftp://x:1", "http://x:1/path", "x", "=http://x:1", "http://u:p@x:1"] {
            assert!(parse_backend(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn merge_prefers_the_upper_layer() {
        let file = Settings {
            balance: Some("least-requests".into()),
            cookie_name: Some("a".into()),
            ..with_backends()
        };
        let flags = Settings {
            cookie_name: Some("b".into()),
            ..Settings::default()
        };
        let c = file.merge(flags).validate().unwrap();
        assert_eq!(c.cookie.name, "b");
        assert_eq!(c.balance, Policy::LeastRequests);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: [(Settings, &str); 11] = [
            (
                Settings {
                    balance: Some("random".into()),
                    ..with_backends()
                },
                "`balance`",
            ),
            (
                Settings {
                    cookie_max_age: Some(0),
                    ..with_backends()
                },
                "`cookie-max-age`",
            ),
            (
                Settings {
                    listen: Some("nope".into()),
                    ..with_backends()
                },
                "`listen`",
            ),
            (Settings::default(), "`backend`"),
            (
                Settings {
                    cookie_secret: Some("short".into()),
                    ..with_backends()
                },
                "`cookie-secret`",
            ),
            (
                Settings {
                    backend_connect_timeout: Some("0s".into()),
                    ..with_backends()
                },
                "`backend-connect-timeout`",
            ),
            (
                Settings {
                    admin_reconcile_interval: Some("soon".into()),
                    ..with_backends()
                },
                "`admin-reconcile-interval`",
            ),
            (
                Settings {
                    admin_replay_token_file: Some("/nonexistent/replay-token".into()),
                    ..with_backends()
                },
                "`admin-replay-token-file`",
            ),
            (
                Settings {
                    journal_owner: Some("owner:9090".into()),
                    ..with_backends()
                },
                "`journal-owner`",
            ),
            (
                Settings {
                    journal_owner: Some("https://owner:9090".into()),
                    ..with_backends()
                },
                "`journal-owner`",
            ),
            (
                Settings {
                    journal_owner: Some("http://owner:9090".into()),
                    admin_journal: Some("/var/lib/journal".into()),
                    ..with_backends()
                },
                "`journal-owner`",
            ),
        ];
        for (s, key) in cases {
            let msg = s.validate().unwrap_err().to_string();
            assert!(msg.contains(key), "{msg} should name {key}");
            assert!(!msg.contains("short"), "secrets never appear in errors: {msg}");
        }
    }

    #[test]
    fn dns_sources() {
        let d = parse_dns_source("kbs-headless.ns.svc:8080").unwrap();
        assert_eq!(
            (d.host.as_str(), d.port, d.scheme),
            ("kbs-headless.ns.svc", 8080, Scheme::HTTP)
        );
        assert_eq!(parse_dns_source("https://kbs:8443").unwrap().scheme, Scheme::HTTPS);
        for bad in ["kbs", "kbs:0", ":80", "ftp://kbs:1", "kb s:80"] {
            assert!(parse_dns_source(bad).is_err(), "{bad}");
        }
        // DNS alone is enough backends.
        let s = Settings {
            backend_dns: Some(vec!["kbs:8080".into()]),
            ..Settings::default()
        };
        assert!(s.validate().unwrap().backends.is_empty());
    }

    #[test]
    fn health_settings() {
        let c = with_backends().validate().unwrap();
        assert_eq!(c.health.mode, HealthMode::Tcp);
        let s = Settings {
            health_check: Some("http".into()),
            health_check_path: Some("/ready".into()),
            ..with_backends()
        };
        assert_eq!(s.validate().unwrap().health.mode, HealthMode::Http("/ready".into()));
        let s = Settings {
            health_fall: Some(0),
            ..with_backends()
        };
        assert!(s.validate().unwrap_err().to_string().contains("`health-fall`"));
    }

    #[test]
    fn durations() {
        assert_eq!(
            duration("k", Some("250ms".into()), 1).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(duration("k", Some("2m".into()), 1).unwrap(), Duration::from_secs(120));
        assert_eq!(duration("k", Some("7".into()), 1).unwrap(), Duration::from_secs(7));
        assert_eq!(
            duration("k", Some("1h 30m".into()), 1).unwrap(),
            Duration::from_secs(5400)
        );
        for bad in ["-1s", "0", "0s", "soon", "5 parsecs", ""] {
            assert!(duration("k", Some(bad.into()), 1).is_err(), "{bad}");
        }
    }

    #[test]
    fn toml_keys_match_flags() {
        let s: Settings = toml::from_str(
            "listen = \"127.0.0.1:1\"\nbackend = [\"a=http://h:1\"]\ncookie-max-age = 10\nbalance = \"least-requests\"\n",
        )
        .unwrap();
        assert_eq!(s.cookie_max_age, Some(10));
        let s: Settings = toml::from_str("shutdown-grace = 7\ndrain-timeout = \"2m\"\naccess-log = false\n").unwrap();
        assert_eq!(
            (s.shutdown_grace.as_deref(), s.drain_timeout.as_deref()),
            (Some("7"), Some("2m"))
        );
        assert_eq!(s.access_log.as_deref(), Some("off"));
        assert!(toml::from_str::<Settings>("cookie-colour = 1")
            .unwrap_err()
            .to_string()
            .contains("cookie-colour"));
    }
}
