//! Image decoding and the CLIP / Chinese-CLIP image processors, driven by
//! preprocessor_config.json and matching transformers' PIL backend step by
//! step: EXIF transpose, RGB (alpha composited onto white), bicubic resize,
//! center crop, rescale, normalize.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde::Deserialize;

use crate::{Error, Result};

#[path = "image/config.rs"]
mod config;
pub use config::*;
#[path = "image/naflex.rs"]
mod naflex;
pub use naflex::*;
#[path = "image/decode.rs"]
mod decode;
#[cfg(feature = "libjpeg")]
#[path = "image/libjpeg.rs"]
mod libjpeg;

/// Which JPEG decoder this build uses: libjpeg-turbo's (Pillow's pixels), or
/// without the `libjpeg` feature the pure-Rust one of `image`.
pub const JPEG_DECODER: &str = if cfg!(feature = "libjpeg") {
    "libjpeg-turbo"
} else {
    "zune-jpeg"
};
pub use decode::*;
#[path = "image/train_crop.rs"]
mod train_crop;

/// transformers' `get_resize_output_image_size`: the short side becomes `size`
/// and the long side `int(size * long / short)` (truncated, not rounded).
fn resize_target((h, w): (u32, u32), to: ResizeTo) -> (u32, u32) {
    match to {
        ResizeTo::Exact { height, width } => (height, width),
        ResizeTo::PatchBudget { patch, max_patches } => patch_budget_size(h, w, patch, max_patches),
        ResizeTo::PixelBudget {
            factor,
            min_pixels,
            max_pixels,
        } => pixel_budget_size(h, w, factor, min_pixels, max_pixels),
        ResizeTo::ShortestEdge(s) => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let new_long = (s as f64 * long as f64 / short as f64) as u32;
            if w <= h {
                (new_long, s)
            } else {
                (s, new_long)
            }
        }
    }
}

/// Processed pixels, CHW, with their height and width.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

/// Turns decoded images into normalised CHW float pixels.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    cfg: ImageProcessorConfig,
}

impl ImageProcessor {
    pub fn new(cfg: ImageProcessorConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &ImageProcessorConfig {
        &self.cfg
    }

    /// Processes one RGB image into CHW f32 values, `output_size` in shape.
    pub fn process(&self, img: &RgbImage) -> Result<Vec<f32>> {
        Ok(self.normalize(&self.resize_and_crop(img)))
    }

    /// [`Self::process`] with the output's height and width.
    pub fn process_pixels(&self, img: &RgbImage) -> Result<Pixels> {
        let out = self.resize_and_crop(img);
        Ok(Pixels {
            height: out.height() as usize,
            width: out.width() as usize,
            data: self.normalize(&out),
        })
    }

    /// [`Self::process_path`] with the output's height and width.
    pub fn process_path_pixels(&self, path: &Path) -> Result<Pixels> {
        self.process_pixels(&load_image(path)?)
    }

    /// The evaluation geometry: resize, then centre crop, as configured.
    fn resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        let resized = if self.cfg.do_resize {
            let (h, w) = resize_target((img.height(), img.width()), self.cfg.resize);
            if (w, h) == img.dimensions() {
                img.clone()
            } else {
                super::resample::resize_pil(img, w, h, self.cfg.resample)
            }
        } else {
            img.clone()
        };
        if self.cfg.do_center_crop {
            center_crop(&resized, self.cfg.crop, self.cfg.crop_rounding)
        } else {
            resized
        }
    }

    /// Loads and processes a file.
    pub fn process_path(&self, path: &Path) -> Result<Vec<f32>> {
        self.process(&load_image(path)?)
    }

    fn normalize(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = img.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        let c = &self.cfg;
        let scale = if c.do_rescale { c.rescale_factor } else { 1.0 };
        // Per channel, value = (px * scale - mean) / std; a 256-entry table
        // holds every possible result so the loop is a lookup.
        let mut lut = [[0f32; 256]; 3];
        for (ch, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                let x = (v as f64 * scale) as f32;
                *slot = if c.do_normalize {
                    (x - c.mean[ch] as f32) / c.std[ch] as f32
                } else {
                    x
                };
            }
        }
        for (i, p) in img.pixels().enumerate() {
            for ch in 0..3 {
                out[ch * plane + i] = lut[ch][p[ch] as usize];
            }
        }
        out
    }
}

/// A center crop: transformers' offsets `(orig - crop) // 2`, or
/// torchvision's (see [`CropRounding`]); a crop larger than the image pads
/// with zeros around it.
fn center_crop(img: &RgbImage, (ch, cw): (u32, u32), rounding: CropRounding) -> RgbImage {
    let (w, h) = img.dimensions();
    if (h, w) == (ch, cw) {
        return img.clone();
    }
    let top = rounding.offset(h, ch);
    let left = rounding.offset(w, cw);
    let mut out = RgbImage::new(cw, ch);
    for y in 0..ch as i64 {
        let sy = y + top;
        if sy < 0 || sy >= h as i64 {
            continue;
        }
        for x in 0..cw as i64 {
            let sx = x + left;
            if sx >= 0 && sx < w as i64 {
                out.put_pixel(x as u32, y as u32, *img.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "image_tests.rs"]
mod tests;
