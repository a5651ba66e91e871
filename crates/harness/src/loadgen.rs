//! A KBS load generator: virtual attesters, each with its own cookie jar, drive full sessions
//! (`POST auth` → `POST attest` → `GET resource/<path>`) against any KBS URL — the proxy, a
//! replica, a simulated replica — and report latencies, errors and affinity.
//!
//! Each virtual client is a [`KbsClient`] (the client that behaves like the real one), runs its
//! sessions one after another, and forgets its cookies between sessions, as a new attester
//! would. By default it keeps its keep-alive connection from one session to the next;
//! [`LoadOptions::new_connection_per_session`] opens a new one per session instead.
//!
//! Affinity is checked from the `x-kbs-replica` response header that the simulated KBS sends:
//! a session whose responses name more than one replica is a violation (the real KBS would have
//! failed it, or served it from two memories). Through the proxy the count must be zero.
//! Against a real KBS, which sends no such header, sessions are counted as unattributed.
//!
//! Every run is bounded: by [`LoadOptions::duration`], by [`LoadOptions::sessions`], or by
//! [`DEFAULT_DURATION`] when neither is given; each request by
//! [`LoadOptions::request_timeout`]. Sessions under way at the deadline are finished.
//!
//! The [`Report`] prints as a table ([`Report::render_table`]), as a versioned JSON document
//! ([`schema`]) and as an SVG latency-percentile plot ([`plot`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::kbs_client::{ClientError, KbsClient};

pub mod plot;
pub mod schema;

/// The run length when neither a duration nor a session count is given.
pub(crate) const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// The largest latency the histograms hold, in microseconds (a minute); longer ones are
/// recorded as this.
const MAX_LATENCY_US: u64 = 60_000_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The KBS (or proxy) base URL, `http://host:port`.
    pub url: String,
    /// Virtual clients running sessions at once; at least 1.
    pub concurrency: usize,
    /// Stop starting sessions after this long.
    pub duration: Option<Duration>,
    /// Stop after this many sessions in all (successful or not).
    pub sessions: Option<u64>,
    /// The resource path fetched at the end of each session, `repo/type/tag`.
    pub resource: String,
    /// Time limit of each request; one over it fails its session with a `timeout` error.
    pub request_timeout: Duration,
    /// Open a new connection for every session instead of keeping one per virtual client.
    pub new_connection_per_session: bool,
    /// Never send the route cookie back (forget it after every response): what a balancer
    /// without affinity amounts to. Used to show that the affinity check can fail.
    pub drop_route_cookie: bool,
    /// The proxy's route cookie name, for [`LoadOptions::drop_route_cookie`].
    pub route_cookie: String,
}

impl LoadOptions {
    /// Defaults against `url`: 16 clients, [`DEFAULT_DURATION`], resource `default/key/demo`,
    /// 10 s per request, keep-alive connections, route cookie `route` kept.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            concurrency: 16,
            duration: None,
            sessions: None,
            resource: "default/key/demo".into(),
            request_timeout: Duration::from_secs(10),
            new_connection_per_session: false,
            drop_route_cookie: false,
            route_cookie: "route".into(),
        }
    }
}

/// A step of a session whose latency is measured; [`Phase::Session`] is the whole session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// `POST /kbs/v0/auth`.
    Auth,
    /// `POST /kbs/v0/attest`.
    Attest,
    /// `GET /kbs/v0/resource/<path>`.
    Resource,
    /// The three steps together, for successful sessions.
    Session,
}

impl Phase {
    /// Every phase, in session order.
    pub const ALL: [Phase; 4] = [Phase::Auth, Phase::Attest, Phase::Resource, Phase::Session];
    /// The steps a session runs, in order.
    const STEPS: [Phase; 3] = [Phase::Auth, Phase::Attest, Phase::Resource];

    /// A short label for tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auth => "auth",
            Self::Attest => "attest",
            Self::Resource => "resource",
            Self::Session => "session",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counts so far, handed to the progress callback about once a second.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Time since the run started.
    pub elapsed: Duration,
    /// Sessions whose three steps succeeded.
    pub sessions_ok: u64,
    /// Sessions that failed at some step.
    pub sessions_failed: u64,
    /// Sessions answered by more than one replica.
    pub affinity_violations: u64,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.sessions_ok as f64 / secs
        } else {
            0.0
        };
        write!(
            f,
            "{secs:6.1}s  sessions ok {} ({rate:.0}/s)  failed {}  affinity violations {}",
            self.sessions_ok, self.sessions_failed, self.affinity_violations
        )
    }
}

/// Latency summary of one phase, in microseconds, over its successful requests; its JSON form
/// is the `latency` object of a step in the [`schema`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// Requests (or sessions) measured.
    pub count: u64,
    /// Mean, rounded to 0.1 µs (the histograms keep three significant digits, no more).
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    #[serde(rename = "p99_9_us")]
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_us: round_to(h.mean(), 1),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// One point of a latency-percentile curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percentile {
    /// The percentile, 0 to 100 (99.9 is the 99.9th).
    pub percentile: f64,
    /// The latency at or below which that share of the requests finished, in microseconds.
    pub us: u64,
}

/// Points per "nine" of a percentile curve: 0.1 apart on the `-log10(1 - q)` scale.
const CURVE_POINTS_PER_NINE: u32 = 10;

/// The latency-percentile curve of `h`: points evenly spaced on the "nines" scale
/// (`-log10(1 - q)`: 90 % is 1, 99 % is 2, 99.9 % is 3) up to the last percentile its count can
/// tell apart (`1 - 1/count`), where the largest value is put. Empty for an empty histogram.
fn curve(h: &Histogram<u64>) -> Vec<Percentile> {
    if h.is_empty() {
        return Vec::new();
    }
    let last_nines = (h.len() as f64).log10();
    let mut points: Vec<Percentile> = (0..)
        .map(|i| f64::from(i) / f64::from(CURVE_POINTS_PER_NINE))
        .take_while(|&nines| nines < last_nines)
        .map(|nines| {
            let q = 1.0 - 10f64.powf(-nines);
            Percentile {
                percentile: round_to(100.0 * q, 4),
                us: h.value_at_quantile(q),
            }
        })
        .collect();
    points.push(Percentile {
        percentile: round_to(100.0 * (1.0 - 1.0 / h.len() as f64), 4),
        us: h.max(),
    });
    points
}

/// `x` rounded to `decimals` places. The JSON report's fractions are rounded so that they read
/// well and parse back to the same `f64` (serde_json's parser is exact up to about 15 digits).
pub(crate) fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// The machine the load ran on, for telling runs apart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// The first `model name` of `/proc/cpuinfo`; `None` where there is none (not Linux, or
    /// CPUs that do not name their model there, as many arm64 ones).
    pub cpu_model: Option<String>,
    /// CPUs this process may run on.
    pub cpus: usize,
}

impl Host {
    /// This machine.
    pub fn detect() -> Self {
        Self {
            cpu_model: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|info| cpu_model(&info)),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// The first `model name` of a `/proc/cpuinfo` text.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name" && !value.trim().is_empty()).then(|| value.trim().to_owned())
    })
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The URL driven.
    pub url: String,
    /// Virtual clients.
    pub concurrency: usize,
    /// The options of the run, defaults filled in: what the JSON report records as its flags.
    pub options: LoadOptions,
    /// When the run started (wall clock), to tell reports apart.
    pub started_at: SystemTime,
    /// The machine it ran on.
    pub host: Host,
    /// From the start to the end of the last session.
    pub elapsed: Duration,
    /// Sessions whose three steps succeeded.
    pub sessions_ok: u64,
    /// Sessions that failed at some step (each counted once, at its first error).
    pub sessions_failed: u64,
    /// HTTP requests answered (any status).
    pub requests: u64,
    /// Sessions whose responses named more than one replica in `x-kbs-replica`.
    pub affinity_violations: u64,
    /// Sessions none of whose responses named a replica (a real KBS, or no answer at all): the
    /// affinity check could not judge them.
    pub sessions_unattributed: u64,
    /// Sessions that stayed on one replica, by replica name: how the balancer spread them.
    pub sessions_by_replica: BTreeMap<String, u64>,
    /// Failed sessions by `"<phase>: <error kind>"`, the kind being the KBS error type and
    /// status (`attest: AttestationError (401)`), `timeout`, `http` (no answer), a non-KBS
    /// error body, or a malformed success body.
    pub errors: BTreeMap<String, u64>,
    /// The first full error message seen for each key of [`Report::errors`].
    pub error_examples: BTreeMap<String, String>,
    /// Latency of each phase, over successful requests (sessions, for [`Phase::Session`]).
    pub latency: BTreeMap<Phase, Latency>,
    /// The latency-percentile curve of each phase, over the same requests: what
    /// [`plot::latency_svg`] draws.
    pub curves: BTreeMap<Phase, Vec<Percentile>>,
}

impl Report {
    /// Successful sessions per second.
    pub(crate) fn sessions_per_sec(&self) -> f64 {
        per_sec(self.sessions_ok, self.elapsed)
    }

    /// Answered requests per second.
    pub(crate) fn requests_per_sec(&self) -> f64 {
        per_sec(self.requests, self.elapsed)
    }

    /// A plain-text report for a terminal.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "KBS load against {}: {} clients, {:.1} s",
            self.url,
            self.concurrency,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "sessions: {} ok, {} failed, {:.1} sessions/s; requests: {} ({:.1}/s)",
            self.sessions_ok,
            self.sessions_failed,
            self.sessions_per_sec(),
            self.requests,
            self.requests_per_sec()
        );
        let attributed: u64 = self.sessions_by_replica.values().sum::<u64>() + self.affinity_violations;
        let _ = writeln!(
            out,
            "affinity: {} sessions answered by more than one replica (of {attributed} with x-kbs-replica; {} without)",
            self.affinity_violations, self.sessions_unattributed
        );
        if !self.sessions_by_replica.is_empty() {
            let spread: Vec<String> = self
                .sessions_by_replica
                .iter()
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            let _ = writeln!(out, "sessions per replica: {}", spread.join(", "));
        }
        let _ = writeln!(
            out,
            "\n{:<9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency", "count", "mean ms", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        let ms = |us: u64| us as f64 / 1000.0;
        for phase in Phase::ALL {
            let l = self.latency.get(&phase).copied().unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<9} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                phase.as_str(),
                l.count,
                l.mean_us / 1000.0,
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us)
            );
        }
        if self.errors.is_empty() {
            let _ = writeln!(out, "\nerrors: none");
        } else {
            let _ = writeln!(out, "\nerrors (failed sessions, by first error):");
            for (kind, n) in &self.errors {
                let example = self.error_examples.get(kind).map_or("", String::as_str);
                let _ = writeln!(out, "  {n:>8}  {kind}  e.g. {example}");
            }
        }
        out
    }

    /// The report as the JSON document of [`schema`], latencies in microseconds.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(schema::ReportDoc::from(self)).expect("the document is plain data")
    }
}

fn per_sec(n: u64, d: Duration) -> f64 {
    let secs = d.as_secs_f64();
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Counters the virtual clients share, for the progress line and the session budget.
#[derive(Debug, Default)]
struct Shared {
    /// Sessions claimed so far (the budget of [`LoadOptions::sessions`]).
    claimed: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    violations: AtomicU64,
}

/// What one virtual client saw; merged into the report at the end, so no lock is taken while
/// the load runs.
struct Tally {
    latency: [Histogram<u64>; 4],
    requests: u64,
    ok: u64,
    failed: u64,
    violations: u64,
    unattributed: u64,
    by_replica: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    error_examples: BTreeMap<String, String>,
}

impl Tally {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds");
        Self {
            latency: [h(), h(), h(), h()],
            requests: 0,
            ok: 0,
            failed: 0,
            violations: 0,
            unattributed: 0,
            by_replica: BTreeMap::new(),
            errors: BTreeMap::new(),
            error_examples: BTreeMap::new(),
        }
    }

    fn record(&mut self, phase: Phase, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.latency[phase.index()].saturating_record(us.clamp(1, MAX_LATENCY_US));
    }

    fn error(&mut self, kind: String, example: String) {
        *self.errors.entry(kind.clone()).or_default() += 1;
        self.error_examples.entry(kind).or_insert(example);
    }

    fn merge(&mut self, other: Tally) {
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            mine.add(theirs).expect("histograms of the same bounds");
        }
        self.requests += other.requests;
        self.ok += other.ok;
        self.failed += other.failed;
        self.violations += other.violations;
        self.unattributed += other.unattributed;
        for (k, n) in other.by_replica {
            *self.by_replica.entry(k).or_default() += n;
        }
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        for (k, e) in other.error_examples {
            self.error_examples.entry(k).or_insert(e);
        }
    }
}

/// Runs the load described by `opts` and reports. `progress` is called about once a second
/// while it runs.
pub async fn run(opts: LoadOptions, mut progress: impl FnMut(&Progress)) -> Report {
    let mut opts = opts;
    opts.concurrency = opts.concurrency.max(1);
    if opts.duration.is_none() && opts.sessions.is_none() {
        opts.duration = Some(DEFAULT_DURATION);
    }
    let opts = Arc::new(opts);
    let shared = Arc::new(Shared::default());
    let started_at = SystemTime::now();
    let start = Instant::now();
    let deadline = opts.duration.map(|d| start + d);

    let mut clients = JoinSet::new();
    for _ in 0..opts.concurrency {
        clients.spawn(virtual_client(Arc::clone(&opts), Arc::clone(&shared), deadline));
    }

    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut total = Tally::new();
    loop {
        tokio::select! {
            joined = clients.join_next() => match joined {
                None => break,
                Some(Ok(tally)) => total.merge(tally),
                // A client task that panicked: its sessions are lost; say so rather than hide it.
                Some(Err(e)) => total.error("internal: client task failed".into(), e.to_string()),
            },
            _ = tick.tick() => progress(&Progress {
                elapsed: start.elapsed(),
                sessions_ok: shared.ok.load(Ordering::Relaxed),
                sessions_failed: shared.failed.load(Ordering::Relaxed),
                affinity_violations: shared.violations.load(Ordering::Relaxed),
            }),
        }
    }

    Report {
        url: opts.url.clone(),
        concurrency: opts.concurrency,
        options: LoadOptions::clone(&opts),
        started_at,
        host: Host::detect(),
        elapsed: start.elapsed(),
        sessions_ok: total.ok,
        sessions_failed: total.failed,
        requests: total.requests,
        affinity_violations: total.violations,
        sessions_unattributed: total.unattributed,
        sessions_by_replica: total.by_replica,
        errors: total.errors,
        error_examples: total.error_examples,
        latency: Phase::ALL
            .iter()
            .map(|&p| (p, Latency::of(&total.latency[p.index()])))
            .collect(),
        curves: Phase::ALL
            .iter()
            .map(|&p| (p, curve(&total.latency[p.index()])))
            .collect(),
    }
}

/// One attester: sessions one after another until the deadline or the session budget.
async fn virtual_client(opts: Arc<LoadOptions>, shared: Arc<Shared>, deadline: Option<Instant>) -> Tally {
    let mut tally = Tally::new();
    let mut client: Option<KbsClient> = None;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if let Some(max) = opts.sessions {
            if shared.claimed.fetch_add(1, Ordering::Relaxed) >= max {
                break;
            }
        }
        let c = match client.as_mut() {
            Some(c) if !opts.new_connection_per_session => {
                c.reset_session();
                c
            }
            _ => client.insert(KbsClient::new(opts.url.as_str())),
        };
        session(c, &opts, &shared, &mut tally).await;
    }
    tally
}

/// One full session on `client`, whose jar is empty; stops at the first failed step, as the
/// real client's handshake does.
async fn session(client: &mut KbsClient, opts: &LoadOptions, shared: &Shared, tally: &mut Tally) {
    let start = Instant::now();
    let mut failed = false;
    for phase in Phase::STEPS {
        let t = Instant::now();
        let outcome = tokio::time::timeout(opts.request_timeout, step(client, phase, opts)).await;
        if opts.drop_route_cookie {
            client.forget_cookie(&opts.route_cookie);
        }
        match outcome {
            Ok(Ok(())) => tally.record(phase, t.elapsed()),
            Ok(Err(e)) => {
                tally.error(format!("{}: {}", phase.as_str(), error_kind(&e)), e.to_string());
                failed = true;
            }
            Err(_) => {
                tally.error(
                    format!("{}: timeout", phase.as_str()),
                    format!("no answer within {:?}", opts.request_timeout),
                );
                failed = true;
            }
        }
        if failed {
            break;
        }
    }
    tally.requests += client.log.len() as u64;
    if failed {
        tally.failed += 1;
        shared.failed.fetch_add(1, Ordering::Relaxed);
    } else {
        tally.record(Phase::Session, start.elapsed());
        tally.ok += 1;
        shared.ok.fetch_add(1, Ordering::Relaxed);
    }
    let replicas: BTreeSet<&str> = client.log.iter().filter_map(|e| e.replica.as_deref()).collect();
    let mut replicas = replicas.into_iter();
    match (replicas.next(), replicas.next()) {
        (None, _) => tally.unattributed += 1,
        (Some(only), None) => *tally.by_replica.entry(only.to_owned()).or_default() += 1,
        (Some(_), Some(_)) => {
            tally.violations += 1;
            shared.violations.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn step(client: &mut KbsClient, phase: Phase, opts: &LoadOptions) -> Result<(), ClientError> {
    match phase {
        Phase::Auth => client.auth().await,
        Phase::Attest => client.attest().await,
        Phase::Resource | Phase::Session => client.fetch_resource(&opts.resource).await.map(drop),
    }
}

/// The error's key in [`Report::errors`]: its kind without the free-text detail, so that
/// counts add up.
fn error_kind(e: &ClientError) -> String {
    match e {
        ClientError::Kbs { status, error_type, .. } => format!("{error_type} ({})", status.as_u16()),
        ClientError::NotKbsJson { status } => format!("non-KBS error body ({})", status.as_u16()),
        ClientError::Http(_) => "http".into(),
        ClientError::Malformed(what) => format!("malformed response ({what})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{SimConfig, SimKbs};

    #[test]
    fn progress_line_reads_well() {
        let p = Progress {
            elapsed: Duration::from_secs(2),
            sessions_ok: 100,
            sessions_failed: 1,
            affinity_violations: 0,
        };
        assert_eq!(
            p.to_string(),
            "   2.0s  sessions ok 100 (50/s)  failed 1  affinity violations 0"
        );
    }

    #[test]
    fn the_cpu_model_is_the_first_model_name() {
        let x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(x86).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(
            cpu_model("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n"),
            None
        );
        assert_eq!(cpu_model("model name\t:\n"), None);
    }

    #[test]
    fn a_curve_runs_from_the_minimum_to_the_maximum_on_the_nines_scale() {
        let mut h = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3).unwrap();
        assert!(curve(&h).is_empty());
        for us in 1..=1000 {
            h.record(us).unwrap();
        }
        let c = curve(&h);
        // Three nines in ten points each, then the maximum at 1 - 1/1000.
        assert_eq!(c.len(), 31, "{c:?}");
        assert_eq!(c[0], Percentile { percentile: 0.0, us: 1 });
        assert!((c[10].percentile - 90.0).abs() < 1e-9 && c[10].us == 900, "{:?}", c[10]);
        assert_eq!(c[30].us, 1000);
        assert!((c[30].percentile - 99.9).abs() < 1e-9);
        assert!(c
            .windows(2)
            .all(|w| w[0].percentile < w[1].percentile && w[0].us <= w[1].us));
    }

    #[tokio::test]
    async fn against_one_replica_every_session_succeeds_and_is_attributed() {
        let sim = SimKbs::start_local(SimConfig::new("kbs-0")).await.unwrap();
        let opts = LoadOptions {
            concurrency: 2,
            sessions: Some(10),
            duration: Some(Duration::from_secs(30)),
            ..LoadOptions::new(sim.url())
        };
        let report = run(opts, |_| {}).await;
        assert_eq!((report.sessions_ok, report.sessions_failed), (10, 0));
        assert_eq!(report.requests, 30);
        assert_eq!(report.sessions_by_replica.get("kbs-0"), Some(&10));
        assert_eq!(report.affinity_violations, 0);
        assert_eq!(report.latency[&Phase::Session].count, 10);
        assert_eq!(report.latency[&Phase::Attest].count, 10);
        assert_eq!(
            sim.counters().resource.load(Ordering::Relaxed),
            10,
            "the replica served every resource"
        );
        sim.stop();
    }

    #[tokio::test]
    async fn a_missing_resource_is_reported_by_its_kbs_error_type() {
        let sim = SimKbs::start_local(SimConfig::new("kbs-0")).await.unwrap();
        let opts = LoadOptions {
            concurrency: 1,
            sessions: Some(3),
            resource: "default/key/absent".into(),
            ..LoadOptions::new(sim.url())
        };
        let report = run(opts, |_| {}).await;
        assert_eq!((report.sessions_ok, report.sessions_failed), (0, 3));
        assert_eq!(report.errors.get("resource: PluginError (401)"), Some(&3));
        let json = report.to_json();
        assert_eq!(json["errors"]["resource: PluginError (401)"], 3);
        assert_eq!(json["steps"][0]["step"], "auth");
        assert_eq!(json["steps"][0]["latency"]["count"], 3);
        assert_eq!(json["steps"][2]["errors"]["PluginError (401)"], 3);
        assert!(report.render_table().contains("resource: PluginError (401)"));
        sim.stop();
    }

    #[tokio::test]
    async fn nobody_listening_fails_every_session_as_http() {
        let addr = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let opts = LoadOptions {
            concurrency: 2,
            sessions: Some(4),
            ..LoadOptions::new(format!("http://{addr}"))
        };
        let report = run(opts, |_| {}).await;
        assert_eq!(report.sessions_failed, 4);
        assert_eq!(report.errors.get("auth: http"), Some(&4));
        assert_eq!(report.sessions_unattributed, 4);
        assert_eq!(report.requests, 0);
    }
}
