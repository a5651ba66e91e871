//! Configuration: [`Settings`] is one layer of raw values (a TOML file, or the command line with
//! the environment below it), [`Settings::merge`] stacks layers, and [`Settings::validate`] turns
//! the result into a [`Config`] or one [`ConfigError`] that names the key. Nothing binds while
//! configuring.
//!
//! Each setting is declared once, in `config/settings.rs`: the flag `--foo-bar`, the config-file
//! key `foo-bar`, the environment variable `KBS_AFFINITY_PROXY_FOO_BAR`, the help and the default
//! all come from that line. Precedence, highest first: flags, then the environment, then the
//! file, then the defaults. `config/validate.rs` checks the values, one section at a time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;

use crate::routing::balance::Policy;
use crate::routing::route_cookie::CookieSecret;

mod settings;
mod validate;

pub use settings::{
    declared, defaults, describe, env_error, refuse_secret_flag, Setting, Settings, Unset, ENV_PREFIX, SECRET_ENV,
};
pub use validate::{parse_backend, parse_dns_source, read_replay_token};

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
    /// A setting's environment variable holds a value its type does not take.
    #[error("invalid value {value:?} for `{key}` (environment variable {var}): {reason}")]
    Env {
        /// The config key.
        key: String,
        /// The variable, `KBS_AFFINITY_PROXY_` and the key.
        var: String,
        /// What it holds (never a secret: the secret is text, which always parses).
        value: String,
        /// What was expected.
        reason: String,
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

impl ConfigError {
    /// The key it names (a file's own error names it in its message).
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } | Self::Missing { key, .. } | Self::Read { key, .. } => Some(key),
            Self::Env { key, .. } => Some(key),
            Self::File { .. } => None,
        }
    }
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
    /// For `https`: the name the backends' certificates must carry (sent as SNI).
    pub tls_name: String,
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
    /// Clients whose `X-Forwarded-For` chain the access log shows.
    pub trusted_proxies: Vec<Cidr>,
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
    /// HTTP/1.1 (plain or over TLS) on the fast path (off whenever `backend_http2` is on).
    pub fast_path: bool,
    /// HTTP/2 to the backends instead of pooled HTTP/1.1.
    pub backend_http2: bool,
}

/// An IP network, `10.0.0.0/8` or `fd00::/8`; an address alone is one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network's address (host bits cleared).
    addr: std::net::IpAddr,
    /// Leading bits that must match.
    prefix: u8,
}

impl Cidr {
    /// Parses `IP` or `IP/PREFIX`.
    pub fn parse(text: &str) -> Option<Self> {
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().ok()?)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = ip.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then(|| Self {
            addr: Self::mask(addr, prefix),
            prefix,
        })
    }

    /// Whether `ip` is in the network (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && Self::mask(ip, self.prefix) == self.addr
    }

    fn mask(ip: std::net::IpAddr, prefix: u8) -> std::net::IpAddr {
        match ip {
            std::net::IpAddr::V4(a) => {
                let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                std::net::IpAddr::V4((u32::from(a) & m).into())
            }
            std::net::IpAddr::V6(a) => {
                let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                std::net::IpAddr::V6((u128::from(a) & m).into())
            }
        }
    }
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
    fn certificate_names_per_backend_then_the_setting_then_the_host() {
        let b = parse_backend("kbs-a=https://10.0.0.1:8443;tls-name=kbs.example").unwrap();
        assert_eq!((b.name.as_str(), b.tls_name.as_str()), ("kbs-a", "kbs.example"));
        assert_eq!(b.authority.as_str(), "10.0.0.1:8443");
        assert_eq!(parse_backend("https://[fd00::1]:8443").unwrap().tls_name, "fd00::1");
        let d = parse_dns_source("https://kbs-headless:8080;tls-name=kbs.ns.svc").unwrap();
        assert_eq!((d.host.as_str(), d.tls_name.as_str()), ("kbs-headless", "kbs.ns.svc"));
        let c = Settings {
            backend: Some(vec![
                "https://10.0.0.1:8443".into(),
                "https://10.0.0.2:8443;tls-name=own.example".into(),
            ]),
            backend_dns: Some(vec!["https://kbs-headless:8080".into()]),
            backend_tls_name: Some("kbs.example".into()),
            ..Settings::default()
        }
        .validate()
        .unwrap();
        let names: Vec<&str> = c.backends.iter().map(|b| b.tls_name.as_str()).collect();
        assert_eq!(names, ["kbs.example", "own.example"]);
        assert_eq!(c.backend_dns[0].tls_name, "kbs.example");
        for (s, key) in [
            (
                Settings {
                    backend_tls_name: Some("not a name!".into()),
                    ..with_backends()
                },
                "`backend-tls-name`",
            ),
            (
                Settings {
                    backend: Some(vec!["https://h:1;tls-name=bad name".into()]),
                    ..Settings::default()
                },
                "`backend`",
            ),
            (
                Settings {
                    backend: Some(vec!["https://h:1;sni=x".into()]),
                    ..Settings::default()
                },
                "`backend`",
            ),
            (
                Settings {
                    backend_dns: Some(vec!["https://h:1;tls-name=".into()]),
                    ..Settings::default()
                },
                "`backend-dns`",
            ),
        ] {
            let msg = s.validate().unwrap_err().to_string();
            assert!(msg.contains(key), "{msg} should name {key}");
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
    fn a_dns_name_without_a_dot_is_qualified_with_the_namespace() {
        let with = |ns: &str, dns: &[&str]| Settings {
            backend_dns: Some(dns.iter().map(|d| d.to_string()).collect()),
            backend_dns_namespace: Some(ns.into()),
            ..Settings::default()
        };
        let c = with(
            "trustee-operator-system",
            &["https://kbs-headless:8080", "kbs.other.svc:8080"],
        )
        .validate()
        .unwrap();
        let hosts: Vec<(&str, &str)> = c
            .backend_dns
            .iter()
            .map(|d| (d.host.as_str(), d.tls_name.as_str()))
            .collect();
        assert_eq!(
            hosts,
            [
                (
                    "kbs-headless.trustee-operator-system.svc",
                    "kbs-headless.trustee-operator-system.svc"
                ),
                ("kbs.other.svc", "kbs.other.svc"),
            ]
        );
        // Without the setting, names are looked up as written.
        let c = Settings {
            backend_dns: Some(vec!["kbs-headless:8080".into()]),
            ..Settings::default()
        };
        assert_eq!(c.validate().unwrap().backend_dns[0].host, "kbs-headless");
        for bad in ["", "Trustee", "-ns", "a.b", &"n".repeat(64)] {
            let msg = with(bad, &["kbs:1"]).validate().unwrap_err().to_string();
            assert!(msg.contains("`backend-dns-namespace`"), "{bad}: {msg}");
        }
    }

    #[test]
    fn trusted_proxies_are_addresses_or_networks() {
        let c = Settings {
            trusted_proxies: Some(vec!["10.0.0.0/8".into(), "fd00::1".into(), "192.168.1.7/24".into()]),
            ..with_backends()
        }
        .validate()
        .unwrap();
        let trusted = |ip: &str| c.trusted_proxies.iter().any(|n| n.contains(ip.parse().unwrap()));
        for ip in ["10.1.2.3", "::ffff:10.0.0.1", "fd00::1", "192.168.1.200"] {
            assert!(trusted(ip), "{ip}");
        }
        for ip in ["11.0.0.1", "fd00::2", "192.168.2.1", "::1"] {
            assert!(!trusted(ip), "{ip}");
        }
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "fd00::/129", "nope", "10.0.0.0/", "/8"] {
            let msg = Settings {
                trusted_proxies: Some(vec![bad.into()]),
                ..with_backends()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(msg.contains("`trusted-proxies`"), "{bad}: {msg}");
        }
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
        let parse = |text: &str| validate::duration("k", Some(text), Duration::from_secs(1));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse("1h 30m").unwrap(), Duration::from_secs(5400));
        for bad in ["-1s", "0", "0s", "soon", "5 parsecs", ""] {
            assert!(parse(bad).is_err(), "{bad}");
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
