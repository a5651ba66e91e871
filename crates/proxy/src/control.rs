//! The control plane, off the request path: active health checks, DNS discovery, draining,
//! certificate and configuration reloads. It changes what the data plane sees only by swapping
//! the routing table (and the TLS server configuration) whole.
//!
//! - [`health`]: active checks with hysteresis; [`discovery`]: backends from DNS.
//! - [`journal`]: admin writes broadcast to every replica and kept for replay;
//!   [`sync`]: replicas that lost their state found and resynced, the periodic reconciliation,
//!   following a journal owner when several proxies run.
//! - [`admin`]: the admin port; [`metrics`]: counters and their Prometheus exposition.
//! - This file: [`ControlPlane`], which runs them and applies reloads.

pub mod admin;
pub mod discovery;
pub mod health;
pub mod journal;
pub mod metrics;
pub mod sync;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendSpec, Config, ConfigError};
use crate::control::discovery::{specs_for, Resolve, SystemResolver};
use crate::control::sync::{ReplicaSync, WATCH_INTERVAL};
use crate::dataplane::proxy::Proxy;
use crate::dataplane::server::TlsSettings;
use crate::tls::CertStore;
use crate::upstream::backend::{route_index, ROUTES};
use crate::upstream::connector::BackendConnector;

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
    /// Keeps the replicas' admin state in sync with the journal.
    sync: ReplicaSync,
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
        let sync = ReplicaSync::new(
            proxy.clone(),
            connector.clone(),
            crate::control::sync::SyncSettings {
                replay_token: config.admin_replay_token_file.clone(),
                owner_token: config.admin.as_ref().and_then(|a| a.token.clone()),
                watch: config.replica_watch,
                http2: config.backend_http2,
            },
        );
        if config.journal_owner.is_none() && config.admin_journal.is_none() {
            tracing::warn!(
                "admin-journal is not set: admin writes are journaled in memory only and lost when this proxy restarts"
            );
        }
        if config.journal_owner.is_none() && config.admin_replay_token_file.is_none() {
            tracing::warn!("admin-replay-token-file is not set: replays reuse each write's own Authorization, which the KBS refuses once the token has expired");
        }
        Self {
            proxy,
            sync,
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
        let mut next_watch = Instant::now() + WATCH_INTERVAL;
        // The first reconciliation soon after start: a replica may have restarted empty while
        // this proxy was down, which no signal shows to a proxy that just started.
        let mut next_reconcile = Instant::now() + WATCH_INTERVAL;
        loop {
            let now = Instant::now();
            if now >= next_watch {
                self.sync.watch().await;
                self.sync.catch_up().await;
                next_watch = Instant::now() + WATCH_INTERVAL;
            }
            if now >= next_reconcile {
                self.sync.reconcile().await;
                next_reconcile = Instant::now() + self.state().config.admin_reconcile_interval;
            }
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
            let wake = next_dns
                .min(next_health)
                .min(next_housekeeping)
                .min(next_watch)
                .min(next_reconcile);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = self.sync.woken() => self.sync.on_wake().await,
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Checks every backend once; those that came back up are resynced (they may have
    /// restarted empty); then catches up the healthy ones that are behind on admin writes.
    pub async fn check_health(&self) {
        let (health, http2) = {
            let state = self.state();
            (state.config.health.clone(), state.config.backend_http2)
        };
        let routing = self.proxy.routing();
        let came_up = crate::control::health::check_all(&routing, &health, http2, &self.connector).await;
        for backend in &came_up {
            self.sync
                .resync(backend, crate::control::sync::LossSignal::CameBackUp)
                .await;
        }
        self.sync.catch_up().await;
    }

    /// Replays the journaled admin writes each healthy, non-draining backend has missed, in
    /// order; see [`ReplicaSync::catch_up`].
    pub async fn catch_up(&self) {
        self.sync.catch_up().await;
    }

    /// One round of the replica watch (see [`crate::control::sync`]), then a catch-up: what the control
    /// plane does every [`WATCH_INTERVAL`].
    pub async fn watch_replicas(&self) {
        self.sync.watch().await;
        self.sync.catch_up().await;
    }

    /// Re-applies the whole compacted journal to every in-sync replica; returns the writes sent.
    pub async fn reconcile(&self) -> u64 {
        self.sync.reconcile().await
    }

    /// Resyncs the backend called `name` (it may have lost its state), then catches it up.
    pub async fn resync(&self, name: &str) -> Result<(), ActionError> {
        if !self.sync.resync_by_name(name).await {
            return Err(ActionError::UnknownBackend(name.into()));
        }
        self.sync.catch_up().await;
        Ok(())
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
            let stats = self.proxy.stats();
            match self.resolver.resolve(source).await {
                Ok(addrs) => {
                    let specs = specs_for(source, addrs);
                    stats.count_dns_lookup(&source.host, Some(specs.len()));
                    found.insert(key, specs);
                }
                Err(e) => {
                    stats.count_dns_lookup(&source.host, None);
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
                self.sync.backends_changed();
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
            self.sync.backends_changed();
        }
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(store) = certs {
            let stats = self.proxy.stats();
            match store.reload(false) {
                Ok(true) => {
                    stats.count_tls_reload(true);
                    tracing::info!("TLS certificate reloaded");
                }
                Ok(false) => {}
                Err(e) => {
                    stats.count_tls_reload(false);
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
                Ok(Some((store, server))) => {
                    self.proxy.stats().count_tls_reload(true);
                    Some((store, server.load_full(), settings))
                }
                Ok(None) => None,
                Err(e) => {
                    self.proxy.stats().count_tls_reload(false);
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
        self.sync.backends_changed();
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

    /// Ready: at least one backend is serving (healthy, not draining), in sync with the admin
    /// journal or not: the balancer falls back to replicas behind rather than to none.
    pub fn ready(&self) -> bool {
        self.proxy.routing().backends.list.iter().any(|b| b.is_serving())
    }

    /// The healthy, non-draining replicas that are behind on admin writes (named in `/readyz`).
    pub(crate) fn out_of_sync(&self) -> Vec<String> {
        self.sync.out_of_sync()
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
                let sync = self.sync.status(&b.name);
                let replays: serde_json::Map<String, Value> = crate::upstream::backend::REPLAY_OUTCOMES
                    .iter()
                    .zip(&b.stats.replays)
                    .map(|(o, n)| ((*o).to_owned(), json!(n.load(Ordering::Relaxed))))
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
                    "state_resets": b.stats.state_resets.load(Ordering::Relaxed),
                    "last_state_reset": sync.last_reset,
                    "replay_error": sync.replay_error,
                    "has_metrics": sync.has_metrics,
                    "replays": replays,
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
