//! The SVG picture of a [`Report`]: latency against percentile, one line per step.
//!
//! The x axis is the "nines" scale, `-log10(1 - q)`: 90 % is 1, 99 % is 2, 99.9 % is 3, so
//! the tail, where proxies differ, gets as much room as the median. Drawn with plotters' SVG
//! backend only: the picture is a file to open in a browser or put in a document.

use plotters::prelude::*;

use super::{Percentile, Phase, Report};
pub use crate::chart::PlotError;
use crate::chart::{TickAxis, LABELS};

/// Width and height of the pictures, in SVG pixels.
const SIZE: (u32, u32) = (900, 540);

/// The width of the steps' lines, in SVG pixels (the axes are 1).
const LINE_WIDTH: u32 = 2;

/// Each step its own colour, the same in every plot (the palette of matplotlib's "tab10"; the
/// whole session in black, above the others).
fn step_color(phase: Phase) -> RGBColor {
    match phase {
        Phase::Auth => RGBColor(0x1f, 0x77, 0xb4),
        Phase::Attest => RGBColor(0xff, 0x7f, 0x0e),
        Phase::Resource => RGBColor(0x2c, 0xa0, 0x2c),
        Phase::Session => BLACK,
    }
}

/// The x axis goes at least this far: 99.9 %, the percentile the tables print.
const MIN_NINES: f64 = 3.0;

/// The x position of `percentile` (0 to 100) on the nines scale.
fn nines(percentile: f64) -> f64 {
    -(1.0 - percentile / 100.0).max(1e-12).log10()
}

/// The percentile a tick of the nines scale stands for, with as many decimals as its nines
/// need: `50%`, `90%`, `99%`, `99.9%`, `99.99%`.
fn percentile_label(x: f64) -> String {
    let decimals = (x.ceil() as usize).saturating_sub(2);
    format!("{:.*}%", decimals, 100.0 * (1.0 - 10f64.powf(-x)))
}

/// The report's latency-percentile plot as an SVG document: one line per step that has
/// measurements (`auth`, `attest`, `resource`, `session`), latency in milliseconds.
pub fn latency_svg(report: &Report) -> Result<String, PlotError> {
    let lines: Vec<(Phase, &[Percentile])> = Phase::ALL
        .iter()
        .filter_map(|p| Some((*p, report.curves.get(p)?.as_slice())))
        .filter(|(_, points)| !points.is_empty())
        .collect();
    let all = || lines.iter().flat_map(|(_, points)| points.iter());
    let x_max = all().map(|p| nines(p.percentile)).fold(MIN_NINES, f64::max).ceil();
    let y_max = all().map(|p| p.us).max().unwrap_or(1000).max(1) as f64 / 1000.0 * 1.05;
    // Enough decimals that sub-millisecond ticks do not all read the same.
    let decimals = match y_max {
        y if y < 1.0 => 3,
        y if y < 10.0 => 2,
        _ => 1,
    };
    // Ticks at the median and at every whole nine.
    let mut ticks = vec![0.0, 2f64.log10()];
    ticks.extend((1..=x_max as u32).map(f64::from));
    let x_axis = TickAxis {
        range: 0.0..x_max,
        ticks,
    };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let caption = format!(
            "KBS session latency by percentile: {}, concurrency {}, {}",
            report.url,
            report.concurrency,
            humantime::format_rfc3339_seconds(report.started_at)
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .margin_right(36)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d(x_axis, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("percentile (log scale of nines)")
            .y_desc("latency (ms)")
            .label_style(LABELS)
            .axis_desc_style(LABELS)
            .x_label_formatter(&|x| percentile_label(*x))
            .y_label_formatter(&|y| format!("{y:.decimals$}"))
            .draw()?;
        for &(phase, points) in &lines {
            let color = step_color(phase);
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|p| (nines(p.percentile), p.us as f64 / 1000.0)),
                    color.stroke_width(LINE_WIDTH),
                ))?
                .label(phase.as_str())
                // A filled square, not a line, so that the lines of the plot are the steps' only.
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(LABELS)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::{run, LoadOptions};
    use crate::sim::{SimConfig, SimKbs};
    use crate::svg_check;

    #[tokio::test]
    async fn one_line_per_measured_step_and_labelled_axes() {
        let sim = SimKbs::start_local(SimConfig::new("kbs-0")).await.unwrap();
        let bounded = |resource: &str, sessions| LoadOptions {
            concurrency: 2,
            sessions: Some(sessions),
            resource: resource.into(),
            ..LoadOptions::new(sim.url())
        };
        let all_ok = run(bounded("default/key/demo", 20), |_| {}).await;
        // No resource step succeeds, so no session does: two lines.
        let resource_missing = run(bounded("default/key/absent", 3), |_| {}).await;
        let cases = [
            (&all_ok, &["auth", "attest", "resource", "session"][..]),
            (&resource_missing, &["auth", "attest"][..]),
        ];
        for (report, steps) in cases {
            let svg = latency_svg(report).unwrap();
            let elements = svg_check::elements(&svg).unwrap_or_else(|e| panic!("{e}:\n{svg}"));
            assert_eq!(elements[0].name, "svg");
            let width = LINE_WIDTH.to_string();
            let lines: Vec<_> = elements
                .iter()
                .filter(|e| e.name == "polyline" && e.attrs.get("stroke-width") == Some(&width))
                .collect();
            assert_eq!(lines.len(), steps.len(), "{svg}");
            for (line, step) in lines.iter().zip(steps) {
                let phase = Phase::ALL.into_iter().find(|p| p.as_str() == *step).unwrap();
                let points = line.attrs["points"].split_whitespace().count();
                assert_eq!(points, report.curves[&phase].len(), "{step}");
            }
            let texts: Vec<&str> = elements
                .iter()
                .filter(|e| e.name == "text")
                .map(|e| e.text.trim())
                .collect();
            let labels = ["percentile (log scale of nines)", "latency (ms)", "50%", "99%", "99.9%"];
            for label in labels.iter().chain(steps) {
                assert!(texts.contains(label), "no {label:?} in {texts:?}");
            }
        }
        sim.stop();
    }

    #[test]
    fn the_nines_scale_puts_each_nine_one_apart() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert!(nines(100.0).is_finite());
        let labels: Vec<String> = [0.0, 2f64.log10(), 1.0, 2.0, 3.0, 4.0]
            .into_iter()
            .map(percentile_label)
            .collect();
        assert_eq!(labels, ["0%", "50%", "90%", "99%", "99.9%", "99.99%"]);
    }
}
