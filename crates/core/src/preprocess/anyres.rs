//! LLaVA-NeXT's AnyRes preprocessing, as transformers'
//! `LlavaNextImageProcessor` (its PIL backend) does it:
//! 1. the best resolution among `image_grid_pinpoints` (the one that keeps
//!    the most of the image's pixels, then wastes the least);
//! 2. the image resized into it keeping its aspect (PIL bicubic), centred
//!    on black padding, and cut into tiles of the tower's size, row by row;
//! 3. the whole image resized to the tower's square (the base image, first);
//! 4. every tile through the tower's own preprocessing (a no-op resize and
//!    crop at that size, rescale, normalise).
//!
//! [`feature_count`] is the number of image tokens the model gives such an
//! image (`LlavaNextProcessor._get_number_of_features`): the base image's
//! tokens, then the tiles' feature map with its padding cut away and one
//! `image_newline` per row.

use image::RgbImage;

use super::image::ImageProcessor;
use super::resample::resize_pil;
use crate::{Error, Result};

/// The pinpoint (height, width) that fits an image of `orig` (height,
/// width) best: the most of its pixels kept, then the fewest wasted.
pub fn select_best_resolution(orig: (u32, u32), pinpoints: &[(u32, u32)]) -> (u32, u32) {
    let (oh, ow) = (orig.0 as f64, orig.1 as f64);
    let mut best = pinpoints[0];
    let (mut max_effective, mut min_wasted) = (0i64, i64::MAX);
    for &(h, w) in pinpoints {
        let scale = (w as f64 / ow).min(h as f64 / oh);
        let (dw, dh) = ((ow * scale) as i64, (oh * scale) as i64);
        let effective = (dw * dh).min(orig.0 as i64 * orig.1 as i64);
        let wasted = h as i64 * w as i64 - effective;
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = (h, w);
        }
    }
    best
}

/// The size (height, width) an image of `orig` is resized to inside
/// `target`, keeping its aspect (`get_patch_output_size`).
pub fn patch_output_size(orig: (u32, u32), target: (u32, u32)) -> (u32, u32) {
    let (oh, ow) = (orig.0 as f64, orig.1 as f64);
    let (th, tw) = target;
    let (sw, sh) = (tw as f64 / ow, th as f64 / oh);
    if sw < sh {
        (((oh * sw).ceil() as u32).min(th), tw)
    } else {
        (th, ((ow * sh).ceil() as u32).min(tw))
    }
}

/// An image prepared for AnyRes: the base image's and the tiles' pixels
/// (CHW, the tower's size), and what the model needs to put them together.
#[derive(Debug, Clone, PartialEq)]
pub struct AnyResPixels {
    /// The base image first, then the tiles row by row.
    pub tiles: Vec<Vec<f32>>,
    /// The original (height, width): the model unpads by it.
    pub image_size: (u32, u32),
    /// The tiles' grid (rows, columns).
    pub grid: (usize, usize),
}

/// Python's `int(round(x, 7))` for the non-negative sizes it is used on.
fn round7_trunc(x: f64) -> i64 {
    ((x * 1e7).round() / 1e7) as i64
}

/// Checks pinpoints against the tower's tile size.
pub fn check_pinpoints(pinpoints: &[(u32, u32)], tile: u32) -> Result<()> {
    if pinpoints.is_empty() {
        return Err(Error::Report("image_grid_pinpoints is empty".into()));
    }
    if let Some(p) = pinpoints
        .iter()
        .find(|(h, w)| *h == 0 || *w == 0 || h % tile != 0 || w % tile != 0)
    {
        return Err(Error::Report(format!(
            "image_grid_pinpoints: {}x{} is not a whole number of {tile}-pixel tiles",
            p.0, p.1
        )));
    }
    Ok(())
}

/// AnyRes tiles of `img` for a tower of `tile` pixels whose preprocessing
/// is `proc` (which must give `tile`×`tile` pixels).
pub fn tiles(
    proc: &ImageProcessor,
    img: &RgbImage,
    pinpoints: &[(u32, u32)],
    tile: u32,
) -> Result<AnyResPixels> {
    check_pinpoints(pinpoints, tile)?;
    let orig = (img.height(), img.width());
    let best = select_best_resolution(orig, pinpoints);
    let (nh, nw) = patch_output_size(orig, best);
    let resized = if (nw, nh) == img.dimensions() {
        img.clone()
    } else {
        resize_pil(img, nw, nh, proc.config().resample)
    };
    // Centred on black: the odd pixel of padding goes right and below.
    let (top, left) = ((best.0 - nh) / 2, (best.1 - nw) / 2);
    let mut padded = RgbImage::new(best.1, best.0);
    image::imageops::replace(&mut padded, &resized, left as i64, top as i64);
    let base = if img.dimensions() == (tile, tile) {
        img.clone()
    } else {
        resize_pil(img, tile, tile, proc.config().resample)
    };
    let (rows, cols) = ((best.0 / tile) as usize, (best.1 / tile) as usize);
    let mut out = Vec::with_capacity(1 + rows * cols);
    let mut push = |im: &RgbImage| -> Result<()> {
        let px = proc.process_pixels(im)?;
        if (px.height, px.width) != (tile as usize, tile as usize) {
            return Err(Error::Shape(format!(
                "AnyRes tiles are {tile} pixels, and the tower's preprocessing gives {}x{}",
                px.height, px.width
            )));
        }
        out.push(px.data);
        Ok(())
    };
    push(&base)?;
    for r in 0..rows as u32 {
        for c in 0..cols as u32 {
            let t = image::imageops::crop_imm(&padded, c * tile, r * tile, tile, tile).to_image();
            push(&t)?;
        }
    }
    Ok(AnyResPixels {
        tiles: out,
        image_size: orig,
        grid: (rows, cols),
    })
}

/// The unpadded feature map's (height, width) in tower patches: the tiles'
/// map (`rows`×`cols` tiles of `per_side` patches) with the padding the
/// aspect left cut away (`unpad_image`).
pub fn unpadded_size(orig: (u32, u32), grid: (usize, usize), per_side: usize) -> (usize, usize) {
    let (mut ch, mut cw) = (grid.0 * per_side, grid.1 * per_side);
    let (oh, ow) = (orig.0 as f64, orig.1 as f64);
    if ow / oh > cw as f64 / ch as f64 {
        let new_h = round7_trunc(oh * (cw as f64 / ow)) as usize;
        let pad = (ch - new_h) / 2;
        ch -= 2 * pad;
    } else {
        let new_w = round7_trunc(ow * (ch as f64 / oh)) as usize;
        let pad = (cw - new_w) / 2;
        cw -= 2 * pad;
    }
    (ch, cw)
}

/// Grid pinpoints written `336x672,672x336`: (height, width) pairs.
pub fn parse_pinpoints(s: &str) -> std::result::Result<Vec<(u32, u32)>, String> {
    s.split(',')
        .map(|p| {
            let (h, w) = p
                .trim()
                .split_once('x')
                .ok_or_else(|| format!("`{p}` is not HxW (336x672)"))?;
            match (h.parse::<u32>(), w.parse::<u32>()) {
                (Ok(h), Ok(w)) if h > 0 && w > 0 => Ok((h, w)),
                _ => Err(format!("`{p}` is not HxW with positive sizes")),
            }
        })
        .collect()
}

/// Image tokens the model gives an image of `orig`: the base image's
/// `per_side`² (+ `extra`: 1 with the class token, `full` selection), then
/// the unpadded map with one newline per row.
pub fn feature_count(
    orig: (u32, u32),
    pinpoints: &[(u32, u32)],
    tile: u32,
    per_side: usize,
    extra: usize,
) -> usize {
    let best = select_best_resolution(orig, pinpoints);
    let grid = ((best.0 / tile) as usize, (best.1 / tile) as usize);
    let (h, w) = unpadded_size(orig, grid, per_side);
    per_side * per_side + extra + h * w + h
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINPOINTS: [(u32, u32); 5] =
        [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

    #[test]
    fn best_resolution_output_size_and_counts_follow_transformers_rules() {
        // A wide diagram picks the widest grid; a 4:3 photo the square one.
        assert_eq!(select_best_resolution((762, 2162), &PINPOINTS), (336, 1008));
        assert_eq!(select_best_resolution((480, 640), &PINPOINTS), (672, 672));
        assert_eq!(select_best_resolution((500, 375), &PINPOINTS), (672, 672));
        assert_eq!(patch_output_size((480, 640), (672, 672)), (504, 672));
        assert_eq!(patch_output_size((762, 2162), (336, 1008)), (336, 954));
        // 24×24 patches per tile: 576 + 2×2 tiles' map 48×48 unpadded to
        // 36 rows (480/640 of 48) with a newline each.
        assert_eq!(
            feature_count((480, 640), &PINPOINTS, 336, 24, 0),
            576 + 36 * 48 + 36
        );
        assert!(check_pinpoints(&[(336, 500)], 336).is_err());
    }
}
