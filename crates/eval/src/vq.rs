//! How well a VQ image tokenizer reconstructs photos: PSNR and SSIM of the
//! reconstruction against the photo at the tokenizer's own geometry, the
//! codebook's use (`emu3_vq::codebook_usage` over every position), and a
//! perceptual score (the cosine between a pretrained image tower's pooled
//! features of the two), each beside controls: another photo's
//! reconstruction (the wrong photo), and the photo shrunk to the code grid
//! and blown back up (bicubic: the same number of positions as codes, each a
//! full RGB triple).
//!
//! SSIM is Wang et al.'s (2004): an 11-tap Gaussian window of σ 1.5,
//! K1 0.01 and K2 0.03 on the 0–255 range, population (co)variances, the
//! mean over the positions the whole window covers, and the mean over the
//! three channels; that is scikit-image's `structural_similarity` with
//! `gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
//! data_range=255, channel_axis=2`.

use candle_core::{Device, Tensor};
use clasp_core::model::emu3_vq::{pixels_to_image, Emu3Vq};
use clasp_core::preprocess::image::{ImageProcessor, ImageProcessorConfig};
use clasp_core::preprocess::resample::{resize_pil, Filter};
use image::RgbImage;

use crate::Result;

/// PSNR in dB of two images of one size on the 0–255 range (infinite when
/// they are equal).
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = a.as_raw().len() as f64;
    let mse: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / n;
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// The normalised 11-tap Gaussian of σ 1.5 (scipy's, truncated at 3.5 σ).
fn gaussian() -> [f64; 11] {
    let mut k = [0.0; 11];
    for (i, v) in k.iter_mut().enumerate() {
        let x = i as f64 - 5.0;
        *v = (-x * x / (2.0 * 1.5 * 1.5)).exp();
    }
    let s: f64 = k.iter().sum();
    k.map(|v| v / s)
}

/// The window's weighted mean of `f(x, y)` at each position it covers
/// whole: separable, rows then columns. `plane` is [h][w].
fn filter(plane: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let k = gaussian();
    let (h, w) = (plane.len(), plane[0].len());
    let rows: Vec<Vec<f64>> = plane
        .iter()
        .map(|r| {
            (0..w - 10)
                .map(|x| (0..11).map(|i| k[i] * r[x + i]).sum())
                .collect()
        })
        .collect();
    (0..h - 10)
        .map(|y| {
            (0..w - 10)
                .map(|x| (0..11).map(|i| k[i] * rows[y + i][x]).sum())
                .collect()
        })
        .collect()
}

/// Mean SSIM of two images of one size (at least 11 pixels a side).
pub fn ssim(a: &RgbImage, b: &RgbImage) -> f64 {
    let (w, h) = (a.width() as usize, a.height() as usize);
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let mut total = 0.0;
    for ch in 0..3 {
        let plane = |img: &RgbImage| -> Vec<Vec<f64>> {
            (0..h)
                .map(|y| {
                    (0..w)
                        .map(|x| img.get_pixel(x as u32, y as u32)[ch] as f64)
                        .collect()
                })
                .collect()
        };
        let (x, y) = (plane(a), plane(b));
        let prod = |p: &[Vec<f64>], q: &[Vec<f64>]| -> Vec<Vec<f64>> {
            p.iter()
                .zip(q)
                .map(|(r, s)| r.iter().zip(s).map(|(u, v)| u * v).collect())
                .collect()
        };
        let (mx, my) = (filter(&x), filter(&y));
        let (xx, yy, xy) = (
            filter(&prod(&x, &x)),
            filter(&prod(&y, &y)),
            filter(&prod(&x, &y)),
        );
        let mut sum = 0.0;
        let mut n = 0usize;
        for i in 0..mx.len() {
            for j in 0..mx[0].len() {
                let (ux, uy) = (mx[i][j], my[i][j]);
                let (vx, vy, cxy) = (xx[i][j] - ux * ux, yy[i][j] - uy * uy, xy[i][j] - ux * uy);
                sum += ((2.0 * ux * uy + c1) * (2.0 * cxy + c2))
                    / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
                n += 1;
            }
        }
        total += sum / n as f64;
    }
    total / 3.0
}

/// A photo through a tokenizer: the photo at the tokenizer's geometry (as
/// bytes), its codes [h][w], and the reconstruction.
pub struct Reconstruction {
    pub original: RgbImage,
    pub codes: Vec<Vec<u32>>,
    pub recon: RgbImage,
}

/// Tokenizes and decodes `img` with `vq`, whose processor is `cfg`.
pub fn reconstruct(
    vq: &Emu3Vq,
    cfg: &ImageProcessorConfig,
    img: &RgbImage,
) -> Result<Reconstruction> {
    let (h, w) = cfg.output_size((img.height(), img.width()));
    let original = if (w, h) == img.dimensions() {
        img.clone()
    } else {
        resize_pil(img, w, h, cfg.resample)
    };
    let px = ImageProcessor::new(cfg.clone()).process(&original)?;
    let t = Tensor::from_vec(px, (1, 3, h as usize, w as usize), &Device::Cpu)?;
    let codes = vq.encode(&t)?;
    let recon = pixels_to_image(&vq.decode(&codes)?.squeeze(0)?, cfg)?;
    let codes: Vec<Vec<u32>> = codes
        .squeeze(0)?
        .to_dtype(candle_core::DType::U32)?
        .to_vec2()?;
    Ok(Reconstruction {
        original,
        codes,
        recon,
    })
}

/// The photo shrunk to `grid` (h, w) positions and blown back up, bicubic.
pub fn thumbnail(img: &RgbImage, grid: (usize, usize)) -> RgbImage {
    let small = resize_pil(img, grid.1 as u32, grid.0 as u32, Filter::Bicubic);
    resize_pil(&small, img.width(), img.height(), Filter::Bicubic)
}

/// Rows of originals over their reconstructions, `per_row` pairs a row.
pub fn grid(pairs: &[(&RgbImage, &RgbImage)], per_row: usize) -> RgbImage {
    let (w, h) = pairs.first().map_or((1, 1), |p| p.0.dimensions());
    let rows = pairs.len().div_ceil(per_row.max(1));
    let mut out = RgbImage::from_pixel(
        w * per_row as u32,
        h * 2 * rows as u32,
        image::Rgb([255; 3]),
    );
    for (i, (a, b)) in pairs.iter().enumerate() {
        let (x, y) = ((i % per_row) as u32 * w, (i / per_row) as u32 * 2 * h);
        image::imageops::overlay(&mut out, *a, x as i64, y as i64);
        image::imageops::overlay(&mut out, *b, x as i64, (y + h) as i64);
    }
    out
}

/// A pretrained image tower's pooled features, for the perceptual score.
pub struct Perceptual {
    tower: clasp_core::model::cnn_tower::CnnTower,
    proc: ImageProcessor,
}

impl Perceptual {
    /// A pretrained CNN file (torchvision's MobileNetV2, ResNets, EfficientNet-Lite).
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let (tower, cfg) = clasp_core::model::cnn_tower::load_pretrained(path, &Device::Cpu)?;
        Ok(Self {
            tower,
            proc: ImageProcessor::new(cfg.processor()),
        })
    }

    /// The tower's pooled features of each image, in batches of 16.
    pub fn features(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let (h, w) = self.proc.config().crop;
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(16) {
            let px: Vec<f32> = chunk
                .iter()
                .map(|i| self.proc.process(i))
                .collect::<Result<Vec<_>>>()?
                .concat();
            let t = Tensor::from_vec(px, (chunk.len(), 3, h as usize, w as usize), &Device::Cpu)?;
            out.extend(self.tower.forward(&t)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// The cosine between the towers' features of `a` and `b`.
    pub fn cosine(&self, a: &RgbImage, b: &RgbImage) -> Result<f64> {
        let f = self.features(&[a.clone(), b.clone()])?;
        let dot: f64 = f[0]
            .iter()
            .zip(&f[1])
            .map(|(x, y)| (*x as f64) * (*y as f64))
            .sum();
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        Ok(dot / (norm(&f[0]) * norm(&f[1])))
    }
}

/// One photo's scores: the reconstruction's, and each control's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhotoScores {
    pub image: String,
    /// Keyed by what was compared with the photo: `reconstruction`,
    /// `wrong_photo`, `thumbnail` (and `baseline`, another tokenizer's).
    pub psnr: std::collections::BTreeMap<String, f64>,
    pub ssim: std::collections::BTreeMap<String, f64>,
    pub perceptual: std::collections::BTreeMap<String, f64>,
}

/// Scores each of `photos` (decoded images with their names) through `vq`
/// and the controls, and returns the scores with the reconstructions;
/// `counts` gathers the code histogram. The wrong photo
/// of photo i is photo i + 1's reconstruction (resized to i's geometry),
/// the last one's the first's.
pub fn score_photos(
    vq: &Emu3Vq,
    cfg: &ImageProcessorConfig,
    baseline: Option<(&Emu3Vq, &ImageProcessorConfig)>,
    perceptual: Option<&Perceptual>,
    photos: &[(String, RgbImage)],
    counts: &mut [f64],
    progress: &dyn Fn(usize),
) -> Result<(Vec<PhotoScores>, Vec<Reconstruction>)> {
    let recs: Vec<Reconstruction> = photos
        .iter()
        .enumerate()
        .map(|(i, (_, img))| {
            progress(i);
            reconstruct(vq, cfg, img)
        })
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        for c in r.codes.iter().flatten() {
            counts[*c as usize] += 1.0;
        }
        let other = &recs[(i + 1) % recs.len()].recon;
        let wrong = resize_pil(
            other,
            r.original.width(),
            r.original.height(),
            Filter::Bicubic,
        );
        let grid = (r.codes.len(), r.codes[0].len());
        let mut compared = vec![
            ("reconstruction", r.recon.clone()),
            ("wrong_photo", wrong),
            ("thumbnail", thumbnail(&r.original, grid)),
        ];
        if let Some((b, bcfg)) = baseline {
            let br = reconstruct(b, bcfg, &photos[i].1)?.recon;
            compared.push((
                "baseline",
                resize_pil(
                    &br,
                    r.original.width(),
                    r.original.height(),
                    Filter::Bicubic,
                ),
            ));
        }
        let mut s = PhotoScores {
            image: photos[i].0.clone(),
            psnr: Default::default(),
            ssim: Default::default(),
            perceptual: Default::default(),
        };
        for (name, img) in &compared {
            s.psnr.insert(name.to_string(), psnr(&r.original, img));
            s.ssim.insert(name.to_string(), ssim(&r.original, img));
            if let Some(p) = perceptual {
                s.perceptual
                    .insert(name.to_string(), p.cosine(&r.original, img)?);
            }
        }
        out.push(s);
    }
    Ok((out, recs))
}

impl PhotoScores {
    fn metric(&self, name: &str) -> &std::collections::BTreeMap<String, f64> {
        match name {
            "psnr" => &self.psnr,
            "ssim" => &self.ssim,
            _ => &self.perceptual,
        }
    }
}

/// Each metric's mean for the reconstruction and each control, with the
/// reconstruction's paired difference from the control and its t.
pub fn summarize(scores: &[PhotoScores]) -> serde_json::Value {
    let column = |metric: &str, k: &str| -> Vec<f64> {
        scores
            .iter()
            .filter_map(|s| s.metric(metric).get(k).copied())
            .collect()
    };
    let mut out = serde_json::Map::new();
    for metric in ["psnr", "ssim", "perceptual"] {
        let own = column(metric, "reconstruction");
        if own.is_empty() {
            continue;
        }
        let mut m = serde_json::Map::new();
        for k in ["reconstruction", "wrong_photo", "thumbnail", "baseline"] {
            let v = column(metric, k);
            if v.is_empty() {
                continue;
            }
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let mut entry = serde_json::json!({ "mean": mean });
            if k != "reconstruction" {
                let (d, t) = paired(&own, &v);
                entry["reconstruction_minus_this"] = serde_json::json!({"mean": d, "paired_t": t});
            }
            m.insert(k.to_string(), entry);
        }
        out.insert(metric.to_string(), serde_json::Value::Object(m));
    }
    serde_json::Value::Object(out)
}

/// The mean of `a − b` and its paired t (n − 1 degrees of freedom).
pub fn paired(a: &[f64], b: &[f64]) -> (f64, f64) {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, mean / (var / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_and_ssim_of_equal_and_shifted_images() {
        let a = RgbImage::from_fn(32, 24, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 9) as u8, ((x + y) * 3) as u8])
        });
        assert!(psnr(&a, &a).is_infinite());
        assert!((ssim(&a, &a) - 1.0).abs() < 1e-12);
        let b = RgbImage::from_fn(32, 24, |x, y| {
            let p = a.get_pixel(x, y);
            image::Rgb([p[0].saturating_add(10), p[1], p[2]])
        });
        // MSE: 100 in one channel of three (where no byte saturates).
        let want = 10.0 * (255.0f64 * 255.0 / (100.0 / 3.0)).log10();
        assert!((psnr(&a, &b) - want).abs() < 1e-9, "{}", psnr(&a, &b));
        assert!(ssim(&a, &b) < 1.0 && ssim(&a, &b) > 0.9);
        let (p, used) = clasp_core::model::emu3_vq::codebook_usage(&[5.0, 5.0, 0.0, 0.0]);
        assert!((p - 2.0).abs() < 1e-12 && used == 2);
    }

    /// scikit-image's numbers (scripts/gen_vq_metric_fixtures.py) on two
    /// images both sides build from the same integer formulas.
    #[test]
    fn ssim_and_psnr_equal_scikit_image() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/eval/vq_metrics.json"
        );
        let f: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let a = RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb(std::array::from_fn(|c| {
                ((x * 7 + y * 13 + c as u32 * 50) % 256) as u8
            }))
        });
        let b = RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb(std::array::from_fn(|c| {
                let v = a.get_pixel(x, y)[c] as i64 + ((x * y * (c as u32 + 1)) % 31) as i64 - 15;
                v.clamp(0, 255) as u8
            }))
        });
        let (s, p) = (ssim(&a, &b), psnr(&a, &b));
        assert!(
            (s - f["ssim"].as_f64().unwrap()).abs() < 1e-9,
            "SSIM {s} vs {}",
            f["ssim"]
        );
        assert!(
            (p - f["psnr"].as_f64().unwrap()).abs() < 1e-9,
            "PSNR {p} vs {}",
            f["psnr"]
        );
    }
}
