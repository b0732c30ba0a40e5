//! Drawing with a native model: image tokens sampled after a caption with
//! classifier-free guidance against a negative prompt (Emu3's scheme), the
//! row structure enforced by constrained decoding (only code tokens inside a
//! row, the end-of-row token at each row's end), then decoded by the VQ
//! tokenizer.

use super::*;
use clasp_core::preprocess::image::{ImageProcessorConfig, ResizeTo};
use llm::sampling::{Sampler, SamplingParams};

/// Emu3's negative prompt for drawing.
pub const NEGATIVE_PROMPT: &str = "lowres, bad anatomy, bad hands, text, error, missing fingers, \
extra digit, fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, \
signature, watermark, username, blurry.";

/// How to draw.
#[derive(Debug, Clone)]
pub struct DrawOptions {
    /// The image in pixels (height, width): multiples of the tokenizer's
    /// pixels per code.
    pub size: (usize, usize),
    /// Classifier-free guidance: `uncond + cfg (cond − uncond)`; 1 is none.
    pub cfg: f32,
    pub negative_prompt: String,
    pub sampling: SamplingParams,
}

/// A drawing's code grid (rows, columns) for `size` pixels under a
/// tokenizer of `cfg`, or an error that names an empty prompt or a size the
/// tokenizer cannot make. It needs only the config, so a front end can check
/// before it loads the model.
pub fn check_draw(
    cfg: &Emu3VqConfig,
    prompt: &str,
    size: (usize, usize),
) -> Result<(usize, usize)> {
    if prompt.trim().is_empty() {
        return Err(Error::Report(
            "the prompt is empty: say what to draw".into(),
        ));
    }
    let f = cfg.spatial_factor();
    let (h, w) = size;
    if h == 0 || w == 0 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
        return Err(Error::Report(format!(
            "size {h}x{w}: this tokenizer makes images whose sides are positive multiples of {f} pixels"
        )));
    }
    Ok((h / f, w / f))
}

/// The default drawing size: the square of the processor's smallest pixel
/// budget, in whole codes (8 codes a side when the processor has no budget).
pub fn default_draw_size(cfg: &Emu3VqConfig, processor: &ImageProcessorConfig) -> (usize, usize) {
    let f = cfg.spatial_factor();
    let side = match processor.resize {
        ResizeTo::PixelBudget { min_pixels, .. } => {
            ((min_pixels as f64).sqrt() as usize / f).max(1) * f
        }
        _ => 8 * f,
    };
    (side, side)
}

impl NativeModel {
    /// The code grid (rows, columns) of an image of `size` pixels, or an
    /// error that names the size.
    pub fn code_grid(&self, size: (usize, usize)) -> Result<(usize, usize)> {
        check_draw(self.vq.config(), "-", size)
    }

    /// The codes [rows][columns] drawn for `caption`; `progress` hears each
    /// finished row.
    pub fn draw_codes(
        &self,
        caption: &str,
        o: &DrawOptions,
        progress: &dyn Fn(usize),
    ) -> Result<Vec<Vec<u32>>> {
        let (h, w) = check_draw(self.vq.config(), caption, o.size)?;
        o.sampling.validate().map_err(Error::Report)?;
        let dev = self.llm.device();
        let guided = o.cfg != 1.0;
        let mut cond = self.llm.new_cache(vec![0]);
        let mut uncond = self.llm.new_cache(vec![0]);
        let start = |ids: Vec<u32>, cache: &mut llm::llama::Cache| -> Result<Tensor> {
            let t = Tensor::new(ids.as_slice(), dev)?.unsqueeze(0)?;
            self.llm.forward_last(&t, cache)
        };
        let mut lc = start(self.draw_prompt_ids(caption, h, w)?, &mut cond)?;
        let mut lu = if guided {
            Some(start(
                self.draw_prompt_ids(&o.negative_prompt, h, w)?,
                &mut uncond,
            )?)
        } else {
            None
        };
        let step = |tok: u32, cache: &mut llm::llama::Cache| -> Result<Tensor> {
            let t = Tensor::new(&[[tok]], dev)?;
            self.llm.forward_last(&t, cache)
        };
        let (first, n) = (self.tokens.first_code as usize, self.tokens.codebook);
        let mut sampler = Sampler::new(o.sampling.clone());
        let mut codes = Vec::with_capacity(h);
        let mut drawn: Vec<u32> = Vec::new();
        for r in 0..h {
            let mut row = Vec::with_capacity(w);
            for _ in 0..w {
                let c = lc.squeeze(0)?.narrow(0, first, n)?;
                let mixed = match &lu {
                    Some(u) => {
                        let u = u.squeeze(0)?.narrow(0, first, n)?;
                        (&u + ((c - &u)? * o.cfg as f64)?)?
                    }
                    None => c,
                };
                let code = sampler.sample(&mixed.to_vec1::<f32>()?, &drawn);
                drawn.push(code);
                row.push(code);
                let tok = self.tokens.first_code + code;
                lc = step(tok, &mut cond)?;
                if guided {
                    lu = Some(step(tok, &mut uncond)?);
                }
            }
            // The end of the row is not sampled: it is the structure.
            if r + 1 < h {
                lc = step(self.tokens.eol, &mut cond)?;
                if guided {
                    lu = Some(step(self.tokens.eol, &mut uncond)?);
                }
            }
            codes.push(row);
            progress(r + 1);
        }
        Ok(codes)
    }

    /// [`Self::draw_codes`] decoded to an image.
    pub fn draw(
        &self,
        caption: &str,
        o: &DrawOptions,
        progress: &dyn Fn(usize),
    ) -> Result<image::RgbImage> {
        let codes = self.draw_codes(caption, o, progress)?;
        let (h, w) = (codes.len(), codes[0].len());
        let flat: Vec<u32> = codes.into_iter().flatten().collect();
        let t = Tensor::from_vec(flat, (1, h, w), self.llm.device())?;
        let px = self.vq.decode(&t)?.squeeze(0)?;
        clasp_core::model::emu3_vq::pixels_to_image(&px, self.processor.config())
    }
}
