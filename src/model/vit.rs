//! The ViT image tower of CLIP and Chinese-CLIP (`CLIPVisionTransformer`):
//! patch embedding, class token, learned positions, pre-LN, pre-norm blocks,
//! post-LN on the class token.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use super::config::VisionConfig;
use super::cpu_kernels;
use super::layers::{forward_fused, AttnMask, LayerNorm, LayerStack, Linear, PreNormBlock};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct VisionTransformer {
    /// Conv2d(stride = patch) weight viewed as a linear map over flattened
    /// [C, p, p] patches: a non-overlapping convolution is exactly that GEMM.
    patch: Linear,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<PreNormBlock>,
    post_layernorm: LayerNorm,
    cfg: VisionConfig,
}

impl VisionTransformer {
    /// The encoder layers (see [`LayerStack`]). The patch embedding stays
    /// f32 under int8 and bf16: it is the first layer, where an error would
    /// reach every later one, and about 1/37 of the FLOPs.
    pub(crate) fn layer_stack(&mut self) -> &mut dyn LayerStack {
        &mut self.layers
    }

    /// Packs the patch embedding for the packed f32 kernel (when this CPU
    /// has one), whatever the layers' precision: it stays f32 (see
    /// [`Self::layer_stack`]) but need not run on the slower generic GEMM.
    pub(crate) fn pack_patch_f32(&mut self) -> Result<()> {
        self.patch.pack(false)
    }

    pub(crate) fn layer_stack_ref(&self) -> &dyn LayerStack {
        &self.layers
    }

    /// `vb` points at `vision_model`.
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let (c, p, h) = (cfg.num_channels, cfg.patch_size, cfg.hidden_size);
        if !cfg.image_size.is_multiple_of(p) {
            return Err(Error::Shape(format!(
                "image_size {} is not a multiple of patch_size {p}",
                cfg.image_size
            )));
        }
        let n_pos = (cfg.image_size / p).pow(2) + 1;
        let emb = vb.pp("embeddings");
        let conv = emb.get((h, c, p, p), "patch_embedding.weight")?;
        let patch = Linear::new(conv.reshape((h, c * p * p))?, None);
        let enc = vb.pp("encoder.layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                PreNormBlock::load(
                    enc.pp(i),
                    h,
                    cfg.intermediate_size,
                    cfg.num_attention_heads,
                    cfg.layer_norm_eps,
                    cfg.hidden_act,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            patch,
            class_embedding: emb.get(h, "class_embedding")?,
            position_embedding: emb.get((n_pos, h), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::load(vb.pp("pre_layrnorm"), h, cfg.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::load(vb.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    /// `pixel_values`: [B, C, S, S] normalised pixels. Returns the pooled
    /// (post-LN class token) output [B, hidden].
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.run_layers(self.embed(pixel_values)?, self.layers.len())?;
        let pooled = x.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
        self.post_layernorm.forward(&pooled)
    }

    /// The hidden states after the first `n` encoder layers, [B, 1 +
    /// patches, hidden] with the class token first: transformers'
    /// `hidden_states[n]` (0: the embeddings after `pre_layrnorm`). LLaVA
    /// reads its patch features here (`vision_feature_layer`).
    pub fn hidden_state(&self, pixel_values: &Tensor, n: usize) -> Result<Tensor> {
        if n > self.layers.len() {
            return Err(Error::Shape(format!(
                "hidden state {n} of a vision tower with {} layers",
                self.layers.len()
            )));
        }
        self.run_layers(self.embed(pixel_values)?, n)
    }

    /// Patch embedding, class token, positions and the pre-LN.
    fn embed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = pixel_values.dims4()?;
        let (p, s) = (self.cfg.patch_size, self.cfg.image_size);
        if c != self.cfg.num_channels || hh != s || ww != s {
            return Err(Error::Shape(format!(
                "pixel_values must be [B, {}, {s}, {s}], got {:?}",
                self.cfg.num_channels,
                pixel_values.dims()
            )));
        }
        let g = s / p;
        // [B, C, g, p, g, p] -> [B, g, g, C, p, p] -> [B*g*g, C*p*p]
        let patches = pixel_values
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, g * g, c * p * p))?;
        let x = self.patch.forward(&patches)?; // [B, g*g, H]
        let hdim = self.cfg.hidden_size;
        let cls = self
            .class_embedding
            .reshape((1, 1, hdim))?
            .broadcast_as((b, 1, hdim))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let x = x.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        self.pre_layrnorm.forward(&x)
    }

    /// The first `n` encoder layers over `x`.
    fn run_layers(&self, mut x: Tensor, n: usize) -> Result<Tensor> {
        let layers = &self.layers[..n];
        if cpu_kernels::applies(&x) && !layers.is_empty() {
            return forward_fused(layers, &x, &AttnMask::None);
        }
        for layer in layers {
            x = layer.forward(&x, &AttnMask::None)?;
        }
        Ok(x)
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }
}

/// L2-normalises rows.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// Pixels [B, C, H, W] to flattened patches [B, (H/p)*(W/p), C*p*p], row by
/// row, each patch's values in [C, p, p] order (a stride-p convolution's
/// weight viewed as a linear map reads them so).
pub(crate) fn patchify(pixel_values: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = pixel_values.dims4()?;
    let (gh, gw) = (h / p, w / p);
    Ok(pixel_values
        .reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b, gh * gw, c * p * p))?)
}

/// A learned position table for a square grid of patches, resized to other
/// grids as transformers' `interpolate_pos_encoding=True` does: torch's
/// bicubic `interpolate(size=..., align_corners=False)` of the table viewed
/// as a [C, g, g] image.
#[derive(Debug, Clone)]
pub struct PositionGrid {
    /// [g*g, C]
    table: Tensor,
    g: usize,
}

impl PositionGrid {
    pub fn new(table: Tensor, g: usize) -> Result<Self> {
        let (n, _) = table.dims2()?;
        if n != g * g {
            return Err(Error::Shape(format!(
                "a position table of {n} rows is not a {g}x{g} grid"
            )));
        }
        Ok(Self { table, g })
    }

    /// The table as trained.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// The positions of a gh x gw grid [gh*gw, C]: the table itself for the
    /// trained grid, else its bicubic resize.
    pub fn resized(&self, gh: usize, gw: usize) -> Result<Tensor> {
        if (gh, gw) == (self.g, self.g) {
            return Ok(self.table.clone());
        }
        let c = self.table.dim(1)?;
        let src = self
            .table
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        let g = self.g;
        let wy = bicubic_weights(g, gh);
        let wx = bicubic_weights(g, gw);
        let mut out = vec![0f32; gh * gw * c];
        for (oy, ry) in wy.iter().enumerate() {
            for (ox, rx) in wx.iter().enumerate() {
                let dst = &mut out[(oy * gw + ox) * c..(oy * gw + ox + 1) * c];
                let mut acc = vec![0f64; c];
                for &(iy, fy) in ry {
                    // torch interpolates along x first, then y, in float
                    let mut row = vec![0f64; c];
                    for &(ix, fx) in rx {
                        let s = &src[iy * g + ix];
                        for (r, &v) in row.iter_mut().zip(s) {
                            *r += fx * v as f64;
                        }
                    }
                    for (a, r) in acc.iter_mut().zip(&row) {
                        *a += fy * r;
                    }
                }
                for (d, a) in dst.iter_mut().zip(&acc) {
                    *d = *a as f32;
                }
            }
        }
        Ok(Tensor::from_vec(out, (gh * gw, c), self.table.device())?
            .to_dtype(self.table.dtype())?)
    }
}

/// For each of `out` positions, the four (source index, weight) taps of
/// torch's bicubic upsampling from `inp` positions (A = -0.75,
/// half-pixel centres, indices clamped to the edge).
fn bicubic_weights(inp: usize, out: usize) -> Vec<[(usize, f64); 4]> {
    const A: f64 = -0.75;
    let conv1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let conv2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = inp as f64 / out as f64;
    (0..out)
        .map(|o| {
            let real = (o as f64 + 0.5) * scale - 0.5;
            let i0 = real.floor();
            let t = real - i0;
            let w = [conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2(2.0 - t)];
            let mut taps = [(0usize, 0f64); 4];
            for (k, tap) in taps.iter_mut().enumerate() {
                let idx = (i0 as i64 - 1 + k as i64).clamp(0, inp as i64 - 1) as usize;
                *tap = (idx, w[k]);
            }
            taps
        })
        .collect()
}
