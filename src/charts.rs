//! Line and scatter charts as PNG and SVG (plotters), with an embedded
//! font so that no system font is needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            panic!("the embedded font does not parse");
        }
    });
}

#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Join the points with a line (else markers only).
    pub line: bool,
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Where the legend goes (away from the data).
    pub legend: SeriesLabelPosition,
}

const SIZE: (u32, u32) = (900, 560);

fn range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    lo - pad..hi + pad
}

fn render<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, chart: &Chart) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing {}: {e:?}", chart.title);
    root.fill(&WHITE).map_err(err)?;
    let points = || chart.series.iter().flat_map(|s| s.points.iter());
    let (xs, ys) = (range(points().map(|p| p.0)), range(points().map(|p| p.1)));
    let mut c = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(xs, ys)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, s) in chart.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        let legend = if s.line {
            c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?
        } else {
            c.draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                .map_err(err)?
        };
        legend
            .label(&s.label)
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
        if !s.line || pts.len() <= 60 {
            c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?;
        }
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(chart.legend.clone())
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Writes `stem.png` and `stem.svg` under `dir`.
pub fn draw(chart: &Chart, dir: &Path, stem: &str) -> Result<()> {
    register_font();
    let png = dir.join(format!("{stem}.png"));
    let svg = dir.join(format!("{stem}.svg"));
    render(BitMapBackend::new(&png, SIZE).into_drawing_area(), chart)?;
    render(SVGBackend::new(&svg, SIZE).into_drawing_area(), chart)?;
    Ok(())
}
