//! PNG plots of a run (training curves, feature density), drawn in pure Rust with an embedded font.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{io_error, Error, Result};
use crate::eval::DensityHistogram;
pub use crate::io::{read_feature_density, read_metrics};
use crate::io::{MetricsRecord, METRICS_FILE};

/// Width and height in pixels of [`training_curves`]' image.
pub const CURVES_SIZE: (u32, u32) = (1600, 1000);
/// Width and height in pixels of [`density_histogram`]'s image.
pub const DENSITY_SIZE: (u32, u32) = (1200, 700);

/// DejaVu Sans, cut down to the characters labels use (see `assets/fonts/`). Embedded so that
/// plots come out the same on any machine, with no system fonts or libraries.
static FONT_TTF: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// The family every text style below names; plotters looks fonts up by it.
const FONT: &str = "sans-serif";

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(230, 120, 10);
const GREEN_: RGBColor = RGBColor(44, 150, 44);
const PURPLE: RGBColor = RGBColor(130, 80, 180);
const RED_: RGBColor = RGBColor(200, 40, 40);
const GRID: RGBColor = RGBColor(232, 232, 232);
const GREY: RGBColor = RGBColor(110, 110, 110);

/// Drawing errors as plotters reports them; turned into [`Error::Plot`] with the path.
type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// What [`redraw`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redrawn {
    /// `curves.png`.
    pub curves: PathBuf,
    /// `density.png`, when the run directory has `feature_density.npy`.
    pub density: Option<PathBuf>,
    /// A line to show about the metrics (a diverged run's non-finite loss), if any.
    pub note: Option<String>,
}

/// Draws a run's metrics (one run, records in step order) against training tokens as four
/// panels, loss and MSE (log scale when they span a factor of ten or more), fraction of variance
/// explained, L0 and the fraction of dead latents, and writes them as a
/// [`CURVES_SIZE`] PNG to `path`. Any records draw, none included: missing or non-finite values
/// leave gaps.
pub fn training_curves(records: &[MetricsRecord], path: &Path) -> Result<()> {
    let title = curves_title(records, path);
    let rgb = render(CURVES_SIZE, |root| draw_curves(root, records, &title))
        .map_err(|e| plot_error(path, e.to_string()))?;
    write_png(path, CURVES_SIZE, &rgb)
}

/// Draws the histogram of log10 firing frequency of the latents (each frequency in [0, 1], the
/// fraction of evaluation rows a latent fired on), with the latents that never fired as a
/// separate red bar, and writes it as a [`DENSITY_SIZE`] PNG to `path`. A frequency that is NaN
/// or outside [0, 1] is an error naming the latent.
pub fn density_histogram(firing_frequency_f: &[f64], path: &Path) -> Result<()> {
    let histogram = DensityHistogram::new(firing_frequency_f, bins_per_decade(firing_frequency_f))?;
    let rgb = render(DENSITY_SIZE, |root| {
        draw_density(root, &histogram, firing_frequency_f)
    })
    .map_err(|e| plot_error(path, e.to_string()))?;
    write_png(path, DENSITY_SIZE, &rgb)
}

/// Redraws a run directory's plots from its files: `curves.png` from `metrics.jsonl` (which
/// must exist; see [`read_metrics`]) and, when `feature_density.npy` exists, `density.png` from
/// it (see [`read_feature_density`]).
pub fn redraw(run_dir: &Path) -> Result<Redrawn> {
    let metrics = run_dir.join(METRICS_FILE);
    let records = read_metrics(&metrics)?;
    let note = records.iter().find(|r| !r.loss.is_finite()).map(|r| {
        format!(
            "{}: the loss is not finite from step {} (training diverged; a run by an older sae \
             wrote it as null); the curves leave those steps out",
            metrics.display(),
            r.step
        )
    });
    let curves = run_dir.join("curves.png");
    training_curves(&records, &curves)?;
    let density_npy = run_dir.join("feature_density.npy");
    let density = if density_npy.exists() {
        let path = run_dir.join("density.png");
        density_histogram(&read_feature_density(&density_npy)?, &path)?;
        Some(path)
    } else {
        None
    };
    Ok(Redrawn {
        curves,
        density,
        note,
    })
}

fn plot_error(path: &Path, reason: String) -> Error {
    Error::Plot {
        path: path.to_path_buf(),
        reason,
    }
}

/// Registers the embedded font with plotters, once per process.
fn register_font() -> DrawResult<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, FONT_TTF).is_ok());
    if ok {
        Ok(())
    } else {
        Err("the embedded font does not parse".into())
    }
}

/// Runs `draw` on a white `size` canvas and returns its RGB pixels, row by row.
fn render(size: (u32, u32), draw: impl FnOnce(&Area<'_>) -> DrawResult<()>) -> DrawResult<Vec<u8>> {
    register_font()?;
    let mut rgb = vec![255u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        draw(&root)?;
        root.present()?;
    }
    Ok(rgb)
}

/// Writes RGB pixels as a PNG, through a temporary file renamed into place so that a viewer
/// never sees half an image.
fn write_png(path: &Path, (width, height): (u32, u32), rgb: &[u8]) -> Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let file = std::fs::File::create(&tmp).map_err(io_error(path, "writing"))?;
    let encode = || -> std::result::Result<(), png::EncodingError> {
        let file = std::io::BufWriter::new(file);
        let mut encoder = png::Encoder::new(file, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // The default level leaves a mostly white plot ten times larger than it needs to be.
        encoder.set_compression(png::Compression::Best);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(rgb)?;
        writer.finish()
    };
    let written = encode()
        .map_err(|e| plot_error(path, e.to_string()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io_error(path, "renaming into")));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// "Training curves: <run>, N steps, T tokens, S s" from the last record and the directory
/// the image goes to (usually the run's).
fn curves_title(records: &[MetricsRecord], path: &Path) -> String {
    let run = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| format!(" of {}", n.to_string_lossy()))
        .unwrap_or_default();
    match records.last() {
        Some(last) => format!(
            "Training{run}: {} steps, {} tokens, {}",
            last.step,
            format_si(last.tokens as f64),
            format_seconds(last.seconds)
        ),
        None => format!("Training{run}: no records yet"),
    }
}

/// A curve: its name in the legend, its colour, and its points split where values are missing.
struct Curve {
    name: &'static str,
    color: RGBColor,
    segments: Vec<Vec<(f64, f64)>>,
}

impl Curve {
    /// The curve of `value` against tokens; `None` or a non-finite value breaks the line.
    fn new(
        name: &'static str,
        color: RGBColor,
        records: &[MetricsRecord],
        value: impl Fn(&MetricsRecord) -> Option<f64>,
    ) -> Self {
        let mut segments = vec![Vec::new()];
        for r in records {
            match value(r).filter(|v| v.is_finite()) {
                Some(v) => segments
                    .last_mut()
                    .expect("never empty")
                    .push((r.tokens as f64, v)),
                None if segments.last().is_some_and(|s| !s.is_empty()) => segments.push(Vec::new()),
                None => {}
            }
        }
        segments.retain(|s| !s.is_empty());
        Curve {
            name,
            color,
            segments,
        }
    }

    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.segments.iter().flatten().map(|p| p.1)
    }

    fn last(&self) -> Option<f64> {
        self.segments.last().and_then(|s| s.last()).map(|p| p.1)
    }
}

/// How a panel's y axis runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum YAxis {
    Linear(f64, f64),
    Log(f64, f64),
}

/// One of the four panels.
struct Panel {
    title: String,
    y_desc: &'static str,
    curves: Vec<Curve>,
    y: YAxis,
    y_format: fn(&f64) -> String,
    /// A line under the curves, for what the reader would otherwise misread.
    note: Option<String>,
}

fn draw_curves(root: &Area<'_>, records: &[MetricsRecord], title: &str) -> DrawResult<()> {
    root.fill(&WHITE)?;
    let body = draw_title(root, title, 34)?;
    let x_max = records
        .iter()
        .map(|r| r.tokens as f64)
        .fold(0.0f64, f64::max);
    // Tokens start at 0: a reader sees how far the run got, and when the first record came.
    // 2% to spare on the right keeps the last point off the frame.
    let x_range = (0.0, if x_max > 0.0 { x_max * 1.02 } else { 1.0 });

    let loss = Curve::new("loss", BLUE_, records, |r| Some(r.loss as f64));
    let mse = Curve::new("mse", ORANGE, records, |r| Some(r.mse as f64));
    let loss_axis = loss_axis(loss.values().chain(mse.values()));
    let fve = Curve::new("fve", GREEN_, records, |r| r.fve.map(f64::from));
    let (fve_axis, fve_note) = fve_axis(fve.values());
    let fve = clamp_curve(fve, fve_axis);
    let l0 = Curve::new("L0", PURPLE, records, |r| Some(r.l0 as f64));
    let dead = Curve::new("dead", RED_, records, |r| Some(r.dead_fraction as f64));
    let panels = [
        Panel {
            title: with_last("Loss and MSE", &[&loss, &mse], format_value),
            y_desc: if matches!(loss_axis, YAxis::Log(..)) {
                "per row (log scale)"
            } else {
                "per row"
            },
            y: loss_axis,
            curves: vec![loss, mse],
            y_format: format_value,
            note: None,
        },
        Panel {
            title: with_last("Fraction of variance explained", &[&fve], format_value),
            y_desc: "FVE (1 = perfect)",
            y: fve_axis,
            curves: vec![fve],
            y_format: format_value,
            note: fve_note,
        },
        Panel {
            title: with_last("L0: active latents per row", &[&l0], format_value),
            y_desc: "latents",
            y: zero_based_axis(l0.values(), 1.0, f64::INFINITY),
            curves: vec![l0],
            y_format: format_value,
            note: None,
        },
        Panel {
            title: with_last("Dead latents", &[&dead], format_percent),
            y_desc: "fraction of latents",
            y: zero_based_axis(dead.values(), 0.05, 1.0),
            curves: vec![dead],
            y_format: format_percent,
            note: None,
        },
    ];
    for (area, panel) in body.split_evenly((2, 2)).iter().zip(&panels) {
        draw_panel(area, panel, x_range, records.is_empty())?;
    }
    Ok(())
}

/// "title (last: v)" with each curve's last value, or the title alone when none has one.
fn with_last(title: &str, curves: &[&Curve], format: fn(&f64) -> String) -> String {
    let lasts: Vec<String> = curves
        .iter()
        .filter_map(|c| c.last().map(|v| (c.name, format(&v))))
        .map(|(name, v)| {
            if curves.len() > 1 {
                format!("{name} {v}")
            } else {
                v
            }
        })
        .collect();
    if lasts.is_empty() {
        title.to_string()
    } else {
        format!("{title} (last: {})", lasts.join(", "))
    }
}

/// Log scale when the positive values span a factor of 10 or more (loss falls by decades
/// early in training and the linear picture would hide the rest), linear otherwise.
fn loss_axis(values: impl Iterator<Item = f64>) -> YAxis {
    let values: Vec<f64> = values.collect();
    let (lo, hi) = min_max(values.iter().copied());
    if lo > 0.0 && hi / lo >= 10.0 {
        YAxis::Log(lo / 1.25, hi * 1.25)
    } else {
        padded_axis(lo, hi)
    }
}

/// FVE runs up to 1. A fresh SAE can start far below 0 and would squash the part of the run
/// that matters, so the axis stops at −1 and lower values are drawn on it, with a note.
fn fve_axis(values: impl Iterator<Item = f64>) -> (YAxis, Option<String>) {
    let (lo, hi) = min_max(values);
    if lo > hi {
        return (YAxis::Linear(0.0, 1.0), None);
    }
    let floor = -1.0;
    let note = (lo < floor).then(|| {
        format!(
            "values below {floor} (lowest {}) drawn at {floor}",
            format_value(&lo)
        )
    });
    let lo = lo.max(floor);
    let hi = hi.max(1.0);
    let pad = 0.04 * (hi - lo).max(0.05);
    (YAxis::Linear(lo - pad, hi + pad), note)
}

/// Ticks of a log axis over [lo, hi] (0 < lo < hi): 1, 2 and 5 times each power of ten over
/// up to three decades, powers of ten alone (every n-th, for at most 10 ticks) beyond. Plotters'
/// own choice is powers of ten alone, which leaves one or two labelled ticks on a loss curve.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let decades = (last - first).max(1);
    let (multipliers, every): (&[f64], i32) = if decades <= 3 {
        (&[1.0, 2.0, 5.0], 1)
    } else {
        (&[1.0], (decades + 9) / 10)
    };
    (first..=last)
        .filter(|k| k.rem_euclid(every) == 0)
        .flat_map(|k| multipliers.iter().map(move |m| m * 10f64.powi(k)))
        .filter(|v| (lo..=hi).contains(v))
        .collect()
}

/// Values outside a linear axis moved onto its edge.
fn clamp_curve(mut curve: Curve, axis: YAxis) -> Curve {
    if let YAxis::Linear(lo, hi) = axis {
        for p in curve.segments.iter_mut().flatten() {
            p.1 = p.1.clamp(lo, hi);
        }
    }
    curve
}

/// [0, a little above the largest value], at least [0, `min_top`] and at most [0, `max_top`]:
/// counts and fractions read best against zero.
fn zero_based_axis(values: impl Iterator<Item = f64>, min_top: f64, max_top: f64) -> YAxis {
    let (lo, hi) = min_max(values);
    if lo < 0.0 {
        return padded_axis(lo, hi);
    }
    let top = if lo > hi {
        min_top
    } else {
        (hi * 1.08).clamp(min_top, max_top)
    };
    // A little below zero, so that a curve along zero stays clear of the axis line.
    YAxis::Linear(-0.015 * top, top)
}

/// [lo, hi] with 5% to spare on each side; a constant (or absent) series gets a range around it.
fn padded_axis(lo: f64, hi: f64) -> YAxis {
    if lo > hi {
        return YAxis::Linear(0.0, 1.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        0.05 * span
    } else {
        0.1 * lo.abs().max(1e-3)
    };
    YAxis::Linear(lo - pad, hi + pad)
}

/// (min, max) of the values; (+∞, −∞) when there are none.
fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

fn draw_panel(area: &Area<'_>, panel: &Panel, x: (f64, f64), empty: bool) -> DrawResult<()> {
    let area = area.margin(8, 8, 8, 16);
    let mut builder = ChartBuilder::on(&area);
    builder
        .caption(&panel.title, (FONT, 24))
        .margin(10)
        .x_label_area_size(56)
        .y_label_area_size(84);
    let x_range = x.0..x.1;
    match panel.y {
        YAxis::Linear(lo, hi) => {
            let mut chart = builder.build_cartesian_2d(x_range, lo..hi)?;
            fill_chart(&mut chart, panel, empty)
        }
        YAxis::Log(lo, hi) => {
            let y_range = (lo..hi).log_scale().with_key_points(log_ticks(lo, hi));
            let mut chart = builder.build_cartesian_2d(x_range, y_range)?;
            fill_chart(&mut chart, panel, empty)
        }
    }
}

/// Mesh, curves, legend and notes of a built panel, whatever its y scale.
fn fill_chart<'a, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    panel: &Panel,
    empty: bool,
) -> DrawResult<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let x_format = |v: &f64| format_si(*v);
    // Tick positions carry rounding noise: a tick at 0 may come as -5.55e-17.
    let span = match panel.y {
        YAxis::Linear(lo, hi) => hi - lo,
        YAxis::Log(..) => 0.0,
    };
    let y_format = |v: &f64| (panel.y_format)(&if v.abs() < 1e-9 * span { 0.0 } else { *v });
    chart
        .configure_mesh()
        .x_desc("training tokens (rows)")
        .y_desc(panel.y_desc)
        .x_label_formatter(&x_format)
        .y_label_formatter(&y_format)
        .x_labels(8)
        .y_labels(8)
        .label_style((FONT, 18))
        .axis_desc_style((FONT, 20))
        .max_light_lines(0)
        .bold_line_style(GRID)
        .draw()?;
    let n_points: usize = panel.curves.iter().map(|c| c.values().count()).sum();
    for curve in &panel.curves {
        let style = curve.color.stroke_width(3);
        for (i, segment) in curve.segments.iter().enumerate() {
            let series = chart.draw_series(LineSeries::new(segment.iter().copied(), style))?;
            if i == 0 && panel.curves.len() > 1 {
                series
                    .label(curve.name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            }
            // A lone point draws no line, and a short run is read point by point.
            if segment.len() == 1 || n_points <= 24 {
                chart.draw_series(
                    segment
                        .iter()
                        .map(|&p| Circle::new(p, 4, curve.color.filled())),
                )?;
            }
        }
    }
    if panel.curves.len() > 1 && n_points > 0 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 20))
            .background_style(WHITE.mix(0.85))
            .border_style(GREY)
            .draw()?;
    }
    let plot = chart.plotting_area().strip_coord_spec();
    let (w, h) = plot.dim_in_pixel();
    let centre = Pos::new(HPos::Center, VPos::Center);
    if empty || n_points == 0 {
        let message = if empty {
            "no records yet"
        } else {
            "no finite values"
        };
        plot.draw(&Text::new(
            message,
            (w as i32 / 2, h as i32 / 2),
            (FONT, 26).into_font().color(&GREY).pos(centre),
        ))?;
    }
    if let Some(note) = &panel.note {
        plot.draw(&Text::new(
            note.as_str(),
            (w as i32 - 10, h as i32 - 14),
            (FONT, 17)
                .into_font()
                .color(&GREY)
                .pos(Pos::new(HPos::Right, VPos::Bottom)),
        ))?;
    }
    Ok(())
}

/// Bins per decade for a histogram of about 40 bins.
fn bins_per_decade(firing_frequency_f: &[f64]) -> usize {
    let rarest = firing_frequency_f
        .iter()
        .filter(|&&v| v > 0.0 && v <= 1.0)
        .fold(1.0f64, |a, &b| a.min(b));
    let decades = (-rarest.log10().floor()).max(1.0);
    (40.0 / decades).round().clamp(2.0, 20.0) as usize
}

fn draw_density(
    root: &Area<'_>,
    histogram: &DensityHistogram,
    firing_frequency_f: &[f64],
) -> DrawResult<()> {
    root.fill(&WHITE)?;
    let n = firing_frequency_f.len();
    let title = if n == 0 {
        "Feature density: no latents".to_string()
    } else {
        format!(
            "Feature density of {n} latents on the evaluation rows: {} never fired ({})",
            histogram.dead,
            format_percent(&(histogram.dead as f64 / n as f64))
        )
    };
    let body = draw_title(root, &title, 32)?.margin(0, 10, 10, 20);
    let top = histogram
        .counts
        .iter()
        .copied()
        .chain([histogram.dead])
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.08;
    let (dead_area, main_area) = body.split_horizontally(210);
    // Both charts get the same vertical layout, so their bars share one y scale.
    let (x_area, top_margin) = (64, 16);

    let mut dead_chart = ChartBuilder::on(&dead_area)
        .margin_top(top_margin)
        .x_label_area_size(x_area)
        .y_label_area_size(90)
        .build_cartesian_2d(0.0..1.0, 0.0..top)?;
    dead_chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(8)
        .y_desc("latents")
        .x_desc("never fired")
        .y_label_formatter(&|v: &f64| format_count(*v))
        .label_style((FONT, 18))
        .axis_desc_style((FONT, 20))
        .max_light_lines(0)
        .bold_line_style(GRID)
        .draw()?;
    dead_chart.draw_series([Rectangle::new(
        [(0.2, 0.0), (0.8, histogram.dead as f64)],
        RED_.filled(),
    )])?;
    dead_chart.draw_series([Text::new(
        format!("{}", histogram.dead),
        (0.5, histogram.dead as f64),
        (FONT, 18)
            .into_font()
            .color(&RED_)
            .pos(Pos::new(HPos::Center, VPos::Bottom)),
    )])?;

    let (lo, hi) = (
        histogram.edges_log10.first().copied().unwrap_or(-1.0),
        histogram.edges_log10.last().copied().unwrap_or(0.0),
    );
    let mut chart = ChartBuilder::on(&main_area)
        .margin_top(top_margin)
        .margin_left(16)
        .x_label_area_size(x_area)
        .y_label_area_size(0)
        .build_cartesian_2d(lo..hi, 0.0..top)?;
    let decades = (hi - lo).round() as usize;
    chart
        .configure_mesh()
        .x_labels(decades.min(12) + 1)
        .y_labels(8)
        .x_label_formatter(&|v: &f64| format_power_of_ten(*v))
        .x_desc("firing frequency: fraction of evaluation rows a latent fires on (log scale)")
        .label_style((FONT, 18))
        .axis_desc_style((FONT, 20))
        .max_light_lines(0)
        .bold_line_style(GRID)
        .draw()?;
    chart.draw_series(
        histogram
            .edges_log10
            .windows(2)
            .zip(&histogram.counts)
            .filter(|(_, &c)| c > 0)
            .map(|(e, &c)| Rectangle::new([(e[0], 0.0), (e[1], c as f64)], BLUE_.filled())),
    )?;
    let plot = chart.plotting_area().strip_coord_spec();
    let (w, h) = plot.dim_in_pixel();
    let live = n as u64 - histogram.dead;
    let message = if n == 0 {
        Some("no latents".to_string())
    } else if live == 0 {
        Some("no latent fired on any evaluation row".to_string())
    } else {
        None
    };
    if let Some(message) = message {
        plot.draw(&Text::new(
            message,
            (w as i32 / 2, h as i32 / 2),
            (FONT, 26)
                .into_font()
                .color(&GREY)
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
    } else {
        let mut sorted: Vec<f64> = firing_frequency_f
            .iter()
            .copied()
            .filter(|&v| v > 0.0)
            .collect();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        plot.draw(&Text::new(
            format!(
                "{live} latents fired; median frequency {}",
                format_frequency(median)
            ),
            (16, 12),
            (FONT, 20)
                .into_font()
                .color(&GREY)
                .pos(Pos::new(HPos::Left, VPos::Top)),
        ))?;
    }
    Ok(())
}

/// Writes `title` centred in a band at the top of `root` and returns the area below it.
/// (plotters' own `titled` puts the text too high with the ab_glyph renderer, which places
/// glyphs about a quarter of the font size above the anchor, and clips a title at the top.)
fn draw_title<'a>(root: &Area<'a>, title: &str, size: u32) -> DrawResult<Area<'a>> {
    let band = size * 2;
    let (title_area, body) = root.split_vertically(band);
    let (w, h) = title_area.dim_in_pixel();
    title_area.draw(&Text::new(
        title,
        (w as i32 / 2, h as i32 / 2 + size as i32 / 4),
        TextStyle::from((FONT, size).into_font()).pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    Ok(body)
}

/// 1234567 → "1.23M": three significant digits and an SI suffix.
fn format_si(v: f64) -> String {
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e12 {
        (v / 1e12, "T")
    } else if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    format!("{}{suffix}", trim_decimals(scaled, 3))
}

/// `v` with `significant` significant digits, trailing zeros dropped.
fn trim_decimals(v: f64, significant: i32) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let decimals = (significant - 1 - v.abs().log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A tick label or figure: three significant digits, scientific when very large or small.
fn format_value(v: &f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}").replace(".00e", "e").replace("0e", "e")
    } else {
        trim_decimals(*v, 3)
    }
}

fn format_percent(v: &f64) -> String {
    format!("{}%", trim_decimals(v * 100.0, 3))
}

/// Whole counts only; fractional ticks of a count axis get no label.
fn format_count(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round())
    } else {
        String::new()
    }
}

/// 0.0123 → "0.0123 (once in 81 rows)".
fn format_frequency(v: f64) -> String {
    let every = (1.0 / v).round();
    if every <= 1.0 {
        format!("{} (about every row)", format_value(&v))
    } else {
        format!("{} (once in {} rows)", format_value(&v), format_si(every))
    }
}

/// -3 → "10⁻³"; a tick between whole decades gets the frequency itself.
fn format_power_of_ten(log10: f64) -> String {
    if (log10 - log10.round()).abs() > 1e-9 {
        return format_value(&10f64.powf(log10));
    }
    let k = log10.round() as i64;
    if k == 0 {
        return "1".into();
    }
    const SUPERSCRIPT: [char; 10] = ['⁰', '¹', '²', '³', '⁴', '⁵', '⁶', '⁷', '⁸', '⁹'];
    let digits: String = k
        .unsigned_abs()
        .to_string()
        .chars()
        .map(|c| SUPERSCRIPT[c as usize - '0' as usize])
        .collect();
    format!("10{}{digits}", if k < 0 { "⁻" } else { "" })
}

fn format_seconds(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "? s".into();
    }
    if s < 120.0 {
        format!("{} s", trim_decimals(s, 3))
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run as `sae train` logs one: loss falling by two decades, FVE rising from below −1,
    /// L0 falling, latents dying late.
    fn realistic(n: u64) -> Vec<MetricsRecord> {
        (1..=n)
            .map(|i| {
                let t = i as f32 / n as f32;
                MetricsRecord {
                    step: i * 10,
                    tokens: i * 10 * 4096,
                    lr: 1e-3,
                    loss: 10.0 * (-5.0 * t).exp() + 0.05,
                    mse: 8.0 * (-5.0 * t).exp() + 0.04,
                    aux: 0.1,
                    fve: Some(1.0 - 3.0 * (-6.0 * t).exp()),
                    l0: 200.0 * (-4.0 * t).exp() + 30.0,
                    dead_fraction: (t - 0.5).max(0.0) * 0.2,
                    threshold: None,
                    seconds: i as f64 * 0.5,
                }
            })
            .collect()
    }

    fn curves_rgb(records: &[MetricsRecord]) -> Vec<u8> {
        render(CURVES_SIZE, |root| draw_curves(root, records, "test")).unwrap()
    }

    /// Pixels of exactly `color` in the pixel rectangle [x0, x1) × [y0, y1).
    fn count_color(
        rgb: &[u8],
        width: u32,
        (x0, x1, y0, y1): (u32, u32, u32, u32),
        color: RGBColor,
    ) -> usize {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| ((y * width + x) * 3) as usize))
            .filter(|&i| rgb[i..i + 3] == [color.0, color.1, color.2])
            .count()
    }

    /// The width and height a PNG file's IHDR chunk gives, after checking the signature.
    pub(crate) fn png_size(path: &Path) -> (u32, u32) {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            &bytes[..8],
            b"\x89PNG\r\n\x1a\n",
            "{} is not a PNG",
            path.display()
        );
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
        (be(16), be(20))
    }

    /// Decodes a PNG written by [`write_png`] and returns its distinct pixel values.
    fn distinct_pixels(path: &Path) -> usize {
        let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut rgb = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut rgb).unwrap();
        let pixels: std::collections::HashSet<&[u8]> = rgb.chunks(3).collect();
        pixels.len()
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sae-plot-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn every_panel_draws_its_curve_in_its_quadrant() {
        let rgb = curves_rgb(&realistic(100));
        let (w, h) = CURVES_SIZE;
        let quadrants = [
            ((0, w / 2, 0, h / 2), BLUE_),
            ((w / 2, w, 0, h / 2), GREEN_),
            ((0, w / 2, h / 2, h), PURPLE),
            ((w / 2, w, h / 2, h), RED_),
        ];
        for (i, (area, color)) in quadrants.into_iter().enumerate() {
            let n = count_color(&rgb, w, area, color);
            assert!(n > 500, "panel {i}: {n} pixels of its curve's colour");
            for (j, (other, _)) in quadrants.iter().enumerate() {
                if j != i {
                    assert_eq!(
                        count_color(&rgb, w, *other, color),
                        0,
                        "panel {i}'s colour in {j}"
                    );
                }
            }
        }
        // The title: dark text in the band above the panels.
        assert!(count_color(&rgb, w, (0, w, 0, 60), RGBColor(0, 0, 0)) > 100);
    }

    #[test]
    fn training_curves_writes_a_png_of_the_stated_size_that_is_not_blank() {
        let path = temp_path("curves.png");
        training_curves(&realistic(50), &path).unwrap();
        assert_eq!(png_size(&path), CURVES_SIZE);
        assert!(distinct_pixels(&path) > 20);
        assert!(!path.with_file_name("curves.png.tmp").exists());
    }

    #[test]
    fn odd_records_draw_without_panicking() {
        let base = realistic(30);
        let mut nan_fve = base.clone();
        nan_fve.iter_mut().for_each(|r| r.fve = None);
        let mut gappy = base.clone();
        for r in gappy.iter_mut().step_by(3) {
            (r.fve, r.loss, r.l0) = (None, f32::NAN, f32::INFINITY);
        }
        let mut constant = base.clone();
        constant.iter_mut().for_each(|r| {
            (r.loss, r.mse, r.fve, r.l0, r.dead_fraction) = (2.0, 2.0, Some(0.5), 8.0, 0.0)
        });
        let mut zeros = base.clone();
        zeros.iter_mut().for_each(|r| {
            (r.loss, r.mse, r.fve, r.l0, r.dead_fraction, r.tokens) =
                (0.0, 0.0, Some(0.0), 0.0, 1.0, 0)
        });
        let mut extreme = base.clone();
        extreme[3].loss = f32::MAX;
        extreme[4].fve = Some(-1e30);
        extreme[5].mse = -1.0;
        extreme[6].dead_fraction = 7.0;
        let one = vec![base[0].clone()];
        let cases = [vec![], one, nan_fve, gappy, constant, zeros, extreme];
        for (i, records) in cases.iter().enumerate() {
            let path = temp_path(&format!("odd-{i}.png"));
            training_curves(records, &path).unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert_eq!(png_size(&path), CURVES_SIZE);
        }
        // A single record still shows as a point in each panel.
        let rgb = curves_rgb(&cases[1]);
        let (w, h) = CURVES_SIZE;
        assert!(count_color(&rgb, w, (0, w / 2, 0, h / 2), BLUE_) > 10);
    }

    #[test]
    fn loss_goes_to_a_log_axis_when_it_spans_a_decade() {
        assert!(matches!(loss_axis([10.0, 0.5].into_iter()), YAxis::Log(..)));
        assert!(matches!(
            loss_axis([2.0, 0.5].into_iter()),
            YAxis::Linear(..)
        ));
        // Zero has no logarithm.
        assert!(matches!(
            loss_axis([10.0, 0.0].into_iter()),
            YAxis::Linear(..)
        ));
        assert_eq!(log_ticks(0.6, 60.0), vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0]);
        let wide = log_ticks(1e-30, 1e30);
        assert!(wide.len() <= 10 && wide.len() >= 5, "{wide:?}");
        assert_eq!(loss_axis(std::iter::empty()), YAxis::Linear(0.0, 1.0));
    }

    #[test]
    fn counts_and_fractions_start_at_zero_and_fractions_stop_at_one() {
        assert_eq!(
            zero_based_axis([0.0, 7.0].into_iter(), 0.05, 1.0),
            YAxis::Linear(-0.015, 1.0)
        );
        assert_eq!(
            zero_based_axis([0.0, 0.0].into_iter(), 0.05, 1.0),
            YAxis::Linear(-0.015 * 0.05, 0.05)
        );
        let YAxis::Linear(_, top) = zero_based_axis([3.0, 100.0].into_iter(), 1.0, f64::INFINITY)
        else {
            panic!()
        };
        assert_eq!(top, 108.0);
    }

    #[test]
    fn fve_below_minus_one_is_clipped_with_a_note() {
        let (axis, note) = fve_axis([-12.0, 0.5].into_iter());
        let YAxis::Linear(lo, hi) = axis else {
            panic!("{axis:?}")
        };
        assert!((-1.1..-1.0).contains(&lo) && hi > 1.0, "{lo} {hi}");
        assert!(note.unwrap().contains("-12"));
        assert_eq!(fve_axis([0.2, 0.9].into_iter()).1, None);
        let clamped = clamp_curve(
            Curve {
                name: "fve",
                color: GREEN_,
                segments: vec![vec![(0.0, -12.0), (1.0, 0.5)]],
            },
            axis,
        );
        assert_eq!(clamped.segments[0], vec![(0.0, lo), (1.0, 0.5)]);
    }

    #[test]
    fn labels_read_as_people_write_numbers() {
        assert_eq!(format_si(1_234_567.0), "1.23M");
        assert_eq!(format_si(250_000.0), "250k");
        assert_eq!(format_si(0.0), "0");
        assert_eq!(format_value(&0.5), "0.5");
        assert_eq!(format_value(&3e-5), "3e-5");
        assert_eq!(format_percent(&0.0352), "3.52%");
        assert_eq!(format_power_of_ten(-3.0), "10⁻³");
        assert_eq!(format_power_of_ten(-12.0), "10⁻¹²");
        assert_eq!(format_power_of_ten(0.0), "1");
        assert_eq!(format_seconds(4000.0), "67 min");
        assert_eq!(format_count(2.5), "");
        assert_eq!(format_frequency(0.02), "0.02 (once in 50 rows)");
        assert_eq!(format_frequency(0.9), "0.9 (about every row)");
    }

    fn density_rgb(freq: &[f64]) -> Vec<u8> {
        let histogram = DensityHistogram::new(freq, bins_per_decade(freq)).unwrap();
        render(DENSITY_SIZE, |root| draw_density(root, &histogram, freq)).unwrap()
    }

    #[test]
    fn density_draws_live_latents_in_blue_and_dead_ones_in_red() {
        let freq: Vec<f64> = (0..400)
            .map(|j| {
                if j < 100 {
                    0.0
                } else {
                    10f64.powf(-4.0 + 3.0 * (j as f64 / 400.0))
                }
            })
            .collect();
        let rgb = density_rgb(&freq);
        let (w, h) = DENSITY_SIZE;
        // The dead bar sits in the narrow chart on the left, the histogram to its right.
        assert!(count_color(&rgb, w, (0, 240, 0, h), RED_) > 2000);
        assert!(count_color(&rgb, w, (240, w, 0, h), BLUE_) > 5000);
        assert_eq!(count_color(&rgb, w, (0, 240, 0, h), BLUE_), 0);

        let path = temp_path("density.png");
        density_histogram(&freq, &path).unwrap();
        assert_eq!(png_size(&path), DENSITY_SIZE);
        assert!(distinct_pixels(&path) > 20);

        let live: Vec<f64> = freq.iter().map(|&f| f.max(0.01)).collect();
        let rgb = density_rgb(&live);
        assert!(
            count_color(&rgb, w, (0, 240, 0, h), RED_) < 200,
            "no dead bar, only its label"
        );
    }

    #[test]
    fn density_of_odd_frequencies_draws_without_panicking() {
        let cases: [&[f64]; 6] = [
            &[],
            &[0.0; 50],
            &[1.0; 50],
            &[0.3],
            &[1e-300, 1.0],
            &[0.0, 1e-9],
        ];
        for (i, freq) in cases.iter().enumerate() {
            let path = temp_path(&format!("density-odd-{i}.png"));
            density_histogram(freq, &path).unwrap_or_else(|e| panic!("case {i}: {e}"));
            assert_eq!(png_size(&path), DENSITY_SIZE);
        }
        let err = density_histogram(&[0.1, f64::NAN], &temp_path("nan.png")).unwrap_err();
        assert!(err.to_string().contains("latent 1"), "{err}");
    }

    #[test]
    fn an_unwritable_path_is_an_error_naming_it() {
        let path = temp_path("no-such-dir").join("curves.png");
        let err = training_curves(&realistic(5), &path).unwrap_err();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
        let err = density_histogram(&[0.5], &path).unwrap_err();
        assert!(err.to_string().contains("no-such-dir"), "{err}");
    }
}
