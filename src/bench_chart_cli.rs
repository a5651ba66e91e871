//! The `bench-chart` subcommand: the bar chart of a `benches/compare.sh` runs file
//! ([`kbs_proxy_harness::compare_chart`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use kbs_proxy_harness::compare_chart;

use crate::loadgen_cli::write_file;

/// Flags of `kbs-affinity-proxy bench-chart`.
#[derive(Args, Debug)]
pub struct BenchChartArgs {
    /// The runs file of benches/compare.sh (RUNS_TSV=FILE keeps it): one tab-separated line
    /// per wrk run.
    #[arg(value_name = "RUNS_TSV")]
    runs: PathBuf,
    /// Where to write the SVG chart.
    #[arg(long, short, value_name = "FILE")]
    out: PathBuf,
    /// The chart's title.
    #[arg(long, default_value = "benches/compare.sh: ratios to HAProxy, paired per repetition")]
    title: String,
}

/// Reads the runs, draws the chart, writes it.
pub fn run(args: BenchChartArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.runs).with_context(|| format!("cannot read {}", args.runs.display()))?;
    let runs = compare_chart::parse_runs(&text).with_context(|| args.runs.display().to_string())?;
    anyhow::ensure!(!runs.is_empty(), "{}: no runs", args.runs.display());
    write_file(&args.out, &compare_chart::chart_svg(&runs, &args.title)?)
}
