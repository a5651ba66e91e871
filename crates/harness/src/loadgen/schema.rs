//! The JSON form of a [`Report`]: one document, versioned by `schema_version`, that
//! `loadgen --json` prints and `loadgen --report-json FILE` writes.
//!
//! Its shape is these types (each field documented below; names as in the JSON):
//!
//! ```text
//! { "schema_version": 1,
//!   "run": { "target", "started_at", "elapsed_s", "loadgen_version",
//!            "flags": { "concurrency", "duration_s", "sessions", "resource", "request_timeout_s",
//!                       "new_connection_per_session", "drop_route_cookie", "route_cookie" },
//!            "host": { "cpu_model", "cpus" } },
//!   "sessions_ok", "sessions_failed", "sessions_per_s", "requests", "requests_per_s",
//!   "affinity_violations", "sessions_unattributed", "sessions_by_replica": { name: n },
//!   "errors": { "<step>: <kind>": n }, "error_examples": { "<step>: <kind>": "message" },
//!   "steps": [ { "step", "attempted", "ok", "failed", "offered_per_s", "achieved_per_s",
//!                "errors": { kind: n },
//!                "latency": { "count", "mean_us", "p50_us", "p90_us", "p99_us", "p99_9_us", "max_us" },
//!                "percentiles": [ { "percentile", "us" } ] } ] }
//! ```
//!
//! Stable means: within one `schema_version`, fields are only ever added, never renamed,
//! retyped or dropped; a reader that must not miss a change checks the version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{per_sec, round_to, Host, Latency, LoadOptions, Percentile, Phase, Report};

/// The version written in `schema_version`; raised when a field is renamed, retyped or dropped.
pub const SCHEMA_VERSION: u32 = 1;

/// The whole document. Its totals repeat [`Report`]'s fields on purpose: the in-memory report
/// may change its shape, this type may not (within a version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportDoc {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// What ran, where and when.
    pub run: RunDoc,
    /// Sessions whose three steps succeeded.
    pub sessions_ok: u64,
    /// Sessions that failed at some step, each counted once, at its first error.
    pub sessions_failed: u64,
    /// Successful sessions per second of the run.
    pub sessions_per_s: f64,
    /// HTTP requests answered (any status).
    pub requests: u64,
    /// Answered requests per second of the run.
    pub requests_per_s: f64,
    /// Sessions answered by more than one replica (`x-kbs-replica`): 0 through the proxy.
    pub affinity_violations: u64,
    /// Sessions no response of which named a replica.
    pub sessions_unattributed: u64,
    /// Sessions that stayed on one replica, by replica name.
    pub sessions_by_replica: BTreeMap<String, u64>,
    /// Failed sessions by `"<step>: <kind>"` (see [`Report::errors`]).
    pub errors: BTreeMap<String, u64>,
    /// The first full message of each key of `errors`.
    pub error_examples: BTreeMap<String, String>,
    /// `auth`, `attest`, `resource`, then `session` (the three together), in that order.
    pub steps: Vec<StepDoc>,
}

/// The run's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunDoc {
    /// The URL driven.
    pub target: String,
    /// When the run started, RFC 3339 in UTC to the second (`2026-12-04T07:40:00Z`).
    pub started_at: String,
    /// From the start to the end of the last session, in seconds.
    pub elapsed_s: f64,
    /// The version of the load generator that wrote the document.
    pub loadgen_version: String,
    /// The options the run used, defaults filled in.
    pub flags: FlagsDoc,
    /// The machine it ran on.
    pub host: Host,
}

/// The effective `loadgen` flags: the run's [`LoadOptions`] with durations in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagsDoc {
    /// `--concurrency`.
    pub concurrency: usize,
    /// `--duration`, `null` when the run was bounded by `--sessions` alone.
    pub duration_s: Option<f64>,
    /// `--sessions`, `null` when not given.
    pub sessions: Option<u64>,
    /// `--resource`.
    pub resource: String,
    /// `--request-timeout`.
    pub request_timeout_s: f64,
    /// `--new-connection-per-session`.
    pub new_connection_per_session: bool,
    /// `--drop-route-cookie`.
    pub drop_route_cookie: bool,
    /// `--route-cookie`.
    pub route_cookie: String,
}

/// One step of the sessions (or `session`, the three together).
///
/// The load generator is closed-loop: each client starts its next request when the last one
/// ends, so the offered rate is what the clients attempted, set by `--concurrency` and the
/// target's speed together, not a rate fixed in advance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDoc {
    /// `auth`, `attest`, `resource` or `session`.
    pub step: String,
    /// Requests of this step started (`session`: sessions started); `ok + failed`.
    pub attempted: u64,
    /// Those that succeeded; the count of `latency`.
    pub ok: u64,
    /// Those that failed (a failed step ends its session).
    pub failed: u64,
    /// `attempted` per second of the run.
    pub offered_per_s: f64,
    /// `ok` per second of the run.
    pub achieved_per_s: f64,
    /// Failures by kind: the KBS error type and status (`PluginError (401)`), `timeout`, `http`
    /// (no answer), a non-KBS body, a malformed one; for `session`, the run's `errors`.
    pub errors: BTreeMap<String, u64>,
    /// Latency percentiles of the successful requests, in microseconds.
    pub latency: Latency,
    /// The latency-percentile curve the SVG plot draws, points evenly spaced on the "nines"
    /// scale up to the largest latency.
    pub percentiles: Vec<Percentile>,
}

impl From<&Report> for ReportDoc {
    fn from(r: &Report) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            run: RunDoc {
                target: r.url.clone(),
                started_at: humantime::format_rfc3339_seconds(r.started_at).to_string(),
                elapsed_s: r.elapsed.as_secs_f64(),
                loadgen_version: env!("CARGO_PKG_VERSION").to_owned(),
                flags: FlagsDoc::from(&r.options),
                host: r.host.clone(),
            },
            sessions_ok: r.sessions_ok,
            sessions_failed: r.sessions_failed,
            sessions_per_s: rate(r.sessions_per_sec()),
            requests: r.requests,
            requests_per_s: rate(r.requests_per_sec()),
            affinity_violations: r.affinity_violations,
            sessions_unattributed: r.sessions_unattributed,
            sessions_by_replica: r.sessions_by_replica.clone(),
            errors: r.errors.clone(),
            error_examples: r.error_examples.clone(),
            steps: Phase::ALL.iter().map(|&p| StepDoc::of(r, p)).collect(),
        }
    }
}

/// A rate as the document holds it: to 0.001 per second.
fn rate(per_s: f64) -> f64 {
    round_to(per_s, 3)
}

impl From<&LoadOptions> for FlagsDoc {
    fn from(o: &LoadOptions) -> Self {
        Self {
            concurrency: o.concurrency,
            duration_s: o.duration.map(|d| d.as_secs_f64()),
            sessions: o.sessions,
            resource: o.resource.clone(),
            request_timeout_s: o.request_timeout.as_secs_f64(),
            new_connection_per_session: o.new_connection_per_session,
            drop_route_cookie: o.drop_route_cookie,
            route_cookie: o.route_cookie.clone(),
        }
    }
}

impl StepDoc {
    /// The counts of a step come from what the report already holds: a step succeeded as many
    /// times as its latency was measured, and failed as many times as an error names it.
    fn of(r: &Report, phase: Phase) -> Self {
        let latency = r.latency.get(&phase).copied().unwrap_or_default();
        let (ok, errors) = match phase {
            Phase::Session => (r.sessions_ok, r.errors.clone()),
            _ => {
                let prefix = format!("{}: ", phase.as_str());
                let errors = r
                    .errors
                    .iter()
                    .filter_map(|(k, &n)| Some((k.strip_prefix(&prefix)?.to_owned(), n)))
                    .collect();
                (latency.count, errors)
            }
        };
        let failed = match phase {
            Phase::Session => r.sessions_failed,
            _ => errors.values().sum(),
        };
        Self {
            step: phase.as_str().to_owned(),
            attempted: ok + failed,
            ok,
            failed,
            offered_per_s: rate(per_sec(ok + failed, r.elapsed)),
            achieved_per_s: rate(per_sec(ok, r.elapsed)),
            errors,
            latency,
            percentiles: r.curves.get(&phase).cloned().unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::loadgen::run;
    use crate::sim::{SimConfig, SimKbs};

    /// The document's top-level fields and the run's, as docs/benchmarks.md lists them: a
    /// rename fails here before it reaches a reader.
    const TOP: [&str; 13] = [
        "schema_version",
        "run",
        "sessions_ok",
        "sessions_failed",
        "sessions_per_s",
        "requests",
        "requests_per_s",
        "affinity_violations",
        "sessions_unattributed",
        "sessions_by_replica",
        "errors",
        "error_examples",
        "steps",
    ];
    const RUN: [&str; 6] = ["target", "started_at", "elapsed_s", "loadgen_version", "flags", "host"];
    const STEP: [&str; 9] = [
        "step",
        "attempted",
        "ok",
        "failed",
        "offered_per_s",
        "achieved_per_s",
        "errors",
        "latency",
        "percentiles",
    ];

    fn keys(v: &serde_json::Value) -> Vec<&str> {
        let mut k: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        k.sort_unstable();
        k
    }

    fn sorted<const N: usize>(mut k: [&str; N]) -> Vec<&str> {
        k.sort_unstable();
        k.to_vec()
    }

    /// A run of `sessions` sessions fetching `resource` from a simulated replica.
    async fn bounded_run(resource: &str, sessions: u64) -> Report {
        let sim = SimKbs::start_local(SimConfig::new("kbs-0")).await.unwrap();
        let opts = LoadOptions {
            concurrency: 2,
            sessions: Some(sessions),
            resource: resource.into(),
            ..LoadOptions::new(sim.url())
        };
        let report = run(opts, |_| {}).await;
        sim.stop();
        report
    }

    #[tokio::test]
    async fn the_json_parses_back_with_the_schemas_fields_and_the_reports_numbers() {
        let report = bounded_run("default/key/demo", 20).await;
        let text = serde_json::to_string_pretty(&ReportDoc::from(&report)).unwrap();

        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(keys(&value), sorted(TOP));
        assert_eq!(keys(&value["run"]), sorted(RUN));
        for step in value["steps"].as_array().unwrap() {
            assert_eq!(keys(step), sorted(STEP));
        }
        // deny_unknown_fields: parsing back also proves there is no field the types lack.
        let doc: ReportDoc = serde_json::from_str(&text).unwrap();
        assert_eq!(doc, ReportDoc::from(&report));

        assert_eq!(doc.schema_version, SCHEMA_VERSION);
        assert_eq!(doc.run.target, report.url);
        assert!(doc.run.target.starts_with("http://127.0.0.1:"));
        assert_eq!(doc.run.elapsed_s, report.elapsed.as_secs_f64());
        let started = humantime::parse_rfc3339(&doc.run.started_at).unwrap();
        let secs = |t: std::time::SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(started), secs(report.started_at));
        assert_eq!(doc.run.flags.concurrency, 2);
        assert_eq!(doc.run.flags.sessions, Some(20));
        assert_eq!(doc.run.flags.duration_s, None);
        assert_eq!(doc.run.flags.request_timeout_s, 10.0);
        assert_eq!(doc.run.host, report.host);
        assert!(doc.run.host.cpus >= 1);
        assert_eq!((doc.sessions_ok, doc.sessions_failed, doc.requests), (20, 0, 60));
        assert_eq!(doc.sessions_per_s, rate(report.sessions_per_sec()));
        assert_eq!(doc.requests_per_s, rate(report.requests_per_sec()));
        assert_eq!(doc.sessions_by_replica, report.sessions_by_replica);

        let names: Vec<&str> = doc.steps.iter().map(|s| s.step.as_str()).collect();
        assert_eq!(names, ["auth", "attest", "resource", "session"]);
        for (step, phase) in doc.steps.iter().zip(Phase::ALL) {
            assert_eq!((step.attempted, step.ok, step.failed), (20, 20, 0), "{step:?}");
            assert_eq!(step.latency, report.latency[&phase]);
            assert_eq!(step.percentiles, report.curves[&phase]);
            assert_eq!(step.achieved_per_s, rate(20.0 / report.elapsed.as_secs_f64()));
            assert_eq!(step.offered_per_s, step.achieved_per_s);
            let l = step.latency;
            assert!(l.p50_us <= l.p90_us && l.p90_us <= l.p99_us && l.p99_us <= l.p999_us);
            assert!(l.p999_us <= l.max_us && l.max_us > 0, "{l:?}");
        }
    }

    #[tokio::test]
    async fn each_step_counts_what_reached_it_and_its_own_errors() {
        let doc = ReportDoc::from(&bounded_run("default/key/absent", 3).await);
        let counts: Vec<(&str, u64, u64, u64)> = doc
            .steps
            .iter()
            .map(|s| (s.step.as_str(), s.attempted, s.ok, s.failed))
            .collect();
        assert_eq!(
            counts,
            [
                ("auth", 3, 3, 0),
                ("attest", 3, 3, 0),
                ("resource", 3, 0, 3),
                ("session", 3, 0, 3)
            ]
        );
        assert!(doc.steps[0].errors.is_empty());
        assert_eq!(doc.steps[2].errors, BTreeMap::from([("PluginError (401)".into(), 3)]));
        assert_eq!(doc.steps[3].errors, doc.errors);
        assert_eq!(doc.steps[2].achieved_per_s, 0.0);
        assert!(doc.steps[2].offered_per_s > 0.0);
        assert!(doc.steps[2].percentiles.is_empty());
        assert_eq!(doc.run.flags.resource, "default/key/absent");
    }
}
