//! ConvNeXt (Liu et al. 2022) as open_clip's timm image tower builds it
//! (LAION's `convnext_base`, `convnext_base_w`, `convnext_large`, ...):
//! timm's ConvNeXt trunk (a 4×4 stride-4 patchify stem with LayerNorm;
//! stages downsampled by LayerNorm and a 2×2 stride-2 convolution; blocks of
//! a 7×7 depthwise convolution, channels-last LayerNorm, a 4× GELU MLP and a
//! per-channel scale, added to the input), timm's head (average pool, then
//! LayerNorm), and open_clip's linear projection to the embedding.
//!
//! Keys are open_clip's under `visual.` (`trunk.stem.0`,
//! `trunk.stages.1.downsample.1`, `trunk.stages.2.blocks.5.conv_dw`,
//! `trunk.head.norm`, `head.proj`). Inference only (see [`super::cnn`]).

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::layers::{LayerNorm, Linear};
use crate::{Error, Result};

/// A timm ConvNeXt under open_clip's linear projection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvNextConfig {
    /// timm's model name (`convnext_base`), for messages.
    pub timm_model_name: String,
    pub depths: Vec<usize>,
    pub dims: Vec<usize>,
    pub image_size: usize,
    /// The embedding width (open_clip's `embed_dim`).
    pub output_dim: usize,
    /// LayerNorm eps (timm's 1e-6; `convnext_xxlarge` 1e-5).
    pub norm_eps: f64,
    /// The MLP as 1×1 convolutions (timm's small models, `convnext_atto`
    /// to `convnext_nano`): the same arithmetic, weights [out, in, 1, 1].
    #[serde(default)]
    pub conv_mlp: bool,
}

impl ConvNextConfig {
    /// timm's ConvNeXt of this name, under a projection to `output_dim`.
    pub fn timm(name: &str, image_size: usize, output_dim: usize) -> Option<Self> {
        let (depths, dims, eps): (&[usize], [usize; 4], f64) = match name {
            "convnext_atto" => (&[2, 2, 6, 2], [40, 80, 160, 320], 1e-6),
            "convnext_femto" => (&[2, 2, 6, 2], [48, 96, 192, 384], 1e-6),
            "convnext_pico" => (&[2, 2, 6, 2], [64, 128, 256, 512], 1e-6),
            "convnext_nano" => (&[2, 2, 8, 2], [80, 160, 320, 640], 1e-6),
            "convnext_tiny" => (&[3, 3, 9, 3], [96, 192, 384, 768], 1e-6),
            "convnext_small" => (&[3, 3, 27, 3], [96, 192, 384, 768], 1e-6),
            "convnext_base" => (&[3, 3, 27, 3], [128, 256, 512, 1024], 1e-6),
            "convnext_large" => (&[3, 3, 27, 3], [192, 384, 768, 1536], 1e-6),
            "convnext_xlarge" => (&[3, 3, 27, 3], [256, 512, 1024, 2048], 1e-6),
            "convnext_xxlarge" => (&[3, 4, 30, 3], [384, 768, 1536, 3072], 1e-5),
            _ => return None,
        };
        Some(Self {
            timm_model_name: name.into(),
            depths: depths.to_vec(),
            dims: dims.to_vec(),
            image_size,
            output_dim,
            norm_eps: eps,
            conv_mlp: matches!(
                name,
                "convnext_atto" | "convnext_femto" | "convnext_pico" | "convnext_nano"
            ),
        })
    }

    pub fn features(&self) -> usize {
        *self.dims.last().unwrap_or(&0)
    }

    pub fn check(&self) -> std::result::Result<(), String> {
        if self.depths.len() != self.dims.len() || self.dims.is_empty() {
            return Err(format!(
                "{} depths for {} dims",
                self.depths.len(),
                self.dims.len()
            ));
        }
        Ok(())
    }
}

/// An MLP layer: a linear layer, or a 1×1 convolution read as one.
fn mlp_linear(vb: &VarBuilder, cin: usize, cout: usize, conv: bool) -> Result<Linear> {
    if !conv {
        return Linear::load(vb.clone(), cin, cout, true);
    }
    let w = vb.get((cout, cin, 1, 1), "weight")?.reshape((cout, cin))?;
    Ok(Linear::new(w, Some(vb.get(cout, "bias")?)))
}

/// LayerNorm over the channels of [B, C, H, W] (timm's `LayerNorm2d`).
fn norm2d(ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    Ok(ln
        .forward(&x.permute((0, 2, 3, 1))?)?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

#[derive(Debug, Clone)]
struct Block {
    dw_weight: Tensor,
    dw_bias: Tensor,
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    gamma: Tensor,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = super::cnn::depthwise(x, &self.dw_weight, &self.dw_bias, 1, 3)?;
        let h = self.norm.forward(&h.permute((0, 2, 3, 1))?.contiguous()?)?;
        let h = self.fc2.forward(&self.fc1.forward(&h)?.gelu_erf()?)?;
        let h = h.broadcast_mul(&self.gamma)?.permute((0, 3, 1, 2))?;
        Ok((h + x)?)
    }
}

#[derive(Debug, Clone)]
struct Stage {
    /// LayerNorm2d and a 2×2 stride-2 convolution (weight, bias), after the
    /// first stage.
    down: Option<(LayerNorm, Tensor, Tensor)>,
    blocks: Vec<Block>,
}

/// The tower. `vb` points at its root (open_clip's `visual`).
#[derive(Debug, Clone)]
pub struct ConvNext {
    stem: (Tensor, Tensor, LayerNorm),
    stages: Vec<Stage>,
    head_norm: LayerNorm,
    proj: Linear,
}

impl ConvNext {
    pub fn load(vb: VarBuilder, cfg: &ConvNextConfig) -> Result<Self> {
        cfg.check().map_err(Error::Report)?;
        let eps = cfg.norm_eps;
        let t = vb.pp("trunk");
        let d0 = cfg.dims[0];
        let stem = (
            t.get((d0, 3, 4, 4), "stem.0.weight")?,
            t.get(d0, "stem.0.bias")?,
            LayerNorm::load(t.pp("stem.1"), d0, eps)?,
        );
        let mut stages = Vec::new();
        let mut cin = d0;
        for (i, (&depth, &dim)) in cfg.depths.iter().zip(&cfg.dims).enumerate() {
            let sv = t.pp(format!("stages.{i}"));
            let down = if i > 0 {
                Some((
                    LayerNorm::load(sv.pp("downsample.0"), cin, eps)?,
                    sv.get((dim, cin, 2, 2), "downsample.1.weight")?,
                    sv.get(dim, "downsample.1.bias")?,
                ))
            } else {
                None
            };
            let blocks = (0..depth)
                .map(|j| {
                    let bv = sv.pp(format!("blocks.{j}"));
                    Ok(Block {
                        dw_weight: bv.get((dim, 1, 7, 7), "conv_dw.weight")?,
                        dw_bias: bv.get(dim, "conv_dw.bias")?,
                        norm: LayerNorm::load(bv.pp("norm"), dim, eps)?,
                        fc1: mlp_linear(&bv.pp("mlp.fc1"), dim, 4 * dim, cfg.conv_mlp)?,
                        fc2: mlp_linear(&bv.pp("mlp.fc2"), 4 * dim, dim, cfg.conv_mlp)?,
                        gamma: bv.get(dim, "gamma")?,
                    })
                })
                .collect::<Result<_>>()?;
            stages.push(Stage { down, blocks });
            cin = dim;
        }
        Ok(Self {
            stem,
            stages,
            head_norm: LayerNorm::load(t.pp("head.norm"), cin, eps)?,
            proj: Linear::load(vb.pp("head.proj"), cin, cfg.output_dim, false)?,
        })
    }

    /// The last stage's feature map [B, C, H/32, W/32].
    pub fn feature_map(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (w, b, ln) = &self.stem;
        let mut x = pixel_values
            .conv2d(w, 0, 4, 1, 1)?
            .broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
        x = norm2d(ln, &x)?;
        for s in &self.stages {
            if let Some((ln, w, b)) = &s.down {
                x = norm2d(ln, &x)?
                    .conv2d(w, 0, 2, 1, 1)?
                    .broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?;
            }
            for blk in &s.blocks {
                x = blk.forward(&x)?;
            }
        }
        Ok(x)
    }

    /// The image embedding [B, output_dim]: average pool, LayerNorm, and
    /// open_clip's projection.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pooled = self
            .feature_map(pixel_values)?
            .mean(D::Minus1)?
            .mean(D::Minus1)?;
        self.proj.forward(&self.head_norm.forward(&pooled)?)
    }
}
