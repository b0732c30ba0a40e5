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
    /// The class position, then the patch grid's.
    positions: PositionGrid,
    /// CLIP's pre-LN (BLIP-2's ViT has none).
    pre_layrnorm: Option<LayerNorm>,
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
            positions: PositionGrid::new(
                emb.get((n_pos, h), "position_embedding.weight")?,
                1,
                cfg.image_size / p,
            )?,
            pre_layrnorm: Some(LayerNorm::load(
                vb.pp("pre_layrnorm"),
                h,
                cfg.layer_norm_eps,
            )?),
            layers,
            post_layernorm: LayerNorm::load(vb.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    /// A tower from its parts (BLIP-2's ViT, whose checkpoint names and
    /// layout differ from CLIP's): `positions` [1 + g*g, C], the class
    /// position first.
    pub(crate) fn from_parts(
        patch: Linear,
        class_embedding: Tensor,
        positions: Tensor,
        pre_layrnorm: Option<LayerNorm>,
        layers: Vec<PreNormBlock>,
        post_layernorm: LayerNorm,
        cfg: VisionConfig,
    ) -> Result<Self> {
        let g = cfg.image_size / cfg.patch_size;
        Ok(Self {
            patch,
            class_embedding,
            positions: PositionGrid::new(positions, 1, g)?,
            pre_layrnorm,
            layers,
            post_layernorm,
            cfg,
        })
    }

    /// Every token after the last layer and the post-LN, [B, 1 + patches,
    /// hidden]: `Blip2VisionModel`'s `last_hidden_state`.
    pub fn last_hidden_state(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.run_layers(self.embed(pixel_values)?, self.layers.len())?;
        self.post_layernorm.forward(&x.contiguous()?)
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

    /// Patch embedding, class token, positions and the pre-LN. Any size
    /// with sides that are multiples of the patch size runs: positions are
    /// interpolated for a grid other than the trained one (transformers'
    /// `interpolate_pos_encoding=True`).
    fn embed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = pixel_values.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.num_channels
            || !hh.is_multiple_of(p)
            || !ww.is_multiple_of(p)
            || hh == 0
            || ww == 0
        {
            return Err(Error::Shape(format!(
                "pixel_values must be [B, {}, H, W] with H and W multiples of the patch size {p}, got {:?}",
                self.cfg.num_channels,
                pixel_values.dims()
            )));
        }
        let x = self.patch.forward(&patchify(pixel_values, p)?)?; // [B, gh*gw, H]
        let hdim = self.cfg.hidden_size;
        let cls = self
            .class_embedding
            .reshape((1, 1, hdim))?
            .broadcast_as((b, 1, hdim))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let (gh, gw) = (hh / p, ww / p);
        let g = self.positions.side();
        let pos = if (gh, gw) == (g, g) {
            self.positions.table().clone()
        } else {
            Tensor::cat(
                &[
                    &self.positions.table().narrow(0, 0, 1)?,
                    &self.positions.resized(gh, gw)?,
                ],
                0,
            )?
        };
        let x = x.broadcast_add(&pos.unsqueeze(0)?)?;
        match &self.pre_layrnorm {
            Some(ln) => ln.forward(&x),
            None => Ok(x),
        }
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

/// A learned position table for a square grid of patches (after `skip`
/// leading rows: CLIP's class position), resized to other grids as
/// transformers' `interpolate_pos_encoding=True` does: torch's bicubic
/// `interpolate(size=..., align_corners=False)` of the grid rows viewed as a
/// [C, g, g] image. The trained grid's rows are a view of the table, so
/// gradients reach it; a resized grid is computed without a graph
/// (inference at other resolutions).
#[derive(Debug, Clone)]
pub struct PositionGrid {
    /// [skip + g*g, C]
    table: Tensor,
    skip: usize,
    g: usize,
}

impl PositionGrid {
    pub fn new(table: Tensor, skip: usize, g: usize) -> Result<Self> {
        let (n, _) = table.dims2()?;
        if n != skip + g * g {
            return Err(Error::Shape(format!(
                "a position table of {n} rows is not {skip} + a {g}x{g} grid"
            )));
        }
        Ok(Self { table, skip, g })
    }

    /// The whole table as trained.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// The trained grid's side.
    pub fn side(&self) -> usize {
        self.g
    }

    /// The positions of a gh x gw grid [gh*gw, C]: the table's own rows for
    /// the trained grid, else their bicubic resize.
    pub fn resized(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let g = self.g;
        let rows = self.table.narrow(0, self.skip, g * g)?;
        if (gh, gw) == (g, g) {
            return Ok(rows);
        }
        let c = self.table.dim(1)?;
        let src = rows.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let wy = bicubic_weights(g, gh);
        let wx = bicubic_weights(g, gw);
        let mut out = vec![0f32; gh * gw * c];
        let mut row = vec![0f64; c];
        let mut acc = vec![0f64; c];
        for (oy, ry) in wy.iter().enumerate() {
            for (ox, rx) in wx.iter().enumerate() {
                acc.fill(0.0);
                for &(iy, fy) in ry {
                    // along x first, then y, as torch's kernel
                    row.fill(0.0);
                    for &(ix, fx) in rx {
                        for (r, &v) in row.iter_mut().zip(&src[iy * g + ix]) {
                            *r += fx * v as f64;
                        }
                    }
                    for (a, r) in acc.iter_mut().zip(&row) {
                        *a += fy * r;
                    }
                }
                let dst = &mut out[(oy * gw + ox) * c..(oy * gw + ox + 1) * c];
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
