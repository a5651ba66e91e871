//! Metrics: lock-free counters bumped on the request path, encoded in the Prometheus text format
//! only when scraped (a prometheus-client [`Collector`] reads the atomics and the current
//! backend set).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::backend::{route_index, ROUTES};
use crate::kbs::RouteKind;
use crate::route_cookie::Rejection;
use crate::routing::Routing;

/// Status classes in [`crate::backend::BackendStats::responses`] order.
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

/// Proxy-wide counters (per-backend ones live in [`crate::backend::BackendStats`]).
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
    /// Time to the response head, per route kind.
    latency: [Histogram; 5],
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
            latency: std::array::from_fn(|_| Histogram::new(exponential_buckets(0.000_25, 2.0, 16))),
        }
    }
}

impl ProxyStats {
    /// Counts a response the proxy made itself.
    pub fn count_local(&self, kind: RouteKind, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.local_responses[route_index(kind)][class].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refused route cookie.
    pub fn count_rejected(&self, why: Rejection) {
        self.cookies_rejected[rejection_index(why)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request pinned by what was learned instead of a route cookie.
    pub fn count_learned(&self, how: crate::affinity::Learned) {
        let i = match how {
            crate::affinity::Learned::SessionId(_) => 0,
            crate::affinity::Learned::Token(_) => 1,
        };
        self.learned[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Records the time to a response head.
    pub fn observe_latency(&self, kind: RouteKind, seconds: f64) {
        self.latency[route_index(kind)].observe(seconds);
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
    let mut registry = Registry::with_prefix("kbs_proxy");
    registry.register_collector(Box::new(ProxyCollector {
        stats: Arc::clone(stats),
        routing: Arc::clone(routing),
    }));
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
        for (ri, route) in ROUTES.iter().enumerate() {
            s.latency[ri].encode(latency.encode_family(&[("route", route.as_str())])?)?;
        }

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
        let per_backend = |f: &dyn Fn(&crate::backend::Backend) -> i64| -> Vec<(Vec<(&str, &str)>, i64)> {
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
            for (i, outcome) in crate::backend::REPLAY_OUTCOMES.iter().enumerate() {
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
