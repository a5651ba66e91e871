//! The picture of a `benches/compare.sh` run: per mode, each proxy's req/s and CPU per request
//! as a ratio to HAProxy's, a bar at the paired median with the middle half of the
//! repetitions' ratios as its error bar.
//!
//! It reads the runs file compare.sh writes (`$WORK/runs.tsv`, kept with `RUNS_TSV=FILE`): one
//! line per wrk run, tab-separated, no header:
//!
//! ```text
//! rep  mode  target  req/s  p50_us  p99_us  cpu_us_per_req  requests  errors  user_us  sys_us  proxy_busy_%  load_busy_%
//! ```
//!
//! and pairs them as compare.sh's summary table does: a target's figure divided by its
//! reference's in the same repetition (`*-2t` against `haproxy-2t`, `ours-log` against
//! `haproxy-log`, `ours-tls-log` against `haproxy-tls-log`, the other TLS targets against
//! `haproxy-tls`, every other target against `haproxy`), then the median of those ratios and
//! their range without the lowest and highest quarter (rounded down: with three repetitions,
//! all of them). The references themselves (a ratio of 1 by definition) are the dashed line at
//! 1; `direct` has no CPU ratio (its CPU column is the backend's).

use std::collections::BTreeMap;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::chart::{PlotError, TickAxis, LABELS};

/// One line of the runs file: the columns the chart uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The repetition, from 1.
    pub rep: u32,
    /// `ka-cookie`, `close`, ...
    pub mode: String,
    /// `haproxy`, `ours`, `ours-2t`, ...
    pub target: String,
    /// Requests per second.
    pub rps: f64,
    /// CPU microseconds per request of the target's process.
    pub cpu_us: f64,
}

/// A line of the runs file that is not one.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct ParseError {
    /// From 1.
    pub line: usize,
    /// What is wrong with it.
    pub what: String,
}

/// The runs of a runs file; blank lines are skipped.
pub fn parse_runs(text: &str) -> Result<Vec<Run>, ParseError> {
    let parse = |fields: &[&str]| -> Result<Run, String> {
        let [rep, mode, target, rps, _p50, _p99, cpu, ..] = fields else {
            return Err(format!("{} columns, expected at least 7", fields.len()));
        };
        let number = |name: &str, v: &str| v.parse::<f64>().map_err(|_| format!("{name} {v:?} is not a number"));
        Ok(Run {
            rep: rep.parse().map_err(|_| format!("repetition {rep:?} is not a number"))?,
            mode: (*mode).to_owned(),
            target: (*target).to_owned(),
            rps: number("req/s", rps)?,
            cpu_us: number("CPU per request", cpu)?,
        })
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let fields: Vec<&str> = l.split('\t').collect();
            parse(&fields).map_err(|what| ParseError { line: i + 1, what })
        })
        .collect()
}

/// What a ratio compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Requests per second: above 1 is faster than HAProxy.
    Rps,
    /// CPU time per request: below 1 is cheaper than HAProxy.
    Cpu,
}

impl Metric {
    fn of(self, run: &Run) -> f64 {
        match self {
            Self::Rps => run.rps,
            Self::Cpu => run.cpu_us,
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Rps => "req/s vs HAProxy (higher is better)",
            Self::Cpu => "CPU per request vs HAProxy (lower is better)",
        }
    }
}

/// One bar: a target's paired ratio to its reference in one mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    /// The mode.
    pub mode: String,
    /// The target.
    pub target: String,
    /// The median of the per-repetition ratios.
    pub median: f64,
    /// The lowest of their middle half.
    pub low: f64,
    /// The highest of their middle half.
    pub high: f64,
}

/// The target a target's ratios are paired with, as in compare.sh's table.
pub fn reference(target: &str) -> &'static str {
    if target.ends_with("-2t") {
        "haproxy-2t"
    } else if target == "ours-log" {
        "haproxy-log"
    } else if target == "ours-tls-log" {
        "haproxy-tls-log"
    } else if target.contains("-tls") {
        "haproxy-tls"
    } else {
        "haproxy"
    }
}

/// Names in the order they first appear.
fn first_seen<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for name in names {
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// The bars of `metric`: per mode, then per target, in the order the runs file has them.
pub fn ratios(runs: &[Run], metric: Metric) -> Vec<Ratio> {
    let value: BTreeMap<(&str, &str, u32), f64> = runs
        .iter()
        .map(|r| ((r.mode.as_str(), r.target.as_str(), r.rep), metric.of(r)))
        .collect();
    let modes = first_seen(runs.iter().map(|r| r.mode.as_str()));
    let targets = first_seen(runs.iter().map(|r| r.target.as_str()));
    let mut out = Vec::new();
    for mode in modes {
        for &target in &targets {
            let base = reference(target);
            if target == base || (metric == Metric::Cpu && target == "direct") {
                continue;
            }
            let mut paired: Vec<f64> = runs
                .iter()
                .filter(|r| r.mode == mode && r.target == target)
                .filter_map(|r| {
                    let b = *value.get(&(mode, base, r.rep))?;
                    (b > 0.0).then(|| metric.of(r) / b)
                })
                .collect();
            if paired.is_empty() {
                continue;
            }
            paired.sort_by(f64::total_cmp);
            let n = paired.len();
            let out_each_side = (n - 1) / 4;
            out.push(Ratio {
                mode: mode.to_owned(),
                target: target.to_owned(),
                median: if n % 2 == 1 {
                    paired[n / 2]
                } else {
                    (paired[n / 2 - 1] + paired[n / 2]) / 2.0
                },
                low: paired[out_each_side],
                high: paired[n - 1 - out_each_side],
            });
        }
    }
    out
}

/// Each target its own colour, the same in both panels: matplotlib's "tab20" palette, its ten
/// strong colours first (a full compare.sh run has about a dozen targets besides HAProxy).
fn target_color(i: usize) -> RGBColor {
    const TAB20: [u32; 20] = [
        0x1f77b4, 0xff7f0e, 0x2ca02c, 0xd62728, 0x9467bd, 0x8c564b, 0xe377c2, 0x7f7f7f, 0xbcbd22, 0x17becf, 0xaec7e8,
        0xffbb78, 0x98df8a, 0xff9896, 0xc5b0d5, 0xc49c94, 0xf7b6d2, 0xc7c7c7, 0xdbdb8d, 0x9edae5,
    ];
    let [_, r, g, b] = TAB20[i % TAB20.len()].to_be_bytes();
    RGBColor(r, g, b)
}

/// Width of a picture, at least, and per bar; each panel is [`PANEL_HEIGHT`] high.
const WIDTH: (u32, u32) = (1000, 40);
/// Height of a row of the key.
const KEY_ROW: i32 = 24;
/// The key's left edge, in line with the panels' y axes.
const KEY_INDENT: i32 = 80;
/// The font of the values above the bars, smaller than the labels: bars can be narrow.
const VALUES: (&str, u32) = ("sans-serif", 13);
/// Height of one panel.
const PANEL_HEIGHT: u32 = 420;
/// The share of a mode's slot its bars fill together.
const GROUP_WIDTH: f64 = 0.8;

/// The chart of `runs` as an SVG document: a panel for req/s and one for CPU per request,
/// each a group of bars per mode (one per target) with the middle half as error bars.
pub fn chart_svg(runs: &[Run], title: &str) -> Result<String, PlotError> {
    let panels = [Metric::Rps, Metric::Cpu].map(|m| (m, ratios(runs, m)));
    let modes = first_seen(runs.iter().map(|r| r.mode.as_str()));
    let targets: Vec<&str> = first_seen(
        panels
            .iter()
            .flat_map(|(_, bars)| bars.iter().map(|b| b.target.as_str())),
    );
    let mut svg = String::new();
    {
        let bars = (modes.len() * targets.len()) as u32;
        let width = WIDTH.0.max(200 + WIDTH.1 * bars);
        let (key, key_height) = key_layout(width as i32, &targets);
        let height = 2 * PANEL_HEIGHT + 40 + key_height as u32;
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 18))?;
        let (key_area, root) = root.split_vertically(key_height);
        for (i, (&target, &(x, y))) in targets.iter().zip(&key).enumerate() {
            let square = [(x, y + 6), (x + 12, y + 18)];
            key_area.draw(&Rectangle::new(square, target_color(i).filled()))?;
            let style = TextStyle::from(LABELS).pos(Pos::new(HPos::Left, VPos::Center));
            key_area.draw(&Text::new(target, (x + 18, y + 12), style))?;
        }
        for ((metric, bars), area) in panels.iter().zip(root.split_evenly((2, 1))) {
            draw_panel(&area, *metric, bars, &modes, &targets)?;
        }
        root.present()?;
    }
    Ok(svg)
}

/// Where each target's entry of the key goes, in rows across the top (one key for both panels,
/// outside them, so that it never hides a bar), and the key's height.
fn key_layout(width: i32, targets: &[&str]) -> (Vec<(i32, i32)>, i32) {
    let (mut x, mut y) = (KEY_INDENT, 0);
    let mut at = Vec::new();
    for target in targets {
        // The square, the name at about 9 px a character, a gap.
        let entry = 18 + 9 * target.len() as i32 + 24;
        if x + entry > width && x > KEY_INDENT {
            (x, y) = (KEY_INDENT, y + KEY_ROW);
        }
        at.push((x, y));
        x += entry;
    }
    (at, y + KEY_ROW)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    metric: Metric,
    bars: &[Ratio],
    modes: &[&str],
    targets: &[&str],
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    // Room above the tallest error bar for its value.
    let y_max = bars.iter().map(|b| b.high).fold(1.1, f64::max) * 1.15;
    let x_axis = TickAxis {
        range: 0.0..modes.len().max(1) as f64,
        ticks: (0..modes.len()).map(|i| i as f64 + 0.5).collect(),
    };
    let mut chart = ChartBuilder::on(area)
        .caption(metric.title(), LABELS)
        .margin(10)
        .margin_right(24)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(x_axis, 0.0..y_max)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("ratio to HAProxy")
        .label_style(LABELS)
        .axis_desc_style(LABELS)
        .x_label_formatter(&|x| modes.get(x.floor() as usize).copied().unwrap_or("").to_owned())
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()?;
    chart.draw_series(DashedLineSeries::new(
        [(0.0, 1.0), (modes.len() as f64, 1.0)],
        6,
        4,
        BLACK.stroke_width(1),
    ))?;
    let slot = GROUP_WIDTH / targets.len().max(1) as f64;
    for (i, &target) in targets.iter().enumerate() {
        let color = target_color(i);
        let mine: Vec<(f64, &Ratio)> = bars
            .iter()
            .filter(|b| b.target == target)
            .filter_map(|b| {
                let m = modes.iter().position(|m| *m == b.mode)?;
                Some((m as f64 + (1.0 - GROUP_WIDTH) / 2.0 + slot * i as f64, b))
            })
            .collect();
        if mine.is_empty() {
            continue;
        }
        chart.draw_series(
            mine.iter()
                .map(|&(x, b)| Rectangle::new([(x + slot * 0.1, 0.0), (x + slot * 0.9, b.median)], color.filled())),
        )?;
        chart.draw_series(mine.iter().map(|&(x, b)| {
            ErrorBar::new_vertical(x + slot / 2.0, b.low, b.median, b.high, BLACK.stroke_width(1), 8)
        }))?;
        let value_style = TextStyle::from(VALUES).pos(Pos::new(HPos::Center, VPos::Bottom));
        chart.draw_series(mine.iter().map(|&(x, b)| {
            Text::new(
                format!("{:.2}", b.median),
                (x + slot / 2.0, b.high + y_max / 100.0),
                value_style.clone(),
            )
        }))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svg_check;

    /// A runs file as compare.sh writes it: `rep mode target req/s p50 p99 cpu ...`, with
    /// ours at 1.2, 1.1 and 1.3 times HAProxy's req/s and 0.5, 0.7, 0.6 times its CPU.
    const SAMPLE: &str = "\
1\tka-cookie\tdirect\t40000\t900\t2000\t10.00\t400000\t0\t3\t7\t5.0\t99.0
1\tka-cookie\thaproxy\t30000\t900\t2000\t30.00\t300000\t0\t10\t20\t98.0\t90.0
1\tka-cookie\tours\t36000\t900\t2000\t15.00\t360000\t0\t5\t10\t95.0\t99.0
1\tclose\thaproxy\t10000\t900\t2000\t40.00\t100000\t0\t10\t30\t98.0\t90.0
1\tclose\tours\t12000\t900\t2000\t20.00\t120000\t0\t5\t15\t95.0\t99.0
2\tka-cookie\tdirect\t40000\t900\t2000\t10.00\t400000\t0\t3\t7\t5.0\t99.0
2\tka-cookie\thaproxy\t30000\t900\t2000\t30.00\t300000\t0\t10\t20\t98.0\t90.0
2\tka-cookie\tours\t33000\t900\t2000\t21.00\t330000\t0\t7\t14\t95.0\t99.0
2\tclose\thaproxy\t10000\t900\t2000\t40.00\t100000\t0\t10\t30\t98.0\t90.0
2\tclose\tours\t11000\t900\t2000\t28.00\t110000\t0\t7\t21\t95.0\t99.0
3\tka-cookie\tdirect\t40000\t900\t2000\t10.00\t400000\t0\t3\t7\t5.0\t99.0
3\tka-cookie\thaproxy\t30000\t900\t2000\t30.00\t300000\t0\t10\t20\t98.0\t90.0
3\tka-cookie\tours\t39000\t900\t2000\t18.00\t390000\t0\t6\t12\t95.0\t99.0
3\tclose\thaproxy\t10000\t900\t2000\t40.00\t100000\t0\t10\t30\t98.0\t90.0
3\tclose\tours\t13000\t900\t2000\t24.00\t130000\t0\t6\t18\t95.0\t99.0
";

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn bar(ratios: &[Ratio], mode: &str, target: &str) -> (f64, f64, f64) {
        let r = ratios.iter().find(|r| r.mode == mode && r.target == target).unwrap();
        (r.median, r.low, r.high)
    }

    #[test]
    fn ratios_are_paired_per_repetition_as_compare_sh_pairs_them() {
        let runs = parse_runs(SAMPLE).unwrap();
        assert_eq!(runs.len(), 15);
        let rps = ratios(&runs, Metric::Rps);
        // No bar for the reference itself; modes, then targets, in the file's order.
        let order: Vec<(&str, &str)> = rps.iter().map(|r| (r.mode.as_str(), r.target.as_str())).collect();
        assert_eq!(
            order,
            [("ka-cookie", "direct"), ("ka-cookie", "ours"), ("close", "ours")]
        );
        let (median, low, high) = bar(&rps, "ka-cookie", "ours");
        assert!(close(median, 1.2) && close(low, 1.1) && close(high, 1.3), "{rps:?}");
        let (median, low, high) = bar(&ratios(&runs, Metric::Cpu), "ka-cookie", "ours");
        assert!(close(median, 0.6) && close(low, 0.5) && close(high, 0.7));
        // direct's CPU column is the backend's: no CPU bar.
        assert!(ratios(&runs, Metric::Cpu).iter().all(|r| r.target != "direct"));
    }

    #[test]
    fn the_middle_half_drops_a_quarter_each_side_rounded_down() {
        let runs_of = |rps: &[f64]| -> Vec<Run> {
            let run = |rep, target: &str, rps| Run {
                rep,
                mode: "m".into(),
                target: target.into(),
                rps,
                cpu_us: 1.0,
            };
            (1..)
                .zip(rps)
                .flat_map(|(rep, &v)| [run(rep, "haproxy-2t", 100.0), run(rep, "ours-2t", v)])
                .collect()
        };
        // Five: the lowest and the highest go; the median is the middle one.
        let five = ratios(&runs_of(&[90.0, 150.0, 110.0, 100.0, 120.0]), Metric::Rps);
        assert_eq!(bar(&five, "m", "ours-2t"), (1.1, 1.0, 1.2));
        // Four: none goes; the median is the mean of the middle two.
        let four = ratios(&runs_of(&[90.0, 150.0, 110.0, 100.0]), Metric::Rps);
        assert_eq!(bar(&four, "m", "ours-2t"), (1.05, 0.9, 1.5));
        assert_eq!(reference("ours-2t"), "haproxy-2t");
        assert_eq!(reference("ours-log"), "haproxy-log");
        assert_eq!(reference("ours-h2"), "haproxy");
        assert_eq!(reference("ours-tls"), "haproxy-tls");
        assert_eq!(reference("haproxy-tls-log"), "haproxy-tls");
        assert_eq!(reference("ours-tls-log"), "haproxy-tls-log");
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = parse_runs("1\tka-cookie\tours\t100\t1\t2\t3\n\n1\tclose\tours\tfast\t1\t2\t3\n").unwrap_err();
        assert_eq!(e.to_string(), "line 3: req/s \"fast\" is not a number");
        assert!(parse_runs("1 ka-cookie ours 100\n")
            .unwrap_err()
            .to_string()
            .starts_with("line 1: 1 columns"));
    }

    #[test]
    fn the_chart_has_one_bar_per_mode_in_each_panel() {
        let runs: Vec<Run> = parse_runs(SAMPLE)
            .unwrap()
            .into_iter()
            .filter(|r| r.target != "direct")
            .collect();
        let svg = chart_svg(&runs, "sample").unwrap();
        let elements = svg_check::elements(&svg).unwrap_or_else(|e| panic!("{e}:\n{svg}"));
        assert_eq!(elements[0].name, "svg");
        // ours is the only target with bars: its colour fills one bar per mode in each of
        // the two panels, and its square in the key.
        let ours = format!(
            "#{:02X}{:02X}{:02X}",
            target_color(0).0,
            target_color(0).1,
            target_color(0).2
        );
        let filled = elements
            .iter()
            .filter(|e| e.name == "rect" && e.attrs.get("fill") == Some(&ours))
            .count();
        assert_eq!(filled, 2 * 2 + 1, "{svg}");
        let texts: Vec<&str> = elements
            .iter()
            .filter(|e| e.name == "text")
            .map(|e| e.text.trim())
            .collect();
        for label in [
            "sample",
            Metric::Rps.title(),
            Metric::Cpu.title(),
            "ratio to HAProxy",
            "ka-cookie",
            "close",
            "ours",
            "1.20",
            "0.60",
        ] {
            assert!(texts.contains(&label), "no {label:?} in {texts:?}");
        }
    }
}
