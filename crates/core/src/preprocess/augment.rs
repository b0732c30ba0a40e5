//! Colour jitter for training, as torchvision's `ColorJitter` computes it on
//! PIL images (the path open_clip's training transform takes): a random
//! order of brightness, contrast, saturation and hue adjustments, each with
//! a factor drawn uniformly from its range. The adjustments reproduce PIL's
//! 8-bit arithmetic (`Image.blend` truncation, ITU-R 601 luma, PIL's own
//! RGB/HSV conversion) and equal torchvision's outputs exactly on fixtures
//! (`scripts/gen_augment_fixtures.py`).

use image::RgbImage;

use crate::{Error, Result};

/// Strengths as torchvision takes them: factors are drawn from
/// [max(0, 1 - s), 1 + s] for brightness, contrast and saturation, and from
/// [-hue, hue] for hue. Applied to an image with probability `prob`
/// (open_clip's `color_jitter_prob`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColorJitter {
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
    pub prob: f64,
}

impl ColorJitter {
    /// From `[b, c, s, h]` (empty: off) and the probability.
    pub fn new(strengths: &[f32], prob: f64) -> Result<Option<Self>> {
        let bad = |why: &str| Error::Report(format!("color_jitter {strengths:?}: {why}"));
        match strengths {
            [] => Ok(None),
            &[brightness, contrast, saturation, hue] => {
                if [brightness, contrast, saturation, hue]
                    .iter()
                    .any(|v| !v.is_finite() || *v < 0.0)
                {
                    return Err(bad("strengths must be non-negative"));
                }
                if hue > 0.5 {
                    return Err(bad("hue must be at most 0.5"));
                }
                if !(0.0..=1.0).contains(&prob) {
                    return Err(bad("color_jitter_prob must be in [0, 1]"));
                }
                Ok(Some(Self {
                    brightness,
                    contrast,
                    saturation,
                    hue,
                    prob,
                }))
            }
            _ => Err(bad(
                "give four values: brightness, contrast, saturation, hue",
            )),
        }
    }

    /// Jitters `img` in place with draws from `uniform` ([0, 1)).
    pub fn apply(&self, img: &mut RgbImage, uniform: &mut dyn FnMut() -> f64) {
        if uniform() >= self.prob {
            return;
        }
        // A random order (Fisher-Yates), then the four factors, as
        // torchvision's get_params draws them.
        let mut order = [0usize, 1, 2, 3];
        for i in (1..4).rev() {
            let j = ((uniform() * (i + 1) as f64) as usize).min(i);
            order.swap(i, j);
        }
        let mut factor = |s: f32| {
            let lo = (1.0 - s).max(0.0) as f64;
            (lo + (1.0 + s as f64 - lo) * uniform()) as f32
        };
        let (b, c, s) = (
            factor(self.brightness),
            factor(self.contrast),
            factor(self.saturation),
        );
        let h = (-self.hue as f64 + 2.0 * self.hue as f64 * uniform()) as f32;
        for op in order {
            match op {
                0 if self.brightness > 0.0 => adjust_brightness(img, b),
                1 if self.contrast > 0.0 => adjust_contrast(img, c),
                2 if self.saturation > 0.0 => adjust_saturation(img, s),
                3 if self.hue > 0.0 => adjust_hue(img, h),
                _ => {}
            }
        }
    }
}

/// PIL's `Image.blend(a, b, alpha)` for one 8-bit value: a + alpha (b - a),
/// clipped, truncated toward zero.
fn blend(a: u8, b: u8, alpha: f32) -> u8 {
    let v = a as f32 + alpha * (b as f32 - a as f32);
    if v <= 0.0 {
        0
    } else if v >= 255.0 {
        255
    } else {
        v as u8
    }
}

/// PIL's RGB to L conversion (ITU-R 601-2 luma, 16-bit fixed point).
fn luma(p: &[u8; 3]) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Blend with black: `ImageEnhance.Brightness`.
pub fn adjust_brightness(img: &mut RgbImage, f: f32) {
    for v in img.iter_mut() {
        *v = blend(0, *v, f);
    }
}

/// Blend with the mean grey level: `ImageEnhance.Contrast`.
pub fn adjust_contrast(img: &mut RgbImage, f: f32) {
    let n = (img.width() * img.height()).max(1) as f64;
    let sum: f64 = img.pixels().map(|p| luma(&p.0) as f64).sum();
    let mean = (sum / n + 0.5) as u8;
    for v in img.iter_mut() {
        *v = blend(mean, *v, f);
    }
}

/// Blend with the image's own grey version: `ImageEnhance.Color`.
pub fn adjust_saturation(img: &mut RgbImage, f: f32) {
    for p in img.pixels_mut() {
        let g = luma(&p.0);
        for v in p.0.iter_mut() {
            *v = blend(g, *v, f);
        }
    }
}

/// torchvision's PIL hue shift: to PIL's 8-bit HSV, add `f * 255` to H with
/// wrap-around, and back.
pub fn adjust_hue(img: &mut RgbImage, f: f32) {
    // np.uint8(f * 255): truncation toward zero, then modulo 256.
    let shift = (f * 255.0) as i32 as u8;
    for p in img.pixels_mut() {
        let [h, s, v] = rgb_to_hsv(p.0);
        p.0 = hsv_to_rgb([h.wrapping_add(shift), s, v]);
    }
}

/// PIL's `rgb2hsv` (Convert.c), after Python's colorsys.
fn rgb_to_hsv([r, g, b]: [u8; 3]) -> [u8; 3] {
    let (maxc, minc) = (r.max(g).max(b), r.min(g).min(b));
    if maxc == minc {
        return [0, 0, maxc];
    }
    let cr = (maxc - minc) as f32;
    let s = cr / maxc as f32;
    let rc = (maxc - r) as f32 / cr;
    let gc = (maxc - g) as f32 / cr;
    let bc = (maxc - b) as f32 / cr;
    let h = if r == maxc {
        bc - gc
    } else if g == maxc {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    // C's fmod((h / 6.0 + 1.0), 1.0): computed in double, stored in a float
    // (that rounding matters: pure green lands on 85, not 84).
    let h = ((h as f64 / 6.0 + 1.0) % 1.0) as f32 as f64;
    let clip8 = |v: f64| (v as i32).clamp(0, 255) as u8;
    [clip8(h * 255.0), clip8(s as f64 * 255.0), maxc]
}

/// PIL's `hsv2rgb` (Convert.c).
fn hsv_to_rgb([h, s, v]: [u8; 3]) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let hf = h as f32 * 6.0 / 255.0;
    let i = hf.floor() as i32;
    let f = hf - i as f32;
    let fs = s as f32 / 255.0;
    let clip8 = |x: f32| (x.round() as i32).clamp(0, 255) as u8;
    let p = clip8(v as f32 * (1.0 - fs));
    let q = clip8(v as f32 * (1.0 - fs * f));
    let t = clip8(v as f32 * (1.0 - fs * (1.0 - f)));
    match i % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strengths_are_checked() {
        assert_eq!(ColorJitter::new(&[], 0.8).unwrap(), None);
        assert!(ColorJitter::new(&[0.4, 0.4], 0.8).is_err());
        assert!(ColorJitter::new(&[0.4, 0.4, 0.4, 0.6], 0.8).is_err());
        assert!(ColorJitter::new(&[0.4, -0.1, 0.4, 0.1], 0.8).is_err());
        assert!(ColorJitter::new(&[0.4, 0.4, 0.4, 0.1], 0.8)
            .unwrap()
            .is_some());
    }

    #[test]
    fn jitter_is_seeded_and_respects_probability() {
        let img = RgbImage::from_fn(9, 7, |x, y| image::Rgb([x as u8 * 20, y as u8 * 30, 90]));
        let cj = ColorJitter::new(&[0.4, 0.4, 0.4, 0.1], 1.0)
            .unwrap()
            .unwrap();
        let run = |seed: u64, cj: ColorJitter| {
            // A small LCG: any seeded source of draws will do here.
            let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let mut u = || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 53) as f64
            };
            let mut im = img.clone();
            cj.apply(&mut im, &mut u);
            im
        };
        assert_eq!(run(1, cj), run(1, cj));
        assert_ne!(run(1, cj), run(2, cj));
        assert_ne!(run(1, cj), img);
        let never = ColorJitter { prob: 0.0, ..cj };
        assert_eq!(run(1, never), img);
    }
}
