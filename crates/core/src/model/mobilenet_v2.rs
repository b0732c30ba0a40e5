//! MobileNetV2 (Sandler et al. 2018) as an image tower, in transformers'
//! `MobileNetV2Model` layout with `tf_padding: false`, which is exactly
//! torchvision's `mobilenet_v2` (symmetric padding, BatchNorm eps 1e-5):
//! the stem (a 3×3 stride-2 convolution and the first inverted residual,
//! whose expansion is 1), 16 inverted residual blocks, a 1×1 convolution to
//! 1280 channels, and average pooling. torchvision's ImageNet checkpoint
//! (`mobilenet_v2-b0353104.pth`) loads through [`from_torchvision`].
//!
//! Inference only (see [`super::cnn`]): the tower is used locked.

use std::collections::HashMap;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::cnn::{global_avg_pool, Act, ConvBn, ConvSpec};
use crate::{Error, Result};

/// transformers' `MobileNetV2Config`, the keys clasp reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MobileNetV2Config {
    #[serde(default = "d_3")]
    pub num_channels: usize,
    #[serde(default = "d_224")]
    pub image_size: usize,
    #[serde(default = "d_one")]
    pub depth_multiplier: f64,
    #[serde(default = "d_true")]
    pub tf_padding: bool,
    #[serde(default = "d_true")]
    pub finegrained_output: bool,
    #[serde(default = "d_true")]
    pub first_layer_is_expansion: bool,
    #[serde(default = "d_relu6")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_32")]
    pub output_stride: usize,
}

fn d_3() -> usize {
    3
}
fn d_224() -> usize {
    224
}
fn d_32() -> usize {
    32
}
fn d_one() -> f64 {
    1.0
}
fn d_true() -> bool {
    true
}
fn d_relu6() -> String {
    "relu6".into()
}
fn d_eps() -> f64 {
    0.001
}

/// The pooled feature's width.
pub const FEATURES: usize = 1280;

/// torchvision's table (expansion t, channels c, repeats n, first stride s)
/// after the stem's first block.
const BLOCKS: [(usize, usize, usize, usize); 6] = [
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

impl MobileNetV2Config {
    /// torchvision's architecture, as transformers writes it.
    pub fn torchvision() -> Self {
        Self {
            num_channels: 3,
            image_size: 224,
            depth_multiplier: 1.0,
            tf_padding: false,
            finegrained_output: true,
            first_layer_is_expansion: true,
            hidden_act: "relu6".into(),
            layer_norm_eps: 1e-5,
            output_stride: 32,
        }
    }

    /// Refuses the variants clasp does not build, saying which key.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.tf_padding {
            return Err("tf_padding: true (TensorFlow's asymmetric padding, Google's ported \
                        checkpoints) is not supported; torchvision's MobileNetV2 has tf_padding false"
                .into());
        }
        if self.depth_multiplier != 1.0 {
            return Err(format!(
                "depth_multiplier {} is not supported (only 1.0, torchvision's)",
                self.depth_multiplier
            ));
        }
        if !self.first_layer_is_expansion || self.output_stride != 32 || self.hidden_act != "relu6"
        {
            return Err(
                "only first_layer_is_expansion true, output_stride 32 and relu6 \
                        (torchvision's MobileNetV2) are supported"
                    .into(),
            );
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct InvertedResidual {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl InvertedResidual {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.expand {
            Some(e) => e.forward(x)?,
            None => x.clone(),
        };
        let y = self.project.forward(&self.depthwise.forward(&h)?)?;
        Ok(if self.residual { (y + x)? } else { y })
    }
}

/// The tower. `vb` points at its root (`vision_model` in a dual encoder).
#[derive(Debug, Clone)]
pub struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<InvertedResidual>,
    head: ConvBn,
}

impl MobileNetV2 {
    pub fn load(vb: VarBuilder, cfg: &MobileNetV2Config) -> Result<Self> {
        cfg.check().map_err(Error::Report)?;
        let eps = cfg.layer_norm_eps;
        let conv = |vb: &VarBuilder, name: &str, s: ConvSpec, act: Act| {
            ConvBn::load(
                vb,
                &format!("{name}.convolution.weight"),
                &format!("{name}.normalization"),
                s,
                eps,
                act,
            )
        };
        let spec = |cin, cout, kernel, stride, groups| ConvSpec {
            cin,
            cout,
            kernel,
            stride,
            groups,
        };
        let sv = vb.pp("conv_stem");
        let stem = conv(
            &sv,
            "first_conv",
            spec(cfg.num_channels, 32, 3, 2, 1),
            Act::Relu6,
        )?;
        let mut blocks = vec![InvertedResidual {
            expand: None,
            depthwise: conv(&sv, "conv_3x3", spec(32, 32, 3, 1, 32), Act::Relu6)?,
            project: conv(&sv, "reduce_1x1", spec(32, 16, 1, 1, 1), Act::None)?,
            residual: false,
        }];
        let mut cin = 16;
        let mut i = 0;
        for (t, c, n, s) in BLOCKS {
            for r in 0..n {
                let stride = if r == 0 { s } else { 1 };
                let hidden = cin * t;
                let lv = vb.pp(format!("layer.{i}"));
                blocks.push(InvertedResidual {
                    expand: Some(conv(
                        &lv,
                        "expand_1x1",
                        spec(cin, hidden, 1, 1, 1),
                        Act::Relu6,
                    )?),
                    depthwise: conv(
                        &lv,
                        "conv_3x3",
                        spec(hidden, hidden, 3, stride, hidden),
                        Act::Relu6,
                    )?,
                    project: conv(&lv, "reduce_1x1", spec(hidden, c, 1, 1, 1), Act::None)?,
                    residual: stride == 1 && cin == c,
                });
                cin = c;
                i += 1;
            }
        }
        let head = conv(&vb, "conv_1x1", spec(cin, FEATURES, 1, 1, 1), Act::Relu6)?;
        Ok(Self { stem, blocks, head })
    }

    /// The last feature map [B, 1280, H/32, W/32] (7×7 at 224 pixels) from
    /// normalised pixels [B, 3, H, W].
    pub fn feature_map(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut x = self.stem.forward(pixel_values)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        self.head.forward(&x)
    }

    /// The pooled feature [B, 1280] (transformers' `pooler_output`,
    /// torchvision's input to its classifier).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        global_avg_pool(&self.feature_map(pixel_values)?)
    }
}

/// A torchvision `mobilenet_v2` state dict (already read) in transformers'
/// names, ready for [`MobileNetV2::load`] (and `classifier.*`, the ImageNet
/// head). A state dict already in transformers' names is taken as it is.
pub fn from_torchvision_dict(
    raw: HashMap<String, Tensor>,
) -> std::result::Result<HashMap<String, Tensor>, String> {
    if raw.keys().any(|k| k.starts_with("conv_stem.")) {
        return Ok(raw);
    }
    super::cnn::rename_keys(raw, from_torchvision, "torchvision mobilenet_v2")
}

/// A torchvision `mobilenet_v2` state-dict key in transformers' names
/// (`features.3.conv.1.0.weight` to `layer.1.conv_3x3.convolution.weight`);
/// `classifier.1.*` becomes `classifier.*`. `None` for keys outside the
/// architecture.
pub fn from_torchvision(key: &str) -> Option<String> {
    if let Some(rest) = key.strip_prefix("classifier.1.") {
        return Some(format!("classifier.{rest}"));
    }
    let rest = key.strip_prefix("features.")?;
    let (idx, rest) = rest.split_once('.')?;
    let idx: usize = idx.parse().ok()?;
    // `0.weight` is a convolution, `1.<p>` its BatchNorm.
    let conv_bn = |prefix: &str, part: &str| -> Option<String> {
        let (which, p) = part.split_once('.')?;
        match which {
            "0" if p == "weight" => Some(format!("{prefix}.convolution.weight")),
            "1" => Some(format!("{prefix}.normalization.{p}")),
            _ => None,
        }
    };
    match idx {
        0 => conv_bn("conv_stem.first_conv", rest),
        18 => conv_bn("conv_1x1", rest),
        1..=17 => {
            let body = rest.strip_prefix("conv.")?;
            let (j, p) = body.split_once('.')?;
            let j: usize = j.parse().ok()?;
            // Block 1 (expansion 1): conv.0 = depthwise ConvBNReLU,
            // conv.1 = projection weight, conv.2 = its BatchNorm. Later
            // blocks have the expansion first and shift by one.
            let (prefix, first) = if idx == 1 {
                ("conv_stem".to_string(), 0)
            } else {
                (format!("layer.{}", idx - 2), 1)
            };
            if idx > 1 && j == 0 {
                return conv_bn(&format!("{prefix}.expand_1x1"), p);
            }
            match j - first {
                0 => conv_bn(&format!("{prefix}.conv_3x3"), p),
                1 if p == "weight" => Some(format!("{prefix}.reduce_1x1.convolution.weight")),
                2 => Some(format!("{prefix}.reduce_1x1.normalization.{p}")),
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchvision_keys_map_to_transformers_names() {
        let cases = [
            (
                "features.0.0.weight",
                "conv_stem.first_conv.convolution.weight",
            ),
            (
                "features.0.1.running_var",
                "conv_stem.first_conv.normalization.running_var",
            ),
            (
                "features.1.conv.0.0.weight",
                "conv_stem.conv_3x3.convolution.weight",
            ),
            (
                "features.1.conv.0.1.bias",
                "conv_stem.conv_3x3.normalization.bias",
            ),
            (
                "features.1.conv.1.weight",
                "conv_stem.reduce_1x1.convolution.weight",
            ),
            (
                "features.1.conv.2.weight",
                "conv_stem.reduce_1x1.normalization.weight",
            ),
            (
                "features.2.conv.0.0.weight",
                "layer.0.expand_1x1.convolution.weight",
            ),
            (
                "features.2.conv.1.1.running_mean",
                "layer.0.conv_3x3.normalization.running_mean",
            ),
            (
                "features.17.conv.2.weight",
                "layer.15.reduce_1x1.convolution.weight",
            ),
            (
                "features.17.conv.3.bias",
                "layer.15.reduce_1x1.normalization.bias",
            ),
            ("features.18.1.weight", "conv_1x1.normalization.weight"),
            ("classifier.1.weight", "classifier.weight"),
        ];
        for (tv, hf) in cases {
            assert_eq!(from_torchvision(tv).as_deref(), Some(hf), "{tv}");
        }
        assert_eq!(from_torchvision("features.19.0.weight"), None);
        assert_eq!(from_torchvision("fc.weight"), None);
    }

    #[test]
    fn tf_padding_is_refused() {
        let mut c = MobileNetV2Config::torchvision();
        c.tf_padding = true;
        assert!(c.check().unwrap_err().contains("tf_padding"));
    }
}
