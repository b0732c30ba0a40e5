//! `SiglipModel`: a ViT without class token or pre-LN whose tokens are pooled
//! by a multi-head attention head (one learned probe query), a text
//! transformer without causal mask pooled at its last position through a
//! linear head, and `logit_scale` with `logit_bias` for sigmoid scores.
//! There are no projections: the heads' outputs are the embeddings.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::{SiglipConfig, SiglipTextConfig, SiglipVisionConfig, VisionConfig};
use super::cpu_kernels;
use super::layers::{forward_fused, AttnMask, LayerNorm, LayerStack, Linear, Mlp, PreNormBlock};
use super::vit::{patchify, PositionGrid};
use crate::{Error, Result};

fn blocks(
    vb: VarBuilder,
    n: usize,
    hidden: usize,
    inter: usize,
    heads: usize,
    eps: f64,
    act: super::config::Activation,
) -> Result<Vec<PreNormBlock>> {
    (0..n)
        .map(|i| PreNormBlock::load(vb.pp(i), hidden, inter, heads, eps, act))
        .collect()
}

/// Runs `layers` over `x` [B, T, C] without a mask, on the fused CPU kernels
/// when they apply.
fn run_unmasked(layers: &[PreNormBlock], mut x: Tensor) -> Result<Tensor> {
    if cpu_kernels::applies(&x) && !layers.is_empty() {
        return forward_fused(layers, &x, &AttnMask::None);
    }
    for layer in layers {
        x = layer.forward(&x, &AttnMask::None)?;
    }
    Ok(x)
}

/// `SiglipMultiheadAttentionPoolingHead`: a learned probe attends over the
/// tokens (torch's `nn.MultiheadAttention`, whose q/k/v weights are one
/// stacked `in_proj`), then a pre-LN MLP with a residual.
#[derive(Debug, Clone)]
struct PoolingHead {
    probe: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    layernorm: LayerNorm,
    mlp: Mlp,
}

impl PoolingHead {
    fn load(vb: VarBuilder, cfg: &SiglipVisionConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("attention");
        let w = att.get((3 * h, h), "in_proj_weight")?;
        let b = att.get(3 * h, "in_proj_bias")?;
        let part = |i: usize| -> Result<Linear> {
            Ok(Linear::new(
                w.narrow(0, i * h, h)?.contiguous()?,
                Some(b.narrow(0, i * h, h)?.contiguous()?),
            ))
        };
        let mlp = vb.pp("mlp");
        Ok(Self {
            probe: vb.get((1, 1, h), "probe")?,
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            out: Linear::load(att.pp("out_proj"), h, h, true)?,
            heads: cfg.num_attention_heads,
            layernorm: LayerNorm::load(vb.pp("layernorm"), h, cfg.layer_norm_eps)?,
            mlp: Mlp::new(
                Linear::load(mlp.pp("fc1"), h, cfg.intermediate_size, true)?,
                Linear::load(mlp.pp("fc2"), cfg.intermediate_size, h, true)?,
                cfg.hidden_act,
            ),
        })
    }

    /// `x` [B, N, C] (and the key mask [B, N], 1 = real token, for batches
    /// of mixed sizes) to the pooled [B, C].
    fn forward(&self, x: &Tensor, keys: Option<&Tensor>) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let (nh, d) = (self.heads, c / self.heads);
        let q = self.q.forward(&self.probe)?; // [1, 1, C]
        let q = q.reshape((1, nh, 1, d))?.broadcast_as((b, nh, 1, d))?;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, nh, d))?.transpose(1, 2)?.contiguous()?)
        };
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let mut scores = (q.contiguous()?.matmul(&k.t()?)? * (d as f64).powf(-0.5))?; // [B, nh, 1, N]
        if let Some(m) = keys {
            let add = ((1.0 - m.to_dtype(scores.dtype())?)? * f32::MIN as f64)?;
            scores = scores.broadcast_add(&add.reshape((b, 1, 1, n))?)?;
        }
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        let att = p.matmul(&v)?.transpose(1, 2)?.reshape((b, 1, c))?;
        let r = self.out.forward(&att)?;
        let y = (&r + self.mlp.forward(&self.layernorm.forward(&r)?)?)?;
        Ok(y.squeeze(1)?)
    }
}

/// How positions reach a grid other than the trained one.
#[derive(Debug, Clone)]
enum Positions {
    /// SigLIP: bicubic, as `interpolate_pos_encoding=True`.
    Bicubic(PositionGrid),
    /// SigLIP 2: antialiased bilinear, per image, as NaFlex does.
    NaFlex { table: Tensor, g: usize },
}

impl Positions {
    fn resized(&self, gh: usize, gw: usize) -> Result<Tensor> {
        match self {
            Positions::Bicubic(p) => p.resized(gh, gw),
            // The trained grid's weights are the identity: the table itself,
            // so training reaches it.
            Positions::NaFlex { table, g } if (gh, gw) == (*g, *g) => Ok(table.clone()),
            Positions::NaFlex { table, g } => naflex_positions(table, *g, gh, gw),
        }
    }
}

/// SigLIP 2's position resize (`Siglip2VisionEmbeddings.
/// resize_positional_embeddings`): torch's bilinear, antialiased,
/// `align_corners=False` interpolation of the [g, g, C] table to [gh, gw, C],
/// as separable triangle weights whose support widens when shrinking.
fn naflex_positions(table: &Tensor, g: usize, gh: usize, gw: usize) -> Result<Tensor> {
    let axis = |n: usize| -> Vec<Vec<f64>> {
        let scale = g as f64 / n as f64;
        let support = scale.max(1.0);
        (0..n)
            .map(|o| {
                let center = (o as f64 + 0.5) * scale - 0.5;
                let mut w: Vec<f64> = (0..g)
                    .map(|s| (1.0 - (s as f64 - center).abs() / support).max(0.0))
                    .collect();
                let sum: f64 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= sum);
                w
            })
            .collect()
    };
    let (wy, wx) = (axis(gh), axis(gw));
    let c = table.dim(1)?;
    let src = table.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let mut out = vec![0f32; gh * gw * c];
    let mut acc = vec![0f64; c];
    for (oy, ry) in wy.iter().enumerate() {
        for (ox, rx) in wx.iter().enumerate() {
            acc.fill(0.0);
            for (iy, &fy) in ry.iter().enumerate().filter(|(_, &f)| f != 0.0) {
                for (ix, &fx) in rx.iter().enumerate().filter(|(_, &f)| f != 0.0) {
                    let f = fy * fx;
                    for (a, &v) in acc.iter_mut().zip(&src[iy * g + ix]) {
                        *a += f * v as f64;
                    }
                }
            }
            let dst = &mut out[(oy * gw + ox) * c..(oy * gw + ox + 1) * c];
            for (d, a) in dst.iter_mut().zip(&acc) {
                *d = *a as f32;
            }
        }
    }
    Ok(Tensor::from_vec(out, (gh * gw, c), table.device())?.to_dtype(table.dtype())?)
}

/// SigLIP's and SigLIP 2's image tower (`SiglipVisionTransformer` with its
/// head).
#[derive(Debug, Clone)]
pub struct SiglipVision {
    /// The patch embedding as a linear map over flattened [C, p, p]
    /// patches, with its bias (CLIP's has none). SigLIP's is a stride-p
    /// convolution; SigLIP 2's a linear layer over channel-last [p, p, C]
    /// patches, whose columns are reordered at load.
    patch: Linear,
    positions: Positions,
    layers: Vec<PreNormBlock>,
    post_layernorm: LayerNorm,
    head: PoolingHead,
    cfg: VisionConfig,
}

impl SiglipVision {
    /// `vb` points at `vision_model`.
    pub fn load(vb: VarBuilder, cfg: &SiglipVisionConfig) -> Result<Self> {
        let (c, p, h) = (cfg.num_channels, cfg.patch_size, cfg.hidden_size);
        let emb = vb.pp("embeddings");
        let bias = emb.get(h, "patch_embedding.bias")?;
        let (patch, positions) = match cfg.num_patches {
            Some(n) => {
                let g = (n as f64).sqrt().round() as usize;
                // [H, p*p*C] over (py, px, c) to clasp's (c, py, px) order.
                let w = emb
                    .get((h, p * p * c), "patch_embedding.weight")?
                    .reshape((h, p, p, c))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?
                    .reshape((h, c * p * p))?;
                let table = emb.get((n, h), "position_embedding.weight")?;
                (Linear::new(w, Some(bias)), Positions::NaFlex { table, g })
            }
            None => {
                if !cfg.image_size.is_multiple_of(p) {
                    return Err(Error::Shape(format!(
                        "image_size {} is not a multiple of patch_size {p}",
                        cfg.image_size
                    )));
                }
                let g = cfg.image_size / p;
                let conv = emb.get((h, c, p, p), "patch_embedding.weight")?;
                let table = emb.get((g * g, h), "position_embedding.weight")?;
                (
                    Linear::new(conv.reshape((h, c * p * p))?, Some(bias)),
                    Positions::Bicubic(PositionGrid::new(table, 0, g)?),
                )
            }
        };
        Ok(Self {
            patch,
            positions,
            layers: blocks(
                vb.pp("encoder.layers"),
                cfg.num_hidden_layers,
                h,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                cfg.layer_norm_eps,
                cfg.hidden_act,
            )?,
            post_layernorm: LayerNorm::load(vb.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            head: PoolingHead::load(vb.pp("head"), cfg)?,
            cfg: cfg.as_vit(),
        })
    }

    pub(crate) fn layer_stack(&mut self) -> &mut dyn LayerStack {
        &mut self.layers
    }

    pub(crate) fn layer_stack_ref(&self) -> &dyn LayerStack {
        &self.layers
    }

    pub(crate) fn pack_patch_f32(&mut self) -> Result<()> {
        self.patch.pack(false)
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// `pixel_values` [B, C, H, W] (H and W multiples of the patch size; a
    /// grid other than the trained one gets its positions resized: SigLIP's
    /// as transformers' `interpolate_pos_encoding=True`, SigLIP 2's as
    /// NaFlex) to the pooled [B, C]. A NaFlex batch padded to
    /// `max_num_patches` and masked gives each image's real patches the
    /// values they get here alone, so images run unpadded, grouped by size.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, c, hh, ww) = pixel_values.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.num_channels || !hh.is_multiple_of(p) || !ww.is_multiple_of(p) {
            return Err(Error::Shape(format!(
                "pixel_values must be [B, {}, H, W] with H and W multiples of {p}, got {:?}",
                self.cfg.num_channels,
                pixel_values.dims()
            )));
        }
        let (gh, gw) = (hh / p, ww / p);
        let x = self.patch.forward(&patchify(pixel_values, p)?)?; // [B, gh*gw, C]
        let x = x.broadcast_add(&self.positions.resized(gh, gw)?.unsqueeze(0)?)?;
        let x = run_unmasked(&self.layers, x)?;
        let x = self.post_layernorm.forward(&x)?;
        self.head.forward(&x, None)
    }
}

/// SigLIP's text tower (`SiglipTextTransformer` with its head).
#[derive(Debug, Clone)]
pub struct SiglipText {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<PreNormBlock>,
    final_layer_norm: LayerNorm,
    head: Linear,
    cfg: SiglipTextConfig,
}

impl SiglipText {
    /// `vb` points at `text_model`.
    pub fn load(vb: VarBuilder, cfg: &SiglipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        Ok(Self {
            token_embedding: emb.get((cfg.vocab_size, h), "token_embedding.weight")?,
            position_embedding: emb.get(
                (cfg.max_position_embeddings, h),
                "position_embedding.weight",
            )?,
            layers: blocks(
                vb.pp("encoder.layers"),
                cfg.num_hidden_layers,
                h,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                cfg.layer_norm_eps,
                cfg.hidden_act,
            )?,
            final_layer_norm: LayerNorm::load(vb.pp("final_layer_norm"), h, cfg.layer_norm_eps)?,
            head: Linear::load(vb.pp("head"), h, cfg.projection_size(), true)?,
            cfg: cfg.clone(),
        })
    }

    pub(crate) fn layer_stack(&mut self) -> &mut dyn LayerStack {
        &mut self.layers
    }

    pub(crate) fn layer_stack_ref(&self) -> &dyn LayerStack {
        &self.layers
    }

    /// The dtype of its weights.
    pub fn dtype(&self) -> candle_core::DType {
        self.head.weight().dtype()
    }

    /// `input_ids` [B, T], padded as the tokenizer pads (SigLIP reads the
    /// whole padded context without a mask, as it was trained, and pools the
    /// last position) to the head's output [B, P].
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Shape(format!(
                "text of {t} tokens exceeds the model's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let h = self.cfg.hidden_size;
        let tok = self
            .token_embedding
            .embedding(&input_ids.flatten_all()?)?
            .reshape((b, t, h))?;
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let x = run_unmasked(&self.layers, tok.broadcast_add(&pos.unsqueeze(0)?)?)?;
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?;
        self.head.forward(&self.final_layer_norm.forward(&last)?)
    }
}

#[derive(Debug, Clone)]
pub struct SiglipModel {
    /// `None` when loaded for text only ([`super::Towers::Text`]).
    pub vision: Option<SiglipVision>,
    pub text: SiglipText,
    /// Kept [1] as stored; [`Self::logit_scale`] gives the scalar.
    pub logit_scale: Tensor,
    pub logit_bias: Tensor,
    pub config: SiglipConfig,
}

impl SiglipModel {
    pub fn load(vb: VarBuilder, cfg: &SiglipConfig, towers: super::Towers) -> Result<Self> {
        let vision = match towers {
            super::Towers::Both => Some(SiglipVision::load(
                vb.pp("vision_model"),
                &cfg.vision_config,
            )?),
            super::Towers::Text => None,
        };
        Ok(Self {
            vision,
            text: SiglipText::load(vb.pp("text_model"), &cfg.text_config)?,
            logit_scale: vb.get(1, "logit_scale")?.reshape(())?,
            logit_bias: vb.get(1, "logit_bias")?.reshape(())?,
            config: cfg.clone(),
        })
    }

    pub fn vision_tower(&self) -> Result<&SiglipVision> {
        self.vision.as_ref().ok_or_else(|| {
            Error::Report(
                "this model was loaded for text only (Towers::Text); load it whole to embed images"
                    .into(),
            )
        })
    }
}
