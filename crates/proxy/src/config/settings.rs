//! Every setting, declared once: [`settings!`] turns one line per setting into the [`Settings`]
//! layer (its `--flag`, its TOML key, its help), [`Settings::merge`], and the [`declared`] table
//! from which each flag gets its environment variable and the default its help shows.
//!
//! The default a setting's help shows is the `defaults` constant that `validate` falls back on,
//! or an [`Unset`] saying what happens without a value: the two cannot disagree.
//!
//! The library takes clap here, against "clap only in the binary": the flag and the key can only
//! come from one definition if the struct that serde reads is also the one clap derives from.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::StyledStr;
use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command};
use serde::Deserialize;

use super::ConfigError;

/// What every setting's environment variable starts with; the rest is the key in
/// SCREAMING_SNAKE_CASE (`cookie-max-age`: `KBS_AFFINITY_PROXY_COOKIE_MAX_AGE`).
pub const ENV_PREFIX: &str = "KBS_AFFINITY_PROXY_";

/// The environment variable that may hold the cookie secret, which has no flag.
pub const SECRET_ENV: &str = "KBS_AFFINITY_PROXY_COOKIE_SECRET";

/// The default values `validate` falls back on; `--help` and the README show them.
pub mod defaults {
    use std::time::Duration;

    /// `listen`.
    pub(crate) const LISTEN: &str = "0.0.0.0:8080";
    /// `cookie-name`.
    pub(crate) const COOKIE_NAME: &str = "route";
    /// `cookie-max-age`, seconds: two days, as the ingress-nginx annotation examples use.
    pub(crate) const COOKIE_MAX_AGE: u64 = 172_800;
    /// `cookie-path`.
    pub(crate) const COOKIE_PATH: &str = "/";
    /// `balance`.
    pub(crate) const BALANCE: &str = "round-robin";
    /// `log-format`.
    pub(crate) const LOG_FORMAT: &str = "text";
    /// `backend-connect-timeout`.
    pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// `backend-response-timeout`: attestation can take a while on a loaded verifier.
    pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `auth-body-limit`, bytes: `auth` bodies are buffered so they can be re-sent elsewhere.
    pub(crate) const AUTH_BODY_LIMIT: usize = 64 * 1024;
    /// `shutdown-grace`.
    pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// `backend-dns-interval`.
    pub(crate) const DNS_INTERVAL: Duration = Duration::from_secs(10);
    /// `drain-timeout`: the KBS's default session lifetime.
    pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
    /// `backend-insecure-skip-verify`.
    pub(crate) const INSECURE_SKIP_VERIFY: bool = false;
    /// `backend-protocol`.
    pub(crate) const BACKEND_PROTOCOL: &str = "http1";
    /// `health-check`: a TCP connect, which every KBS release answers.
    pub(crate) const HEALTH_CHECK: &str = "tcp";
    /// `health-check-path`.
    pub(crate) const HEALTH_PATH: &str = "/healthz";
    /// `health-check-interval`.
    pub(crate) const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
    /// `health-check-timeout`.
    pub(crate) const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
    /// `health-fall`: consecutive failed checks that mark a backend down.
    pub(crate) const HEALTH_FALL: u32 = 3;
    /// `health-rise`: consecutive good checks that mark it up again.
    pub(crate) const HEALTH_RISE: u32 = 2;
    /// `access-log`.
    pub(crate) const ACCESS_LOG: &str = "on";
    /// `admin-writes`.
    pub(crate) const ADMIN_WRITES: &str = "broadcast";
    /// `admin-write-routes`: the admin writes broadcast to every replica.
    pub(crate) const ADMIN_WRITE_ROUTES: [&str; 5] = [
        "POST /kbs/v0/resource/",
        "DELETE /kbs/v0/resource/",
        "POST /kbs/v0/resource-policy",
        "POST /kbs/v0/attestation-policy",
        "POST /kbs/v0/reference-value",
    ];
    /// `admin-body-limit`, bytes.
    pub(crate) const ADMIN_BODY_LIMIT: usize = 8 * 1024 * 1024;
    /// `admin-journal-max`: writes kept in the journal.
    pub(crate) const ADMIN_JOURNAL_MAX: usize = 10_000;
    /// `admin-reconcile-interval`: how often the whole compacted journal is re-applied to every
    /// replica, the floor under the detection of a replica that lost its state. Short enough that
    /// an undetected empty restart is repaired within half a minute; with a journal of 1,000
    /// writes it sends ~33 small idempotent writes per second to each replica.
    pub(crate) const ADMIN_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);
    /// `replica-watch`.
    pub(crate) const REPLICA_WATCH: &str = "on";
    /// `session-table-size`: learned session ids and tokens kept.
    pub(crate) const SESSION_TABLE_SIZE: usize = 100_000;
    /// `session-lifetime`: the KBS's default `[attestation_service] timeout`.
    pub(crate) const SESSION_LIFETIME: Duration = Duration::from_secs(300);
    /// `tokens-portable`.
    pub(crate) const TOKENS_PORTABLE: bool = false;
    /// `client-idle-timeout`.
    pub(crate) const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `max-connections`.
    pub(crate) const MAX_CONNECTIONS: usize = 10_000;
    /// `max-header-bytes`: request line plus headers.
    pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;
    /// `fast-path`.
    pub(crate) const FAST_PATH: &str = "on";
}

/// The default of a setting that has no default value: what happens without one.
#[derive(Debug, Clone, Copy)]
pub struct Unset(pub &'static str);

/// How a default reads in `--help` and the README.
trait DefaultText {
    fn text(&self) -> String;
}

macro_rules! default_text_by_display {
    ($($t:ty),*) => { $(impl DefaultText for $t { fn text(&self) -> String { self.to_string() } })* };
}
default_text_by_display!(&str, u32, u64, usize, bool);

impl DefaultText for Unset {
    fn text(&self) -> String {
        self.0.to_owned()
    }
}

impl DefaultText for Duration {
    fn text(&self) -> String {
        humantime::format_duration(*self).to_string()
    }
}

impl<const N: usize> DefaultText for [&str; N] {
    fn text(&self) -> String {
        self.join(", ")
    }
}

/// Declares the settings. Each entry is `/// help` (also the rustdoc), its `#[arg]` and
/// `#[serde]` attributes, and `name: Type = default;`: the field is `Option<Type>`, unset in a
/// layer that does not give it; `default` is a `defaults` constant or an [`Unset`].
macro_rules! settings {
    ($($(#[$attr:meta])* $name:ident: $ty:ty = $default:expr;)*) => {
        /// One layer of raw settings: the TOML file, or the command line with the environment
        /// below it. Field names are the keys (kebab-case in the file); `validate` checks them.
        #[derive(Debug, Default, Clone, Deserialize, clap::Args)]
        #[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
        pub struct Settings {
            $($(#[$attr])* pub $name: Option<$ty>,)*
        }

        impl Settings {
            /// `over` on top of `self`, setting by setting.
            fn over(self, over: Settings) -> Settings {
                Settings { $($name: over.$name.or(self.$name),)* }
            }
        }

        /// Every setting, in declaration order.
        pub fn declared() -> Vec<Setting> {
            vec![$(Setting { field: stringify!($name), default: DefaultText::text(&$default) },)*]
        }
    };
}

settings! {
    /// Address to accept clients on (demo: 127.0.0.1:8080 unless given).
    #[arg(long, value_name = "IP:PORT")]
    listen: String = defaults::LISTEN;
    /// A KBS replica: URL or NAME=URL (repeat for each replica; or use --backend-dns). NAME
    /// defaults to host:port. `;tls-name=NAME` after the URL: its certificate's name.
    #[arg(long, value_name = "[NAME=]URL[;tls-name=NAME]")]
    #[serde(alias = "backends")]
    backend: Vec<String> = Unset("none");
    /// Route cookie name.
    #[arg(long, value_name = "NAME")]
    cookie_name: String = defaults::COOKIE_NAME;
    /// Route cookie lifetime in seconds.
    #[arg(long, value_name = "SECONDS")]
    cookie_max_age: u64 = defaults::COOKIE_MAX_AGE;
    /// File with the cookie signing secret (at least 16 bytes); or the secret itself in
    /// KBS_AFFINITY_PROXY_COOKIE_SECRET.
    #[arg(long, value_name = "FILE")]
    cookie_secret_file: PathBuf = Unset("generated at start");
    /// The cookie signing secret itself: in the file or the environment only, so that it never
    /// shows in ps. Refused as a flag (the flag exists only to be refused with a clear error).
    #[arg(long, value_name = "SECRET", hide = true, hide_env_values = true)]
    cookie_secret: String = Unset("none");
    /// Route cookie Path attribute.
    #[arg(long, value_name = "PATH")]
    cookie_path: String = defaults::COOKIE_PATH;
    /// Route cookie Domain attribute.
    #[arg(long, value_name = "DOMAIN")]
    cookie_domain: String = Unset("not set");
    /// Route cookie SameSite attribute: strict, lax or none.
    #[arg(long, value_name = "MODE")]
    cookie_same_site: String = Unset("not set");
    /// How new sessions are spread: round-robin or least-requests.
    #[arg(long, value_name = "POLICY")]
    balance: String = defaults::BALANCE;
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT")]
    log_format: String = defaults::LOG_FORMAT;
    /// Time limit for connecting to a replica, e.g. 5s or 500ms.
    #[arg(long, value_name = "DURATION")]
    #[serde(deserialize_with = "text_or_number")]
    backend_connect_timeout: String = defaults::CONNECT_TIMEOUT;
    /// Time limit for a replica's response head.
    #[arg(long, value_name = "DURATION")]
    #[serde(deserialize_with = "text_or_number")]
    backend_response_timeout: String = defaults::RESPONSE_TIMEOUT;
    /// Largest auth request body, bytes (buffered so it can be re-sent).
    #[arg(long, value_name = "BYTES")]
    auth_body_limit: usize = defaults::AUTH_BODY_LIMIT;
    /// Serving threads, each with its own runtime.
    #[arg(long, value_name = "N")]
    workers: usize = Unset("number of CPUs");
    /// Time in-flight requests get to finish on SIGTERM/SIGINT.
    #[arg(long, value_name = "DURATION")]
    #[serde(deserialize_with = "text_or_number")]
    shutdown_grace: String = defaults::SHUTDOWN_GRACE;
    /// Backends from DNS: every address of HOST is a backend (e.g. a headless Service). Repeatable.
    /// `;tls-name=NAME` after it: the name their certificates carry (default: HOST).
    #[arg(long, value_name = "[https://]HOST:PORT[;tls-name=NAME]")]
    backend_dns: Vec<String> = Unset("none");
    /// Kubernetes namespace for --backend-dns names without a dot: HOST is looked up as
    /// HOST.NAMESPACE.svc (the manifests fill it from the pod's own namespace).
    #[arg(long, value_name = "NAMESPACE")]
    backend_dns_namespace: String = Unset("names are looked up as written");
    /// How often --backend-dns names are re-resolved.
    #[arg(long, value_name = "DURATION")]
    #[serde(deserialize_with = "text_or_number")]
    backend_dns_interval: String = defaults::DNS_INTERVAL;
    /// How long a drained or vanished backend keeps serving its pinned sessions.
    #[arg(long, value_name = "DURATION")]
    #[serde(deserialize_with = "text_or_number")]
    drain_timeout: String = defaults::DRAIN_TIMEOUT;
    /// PEM certificate chain: serve clients over TLS (h2 and http/1.1 by ALPN).
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf = Unset("plain HTTP");
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf = Unset("none");
    /// PEM CA certificates to trust for https:// backends.
    #[arg(long, value_name = "FILE")]
    backend_ca: PathBuf = Unset("the system's roots");
    /// The name https:// backends' certificates are verified against and sent as SNI, for every
    /// backend (--backend-dns ones included) that does not give its own `;tls-name=NAME`.
    #[arg(long, value_name = "DNS-NAME|IP")]
    backend_tls_name: String = Unset("the backend URL's host");
    /// PEM client certificate for mTLS to backends.
    #[arg(long, value_name = "FILE")]
    backend_client_cert: PathBuf = Unset("none");
    /// PEM key for --backend-client-cert.
    #[arg(long, value_name = "FILE")]
    backend_client_key: PathBuf = Unset("none");
    /// Accept any backend certificate. For testing only: anyone on the path can impersonate a replica.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    backend_insecure_skip_verify: bool = defaults::INSECURE_SKIP_VERIFY;
    /// Active health check: tcp, http or off.
    #[arg(long, value_name = "MODE")]
    health_check: String = defaults::HEALTH_CHECK;
    /// Path of the http health check.
    #[arg(long, value_name = "PATH")]
    health_check_path: String = defaults::HEALTH_PATH;
    /// Time between health checks of a backend.
    #[arg(long, value_name = "DURATION")]
    #[serde(deserialize_with = "text_or_number")]
    health_check_interval: String = defaults::HEALTH_INTERVAL;
    /// Limit on one health check.
    #[arg(long, value_name = "DURATION")]
    #[serde(deserialize_with = "text_or_number")]
    health_check_timeout: String = defaults::HEALTH_TIMEOUT;
    /// Consecutive failed checks that mark a backend down.
    #[arg(long, value_name = "N")]
    health_fall: u32 = defaults::HEALTH_FALL;
    /// Consecutive good checks that mark it up again.
    #[arg(long, value_name = "N")]
    health_rise: u32 = defaults::HEALTH_RISE;
    /// Admin port: /healthz /readyz /metrics /backends, drain/undrain.
    #[arg(long, value_name = "IP:PORT")]
    admin_listen: String = Unset("off");
    /// File with the bearer token that allows admin writes from other than loopback.
    #[arg(long, value_name = "FILE")]
    admin_token_file: PathBuf = Unset("loopback only");
    /// A client address or CIDR whose X-Forwarded-For the access log shows (an ingress or load
    /// balancer in front). Repeatable; the header is forwarded to the backends either way.
    #[arg(long, value_name = "IP[/PREFIX]")]
    trusted_proxies: Vec<String> = Unset("none");
    /// One log line per request: on or off.
    #[arg(long, value_name = "on|off")]
    #[serde(deserialize_with = "text_or_bool")]
    access_log: String = defaults::ACCESS_LOG;
    /// Admin writes (set-resource, policies, reference values): broadcast to every replica, or passthrough.
    #[arg(long, value_name = "MODE")]
    admin_writes: String = defaults::ADMIN_WRITES;
    /// An admin write to broadcast, as "METHOD /path-prefix" (repeat; replaces the default list).
    #[arg(long = "admin-write-route", value_name = "METHOD /PREFIX")]
    admin_write_routes: Vec<String> = defaults::ADMIN_WRITE_ROUTES;
    /// Largest admin write body, bytes.
    #[arg(long, value_name = "BYTES")]
    admin_body_limit: usize = defaults::ADMIN_BODY_LIMIT;
    /// Directory keeping the admin journal across restarts (files 0600: they hold secrets).
    #[arg(long, value_name = "DIR")]
    admin_journal: PathBuf = Unset("memory only");
    /// Admin writes kept in the journal.
    #[arg(long, value_name = "N")]
    admin_journal_max: usize = defaults::ADMIN_JOURNAL_MAX;
    /// How often the whole compacted journal is re-applied to every replica.
    #[arg(long, value_name = "DURATION")]
    #[serde(deserialize_with = "text_or_number")]
    admin_reconcile_interval: String = defaults::ADMIN_RECONCILE_INTERVAL;
    /// File with the proxy's own KBS admin bearer token for replays, re-read at each use; clients' tokens are then not journaled.
    #[arg(long, value_name = "FILE")]
    admin_replay_token_file: PathBuf = Unset("none");
    /// The journal owner's admin port (http://HOST:PORT): forward admin writes there and take the replicas' sync state from it.
    #[arg(long, value_name = "URL")]
    journal_owner: String = Unset("this proxy owns its journal");
    /// Watch each replica every second (its /metrics over a kept-alive connection) for a restart that lost its state: on or off.
    #[arg(long, value_name = "on|off")]
    #[serde(deserialize_with = "text_or_bool")]
    replica_watch: String = defaults::REPLICA_WATCH;
    /// Learned kbs-session-ids and tokens kept, for clients without the route cookie.
    #[arg(long, value_name = "N")]
    session_table_size: usize = defaults::SESSION_TABLE_SIZE;
    /// How long a learned kbs-session-id is kept at most.
    #[arg(long, value_name = "DURATION")]
    #[serde(deserialize_with = "text_or_number")]
    session_lifetime: String = defaults::SESSION_LIFETIME;
    /// The replicas share a token signer: bearer resource requests may go to any replica.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    tokens_portable: bool = defaults::TOKENS_PORTABLE;
    /// Time a client gets to send a request head; idle keep-alive connections close after it.
    #[arg(long, value_name = "DURATION")]
    #[serde(deserialize_with = "text_or_number")]
    client_idle_timeout: String = defaults::CLIENT_IDLE_TIMEOUT;
    /// Client connections open at once; more wait in the listen backlog.
    #[arg(long, value_name = "N")]
    max_connections: usize = defaults::MAX_CONNECTIONS;
    /// Largest request head (HTTP/1.1) or header list (HTTP/2), bytes; over it: 431.
    #[arg(long, value_name = "BYTES")]
    max_header_bytes: usize = defaults::MAX_HEADER_BYTES;
    /// HTTP/1.1 (plain or over TLS) on the proxy's own fast path (on), or hyper for everything (off).
    #[arg(long, value_name = "on|off")]
    #[serde(deserialize_with = "text_or_bool")]
    fast_path: String = defaults::FAST_PATH;
    /// HTTP/1.1 to the backends, pooled (http1), or HTTP/2, one multiplexed connection per backend
    /// and worker, by prior knowledge over TCP and ALPN over TLS; turns the fast path off (http2).
    #[arg(long, value_name = "http1|http2")]
    backend_protocol: String = defaults::BACKEND_PROTOCOL;
}

/// One declared setting: the names it goes by and the default its help shows.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The field of [`Settings`], which is also clap's id of its argument.
    pub field: &'static str,
    /// The default as `--help` shows it.
    pub default: String,
}

impl Setting {
    /// The config-file key, `cookie-max-age`.
    pub fn key(&self) -> String {
        self.field.replace('_', "-")
    }

    /// The environment variable, `KBS_AFFINITY_PROXY_COOKIE_MAX_AGE`.
    pub fn env(&self) -> String {
        format!("{ENV_PREFIX}{}", self.field.to_ascii_uppercase())
    }

    /// `arg` with this setting's environment variable, and its default after the help text.
    fn describe(&self, arg: Arg) -> Arg {
        let with_default = |help: &StyledStr| format!("{help} [default: {}]", self.default);
        let mut arg = arg.env(self.env());
        if let Some(help) = arg.get_help().map(with_default) {
            arg = arg.help(help);
        }
        if let Some(long_help) = arg.get_long_help().map(with_default) {
            arg = arg.long_help(long_help);
        }
        arg
    }
}

/// `cmd` (a command that flattens [`Settings`]) with each setting's environment variable and
/// default: clap reads the variable when the flag is absent, so flags stay above it.
pub fn describe(cmd: Command) -> Command {
    let declared = declared();
    cmd.mut_args(|arg| match declared.iter().find(|s| arg.get_id() == s.field) {
        Some(setting) => setting.describe(arg),
        None => arg,
    })
}

/// Refuses the cookie secret given as a flag: it would show in `ps` and in shell histories.
pub fn refuse_secret_flag(matches: &ArgMatches) -> Result<(), ConfigError> {
    match matches.value_source("cookie_secret") {
        Some(ValueSource::CommandLine) => Err(super::invalid(
            "cookie-secret",
            "<redacted>",
            format!("not accepted as a flag (it would show in `ps`); use --cookie-secret-file or {SECRET_ENV}"),
        )),
        _ => Ok(()),
    }
}

/// clap's error for a value it could not parse, as the one-line error naming the key, when the
/// value came from the setting's environment variable (clap's own names only the flag).
pub fn env_error(cmd: &Command, err: &clap::Error) -> Option<ConfigError> {
    let text = |kind| match err.get(kind) {
        Some(ContextValue::String(s)) => Some(s.as_str()),
        _ => None,
    };
    // "--cookie-max-age <SECONDS>"
    let long = text(ContextKind::InvalidArg)?.split(' ').next()?.strip_prefix("--")?;
    let value = text(ContextKind::InvalidValue)?;
    let arg = cmd.get_arguments().find(|a| a.get_long() == Some(long))?;
    let setting = declared().into_iter().find(|s| arg.get_id() == s.field)?;
    if std::env::var_os(setting.env()).as_deref() != Some(OsStr::new(value)) {
        return None;
    }
    let reason = match (std::error::Error::source(err), err.get(ContextKind::ValidValue)) {
        (Some(source), _) => source.to_string(),
        (None, Some(ContextValue::Strings(valid))) => format!("expected {}", valid.join(" or ")),
        (None, _) => err.kind().to_string(),
    };
    Some(ConfigError::Env {
        key: setting.key(),
        var: setting.env(),
        value: value.to_owned(),
        reason,
    })
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
        self.over(over)
    }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::Args;

    use super::*;

    fn command() -> Command {
        describe(Settings::augment_args(Command::new("t")))
    }

    fn shown(field: &str) -> String {
        declared().into_iter().find(|s| s.field == field).unwrap().default
    }

    /// The keys serde knows, from its "expected one of" list for an unknown key.
    fn toml_keys() -> BTreeSet<String> {
        let err = toml::from_str::<Settings>("no-such-key = 1").unwrap_err().to_string();
        let list = err.split("expected one of").nth(1).expect(&err);
        list.split(',').map(|k| k.trim().trim_matches('`').to_owned()).collect()
    }

    #[test]
    fn every_setting_has_a_flag_a_key_an_env_var_and_help() {
        let cmd = command();
        let declared = declared();
        assert_eq!(cmd.get_arguments().count(), declared.len());
        let mut keys: BTreeSet<String> = declared.iter().map(Setting::key).collect();
        keys.insert("backends".into()); // `backend`'s alias
        assert_eq!(toml_keys(), keys);
        for s in &declared {
            let arg = cmd.get_arguments().find(|a| a.get_id() == s.field).unwrap();
            let long = arg.get_long().unwrap();
            // A list key's flag may be singular: --admin-write-route, given once per route.
            assert!(
                s.key() == long || s.key() == format!("{long}s"),
                "{long} vs {}",
                s.key()
            );
            assert_eq!(arg.get_env(), Some(OsStr::new(&s.env())));
            assert!(s.env().starts_with(ENV_PREFIX) && !s.env().contains('-'));
            let help = arg.get_help().unwrap().to_string();
            assert!(help.len() > 20, "{long}: {help}");
            assert!(help.ends_with(&format!("[default: {}]", s.default)), "{long}: {help}");
        }
        assert_eq!(
            declared.iter().find(|s| s.field == "cookie_secret").unwrap().env(),
            SECRET_ENV
        );
    }

    #[test]
    fn help_shows_the_defaults_validate_uses() {
        let c = Settings {
            backend: Some(vec!["http://127.0.0.1:9001".into()]),
            ..Settings::default()
        }
        .validate()
        .unwrap();
        let duration = |d: Duration| humantime::format_duration(d).to_string();
        let cases: Vec<(&str, String)> = vec![
            ("listen", c.listen.to_string()),
            ("cookie_name", c.cookie.name.clone()),
            ("cookie_max_age", c.cookie.max_age.to_string()),
            ("cookie_path", c.cookie.path.clone()),
            ("backend_connect_timeout", duration(c.connect_timeout)),
            ("backend_response_timeout", duration(c.response_timeout)),
            ("auth_body_limit", c.auth_body_limit.to_string()),
            ("shutdown_grace", duration(c.shutdown_grace)),
            ("backend_dns_interval", duration(c.dns_interval)),
            ("drain_timeout", duration(c.drain_timeout)),
            (
                "backend_insecure_skip_verify",
                c.backend_tls.insecure_skip_verify.to_string(),
            ),
            ("health_check_interval", duration(c.health.interval)),
            ("health_check_timeout", duration(c.health.timeout)),
            ("health_fall", c.health.fall.to_string()),
            ("health_rise", c.health.rise.to_string()),
            ("admin_journal_max", c.admin_journal_max.to_string()),
            ("admin_reconcile_interval", duration(c.admin_reconcile_interval)),
            ("session_table_size", c.session_table_size.to_string()),
            ("session_lifetime", duration(c.session_lifetime)),
            ("tokens_portable", c.tokens_portable.to_string()),
            ("client_idle_timeout", duration(c.limits.idle_timeout)),
            ("max_connections", c.limits.max_connections.to_string()),
            ("max_header_bytes", c.limits.max_header_bytes.to_string()),
        ];
        for (field, used) in cases {
            assert_eq!(shown(field), used, "{field}");
        }
        let fanout = c.admin_fanout.unwrap();
        let routes: Vec<String> = fanout.routes.iter().map(|(m, p)| format!("{m} {p}")).collect();
        assert_eq!(shown("admin_write_routes"), routes.join(", "));
        assert_eq!(shown("admin_body_limit"), fanout.body_limit.to_string());
        // The named modes: the default shown is the one validate picks.
        let with = |f: fn(&mut Settings, Option<String>), field: &str| {
            let mut s = Settings {
                backend: Some(vec!["http://127.0.0.1:9001".into()]),
                ..Settings::default()
            };
            f(&mut s, Some(shown(field)));
            format!("{:?}", s.validate().unwrap())
        };
        let default = with(|_, _| {}, "listen");
        assert_eq!(with(|s, v| s.balance = v, "balance"), default);
        assert_eq!(with(|s, v| s.log_format = v, "log_format"), default);
        assert_eq!(with(|s, v| s.health_check = v, "health_check"), default);
        assert_eq!(with(|s, v| s.health_check_path = v, "health_check_path"), default);
        assert_eq!(with(|s, v| s.access_log = v, "access_log"), default);
        assert_eq!(with(|s, v| s.admin_writes = v, "admin_writes"), default);
        assert_eq!(with(|s, v| s.replica_watch = v, "replica_watch"), default);
        assert_eq!(with(|s, v| s.fast_path = v, "fast_path"), default);
        assert_eq!(with(|s, v| s.backend_protocol = v, "backend_protocol"), default);
        // And --help prints each of them.
        let help = command().render_long_help().to_string();
        for s in declared().iter().filter(|s| s.field != "cookie_secret") {
            assert!(help.contains(&format!("[default: {}]", s.default)), "{}", s.field);
            assert!(help.contains(&format!("[env: {}=", s.env())), "{}", s.field);
        }
    }

    #[test]
    fn readme_table_lists_every_setting() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"));
        let section = readme.split("## Flags and config keys").nth(1).unwrap();
        let section = section.split("\n## ").next().unwrap();
        let mut rows = Vec::new();
        for line in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split(" | ").collect();
            let names: Vec<&str> = cells[0].split('`').skip(1).step_by(2).collect();
            let flag = names.iter().find(|n| n.starts_with("--")).copied();
            let key = names.iter().find(|n| !n.starts_with("--")).copied();
            rows.push((flag, key, cells[1].replace('`', "")));
        }
        let cmd = command();
        let declared = declared();
        let listed: BTreeSet<&str> = rows.iter().filter_map(|(_, key, _)| *key).collect();
        let keys: Vec<String> = declared.iter().map(Setting::key).collect();
        assert_eq!(listed, keys.iter().map(String::as_str).collect(), "README keys");
        for s in &declared {
            let (flag, _, default) = rows.iter().find(|(_, key, _)| *key == Some(&s.key())).unwrap();
            let arg = cmd.get_arguments().find(|a| a.get_id() == s.field).unwrap();
            if !arg.is_hide_set() {
                assert_eq!(*flag, Some(format!("--{}", arg.get_long().unwrap()).as_str()));
            }
            assert!(default.contains(&s.default), "README default of {}: {default}", s.key());
        }
    }
}
