//! What the SVG pictures share ([`crate::loadgen::plot`], [`crate::compare_chart`]): the error,
//! the font, and an axis whose ticks are placed by hand.

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::drawing::DrawingAreaErrorKind;

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
