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

use crate::balance::Policy;
use crate::route_cookie::{CookieSecret, MIN_SECRET_LEN};

/// The environment variable that may hold the cookie secret.
pub const SECRET_ENV: &str = "KBS_AFFINITY_PROXY_COOKIE_SECRET";

/// Defaults, in one place so the README and `--help` can quote them.
pub mod defaults {
    /// `--listen`.
    pub const LISTEN: &str = "0.0.0.0:8080";
    /// `--cookie-name`.
    pub const COOKIE_NAME: &str = "route";
    /// `--cookie-max-age`, seconds: two days, as the ingress-nginx annotation examples use.
    pub const COOKIE_MAX_AGE: u64 = 172_800;
    /// `--cookie-path`.
    pub const COOKIE_PATH: &str = "/";
    /// `--backend-connect-timeout`, seconds.
    pub const CONNECT_TIMEOUT: u64 = 5;
    /// `--backend-response-timeout`, seconds: attestation can take a while on a loaded verifier.
    pub const RESPONSE_TIMEOUT: u64 = 60;
    /// `--auth-body-limit`, bytes: `auth` bodies are buffered so they can be re-sent elsewhere.
    pub const AUTH_BODY_LIMIT: usize = 64 * 1024;
    /// `--shutdown-grace`, seconds.
    pub const SHUTDOWN_GRACE: u64 = 10;
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
    pub backend_connect_timeout: Option<String>,
    /// `backend-response-timeout`: time to the response head.
    pub backend_response_timeout: Option<String>,
    /// `auth-body-limit`, bytes.
    pub auth_body_limit: Option<usize>,
    /// `workers`: serving threads, each with its own single-threaded runtime.
    pub workers: Option<usize>,
    /// `shutdown-grace`: how long in-flight requests may finish after SIGTERM/SIGINT.
    pub shutdown_grace: Option<String>,
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
    /// `http` for now.
    pub scheme: Scheme,
    /// `host:port`.
    pub authority: Authority,
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
    /// Signing key.
    pub secret: CookieSecret,
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
            shutdown_grace
        )
    }

    /// Validates every value and builds the [`Config`]; reads the secret file if one is named.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen_text = self.listen.as_deref().unwrap_or(defaults::LISTEN);
        let listen = listen_text
            .parse()
            .map_err(|_| invalid("listen", listen_text, "expected IP:PORT, e.g. 0.0.0.0:8080"))?;

        let backends = parse_backends(self.backend.unwrap_or_default())?;

        let name = self
            .cookie_name
            .unwrap_or_else(|| defaults::COOKIE_NAME.into());
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(invalid(
                "cookie-name",
                name,
                "expected an RFC 6265 token (letters, digits, -_.)",
            ));
        }
        if name == crate::kbs::SESSION_COOKIE {
            return Err(invalid(
                "cookie-name",
                name,
                "that is the KBS's own session cookie",
            ));
        }
        let max_age = self.cookie_max_age.unwrap_or(defaults::COOKIE_MAX_AGE);
        if max_age == 0 || max_age > u64::from(u32::MAX) {
            return Err(invalid(
                "cookie-max-age",
                max_age.to_string(),
                "expected 1 to 4294967295 seconds",
            ));
        }
        let path = self
            .cookie_path
            .unwrap_or_else(|| defaults::COOKIE_PATH.into());
        if !path.starts_with('/') || !path.bytes().all(is_attr_byte) {
            return Err(invalid(
                "cookie-path",
                path,
                "expected an absolute path without ';' or controls",
            ));
        }
        if let Some(d) = &self.cookie_domain {
            if d.is_empty()
                || !d
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            {
                return Err(invalid(
                    "cookie-domain",
                    d.as_str(),
                    "expected a domain name",
                ));
            }
        }
        let same_site = self
            .cookie_same_site
            .map(|s| match s.to_ascii_lowercase().as_str() {
                "strict" => Ok(SameSite::Strict),
                "lax" => Ok(SameSite::Lax),
                "none" => Ok(SameSite::None),
                _ => Err(invalid(
                    "cookie-same-site",
                    s,
                    "expected strict, lax or none",
                )),
            })
            .transpose()?;
        let (secret, secret_generated) = load_secret(self.cookie_secret_file, self.cookie_secret)?;

        let balance = match self.balance.as_deref().unwrap_or("round-robin") {
            "round-robin" => Policy::RoundRobin,
            "least-requests" => Policy::LeastRequests,
            other => {
                return Err(invalid(
                    "balance",
                    other,
                    "expected round-robin or least-requests",
                ))
            }
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
        let shutdown_grace = duration(
            "shutdown-grace",
            self.shutdown_grace,
            defaults::SHUTDOWN_GRACE,
        )?;
        let auth_body_limit = self.auth_body_limit.unwrap_or(defaults::AUTH_BODY_LIMIT);
        if auth_body_limit == 0 {
            return Err(invalid(
                "auth-body-limit",
                "0",
                "expected a positive number of bytes",
            ));
        }
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
                secret,
                secret_generated,
            },
            balance,
            log_format,
            connect_timeout,
            response_timeout,
            auth_body_limit,
            workers,
            shutdown_grace,
        })
    }
}

fn parse_backends(raw: Vec<String>) -> Result<Vec<BackendSpec>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::Missing {
            key: "backend",
            reason: "give at least one --backend URL (or NAME=URL)",
        });
    }
    let mut out: Vec<BackendSpec> = Vec::with_capacity(raw.len());
    for item in raw {
        let spec = parse_backend(&item)?;
        if out.iter().any(|b| b.name == spec.name) {
            return Err(invalid(
                "backend",
                item,
                "duplicate backend name; give each NAME=URL",
            ));
        }
        out.push(spec);
    }
    Ok(out)
}

/// Parses `URL` or `NAME=URL`.
pub fn parse_backend(item: &str) -> Result<BackendSpec, ConfigError> {
    let (name, url) = match item.split_once('=') {
        Some((name, url)) if !name.contains("://") => (Some(name), url),
        _ => (None, item),
    };
    let uri: Uri = url.parse().map_err(|_| {
        invalid(
            "backend",
            item,
            "expected http://HOST:PORT or NAME=http://HOST:PORT",
        )
    })?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => {
            return Err(invalid(
                "backend",
                item,
                "https backends are not supported by this build yet",
            ));
        }
        _ => return Err(invalid("backend", item, "expected an http:// URL")),
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
    if !matches!(
        uri.path_and_query().map(|p| p.as_str()),
        None | Some("/") | Some("")
    ) {
        return Err(invalid(
            "backend",
            item,
            "a backend URL takes no path; requests keep their own",
        ));
    }
    let authority: Authority = match authority.port_u16() {
        Some(_) => authority.clone(),
        None => format!("{}:80", authority.host())
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
    Ok(BackendSpec {
        name,
        scheme,
        authority,
    })
}

fn load_secret(
    file: Option<PathBuf>,
    inline: Option<String>,
) -> Result<(CookieSecret, bool), ConfigError> {
    let (key, bytes) = match (file, inline) {
        (Some(path), _) => {
            let mut bytes = std::fs::read(&path).map_err(|source| ConfigError::Read {
                key: "cookie-secret-file",
                path: path.clone(),
                source,
            })?;
            let end = bytes.trim_ascii_end().len();
            bytes.truncate(end);
            ("cookie-secret-file", bytes)
        }
        (None, Some(s)) => ("cookie-secret", s.trim().as_bytes().to_vec()),
        (None, None) => return Ok((CookieSecret::generate(), true)),
    };
    let len = bytes.len();
    CookieSecret::new(bytes).map(|s| (s, false)).ok_or_else(|| {
        invalid(
            key,
            "<redacted>",
            format!("the secret has {len} bytes; at least {MIN_SECRET_LEN} are needed (e.g. `openssl rand -base64 32`)"),
        )
    })
}

/// Parses `250ms`, `5s`, `2m`, or a bare number of seconds.
fn duration(
    key: &'static str,
    value: Option<String>,
    default_secs: u64,
) -> Result<Duration, ConfigError> {
    let Some(text) = value else {
        return Ok(Duration::from_secs(default_secs));
    };
    let t = text.trim();
    let (num, unit_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else {
        (t, 1000)
    };
    match num.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_millis(n.saturating_mul(unit_ms))),
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
        assert_eq!(
            (b.name.as_str(), b.authority.as_str()),
            ("kbs-a", "10.0.0.1:8080")
        );
        assert_eq!(
            parse_backend("http://kbs").unwrap().authority.as_str(),
            "kbs:80"
        );
        for bad in [
            "ftp://x:1",
            "http://x:1/path",
            "x",
            "=http://x:1",
            "http://u:p@x:1",
        ] {
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
        let cases: [(Settings, &str); 6] = [
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
        ];
        for (s, key) in cases {
            let msg = s.validate().unwrap_err().to_string();
            assert!(msg.contains(key), "{msg} should name {key}");
            assert!(
                !msg.contains("short"),
                "secrets never appear in errors: {msg}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            duration("k", Some("250ms".into()), 1).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            duration("k", Some("2m".into()), 1).unwrap(),
            Duration::from_secs(120)
        );
        assert_eq!(
            duration("k", Some("7".into()), 1).unwrap(),
            Duration::from_secs(7)
        );
        assert!(duration("k", Some("-1s".into()), 1).is_err());
    }

    #[test]
    fn toml_keys_match_flags() {
        let s: Settings = toml::from_str(
            "listen = \"127.0.0.1:1\"\nbackend = [\"a=http://h:1\"]\ncookie-max-age = 10\nbalance = \"least-requests\"\n",
        )
        .unwrap();
        assert_eq!(s.cookie_max_age, Some(10));
        assert!(toml::from_str::<Settings>("cookie-colour = 1")
            .unwrap_err()
            .to_string()
            .contains("cookie-colour"));
    }
}
