//! SigLIP 2's NaFlex inputs: the patch-budget size and the patch sequence with its mask and spatial shapes.

use super::*;

/// The size that keeps an image's aspect ratio with each side a multiple of
/// `patch` and at most `max_patches` patches: transformers'
/// `get_image_size_for_max_num_patches` (Siglip2ImageProcessor), the same
/// bisection over the scale in f64, so the same grid comes out.
pub fn patch_budget_size(h: u32, w: u32, patch: u32, max_patches: u32) -> (u32, u32) {
    let p = patch as f64;
    let scaled = |scale: f64, size: u32| -> u32 {
        let s = ((size as f64 * scale) / p).ceil() * p;
        s.max(p) as u32
    };
    let eps = 1e-5;
    let (mut lo, mut hi) = (eps / 10.0, 100.0f64);
    while hi - lo >= eps {
        let scale = (lo + hi) / 2.0;
        let (th, tw) = (scaled(scale, h), scaled(scale, w));
        let n = (th as f64 / p) * (tw as f64 / p);
        if n <= max_patches as f64 {
            lo = scale;
        } else {
            hi = scale;
        }
    }
    (scaled(lo, h), scaled(lo, w))
}

/// The size that keeps an image's aspect ratio with each side a multiple of
/// `factor` and the area within `min_pixels..=max_pixels`: transformers'
/// `smart_resize` of Emu3ImageProcessor (Python's round-half-even first, and
/// floor or ceil of the scaled sides when the area is out of bounds).
pub fn pixel_budget_size(
    h: u32,
    w: u32,
    factor: u32,
    min_pixels: u32,
    max_pixels: u32,
) -> (u32, u32) {
    let (hf, wf, f) = (h as f64, w as f64, factor as f64);
    let mut hb = (hf / f).round_ties_even() * f;
    let mut wb = (wf / f).round_ties_even() * f;
    if hb * wb > max_pixels as f64 {
        let beta = (hf * wf / max_pixels as f64).sqrt();
        hb = f.max((hf / beta / f).floor() * f);
        wb = f.max((wf / beta / f).floor() * f);
    } else if hb * wb < min_pixels as f64 {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        hb = (hf * beta / f).ceil() * f;
        wb = (wf * beta / f).ceil() * f;
    }
    (hb as u32, wb as u32)
}

/// SigLIP 2's model inputs for one image, as Siglip2ImageProcessor returns
/// them.
#[derive(Debug, Clone, PartialEq)]
pub struct NaflexInputs {
    /// [max_patches, p*p*C]: each patch row-major, channels last; zero
    /// after the image's own patches.
    pub patches: Vec<f32>,
    /// 1 for the image's patches, 0 for padding.
    pub mask: Vec<u8>,
    /// The patch grid (rows, columns).
    pub grid: (usize, usize),
}

/// Patchifies processed pixels as Siglip2ImageProcessor does.
pub fn naflex_patches(px: &Pixels, patch: usize, max_patches: usize) -> Result<NaflexInputs> {
    let (gh, gw) = (px.height / patch, px.width / patch);
    if !px.height.is_multiple_of(patch) || !px.width.is_multiple_of(patch) || gh * gw > max_patches
    {
        return Err(Error::Shape(format!(
            "a {}x{} image is not a grid of at most {max_patches} patches of {patch} px",
            px.height, px.width
        )));
    }
    let c = px.data.len() / (px.height * px.width);
    let dim = patch * patch * c;
    let mut out = vec![0f32; max_patches * dim];
    for (i, dst) in out.chunks_mut(dim).take(gh * gw).enumerate() {
        let (r, q) = (i / gw, i % gw);
        for y in 0..patch {
            for x in 0..patch {
                for ch in 0..c {
                    let src =
                        ch * px.height * px.width + (r * patch + y) * px.width + q * patch + x;
                    dst[(y * patch + x) * c + ch] = px.data[src];
                }
            }
        }
    }
    Ok(NaflexInputs {
        patches: out,
        mask: (0..max_patches).map(|i| (i < gh * gw) as u8).collect(),
        grid: (gh, gw),
    })
}
