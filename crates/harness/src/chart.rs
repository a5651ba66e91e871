//! What the SVG pictures share ([`crate::loadgen::plot`], [`crate::compare_chart`]): the error,
//! the font, and an axis whose ticks are placed by hand.

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::CoordTranslate;
use plotters::prelude::*;

/// A picture could not be drawn (plotters' own error, as text: its type is generic over the
/// backend).
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the chart: {0}")]
pub struct PlotError(pub String);

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for PlotError {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        Self(e.to_string())
    }
}

/// The font of axis labels and legends.
pub(crate) const LABELS: (&str, u32) = ("sans-serif", 15);

/// A series' square in the legend, filled with its colour.
pub(crate) fn legend_square(color: RGBColor) -> impl Fn((i32, i32)) -> Rectangle<(i32, i32)> {
    move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
}

/// Draws the legend of `chart`'s labelled series, in the corner at `position`.
pub(crate) fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(LABELS)
        .draw()?;
    Ok(())
}

/// A numeric axis over `range` with its ticks (and labels) exactly at `ticks`: the median and
/// every nine of a percentile axis, the middle of each group of bars. (plotters'
/// `with_key_points` would place the ticks, but leaves an `f64` axis without a label
/// formatter.)
pub(crate) struct TickAxis {
    /// The values at the two ends of the axis.
    pub(crate) range: Range<f64>,
    /// Where the ticks go.
    pub(crate) ticks: Vec<f64>,
}

impl Ranged for TickAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let share = (value - self.range.start) / (self.range.end - self.range.start);
        limit.0 + (f64::from(limit.1 - limit.0) * share).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.max_num_points() == 0 {
            return Vec::new();
        }
        self.ticks.clone()
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}
