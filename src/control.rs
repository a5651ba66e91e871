//! The control plane, off the request path: active health checks, DNS discovery, draining,
//! certificate and configuration reloads. It changes what the data plane sees only by swapping
//! the routing table (and the TLS server configuration) whole.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::Request;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{route_index, ROUTES};
use crate::config::{BackendSpec, Config, ConfigError};
use crate::connector::BackendConnector;
use crate::discovery::{specs_for, Resolve, SystemResolver};
use crate::proxy::{Proxy, ProxyBody};
use crate::server::TlsSettings;
use crate::tls::CertStore;

/// How often certificate and config files are looked at, and drains swept.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// Re-reads the configuration (file, environment, flags) on reload.
pub type ReloadSource = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// What the control plane keeps between ticks.
struct State {
    /// The configuration in force.
    config: Config,
    /// Backends found per DNS source (`host:port`), as last resolved.
    discovered: BTreeMap<String, Vec<BackendSpec>>,
    /// Modification time of the watched config file when last loaded.
    config_stamp: Option<SystemTime>,
}

/// The control plane of one proxy.
pub struct ControlPlane {
    proxy: Proxy,
    state: Mutex<State>,
    /// Connections for health checks (same TLS settings as traffic).
    connector: BackendConnector,
    /// Pooled client for journal replays.
    client: Client<BackendConnector, ProxyBody>,
    resolver: Box<dyn Resolve>,
    /// Client-facing certificates, when TLS is on.
    certs: Mutex<Option<Arc<CertStore>>>,
    /// The TLS server configuration the workers read per connection.
    tls: Option<TlsSettings>,
    /// Where a reload reads the configuration from, and which file to watch for changes.
    reload: Option<(ReloadSource, Option<PathBuf>)>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").finish_non_exhaustive()
    }
}

/// Why an admin action was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActionError {
    /// No backend of that name.
    #[error("no backend named {0:?}")]
    UnknownBackend(String),
    /// The backend left the configured or discovered set; it only drains.
    #[error("backend {0:?} is no longer configured or discovered; it can only drain")]
    Retired(String),
}

/// Client-facing TLS for a configuration: the certificate store and the server configuration.
pub fn tls_settings(config: &Config) -> Result<Option<(Arc<CertStore>, TlsSettings)>, crate::tls::TlsError> {
    let Some(files) = &config.tls else { return Ok(None) };
    let store = CertStore::new(files.clone())?;
    let server = crate::tls::server_config_with(Arc::clone(&store))?;
    Ok(Some((store, Arc::new(ArcSwap::new(server)))))
}

impl ControlPlane {
    /// A control plane for `proxy` running `config`, with client-facing TLS if given.
    pub fn new(proxy: Proxy, config: Config, tls: Option<(Arc<CertStore>, TlsSettings)>) -> Self {
        let connector = proxy.connector();
        let (certs, tls) = match tls {
            Some((c, t)) => (Some(c), Some(t)),
            None => (None, None),
        };
        let client = Client::builder(TokioExecutor::new()).build(connector.clone());
        Self {
            proxy,
            client,
            state: Mutex::new(State {
                config,
                discovered: BTreeMap::new(),
                config_stamp: None,
            }),
            connector,
            resolver: Box::new(SystemResolver),
            certs: Mutex::new(certs),
            tls,
            reload: None,
        }
    }

    /// Resolves DNS sources with `resolver` instead of the system's.
    pub fn with_resolver(mut self, resolver: impl Resolve) -> Self {
        self.resolver = Box::new(resolver);
        self
    }

    /// Enables reloads from `source`; a change of `watch` (the config file) triggers one too.
    pub fn with_reload(mut self, source: ReloadSource, watch: Option<PathBuf>) -> Self {
        self.state().config_stamp = watch.as_deref().and_then(mtime);
        self.reload = Some((source, watch));
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The proxy it controls.
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// Runs the checks and watchers until `shutdown`, the first round one interval from now:
    /// callers run [`Self::refresh_dns`] and [`Self::check_health`] once before serving.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (dns_interval, health_interval) = {
            let state = self.state();
            (state.config.dns_interval, state.config.health.interval)
        };
        let mut next_dns = Instant::now() + dns_interval;
        let mut next_health = Instant::now() + health_interval;
        let mut next_housekeeping = Instant::now() + HOUSEKEEPING;
        loop {
            let now = Instant::now();
            if now >= next_dns {
                self.refresh_dns().await;
                next_dns = Instant::now() + self.state().config.dns_interval;
            }
            if now >= next_health {
                self.check_health().await;
                next_health = Instant::now() + self.state().config.health.interval;
            }
            if now >= next_housekeeping {
                self.housekeeping();
                next_housekeeping = Instant::now() + HOUSEKEEPING;
            }
            let wake = next_dns.min(next_health).min(next_housekeeping);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Checks every backend once, then catches up the healthy ones that missed admin writes.
    pub async fn check_health(&self) {
        let (health, http2) = {
            let state = self.state();
            (state.config.health.clone(), state.config.backend_http2)
        };
        let routing = self.proxy.routing();
        crate::health::check_all(&routing, &health, http2, &self.connector).await;
        self.catch_up().await;
    }

    /// Replays the journaled admin writes each healthy, non-draining backend has missed, in
    /// order; it takes new sessions again once it has them all. A replica that refuses a write
    /// (4xx) has it counted as applied, with a warning, so one bad write cannot block it forever;
    /// on a 5xx or no answer the replay stops and is tried again at the next round.
    pub async fn catch_up(&self) {
        let journal = Arc::clone(self.proxy.journal());
        let routing = self.proxy.routing();
        for backend in &routing.backends.list {
            if backend.is_draining() || !backend.is_healthy() || journal.behind(&backend.name) == 0 {
                continue;
            }
            let _order = journal.order().await;
            for write in journal.pending(&backend.name) {
                let mut req = Request::new(ProxyBody::full(write.body.clone()));
                *req.method_mut() = write.method.clone();
                let Ok(uri) = format!("{}://{}{}", backend.scheme, backend.authority, write.path).parse() else {
                    break;
                };
                *req.uri_mut() = uri;
                for (name, value) in &write.headers {
                    req.headers_mut().append(name.clone(), value.clone());
                }
                let answer = tokio::time::timeout(routing.response_timeout, self.client.request(req)).await;
                let status = match answer {
                    Ok(Ok(resp)) => resp.status(),
                    Ok(Err(e)) => {
                        tracing::warn!(backend = backend.name, error = %e, "admin journal replay failed; will retry");
                        break;
                    }
                    Err(_) => {
                        tracing::warn!(backend = backend.name, "admin journal replay timed out; will retry");
                        break;
                    }
                };
                if status.is_server_error() {
                    tracing::warn!(backend = backend.name, %status, "admin journal replay refused by a server error; will retry");
                    break;
                }
                if !status.is_success() {
                    tracing::warn!(backend = backend.name, %status, seq = write.seq, path = write.path, "replica refused a replayed admin write; skipping it");
                }
                if let Err(e) = journal.mark_applied(&backend.name, write.seq) {
                    tracing::error!(error = %e, "cannot record the admin journal position");
                    break;
                }
            }
            journal.refresh_lags(&routing.backends);
            if journal.behind(&backend.name) == 0 {
                tracing::info!(backend = backend.name, "replica caught up on admin writes");
            }
        }
    }

    /// Re-resolves every DNS source and installs the resulting backend set when it changed. A
    /// source that fails to resolve keeps its previous addresses.
    pub async fn refresh_dns(&self) {
        let sources = self.state().config.backend_dns.clone();
        if sources.is_empty() && self.state().discovered.is_empty() {
            return;
        }
        let mut found = BTreeMap::new();
        for source in &sources {
            let key = format!("{}:{}", source.host, source.port);
            match self.resolver.resolve(source).await {
                Ok(addrs) => {
                    found.insert(key, specs_for(source, addrs));
                }
                Err(e) => {
                    tracing::warn!(source = key, error = %e, "DNS resolution failed; keeping the last addresses");
                    if let Some(old) = self.state().discovered.get(&key) {
                        found.insert(key, old.clone());
                    }
                }
            }
        }
        let changed = {
            let mut state = self.state();
            let changed = found != state.discovered;
            if changed {
                let count: usize = found.values().map(Vec::len).sum();
                tracing::info!(backends = count, "DNS discovery changed the backend set");
                state.discovered = found;
                let discovered: Vec<BackendSpec> = state.discovered.values().flatten().cloned().collect();
                self.proxy.set_backends(&state.config.backends, &discovered);
            }
            changed
        };
        if changed {
            self.catch_up().await;
        }
    }

    /// Drops retired backends whose drain expired; reloads changed certificates and config file.
    pub fn housekeeping(&self) {
        let routing = self.proxy.routing();
        let timeout = routing.backends.drain_timeout;
        if routing
            .backends
            .list
            .iter()
            .any(|b| b.is_retired() && b.drain_expired(timeout))
        {
            let state = self.state();
            let discovered: Vec<BackendSpec> = state.discovered.values().flatten().cloned().collect();
            self.proxy.set_backends(&state.config.backends, &discovered);
        }
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(store) = certs {
            match store.reload(false) {
                Ok(true) => tracing::info!("TLS certificate reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate changed but cannot be loaded; keeping the old one")
                }
            }
        }
        let changed = match &self.reload {
            Some((_, Some(file))) => {
                let now = mtime(file);
                let mut state = self.state();
                let changed = now.is_some() && now != state.config_stamp;
                state.config_stamp = now;
                changed
            }
            _ => false,
        };
        if changed {
            tracing::info!("config file changed; reloading");
            let _ = self.reload();
        }
    }

    /// Reloads the configuration (SIGHUP): routing settings, backends, health settings and
    /// certificates, all or nothing. A bad configuration is refused and the old one keeps running.
    pub fn reload(&self) -> Result<(), String> {
        let Some((source, _)) = &self.reload else {
            return Err("reload is not enabled".into());
        };
        let mut config = match source() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "reload refused: the new configuration is invalid; keeping the old one");
                return Err(e.to_string());
            }
        };
        // The workers' backend clients are built for one protocol: keep it (health checks too).
        let running_http2 = self.state().config.backend_http2;
        if config.backend_http2 != running_http2 {
            tracing::warn!("changing backend-protocol needs a restart; keeping the current one");
            config.backend_http2 = running_http2;
        }
        // Certificates first: if they do not load, nothing changes.
        let new_tls = match (&config.tls, &self.tls) {
            (Some(_), Some(settings)) => match tls_settings(&config) {
                Ok(Some((store, server))) => Some((store, server.load_full(), settings)),
                Ok(None) => None,
                Err(e) => {
                    tracing::error!(error = %e, "reload refused: TLS files do not load; keeping the old configuration");
                    return Err(e.to_string());
                }
            },
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                tracing::warn!("turning client TLS on or off needs a restart; keeping the current mode");
                None
            }
        };
        if let Some((store, server, settings)) = new_tls {
            settings.store(server);
            *self.certs.lock().unwrap_or_else(|p| p.into_inner()) = Some(store);
        }
        let mut state = self.state();
        let discovered: Vec<BackendSpec> = state.discovered.values().flatten().cloned().collect();
        self.proxy.apply(&config, &discovered);
        state.config = config;
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Drains the backend called `name`: no new sessions, pinned ones continue.
    pub fn drain(&self, name: &str) -> Result<(), ActionError> {
        let routing = self.proxy.routing();
        let b = routing
            .backends
            .by_name(name)
            .ok_or_else(|| ActionError::UnknownBackend(name.into()))?;
        b.drain();
        tracing::info!(backend = name, "backend drained by an operator");
        Ok(())
    }

    /// Ends the drain of the backend called `name`.
    pub fn undrain(&self, name: &str) -> Result<(), ActionError> {
        let routing = self.proxy.routing();
        let b = routing
            .backends
            .by_name(name)
            .ok_or_else(|| ActionError::UnknownBackend(name.into()))?;
        if !b.undrain() {
            return Err(ActionError::Retired(name.into()));
        }
        tracing::info!(backend = name, "backend undrained by an operator");
        Ok(())
    }

    /// Ready: at least one backend takes new sessions.
    pub fn ready(&self) -> bool {
        self.proxy
            .routing()
            .backends
            .list
            .iter()
            .any(|b| b.accepts_new_sessions())
    }

    /// Each backend's name, address, health, drain state and counters.
    pub fn backends_json(&self) -> Value {
        let routing = self.proxy.routing();
        let list: Vec<Value> = routing
            .backends
            .list
            .iter()
            .map(|b| {
                let requests: serde_json::Map<String, Value> = ROUTES
                    .iter()
                    .map(|r| {
                        let n: u64 = b.stats.responses[route_index(*r)]
                            .iter()
                            .map(|c| c.load(Ordering::Relaxed))
                            .sum();
                        (r.as_str().to_owned(), json!(n))
                    })
                    .collect();
                json!({
                    "name": b.name,
                    "address": format!("{}://{}", b.scheme, b.authority),
                    "healthy": b.is_healthy(),
                    "check_passing": b.check_verdict(),
                    "in_backoff": b.in_backoff(),
                    "draining": b.is_draining(),
                    "retired": b.is_retired(),
                    "accepts_new_sessions": b.accepts_new_sessions(),
                    "in_flight": b.in_flight(),
                    "sessions_pinned": b.stats.sessions_pinned.load(Ordering::Relaxed),
                    "admin_writes_behind": b.journal_lag(),
                    "in_sync": b.journal_lag() == 0,
                    "pinned_refused": b.stats.pinned_refused.load(Ordering::Relaxed),
                    "requests": requests,
                })
            })
            .collect();
        Value::Array(list)
    }
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
