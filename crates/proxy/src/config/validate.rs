//! [`Settings::validate`]: one function per section of the configuration, each checking its keys
//! and building its part of the [`Config`], falling back on the [`defaults`] `--help` shows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;

use super::settings::defaults;
use super::{
    invalid, AdminConfig, AdminFanout, AdminToken, BackendSpec, BackendTls, Cidr, ClientLimits, Config, ConfigError,
    CookieConfig, DnsSource, HealthConfig, HealthMode, LogFormat, SameSite, Settings, TlsFiles,
};
use crate::routing::balance::Policy;
use crate::routing::route_cookie::{CookieSecret, MIN_SECRET_LEN};

/// The listener and what one client may hold or send.
struct Serving {
    listen: SocketAddr,
    workers: usize,
    shutdown_grace: Duration,
    limits: ClientLimits,
    log_format: LogFormat,
    access_log: bool,
    trusted_proxies: Vec<Cidr>,
    fast_path: bool,
}

/// The backends, where they come from, and how the proxy reaches them.
struct Upstream {
    backends: Vec<BackendSpec>,
    backend_dns: Vec<DnsSource>,
    dns_interval: Duration,
    drain_timeout: Duration,
    balance: Policy,
    connect_timeout: Duration,
    response_timeout: Duration,
    auth_body_limit: usize,
    http2: bool,
}

/// The admin port, admin writes and their journal.
struct Admin {
    admin: Option<AdminConfig>,
    fanout: Option<AdminFanout>,
    journal: Option<PathBuf>,
    journal_max: usize,
    reconcile_interval: Duration,
    replay_token_file: Option<PathBuf>,
    journal_owner: Option<Uri>,
    replica_watch: bool,
}

/// What the proxy learns of sessions that come without the route cookie.
struct Sessions {
    table_size: usize,
    lifetime: Duration,
    tokens_portable: bool,
}

impl Settings {
    /// Validates every value and builds the [`Config`]; reads the files the settings name.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let serving = self.serving()?;
        let upstream = self.upstream()?;
        let cookie = self.cookie()?;
        let (tls, backend_tls) = self.tls(upstream.http2)?;
        let health = self.health()?;
        let admin = self.admin()?;
        let sessions = self.sessions()?;
        Ok(Config {
            listen: serving.listen,
            backends: upstream.backends,
            cookie,
            balance: upstream.balance,
            log_format: serving.log_format,
            connect_timeout: upstream.connect_timeout,
            response_timeout: upstream.response_timeout,
            auth_body_limit: upstream.auth_body_limit,
            workers: serving.workers,
            shutdown_grace: serving.shutdown_grace,
            backend_dns: upstream.backend_dns,
            dns_interval: upstream.dns_interval,
            drain_timeout: upstream.drain_timeout,
            tls,
            backend_tls,
            health,
            admin: admin.admin,
            access_log: serving.access_log,
            trusted_proxies: serving.trusted_proxies,
            admin_fanout: admin.fanout,
            admin_journal: admin.journal,
            admin_journal_max: admin.journal_max,
            admin_reconcile_interval: admin.reconcile_interval,
            admin_replay_token_file: admin.replay_token_file,
            journal_owner: admin.journal_owner,
            replica_watch: admin.replica_watch,
            session_table_size: sessions.table_size,
            session_lifetime: sessions.lifetime,
            tokens_portable: sessions.tokens_portable,
            limits: serving.limits,
            // The fast path speaks HTTP/1.1 to the backends: with HTTP/2 to them, hyper does all.
            fast_path: serving.fast_path && !upstream.http2,
            backend_http2: upstream.http2,
        })
    }

    fn serving(&self) -> Result<Serving, ConfigError> {
        let listen_text = self.listen.as_deref().unwrap_or(defaults::LISTEN);
        let listen = listen_text
            .parse()
            .map_err(|_| invalid("listen", listen_text, "expected IP:PORT, e.g. 0.0.0.0:8080"))?;
        let workers = match self.workers {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(n @ 1..=1024) => n,
            Some(n) => return Err(invalid("workers", n.to_string(), "expected 1 to 1024")),
        };
        let limits = ClientLimits {
            idle_timeout: duration(
                "client-idle-timeout",
                self.client_idle_timeout.as_deref(),
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
        let log_format = match self.log_format.as_deref().unwrap_or(defaults::LOG_FORMAT) {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(invalid("log-format", other, "expected text or json")),
        };
        Ok(Serving {
            listen,
            workers,
            shutdown_grace: duration(
                "shutdown-grace",
                self.shutdown_grace.as_deref(),
                defaults::SHUTDOWN_GRACE,
            )?,
            limits,
            log_format,
            access_log: switch("access-log", self.access_log.as_deref(), defaults::ACCESS_LOG)?,
            trusted_proxies: self
                .trusted_proxies
                .iter()
                .flatten()
                .map(|t| Cidr::parse(t).ok_or_else(|| invalid("trusted-proxies", t, "expected IP or IP/PREFIX")))
                .collect::<Result<_, _>>()?,
            fast_path: switch("fast-path", self.fast_path.as_deref(), defaults::FAST_PATH)?,
        })
    }

    fn upstream(&self) -> Result<Upstream, ConfigError> {
        let tls_name = match self.backend_tls_name.as_deref() {
            Some(name) => Some(tls_name("backend-tls-name", name, name)?),
            None => None,
        };
        let namespace = match self.backend_dns_namespace.as_deref() {
            Some(ns) if is_dns_label(ns) => Some(ns),
            Some(ns) => {
                return Err(invalid(
                    "backend-dns-namespace",
                    ns,
                    "expected a Kubernetes namespace: lowercase letters, digits and '-', at most 63",
                ))
            }
            None => None,
        };
        let backend_dns = self
            .backend_dns
            .iter()
            .flatten()
            .map(|d| parse_dns_source_with(d, tls_name, namespace))
            .collect::<Result<Vec<_>, _>>()?;
        let backends = parse_backends(
            self.backend.as_deref().unwrap_or_default(),
            !backend_dns.is_empty(),
            tls_name,
        )?;
        let balance = match self.balance.as_deref().unwrap_or(defaults::BALANCE) {
            "round-robin" => Policy::RoundRobin,
            "least-requests" => Policy::LeastRequests,
            other => return Err(invalid("balance", other, "expected round-robin or least-requests")),
        };
        let auth_body_limit = self.auth_body_limit.unwrap_or(defaults::AUTH_BODY_LIMIT);
        if auth_body_limit == 0 {
            return Err(invalid("auth-body-limit", "0", "expected a positive number of bytes"));
        }
        let http2 = match self.backend_protocol.as_deref().unwrap_or(defaults::BACKEND_PROTOCOL) {
            "http1" => false,
            "http2" => true,
            other => return Err(invalid("backend-protocol", other, "expected http1 or http2")),
        };
        Ok(Upstream {
            backends,
            backend_dns,
            dns_interval: duration(
                "backend-dns-interval",
                self.backend_dns_interval.as_deref(),
                defaults::DNS_INTERVAL,
            )?,
            drain_timeout: duration("drain-timeout", self.drain_timeout.as_deref(), defaults::DRAIN_TIMEOUT)?,
            balance,
            connect_timeout: duration(
                "backend-connect-timeout",
                self.backend_connect_timeout.as_deref(),
                defaults::CONNECT_TIMEOUT,
            )?,
            response_timeout: duration(
                "backend-response-timeout",
                self.backend_response_timeout.as_deref(),
                defaults::RESPONSE_TIMEOUT,
            )?,
            auth_body_limit,
            http2,
        })
    }

    fn cookie(&self) -> Result<CookieConfig, ConfigError> {
        let name = self.cookie_name.as_deref().unwrap_or(defaults::COOKIE_NAME);
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
        let path = self.cookie_path.as_deref().unwrap_or(defaults::COOKIE_PATH);
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
            .as_deref()
            .map(|s| match s.to_ascii_lowercase().as_str() {
                "strict" => Ok(SameSite::Strict),
                "lax" => Ok(SameSite::Lax),
                "none" => Ok(SameSite::None),
                _ => Err(invalid("cookie-same-site", s, "expected strict, lax or none")),
            })
            .transpose()?;
        let (secrets, secret_generated) =
            load_secrets(self.cookie_secret_file.as_deref(), self.cookie_secret.as_deref())?;
        Ok(CookieConfig {
            name: name.to_owned(),
            max_age,
            path: path.to_owned(),
            domain: self.cookie_domain.clone(),
            same_site,
            secrets,
            secret_generated,
        })
    }

    /// Client-facing TLS, and TLS to `https://` backends (whose ALPN depends on `http2`).
    fn tls(&self, http2: bool) -> Result<(Option<TlsFiles>, BackendTls), ConfigError> {
        let tls = both_or_neither(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            ("tls-key", "--tls-cert needs --tls-key"),
            ("tls-cert", "--tls-key needs --tls-cert"),
        )?;
        if let Some(files) = &tls {
            crate::tls::server_config(files)
                .map_err(|e| invalid("tls-cert", files.cert.display().to_string(), e.to_string()))?;
        }
        let client_auth = both_or_neither(
            self.backend_client_cert.as_deref(),
            self.backend_client_key.as_deref(),
            ("backend-client-key", "--backend-client-cert needs a key"),
            ("backend-client-cert", "--backend-client-key needs a cert"),
        )?;
        let backend_tls = BackendTls {
            ca: self.backend_ca.clone(),
            client_auth,
            insecure_skip_verify: self
                .backend_insecure_skip_verify
                .unwrap_or(defaults::INSECURE_SKIP_VERIFY),
        };
        // Only files need checking: without them the system's roots load when the proxy starts.
        if backend_tls.ca.is_some() || backend_tls.client_auth.is_some() {
            crate::tls::client_config(&backend_tls, http2).map_err(|e| {
                let (key, value) = match &backend_tls.ca {
                    Some(ca) => ("backend-ca", ca.display().to_string()),
                    None => ("backend-client-cert", "<files>".to_owned()),
                };
                invalid(key, value, e.to_string())
            })?;
        }
        Ok((tls, backend_tls))
    }

    fn health(&self) -> Result<HealthConfig, ConfigError> {
        let path = self.health_check_path.as_deref().unwrap_or(defaults::HEALTH_PATH);
        if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(invalid(
                "health-check-path",
                path,
                "expected an absolute path such as /healthz",
            ));
        }
        let mode = match self.health_check.as_deref().unwrap_or(defaults::HEALTH_CHECK) {
            "tcp" => HealthMode::Tcp,
            "http" => HealthMode::Http(path.to_owned()),
            "off" => HealthMode::Off,
            other => return Err(invalid("health-check", other, "expected tcp, http or off")),
        };
        let count = |key: &'static str, v: Option<u32>, default: u32| match v.unwrap_or(default) {
            n @ 1..=100 => Ok(n),
            n => Err(invalid(key, n.to_string(), "expected 1 to 100")),
        };
        Ok(HealthConfig {
            mode,
            interval: duration(
                "health-check-interval",
                self.health_check_interval.as_deref(),
                defaults::HEALTH_INTERVAL,
            )?,
            timeout: duration(
                "health-check-timeout",
                self.health_check_timeout.as_deref(),
                defaults::HEALTH_TIMEOUT,
            )?,
            fall: count("health-fall", self.health_fall, defaults::HEALTH_FALL)?,
            rise: count("health-rise", self.health_rise, defaults::HEALTH_RISE)?,
        })
    }

    fn admin(&self) -> Result<Admin, ConfigError> {
        let admin = match &self.admin_listen {
            None => None,
            Some(text) => Some(AdminConfig {
                listen: text
                    .parse()
                    .map_err(|_| invalid("admin-listen", text.as_str(), "expected IP:PORT, e.g. 127.0.0.1:9090"))?,
                token: self.admin_token_file.as_deref().map(read_admin_token).transpose()?,
            }),
        };
        let fanout = match self.admin_writes.as_deref().unwrap_or(defaults::ADMIN_WRITES) {
            "passthrough" => None,
            "broadcast" => Some(self.admin_fanout()?),
            other => return Err(invalid("admin-writes", other, "expected broadcast or passthrough")),
        };
        let journal_max = self.admin_journal_max.unwrap_or(defaults::ADMIN_JOURNAL_MAX);
        if journal_max == 0 {
            return Err(invalid(
                "admin-journal-max",
                "0",
                "expected a positive number of writes",
            ));
        }
        let reconcile_interval = duration(
            "admin-reconcile-interval",
            self.admin_reconcile_interval.as_deref(),
            defaults::ADMIN_RECONCILE_INTERVAL,
        )?;
        if let Some(path) = &self.admin_replay_token_file {
            // Read once now so a wrong path fails at start; it is read again at each replay.
            read_replay_token(path).map_err(|e| invalid("admin-replay-token-file", path.display().to_string(), e))?;
        }
        Ok(Admin {
            admin,
            fanout,
            journal: self.admin_journal.clone(),
            journal_max,
            reconcile_interval,
            replay_token_file: self.admin_replay_token_file.clone(),
            journal_owner: self.journal_owner()?,
            replica_watch: switch("replica-watch", self.replica_watch.as_deref(), defaults::REPLICA_WATCH)?,
        })
    }

    fn admin_fanout(&self) -> Result<AdminFanout, ConfigError> {
        let raw: Vec<&str> = match &self.admin_write_routes {
            Some(routes) => routes.iter().map(String::as_str).collect(),
            None => defaults::ADMIN_WRITE_ROUTES.to_vec(),
        };
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
        Ok(AdminFanout { routes, body_limit })
    }

    fn journal_owner(&self) -> Result<Option<Uri>, ConfigError> {
        let Some(text) = &self.journal_owner else {
            return Ok(None);
        };
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
        Ok(Some(uri))
    }

    fn sessions(&self) -> Result<Sessions, ConfigError> {
        let table_size = self.session_table_size.unwrap_or(defaults::SESSION_TABLE_SIZE);
        if table_size == 0 {
            return Err(invalid(
                "session-table-size",
                "0",
                "expected a positive number of entries",
            ));
        }
        Ok(Sessions {
            table_size,
            lifetime: duration(
                "session-lifetime",
                self.session_lifetime.as_deref(),
                defaults::SESSION_LIFETIME,
            )?,
            tokens_portable: self.tokens_portable.unwrap_or(defaults::TOKENS_PORTABLE),
        })
    }
}

/// A certificate and its key, both or neither; each `(key, reason)` says which one is missing.
fn both_or_neither(
    cert: Option<&Path>,
    key: Option<&Path>,
    no_key: (&'static str, &'static str),
    no_cert: (&'static str, &'static str),
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::Missing {
            key: no_key.0,
            reason: no_key.1,
        }),
        (None, Some(_)) => Err(ConfigError::Missing {
            key: no_cert.0,
            reason: no_cert.1,
        }),
    }
}

/// Parses `[http://|https://]HOST:PORT[;tls-name=NAME]` for `backend-dns`.
pub fn parse_dns_source(item: &str) -> Result<DnsSource, ConfigError> {
    parse_dns_source_with(item, None, None)
}

/// An RFC 1123 label, as Kubernetes namespaces are.
fn is_dns_label(s: &str) -> bool {
    let alnum = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    s.len() <= 63
        && alnum(s.as_bytes().first())
        && alnum(s.as_bytes().last())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The same, with the certificate name `default_tls_name` (`backend-tls-name`) when the item
/// names none, HOST without either; a HOST without a dot is qualified with `namespace`
/// (`backend-dns-namespace`): `HOST.NAMESPACE.svc`, the Service's name in the cluster.
fn parse_dns_source_with(
    item: &str,
    default_tls_name: Option<&str>,
    namespace: Option<&str>,
) -> Result<DnsSource, ConfigError> {
    let (source, own_tls_name) = split_tls_name("backend-dns", item)?;
    let (scheme, rest) = match source.split_once("://") {
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
    let host = match namespace {
        Some(ns) if !host.contains('.') => format!("{host}.{ns}.svc"),
        _ => host,
    };
    let tls_name = own_tls_name.or(default_tls_name).unwrap_or(&host).to_owned();
    Ok(DnsSource {
        scheme,
        host,
        port,
        tls_name,
    })
}

/// Splits `ITEM[;tls-name=NAME]` (a `backend` or `backend-dns` entry) and checks NAME as
/// rustls will take it: a DNS name or an IP address.
fn split_tls_name<'a>(key: &'static str, item: &'a str) -> Result<(&'a str, Option<&'a str>), ConfigError> {
    let Some((head, option)) = item.split_once(';') else {
        return Ok((item, None));
    };
    match option.trim().split_once('=') {
        Some(("tls-name", name)) => Ok((head.trim_end(), Some(tls_name(key, item, name)?))),
        _ => Err(invalid(
            key,
            item,
            "the only option after ';' is tls-name=NAME (the name the certificate carries)",
        )),
    }
}

/// A name to verify a backend's certificate against (and send as SNI), as rustls takes it.
fn tls_name<'a>(key: &'static str, item: &str, name: &'a str) -> Result<&'a str, ConfigError> {
    match rustls::pki_types::ServerName::try_from(name) {
        Ok(_) => Ok(name),
        Err(_) => Err(invalid(
            key,
            item,
            format!("{name:?} is not a DNS name or an IP address to verify a certificate against"),
        )),
    }
}

fn parse_backends(
    raw: &[String],
    have_dns: bool,
    default_tls_name: Option<&str>,
) -> Result<Vec<BackendSpec>, ConfigError> {
    if raw.is_empty() && !have_dns {
        return Err(ConfigError::Missing {
            key: "backend",
            reason: "give at least one --backend URL (or NAME=URL), or --backend-dns HOST:PORT",
        });
    }
    let mut out: Vec<BackendSpec> = Vec::with_capacity(raw.len());
    for item in raw {
        let spec = parse_backend_with(item, default_tls_name)?;
        if out.iter().any(|b| b.name == spec.name) {
            return Err(invalid(
                "backend",
                item.as_str(),
                "duplicate backend name; give each NAME=URL",
            ));
        }
        out.push(spec);
    }
    Ok(out)
}

/// Parses `URL` or `NAME=URL`, either followed by `;tls-name=NAME`.
pub fn parse_backend(item: &str) -> Result<BackendSpec, ConfigError> {
    parse_backend_with(item, None)
}

/// The same, with the certificate name `default_tls_name` (`backend-tls-name`) when the item
/// names none; the URL's host without either.
fn parse_backend_with(item: &str, default_tls_name: Option<&str>) -> Result<BackendSpec, ConfigError> {
    let (spec, own_tls_name) = split_tls_name("backend", item)?;
    let (name, url) = match spec.split_once('=') {
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
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let tls_name = own_tls_name.or(default_tls_name).unwrap_or(host).to_owned();
    Ok(BackendSpec {
        name,
        scheme,
        authority,
        tls_name,
    })
}

/// One secret per line (first signs, all verify: rotation), from the file or the inline value.
fn load_secrets(file: Option<&Path>, inline: Option<&str>) -> Result<(Vec<CookieSecret>, bool), ConfigError> {
    let (key, text) = match (file, inline) {
        (Some(path), _) => {
            let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
                key: "cookie-secret-file",
                path: path.to_owned(),
                source,
            })?;
            ("cookie-secret-file", bytes)
        }
        (None, Some(s)) => ("cookie-secret", s.as_bytes().to_vec()),
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

/// Reads the admin token file: at least [`MIN_SECRET_LEN`] printable characters.
fn read_admin_token(path: &Path) -> Result<AdminToken, ConfigError> {
    let raw = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        key: "admin-token-file",
        path: path.to_owned(),
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
    Ok(AdminToken(t.to_owned()))
}

/// Reads the replay token file: one bearer token, surrounding whitespace ignored.
pub fn read_replay_token(path: &Path) -> Result<String, String> {
    let raw = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let t = raw.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("expected one bearer token (printable characters, no spaces)".into());
    }
    Ok(t.to_owned())
}

/// Parses a duration as `humantime` does (`250ms`, `5s`, `2m`, `1h 30m`), or a bare number of
/// seconds; it must be positive.
pub(super) fn duration(key: &'static str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    let Some(text) = value else {
        return Ok(default);
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

/// An on/off switch; the file's booleans arrive as `on`/`off`, and `true`/`false` are taken too.
fn switch(key: &'static str, value: Option<&str>, default: &str) -> Result<bool, ConfigError> {
    match value.unwrap_or(default) {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(invalid(key, other, "expected on or off")),
    }
}

/// RFC 6265 §4.1.1 cookie-name = token (RFC 9110 §5.6.2).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_attr_byte(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && b != b';'
}
