//! PNG plots for reports, drawn with plotters. Text is rendered with the
//! DejaVu Sans font compiled in (the `dejavu` crate), so plots need no system
//! fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::{Error, Result};

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is valid; a failure here would only lose the labels.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn perr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Report(format!("{}: cannot draw plot: {e}", path.display()))
}

/// Draws into an RGB buffer, encodes it as PNG with the `image` crate (so
/// plotters' own encoder, which pulls a second `image` version, is not
/// needed), and writes through a temporary file and a rename, so a plot is
/// whole or absent.
fn atomic_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&mut [u8]) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![255u8; (size.0 * size.1 * 3) as usize];
    draw(&mut buf)?;
    let img = image::RgbImage::from_raw(size.0, size.1, buf).expect("buffer matches the size");
    let tmp = path.with_extension("tmp.png");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| perr(path, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Recall@K for K = 1..=max_k, one line per series, on a 0–1 axis.
pub fn recall_curves(path: &Path, title: &str, series: &[(&str, Vec<f64>)]) -> Result<()> {
    let pts: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, ys)| {
            (
                *name,
                ys.iter()
                    .enumerate()
                    .map(|(i, y)| ((i + 1) as f64, *y))
                    .collect(),
            )
        })
        .collect();
    line_chart(path, title, "K", "Recall@K", Some((0.0, 1.0)), &pts)
}

/// Lines of (x, y) points; the y axis spans `y_range`, or the data.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    y_range: Option<(f64, f64)>,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()> {
    fonts();
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for (x, y) in pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if !x0.is_finite() {
        return Ok(());
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = y_range.unwrap_or((y0 - pad, y1 + pad));
    atomic_png(path, (800, 500), |buf| {
        let root = BitMapBackend::with_buffer(buf, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| perr(path, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| perr(path, e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(|e| perr(path, e))?;
        let colors = [BLUE, RED, GREEN, MAGENTA];
        for (n, (name, pts)) in series.iter().enumerate() {
            let c = colors[n % colors.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                .map_err(|e| perr(path, e))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| perr(path, e))?;
        root.present().map_err(|e| perr(path, e))
    })
}

/// Overlaid density histograms of several samples (normalised per sample).
pub fn histograms(
    path: &Path,
    title: &str,
    x_desc: &str,
    samples: &[(&str, &[f32])],
) -> Result<()> {
    fonts();
    const BINS: usize = 60;
    let lo = samples
        .iter()
        .flat_map(|s| s.1.iter())
        .copied()
        .fold(f32::INFINITY, f32::min);
    let hi = samples
        .iter()
        .flat_map(|s| s.1.iter())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let (lo, hi) = if lo < hi {
        (lo as f64, hi as f64)
    } else {
        (lo as f64 - 0.5, lo as f64 + 0.5)
    };
    let width = (hi - lo) / BINS as f64;
    let dens: Vec<Vec<f64>> = samples
        .iter()
        .map(|(_, v)| {
            let mut h = vec![0f64; BINS];
            for &x in v.iter() {
                let b = (((x as f64 - lo) / width) as usize).min(BINS - 1);
                h[b] += 1.0;
            }
            h.iter()
                .map(|c| c / (v.len().max(1) as f64 * width))
                .collect()
        })
        .collect();
    let ymax = dens.iter().flatten().copied().fold(0.0, f64::max) * 1.1;
    atomic_png(path, (800, 500), |buf| {
        let root = BitMapBackend::with_buffer(buf, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| perr(path, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(lo..hi, 0f64..ymax.max(1e-9))
            .map_err(|e| perr(path, e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("density")
            .draw()
            .map_err(|e| perr(path, e))?;
        let colors = [BLUE, RED, GREEN, MAGENTA];
        for (n, ((name, _), d)) in samples.iter().zip(&dens).enumerate() {
            let c = colors[n % colors.len()];
            chart
                .draw_series(d.iter().enumerate().map(|(b, y)| {
                    let x0 = lo + b as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width, *y)], c.mix(0.35).filled())
                }))
                .map_err(|e| perr(path, e))?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 15, y + 5)], c.mix(0.5).filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| perr(path, e))?;
        root.present().map_err(|e| perr(path, e))
    })
}

/// A confusion matrix as a heat map, rows = true class, columns = predicted,
/// each row normalised.
pub fn confusion_matrix(
    path: &Path,
    title: &str,
    classes: &[String],
    counts: &[Vec<usize>],
) -> Result<()> {
    fonts();
    let n = classes.len();
    let cell = (560 / n.max(1)).clamp(8, 60) as i32;
    let label_w = 130;
    let w = (label_w + cell * n as i32 + 30) as u32;
    let h = (80 + cell * n as i32 + label_w) as u32;
    atomic_png(path, (w, h), |buf| {
        let root = BitMapBackend::with_buffer(buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| perr(path, e))?;
        let font = ("sans-serif", 14).into_font();
        root.draw(&Text::new(
            title.to_string(),
            (10, 10),
            ("sans-serif", 20).into_font(),
        ))
        .map_err(|e| perr(path, e))?;
        let (x0, y0) = (label_w, 50);
        for (r, row) in counts.iter().enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f64;
            for (c, &v) in row.iter().enumerate() {
                let f = v as f64 / total;
                let shade = (255.0 * (1.0 - f)) as u8;
                let (x, y) = (x0 + c as i32 * cell, y0 + r as i32 * cell);
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell, y + cell)],
                    RGBColor(shade, shade, 255).filled(),
                ))
                .map_err(|e| perr(path, e))?;
                if cell >= 28 && v > 0 {
                    let color = if f > 0.5 { &WHITE } else { &BLACK };
                    root.draw(&Text::new(
                        format!("{v}"),
                        (x + 3, y + cell / 2 - 6),
                        font.clone().color(color),
                    ))
                    .map_err(|e| perr(path, e))?;
                }
            }
            root.draw(&Text::new(
                classes[r].clone(),
                (5, y0 + r as i32 * cell + cell / 2 - 7),
                font.clone(),
            ))
            .map_err(|e| perr(path, e))?;
        }
        for (c, name) in classes.iter().enumerate() {
            let style = font.clone().transform(FontTransform::Rotate90);
            root.draw(&Text::new(
                name.clone(),
                (
                    x0 + c as i32 * cell + cell / 2 + 7,
                    y0 + n as i32 * cell + 5,
                ),
                style,
            ))
            .map_err(|e| perr(path, e))?;
        }
        root.present().map_err(|e| perr(path, e))
    })
}

/// A training run's curves from its metrics.jsonl: loss.png, and
/// dev_recall.png (a dual encoder) or dev_cider.png (a vision-language
/// model) when it was evaluated.
pub fn training_curves(out: &Path) -> Result<()> {
    let path = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let series = |key: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| Some((r["step"].as_f64()?, key(r)?)))
            .collect()
    };
    let loss = series(&|r| r["loss"].as_f64());
    line_chart(
        &out.join("loss.png"),
        "Training loss",
        "step",
        "loss",
        None,
        &[("loss", loss)],
    )?;
    let conflict = series(&|r| r["grad_conflict"].as_f64());
    if !conflict.is_empty() {
        line_chart(
            &out.join("grad_conflict.png"),
            "Gradient cosine between the first two objectives",
            "step",
            "cosine",
            Some((-1.0, 1.0)),
            &[("cosine", conflict)],
        )?;
    }
    let mut names: Vec<String> = rows
        .iter()
        .filter_map(|r| r["losses"].as_object())
        .flat_map(|m| m.keys().cloned())
        .filter(|k| k != "lambda")
        .collect();
    names.sort();
    names.dedup();
    if !names.is_empty() {
        let parts: Vec<(&str, Vec<(f64, f64)>)> = names
            .iter()
            .map(|n| (n.as_str(), series(&|r| r["losses"][n.as_str()].as_f64())))
            .collect();
        line_chart(
            &out.join("losses.png"),
            "Each objective (unweighted)",
            "step",
            "loss",
            None,
            &parts,
        )?;
    }
    let dev = series(&|r| r["dev"]["mean_recall"].as_f64());
    if !dev.is_empty() {
        line_chart(
            &out.join("dev_recall.png"),
            "Dev mean recall",
            "step",
            "mean recall",
            Some((0.0, 1.0)),
            &[("dev", dev)],
        )?;
    }
    // A vision-language run's dev captioning: own against wrong photos.
    let own = series(&|r| r["dev"]["cider_d"].as_f64());
    if !own.is_empty() {
        let wrong = series(&|r| r["dev"]["wrong_photos_cider_d"].as_f64());
        line_chart(
            &out.join("dev_cider.png"),
            "Dev CIDEr-D: own photos against wrong photos",
            "step",
            "CIDEr-D",
            None,
            &[("own photos", own), ("wrong photos", wrong)],
        )?;
    }
    Ok(())
}
