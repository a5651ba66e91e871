//! A bounded soak: steady KBS sessions through the proxy binary in front of two simulated
//! replicas (binary `sim` children on 127.0.0.1), one replica killed and restarted on the same
//! port midway.
//!
//! Judged: every session completes, or fails with a KBS-shaped error and then succeeds when
//! the client retries with the same cookie jar (as the real client's retry loop does); no
//! session's steps cross replicas; the proxy's RSS and open fds return near their baseline.
//!
//! About 20 s plus set-up; `KBS_SOAK_SECS` sets the load duration (`benches/soak.sh` runs the
//! same scenario with the load generator for minutes).

mod procs;
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kbs_proxy_harness::kbs_client::{ClientError, Exchange, KbsClient};
use procs::{open_fds, rss_kib, start_proxy, start_sim, wait_health};

/// The resource every session fetches.
const RESOURCE: &str = "default/key/demo";
/// Virtual attesters running sessions at once: enough to keep both cores of the test machine
/// busy, few enough that the proxy's pooled connections stay a small, steady number.
const CLIENTS: usize = 8;
/// Load duration unless `KBS_SOAK_SECS` says otherwise.
const DEFAULT_SECS: u64 = 20;
/// Retries of a failed session (each a full `get_resource`: GET, handshake, GET) before it
/// counts as lost.
const RETRIES: usize = 3;
/// Limit on one `get_resource`.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// Limit on a health transition seen on `/backends`.
const HEALTH_LIMIT: Duration = Duration::from_secs(15);
/// Allowed RSS growth over the baseline, KiB. The baseline is taken after a warm-up at the
/// same concurrency, so the allocator's arenas, the connection pools and the learned-session
/// tables (kept small with `--session-table-size`, so they are full by then) are already in it.
/// What remains is allocator slack: freed memory glibc keeps for reuse, and fragmentation after
/// the replica's connections were torn down and rebuilt; 0.1 to 0.3 MiB here over 20 s.
/// A leak of 1 KiB per session (about 400 sessions/s in a debug build, 8000 in all) would
/// pass 6 MiB within 15 s.
const RSS_MARGIN_KIB: u64 = 6 * 1024;
/// Allowed growth of open fds over the baseline: the proxy keeps idle keep-alive connections
/// to each replica (up to one per concurrent request, so up to [`CLIENTS`] each), and after
/// the kill the restarted replica's pool may fill to a different size than before; every
/// client connection is closed by then (+1 to +4 here). This catches leaks that grow with the
/// traffic (one fd per few hundred sessions would exceed it); one fd lost per failed session (a
/// handful per run) would not be seen.
const FD_MARGIN: usize = CLIENTS;
/// Learned kbs-session-id / token entries the proxy keeps (per table); small so the warm-up
/// fills them (see [`RSS_MARGIN_KIB`]).
const SESSION_TABLE: &str = "512";

/// What the virtual clients saw.
#[derive(Debug, Default)]
struct Tally {
    /// Sessions that completed, at the first try or on a retry.
    ok: u64,
    /// Sessions that completed only on a retry.
    recovered: u64,
    /// The most retries one session needed.
    max_retries: usize,
    /// First failure of each failed session, by `"<step>: <type> (<status>)"`.
    failures: BTreeMap<String, u64>,
    /// Failures that were not the KBS JSON error (or a timeout): the real client fails hard.
    not_kbs: Vec<String>,
    /// Sessions still failing after [`RETRIES`] retries.
    lost: Vec<String>,
    /// Sessions whose steps (from an `auth` to the next one) named more than one replica.
    crossings: Vec<Vec<Option<String>>>,
    /// Sessions completed by the restarted replica once it was back.
    ok_on_restarted: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.recovered += other.recovered;
        self.max_retries = self.max_retries.max(other.max_retries);
        for (k, n) in other.failures {
            *self.failures.entry(k).or_default() += n;
        }
        self.not_kbs.extend(other.not_kbs);
        self.lost.extend(other.lost);
        self.crossings.extend(other.crossings);
        self.ok_on_restarted += other.ok_on_restarted;
    }

    fn failed_sessions(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// Whether a client log crosses replicas: from each `auth` to the next, every answer naming a
/// replica must name the same one. (Answers from the proxy itself name none.)
fn crosses(log: &[Exchange]) -> bool {
    let mut current: Option<&str> = None;
    let mut in_session = false;
    for e in log {
        if e.step == "auth" {
            in_session = true;
            current = None;
        }
        if !in_session {
            continue;
        }
        if let Some(r) = e.replica.as_deref() {
            match current {
                None => current = Some(r),
                Some(c) if c != r => return true,
                Some(_) => {}
            }
        }
    }
    false
}

/// One attester: sessions one after another until `deadline`, retrying a failed one with the
/// same jar. `restarted` tells when the killed replica is back.
async fn attester(url: String, deadline: Instant, restarted: Arc<AtomicBool>) -> Tally {
    let mut tally = Tally::default();
    let mut c = KbsClient::new(url);
    // Bounded by the deadline; the count bound is a backstop.
    for _ in 0..1_000_000 {
        if Instant::now() >= deadline {
            break;
        }
        c.reset_session();
        let after_restart = restarted.load(Ordering::Relaxed);
        let mut retries = 0;
        loop {
            let outcome = tokio::time::timeout(CALL_LIMIT, c.get_resource(RESOURCE)).await;
            let step = c.log.last().map_or("connect", |e| e.step);
            match outcome {
                Ok(Ok(_)) => {
                    tally.ok += 1;
                    if retries > 0 {
                        tally.recovered += 1;
                    }
                    let last = c.log.last().and_then(|e| e.replica.as_deref());
                    if after_restart && last == Some("kbs-1") {
                        tally.ok_on_restarted += 1;
                    }
                    break;
                }
                // The KBS shape: `type` under the KBS prefix (stripped by the client), `detail`.
                Ok(Err(ClientError::Kbs { status, error_type, .. })) if !error_type.contains('/') => {
                    if retries == 0 {
                        *tally
                            .failures
                            .entry(format!("{step}: {error_type} ({})", status.as_u16()))
                            .or_default() += 1;
                    }
                    if retries == RETRIES {
                        tally.lost.push(format!("{step}: {error_type} ({status})"));
                        break;
                    }
                    retries += 1;
                    tally.max_retries = tally.max_retries.max(retries);
                }
                Ok(Err(e)) => {
                    tally.not_kbs.push(format!("{step}: {e}"));
                    break;
                }
                Err(_) => {
                    tally.not_kbs.push(format!("{step}: no answer within {CALL_LIMIT:?}"));
                    break;
                }
            }
        }
        if crosses(&c.log) {
            tally.crossings.push(c.replicas());
        }
    }
    tally
}

/// Runs [`CLIENTS`] attesters against `url` until `deadline`.
fn load(url: &str, deadline: Instant, restarted: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Tally>> {
    (0..CLIENTS)
        .map(|_| tokio::spawn(attester(url.to_owned(), deadline, Arc::clone(restarted))))
        .collect()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let mut total = Tally::default();
    for t in tasks {
        // Each attester stops at its deadline; its last session takes at most RETRIES + 1 calls.
        let t = tokio::time::timeout(CALL_LIMIT * (RETRIES as u32 + 2), t)
            .await
            .expect("an attester outlived its deadline")
            .expect("an attester panicked");
        total.merge(t);
    }
    total
}

/// The proxy's (RSS KiB, open fds) once its fd count has held still for three samples in a row
/// (connections closing after a load), at most `limit` later.
async fn settled(pid: u32, limit: Duration) -> (u64, usize) {
    let start = Instant::now();
    let mut last = open_fds(pid);
    let mut still = 0;
    while still < 3 && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = open_fds(pid);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    (rss_kib(pid), last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_a_replica_killed_and_restarted() {
    let secs = std::env::var("KBS_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(DEFAULT_SECS)
        .max(6);
    let duration = Duration::from_secs(secs);
    let started = Instant::now();

    let (_r0, r0) = start_sim(None, "127.0.0.1:0", "kbs-0").await;
    let (r1_process, r1) = start_sim(None, "127.0.0.1:0", "kbs-1").await;
    let mut r1_process = Some(r1_process);
    let mut args = procs::proxy_flags("127.0.0.1:0", "127.0.0.1:0", &[("kbs-0", r0), ("kbs-1", r1)]);
    args.extend(["--session-table-size".into(), SESSION_TABLE.into()]);
    let mut proxy = start_proxy("proxy", None, &args, support::SECRET).await;
    for name in ["kbs-0", "kbs-1"] {
        wait_health(&proxy.admin, name, true, HEALTH_LIMIT).await;
    }
    let pid = proxy.process.pid();
    let restarted = Arc::new(AtomicBool::new(false));

    // Warm-up at the same concurrency, then the baseline.
    let warm = collect(load(&proxy.url, Instant::now() + Duration::from_secs(3), &restarted)).await;
    assert!(warm.not_kbs.is_empty() && warm.failures.is_empty(), "warm-up: {warm:?}");
    let (rss_before, fds_before) = settled(pid, Duration::from_secs(5)).await;

    // The soak: kill kbs-1 at about a third, restart it on the same port a few seconds later.
    let start = Instant::now();
    let tasks = load(&proxy.url, start + duration, &restarted);
    tokio::time::sleep(duration / 3).await;
    r1_process.take().expect("running").kill();
    let down_after = wait_health(&proxy.admin, "kbs-1", false, HEALTH_LIMIT).await;
    tokio::time::sleep(duration / 6).await;
    // Same address: the sim's listener sets SO_REUSEADDR, so the old connections' TIME_WAIT
    // does not hold the port.
    let (_r1, _) = start_sim(None, &r1.to_string(), "kbs-1").await;
    let up_after = wait_health(&proxy.admin, "kbs-1", true, HEALTH_LIMIT).await;
    restarted.store(true, Ordering::Relaxed);
    let total = collect(tasks).await;
    let elapsed = start.elapsed();

    let (rss_after, fds_after) = settled(pid, Duration::from_secs(10)).await;
    let kbs1 = procs::backend_state(&proxy.admin, "kbs-1").await;

    eprintln!(
        "soak: {:.1} s, {CLIENTS} clients: {} sessions ok ({:.0}/s), {} failed then recovered on retry \
         (at most {} retries), {} lost, {} non-KBS failures, {} crossings; \
         kbs-1 down {down_after:?} after the kill, up {up_after:?} after the restart, \
         {} sessions on it since; pinned requests refused: {}; failures by type: {:?}; \
         proxy RSS {rss_before} -> {rss_after} KiB, fds {fds_before} -> {fds_after}; test took {:?}",
        elapsed.as_secs_f64(),
        total.ok,
        total.ok as f64 / elapsed.as_secs_f64(),
        total.recovered,
        total.max_retries,
        total.lost.len(),
        total.not_kbs.len(),
        total.crossings.len(),
        total.ok_on_restarted,
        kbs1["pinned_refused"],
        total.failures,
        started.elapsed(),
    );

    assert!(
        total.not_kbs.is_empty(),
        "failures not in the KBS shape: {:?}",
        total.not_kbs
    );
    assert!(
        total.lost.is_empty(),
        "sessions not recovered on retry: {:?}",
        total.lost
    );
    assert_eq!(total.recovered, total.failed_sessions(), "{total:?}");
    assert!(
        total.crossings.is_empty(),
        "sessions crossed replicas: {:?}",
        total.crossings
    );
    assert!(total.ok >= 10 * secs, "too little load to judge: {total:?}");
    assert!(
        total.ok_on_restarted > 0,
        "the restarted replica got no sessions: {total:?}"
    );
    assert!(
        rss_after <= rss_before + RSS_MARGIN_KIB,
        "RSS grew from {rss_before} to {rss_after} KiB (margin {RSS_MARGIN_KIB})"
    );
    assert!(
        fds_after <= fds_before + FD_MARGIN,
        "open fds grew from {fds_before} to {fds_after} (margin {FD_MARGIN})"
    );

    let status = proxy.process.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
}
