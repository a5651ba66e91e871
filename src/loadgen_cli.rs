//! The `loadgen` subcommand: the flags of [`kbs_proxy_harness::loadgen`], a runtime, a
//! progress line on stderr, the report on stdout, and on request in files as JSON and as an
//! SVG plot.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use kbs_proxy_harness::loadgen::{self, plot, schema::ReportDoc, LoadOptions, Report};

/// Flags of `kbs-affinity-proxy loadgen`.
#[derive(Args, Debug)]
pub struct LoadgenArgs {
    /// KBS or proxy base URL, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    url: String,
    /// Virtual clients running sessions at once, each with its own cookie jar.
    #[arg(long, default_value_t = 16, value_name = "N")]
    concurrency: usize,
    /// Stop starting sessions after this long, e.g. 10s, 500ms, 2m [default: 10s when
    /// --sessions is not given].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many sessions in all.
    #[arg(long, value_name = "N")]
    sessions: Option<u64>,
    /// Resource fetched at the end of each session (repo/type/tag).
    #[arg(long, default_value = "default/key/demo", value_name = "PATH")]
    resource: String,
    /// Time limit of each request.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    request_timeout: Duration,
    /// Open a new connection for every session instead of one kept-alive per client.
    #[arg(long)]
    new_connection_per_session: bool,
    /// Never send the proxy's route cookie back (what a balancer without affinity amounts to).
    #[arg(long)]
    drop_route_cookie: bool,
    /// The proxy's route cookie name, for --drop-route-cookie.
    #[arg(long, default_value = "route", value_name = "NAME")]
    route_cookie: String,
    /// Print the report as JSON instead of a table (the document of --report-json).
    #[arg(long)]
    json: bool,
    /// Also write the report to FILE as JSON: run metadata, totals, and per step the offered
    /// and achieved rates, counts, errors by kind and latency percentiles (schema in
    /// docs/benchmarks.md).
    #[arg(long, value_name = "FILE")]
    report_json: Option<PathBuf>,
    /// Also write an SVG plot to FILE: latency by percentile (x on a log scale of nines), one
    /// line per step.
    #[arg(long, value_name = "FILE")]
    report_svg: Option<PathBuf>,
}

/// Runs the load and prints the report; progress goes to stderr about once a second.
pub fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let opts = LoadOptions {
        url: args.url.trim_end_matches('/').to_owned(),
        concurrency: args.concurrency,
        duration: args.duration,
        sessions: args.sessions,
        resource: args.resource,
        request_timeout: args.request_timeout,
        new_connection_per_session: args.new_connection_per_session,
        drop_route_cookie: args.drop_route_cookie,
        route_cookie: args.route_cookie,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let report = rt.block_on(loadgen::run(opts, |p| eprintln!("{p}")));
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", json_text(&report))?;
    } else {
        write!(out, "{}", report.render_table())?;
    }
    if let Some(path) = &args.report_json {
        write_file(path, &json_text(&report))?;
    }
    if let Some(path) = &args.report_svg {
        write_file(path, &plot::latency_svg(&report)?)?;
    }
    Ok(())
}

/// The JSON document, its fields in the schema's order (a `serde_json::Value` would sort them).
fn json_text(report: &Report) -> String {
    serde_json::to_string_pretty(&ReportDoc::from(report)).expect("the document is plain data")
}

pub(crate) fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// `500ms`, `10s`, `2m`, or a number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, ""), |i| s.split_at(i));
    let n: f64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 10s, 500ms, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("s").is_err());
    }
}
