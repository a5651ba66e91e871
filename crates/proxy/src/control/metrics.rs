//! Metrics: lock-free counters bumped on the request path, encoded in the Prometheus text format
//! only when scraped (a prometheus-client [`Collector`] reads the atomics and the current
//! backend set); [`exposition`] gives the scraper the format it asks for.

pub mod exposition;
mod process;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::kbs::RouteKind;
use crate::routing::route_cookie::Rejection;
use crate::routing::Routing;
use crate::upstream::backend::{route_index, UpstreamCause, ROUTES};

/// Status classes in [`crate::upstream::backend::BackendStats::responses`] order.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const REJECTIONS: [Rejection; 5] = [
    Rejection::Malformed,
    Rejection::BadSignature,
    Rejection::Expired,
    Rejection::FromTheFuture,
    Rejection::UnknownBackend,
];

fn rejection_index(r: Rejection) -> usize {
    match r {
        Rejection::Malformed => 0,
        Rejection::BadSignature => 1,
        Rejection::Expired => 2,
        Rejection::FromTheFuture => 3,
        Rejection::UnknownBackend => 4,
    }
}

fn rejection_label(r: Rejection) -> &'static str {
    match r {
        Rejection::Malformed => "malformed",
        Rejection::BadSignature => "bad_signature",
        Rejection::Expired => "expired",
        Rejection::FromTheFuture => "from_the_future",
        Rejection::UnknownBackend => "unknown_backend",
    }
}

/// Proxy-wide counters (per-backend ones live in [`crate::upstream::backend::BackendStats`]).
#[derive(Debug)]
pub struct ProxyStats {
    /// Responses the proxy answered itself, by route kind and status class.
    local_responses: [[AtomicU64; 5]; 5],
    /// Route cookies issued.
    pub cookies_issued: AtomicU64,
    /// Route cookies refused, by reason.
    cookies_rejected: [AtomicU64; 5],
    /// Requests whose valid cookie named a down or gone backend and that were balanced anew.
    pub repinned: AtomicU64,
    /// Client connections open now.
    pub active_connections: AtomicI64,
    /// Requests pinned without a valid route cookie: by a learned session id, by a learned token.
    learned: [AtomicU64; 2],
    /// Exchanges that ended their client connection early, by [`AbortReason`].
    aborted: [AtomicU64; AbortReason::ALL.len()],
    /// Time to the response head: one shard per worker, summed at scrape time.
    latency: Mutex<Vec<Arc<LatencyShard>>>,
    /// Answers the proxy made itself, by KBS error type, indexed as [`KBS_ERROR_TYPES`].
    local_errors: [AtomicU64; KBS_ERROR_TYPES.len()],
    /// Live learned entries dropped to keep the tables bounded: session ids, tokens.
    evicted: [AtomicU64; 2],
    /// Client-facing certificate reloads: loaded, failed.
    tls_reloads: [AtomicU64; 2],
    /// DNS discovery, per name (off the request path: a lock is fine).
    dns: Mutex<BTreeMap<String, DnsStats>>,
}

/// One DNS name's lookups and what the last one gave.
#[derive(Debug, Default, Clone, Copy)]
struct DnsStats {
    ok: u64,
    error: u64,
    /// Backends it gives now (the last good lookup's).
    backends: i64,
}

/// The KBS error types of the answers the proxy makes itself (`ProxyError`'s variants): the
/// `error` label of `kbs_proxy_local_answers_total`.
pub(crate) const KBS_ERROR_TYPES: [&str; 11] = [
    "ServiceUnavailable",
    "AttestationError",
    "TokenNotFound",
    "SessionLost",
    "PayloadTooLarge",
    "InvalidRequest",
    "BadGateway",
    "AdminWriteIncomplete",
    "JournalOwnerUnavailable",
    "JournalOwnerLoop",
    "GatewayTimeout",
];

/// Upper bounds of `kbs_proxy_backend_response_duration_seconds`' buckets, nanoseconds: few
/// and fixed, as HAProxy's and Envoy's, so a per-backend histogram stays cheap to export.
const RESPONSE_BOUNDS_NS: [u64; 11] = [
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
/// Shards of a backend's response histogram; a worker writes the one its slot picks, so
/// workers (up to this many) do not share a cache line per request.
const RESPONSE_SHARDS: usize = 8;

/// One backend's time from request sent to response head, over both transports.
#[derive(Debug, Default)]
pub struct ResponseLatency {
    shards: [ResponseShard; RESPONSE_SHARDS],
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct ResponseShard {
    /// Per bucket, not cumulative; the last is +Inf. Their total is the count.
    buckets: [AtomicU64; RESPONSE_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl ResponseLatency {
    /// Records one response head `elapsed` after its request was sent, from the worker whose
    /// latency shard has `slot`.
    pub(crate) fn observe(&self, slot: usize, elapsed: std::time::Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let shard = &self.shards[slot % RESPONSE_SHARDS];
        let bucket = RESPONSE_BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(RESPONSE_BOUNDS_NS.len());
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The shards summed: (sum in seconds, count, per-bucket counts with their bounds).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let bound = |i: usize| RESPONSE_BOUNDS_NS.get(i).map_or(f64::MAX, |&ns| ns as f64 / 1e9);
        let mut buckets: Vec<(f64, u64)> = (0..=RESPONSE_BOUNDS_NS.len()).map(|i| (bound(i), 0)).collect();
        let (mut sum_ns, mut count) = (0u64, 0u64);
        for shard in &self.shards {
            for (slot, b) in buckets.iter_mut().zip(&shard.buckets) {
                let n = b.load(Ordering::Relaxed);
                slot.1 += n;
                count += n;
            }
            sum_ns = sum_ns.wrapping_add(shard.sum_ns.load(Ordering::Relaxed));
        }
        (sum_ns as f64 / 1e9, count, buckets)
    }
}

/// Why an exchange ended its client connection early, after the answer or a body began to
/// move: the `reason` of `kbs_proxy_aborted_exchanges_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AbortReason {
    /// The client closed or failed while its request body was read.
    ClientBody,
    /// The backend failed while taking the request body.
    BackendBody,
    /// The response body broke off after its head was sent.
    ResponseBody,
    /// The client went away before its answer was written.
    ClientGone,
}

impl AbortReason {
    /// Every reason, in counter order.
    pub const ALL: [Self; 4] = [
        Self::ClientBody,
        Self::BackendBody,
        Self::ResponseBody,
        Self::ClientGone,
    ];

    /// Its label.
    pub fn label(self) -> &'static str {
        match self {
            Self::ClientBody => "client_body",
            Self::BackendBody => "backend_body",
            Self::ResponseBody => "response_body",
            Self::ClientGone => "client_gone",
        }
    }
}

/// Number of latency buckets: 0.25 ms doubling 16 times (to ~8.2 s), then +Inf.
const LATENCY_BUCKETS: usize = 17;
/// The first bucket's upper bound, nanoseconds.
const LATENCY_FIRST_NS: u64 = 250_000;

/// One worker's latency histograms, per route kind. Only that worker's threads (its fast-path
/// loop and its tokio runtime) write it, with relaxed atomics on lines other workers do not
/// write; a scrape reads every shard and sums them.
/// prometheus-client's `Histogram` takes a write lock per observation, one lock shared by every
/// worker: a cross-core handoff per request (`benches/hot_path.rs`: `latency_*`).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct LatencyShard {
    routes: [RouteLatency; 5],
    /// Which worker's (the order shards were made in): picks its shard of per-backend
    /// histograms.
    pub(crate) slot: usize,
}

#[derive(Debug, Default)]
struct RouteLatency {
    /// Per bucket (not cumulative): observations at most its bound and above the one before.
    /// Their total is the count (one atomic less per request).
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_ns: AtomicU64,
}

impl LatencyShard {
    /// Records the time to a response head for a request of `kind`.
    pub fn observe(&self, kind: RouteKind, elapsed: std::time::Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let r = &self.routes[route_index(kind)];
        r.buckets[latency_bucket(ns)].fetch_add(1, Ordering::Relaxed);
        r.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// The bucket of an observation of `ns`: bucket `i` holds (bound(i-1), bound(i)] with
/// bound(i) = 0.25 ms × 2^i; the last is +Inf.
fn latency_bucket(ns: u64) -> usize {
    // ceil(ns / first bound), at least 1; its base-2 ceiling logarithm is the bucket.
    let q = ns.div_ceil(LATENCY_FIRST_NS).max(1);
    let i = (u64::BITS - (q - 1).leading_zeros()) as usize;
    i.min(LATENCY_BUCKETS - 1)
}

/// The upper bound of latency bucket `i`, seconds (`f64::MAX` for +Inf, as prometheus-client).
fn latency_bound(i: usize) -> f64 {
    if i + 1 == LATENCY_BUCKETS {
        f64::MAX
    } else {
        (LATENCY_FIRST_NS << i) as f64 / 1e9
    }
}

impl Default for ProxyStats {
    fn default() -> Self {
        Self {
            local_responses: Default::default(),
            cookies_issued: AtomicU64::new(0),
            cookies_rejected: Default::default(),
            repinned: AtomicU64::new(0),
            active_connections: AtomicI64::new(0),
            learned: Default::default(),
            aborted: Default::default(),
            latency: Mutex::new(Vec::new()),
            local_errors: Default::default(),
            evicted: Default::default(),
            tls_reloads: Default::default(),
            dns: Mutex::default(),
        }
    }
}

impl ProxyStats {
    /// Counts a response the proxy made itself.
    pub(crate) fn count_local(&self, kind: RouteKind, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.local_responses[route_index(kind)][class].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused route cookie.
    pub(crate) fn count_rejected(&self, why: Rejection) {
        self.cookies_rejected[rejection_index(why)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request pinned by what was learned instead of a route cookie.
    pub(crate) fn count_learned(&self, how: crate::routing::affinity::Learned) {
        let i = match how {
            crate::routing::affinity::Learned::SessionId(_) => 0,
            crate::routing::affinity::Learned::Token(_) => 1,
        };
        self.learned[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an exchange that ended its client connection early.
    pub(crate) fn count_aborted(&self, why: AbortReason) {
        self.aborted[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an answer the proxy made itself with the KBS error type `kbs_type`.
    pub(crate) fn count_local_error(&self, kbs_type: &str) {
        if let Some(i) = KBS_ERROR_TYPES.iter().position(|t| *t == kbs_type) {
            self.local_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Local answers with `kbs_type` so far.
    #[cfg(test)]
    pub(crate) fn local_errors(&self, kbs_type: &str) -> u64 {
        let i = KBS_ERROR_TYPES.iter().position(|t| *t == kbs_type).unwrap();
        self.local_errors[i].load(Ordering::Relaxed)
    }

    /// Counts a live learned entry dropped to keep a table bounded: a session id's (`token`
    /// false) or a token's.
    pub(crate) fn count_evicted(&self, token: bool) {
        self.evicted[usize::from(token)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a reload of the client-facing certificate that loaded (`ok`) or failed.
    pub(crate) fn count_tls_reload(&self, ok: bool) {
        self.tls_reloads[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a lookup of the DNS name `name`; `backends`: what it gives now, when it resolved.
    pub(crate) fn count_dns_lookup(&self, name: &str, backends: Option<usize>) {
        let mut dns = self.dns.lock().unwrap_or_else(|p| p.into_inner());
        let stats = match dns.get_mut(name) {
            Some(s) => s,
            None => dns.entry(name.to_owned()).or_default(),
        };
        match backends {
            Some(n) => {
                stats.ok += 1;
                stats.backends = i64::try_from(n).unwrap_or(i64::MAX);
            }
            None => stats.error += 1,
        }
    }

    /// A new latency shard for one worker, read at every scrape from now on.
    pub fn latency_shard(&self) -> Arc<LatencyShard> {
        let mut shards = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let shard = Arc::new(LatencyShard {
            slot: shards.len(),
            ..LatencyShard::default()
        });
        shards.push(Arc::clone(&shard));
        shard
    }

    /// Every shard's histogram of `kind`, summed: (sum in seconds, count, per-bucket counts).
    fn latency_sum(&self, kind: RouteKind) -> (f64, u64, Vec<(f64, u64)>) {
        let shards = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let mut buckets: Vec<(f64, u64)> = (0..LATENCY_BUCKETS).map(|i| (latency_bound(i), 0)).collect();
        let (mut sum_ns, mut count) = (0u64, 0u64);
        for shard in shards.iter() {
            let r = &shard.routes[route_index(kind)];
            for (slot, b) in buckets.iter_mut().zip(&r.buckets) {
                let n = b.load(Ordering::Relaxed);
                slot.1 += n;
                count += n;
            }
            sum_ns = sum_ns.wrapping_add(r.sum_ns.load(Ordering::Relaxed));
        }
        (sum_ns as f64 / 1e9, count, buckets)
    }

    /// Route cookies refused for `why` so far.
    pub fn rejected(&self, why: Rejection) -> u64 {
        self.cookies_rejected[rejection_index(why)].load(Ordering::Relaxed)
    }
}

/// Encodes everything on scrape.
#[derive(Debug)]
struct ProxyCollector {
    stats: Arc<ProxyStats>,
    routing: Arc<ArcSwap<Routing>>,
}

/// The Prometheus text exposition of the proxy's metrics.
pub fn render(stats: &Arc<ProxyStats>, routing: &Arc<ArcSwap<Routing>>) -> String {
    let mut registry = Registry::default();
    registry
        .sub_registry_with_prefix("kbs_proxy")
        .register_collector(Box::new(ProxyCollector {
            stats: Arc::clone(stats),
            routing: Arc::clone(routing),
        }));
    // The standard process_* names carry no prefix.
    registry.register_collector(Box::new(process::ProcessCollector));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, &str)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        m.encode_family(labels)?.encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, &str)>, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

impl Collector for ProxyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let routing = self.routing.load();
        let backends = &routing.backends.list;
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        let mut requests = Vec::new();
        for (ri, route) in ROUTES.iter().enumerate() {
            for (ci, class) in CLASSES.iter().enumerate() {
                let local = load(&s.local_responses[ri][ci]);
                if local > 0 {
                    requests.push((
                        vec![("backend", "proxy"), ("route", route.as_str()), ("class", *class)],
                        local,
                    ));
                }
                for b in backends {
                    let n = load(&b.stats.responses[ri][ci]);
                    if n > 0 {
                        requests.push((
                            vec![
                                ("backend", b.name.as_str()),
                                ("route", route.as_str()),
                                ("class", *class),
                            ],
                            n,
                        ));
                    }
                }
            }
        }
        counter(
            &mut encoder,
            "requests",
            "Responses by backend (\"proxy\": answered by the proxy), route kind and status class",
            &requests,
        )?;

        let mut latency = encoder.encode_descriptor(
            "request_duration_seconds",
            "Time from request to response head, by route kind",
            None,
            MetricType::Histogram,
        )?;
        for route in ROUTES {
            let (sum, count, buckets) = s.latency_sum(route);
            latency
                .encode_family(&[("route", route.as_str())])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }

        let mut response = encoder.encode_descriptor(
            "backend_response_duration_seconds",
            "Time from request sent to the backend to its response head, by backend",
            None,
            MetricType::Histogram,
        )?;
        for b in backends {
            let (sum, count, buckets) = b.stats.response_latency.snapshot();
            response
                .encode_family(&[("backend", b.name.as_str())])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        let mut errors = Vec::new();
        for b in backends {
            for cause in UpstreamCause::ALL {
                errors.push((
                    vec![("backend", b.name.as_str()), ("cause", cause.label())],
                    b.stats.upstream_errors(cause),
                ));
            }
        }
        counter(
            &mut encoder,
            "upstream_errors",
            "Failed exchanges with a backend on real traffic (retried ones too), by cause",
            &errors,
        )?;
        let retries: Vec<_> = backends
            .iter()
            .map(|b| (vec![("backend", b.name.as_str())], load(&b.stats.retries)))
            .collect();
        counter(
            &mut encoder,
            "retries",
            "Requests re-sent to another backend after this one refused the connection",
            &retries,
        )?;
        let local: Vec<_> = KBS_ERROR_TYPES
            .iter()
            .zip(&s.local_errors)
            .map(|(t, n)| (vec![("error", *t)], load(n)))
            .collect();
        counter(
            &mut encoder,
            "local_answers",
            "Answers the proxy made itself, by KBS error type",
            &local,
        )?;
        counter(
            &mut encoder,
            "sessions_evicted",
            "Live learned session ids and tokens dropped to keep the tables within session-table-size",
            &[
                (vec![("by", "session_id")], load(&s.evicted[0])),
                (vec![("by", "token")], load(&s.evicted[1])),
            ],
        )?;
        counter(
            &mut encoder,
            "tls_reloads",
            "Reloads of the client-facing certificate, by result",
            &[
                (vec![("result", "ok")], load(&s.tls_reloads[0])),
                (vec![("result", "error")], load(&s.tls_reloads[1])),
            ],
        )?;
        let dns = s.dns.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut lookups = Vec::new();
        for (name, d) in &dns {
            lookups.push((vec![("name", name.as_str()), ("result", "ok")], d.ok));
            lookups.push((vec![("name", name.as_str()), ("result", "error")], d.error));
        }
        counter(
            &mut encoder,
            "dns_lookups",
            "Lookups of backend-dns names, by result",
            &lookups,
        )?;
        let found: Vec<_> = dns
            .iter()
            .map(|(name, d)| (vec![("name", name.as_str())], d.backends))
            .collect();
        gauge(
            &mut encoder,
            "dns_backends",
            "Backends a backend-dns name gives now (its last good lookup's addresses)",
            &found,
        )?;

        counter(
            &mut encoder,
            "access_log_dropped_lines",
            "Access-log lines dropped because the log's sink could not keep up",
            &[(vec![], crate::telemetry::access::dropped())],
        )?;
        counter(
            &mut encoder,
            "cookies_issued",
            "Route cookies issued",
            &[(vec![], load(&s.cookies_issued))],
        )?;
        let rejected: Vec<_> = REJECTIONS
            .iter()
            .map(|r| (vec![("reason", rejection_label(*r))], s.rejected(*r)))
            .collect();
        counter(
            &mut encoder,
            "cookies_rejected",
            "Route cookies refused (forged, altered, expired)",
            &rejected,
        )?;
        counter(
            &mut encoder,
            "cookies_repinned",
            "Requests whose cookie named a down or gone backend, balanced anew",
            &[(vec![], load(&s.repinned))],
        )?;
        let refused: Vec<_> = backends
            .iter()
            .map(|b| (vec![("backend", b.name.as_str())], load(&b.stats.pinned_refused)))
            .collect();
        counter(
            &mut encoder,
            "pinned_refused",
            "Pinned requests answered with a KBS 401: backend down, drained or gone",
            &refused,
        )?;
        counter(
            &mut encoder,
            "learned_pins",
            "Requests without a valid route cookie pinned by a learned kbs-session-id or token",
            &[
                (vec![("by", "session_id")], load(&s.learned[0])),
                (vec![("by", "token")], load(&s.learned[1])),
            ],
        )?;
        counter(
            &mut encoder,
            "aborted_exchanges",
            "Exchanges that ended the client connection early after the answer or a body began to move, by reason",
            &AbortReason::ALL
                .iter()
                .zip(&s.aborted)
                .map(|(r, n)| (vec![("reason", r.label())], load(n)))
                .collect::<Vec<_>>(),
        )?;
        gauge(
            &mut encoder,
            "active_connections",
            "Client connections open",
            &[(vec![], s.active_connections.load(Ordering::Relaxed))],
        )?;

        let mut transitions = Vec::new();
        for b in backends {
            transitions.push((vec![("backend", b.name.as_str()), ("to", "up")], load(&b.stats.went_up)));
            transitions.push((
                vec![("backend", b.name.as_str()), ("to", "down")],
                load(&b.stats.went_down),
            ));
        }
        counter(
            &mut encoder,
            "backend_health_transitions",
            "Active health check transitions",
            &transitions,
        )?;
        let per_backend = |f: &dyn Fn(&crate::upstream::backend::Backend) -> i64| -> Vec<(Vec<(&str, &str)>, i64)> {
            backends
                .iter()
                .map(|b| (vec![("backend", b.name.as_str())], f(b)))
                .collect()
        };
        gauge(
            &mut encoder,
            "backend_up",
            "1 when the backend is healthy",
            &per_backend(&|b| i64::from(b.is_healthy())),
        )?;
        gauge(
            &mut encoder,
            "backend_draining",
            "1 when the backend is draining",
            &per_backend(&|b| i64::from(b.is_draining())),
        )?;
        gauge(
            &mut encoder,
            "backend_in_flight",
            "Requests in flight to the backend",
            &per_backend(&|b| i64::try_from(b.in_flight()).unwrap_or(i64::MAX)),
        )?;
        let ejections: Vec<_> = backends
            .iter()
            .map(|b| (vec![("backend", b.name.as_str())], load(&b.stats.ejections)))
            .collect();
        counter(
            &mut encoder,
            "backend_ejections",
            "Passive ejections after failures on real traffic",
            &ejections,
        )?;
        let lag: Vec<_> = backends
            .iter()
            .map(|b| {
                (
                    vec![("backend", b.name.as_str())],
                    i64::try_from(b.journal_lag()).unwrap_or(i64::MAX),
                )
            })
            .collect();
        gauge(
            &mut encoder,
            "backend_admin_writes_behind",
            "Journaled admin writes the backend has not applied",
            &lag,
        )?;
        let resets: Vec<_> = backends
            .iter()
            .map(|b| (vec![("backend", b.name.as_str())], load(&b.stats.state_resets)))
            .collect();
        counter(
            &mut encoder,
            "backend_state_resets",
            "Times the backend was found to have lost its admin state (restarted empty) and was resynced",
            &resets,
        )?;
        let mut replays = Vec::new();
        for b in backends {
            for (i, outcome) in crate::upstream::backend::REPLAY_OUTCOMES.iter().enumerate() {
                replays.push((
                    vec![("backend", b.name.as_str()), ("outcome", *outcome)],
                    load(&b.stats.replays[i]),
                ));
            }
        }
        counter(
            &mut encoder,
            "backend_admin_replays",
            "Journaled admin writes replayed to the backend (catch-up and reconciliation), by outcome",
            &replays,
        )?;
        let pinned: Vec<_> = backends
            .iter()
            .map(|b| (vec![("backend", b.name.as_str())], load(&b.stats.sessions_pinned)))
            .collect();
        counter(
            &mut encoder,
            "backend_sessions_pinned",
            "Route cookies issued for the backend",
            &pinned,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn latency_buckets_follow_the_le_bounds() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(250_000), 0, "at the bound: le");
        assert_eq!(latency_bucket(250_001), 1);
        assert_eq!(latency_bucket(500_000), 1);
        assert_eq!(latency_bucket(500_001), 2);
        assert_eq!(latency_bucket(1_000_000), 2);
        assert_eq!(latency_bucket(250_000 << 15), 15);
        assert_eq!(latency_bucket((250_000 << 15) + 1), 16, "+Inf");
        assert_eq!(latency_bucket(u64::MAX), 16);
        for i in 0..LATENCY_BUCKETS - 1 {
            let bound_ns = (latency_bound(i) * 1e9).round() as u64;
            assert_eq!(latency_bucket(bound_ns), i);
            assert_eq!(latency_bucket(bound_ns + 1), i + 1);
        }
    }

    #[test]
    fn backend_response_buckets_are_le_and_shards_are_summed() {
        let r = ResponseLatency::default();
        r.observe(0, Duration::from_millis(5));
        r.observe(1, Duration::from_nanos(5_000_001));
        r.observe(9, Duration::from_secs(11));
        let (sum, count, buckets) = r.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 11.010_000_001).abs() < 1e-6, "{sum}");
        assert_eq!((buckets[0], buckets[1].1), ((0.005, 1), 1));
        assert_eq!(buckets[11], (f64::MAX, 1), "+Inf");
        assert_eq!(buckets.len(), 12);
    }

    #[test]
    fn shards_are_summed_at_scrape() {
        let stats = ProxyStats::default();
        let (a, b) = (stats.latency_shard(), stats.latency_shard());
        a.observe(RouteKind::Resource, Duration::from_micros(100));
        b.observe(RouteKind::Resource, Duration::from_millis(3));
        b.observe(RouteKind::Auth, Duration::from_secs(60));
        let (sum, count, buckets) = stats.latency_sum(RouteKind::Resource);
        assert_eq!(count, 2);
        assert!((sum - 0.0031).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0].1, 1);
        assert_eq!(buckets[4].1, 1, "3 ms is in (2 ms, 4 ms]");
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 2);
        let (_, count, buckets) = stats.latency_sum(RouteKind::Auth);
        assert_eq!((count, buckets[LATENCY_BUCKETS - 1].1), (1, 1));
    }
}
