//! ResNet (He et al. 2016) as an image tower, in transformers' `ResNetModel`
//! layout, which with `downsample_in_bottleneck: false` is exactly
//! torchvision's `resnet18/34/50/101/152` (the stride on the 3×3 convolution,
//! "ResNet v1.5"; BatchNorm eps 1e-5): a 7×7 stride-2 stem and a 3×3
//! stride-2 max pool, four stages of basic or bottleneck blocks, and
//! average pooling. torchvision's checkpoints load through
//! [`read_torchvision`], which reads the architecture from the weights.
//!
//! Inference only (see [`super::cnn`]): the tower is used locked.

use std::collections::HashMap;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::cnn::{global_avg_pool, max_pool_after_relu, Act, ConvBn, ConvSpec};
use crate::{Error, Result};

/// transformers' `ResNetConfig`, the keys clasp reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    #[serde(default = "d_3")]
    pub num_channels: usize,
    #[serde(default = "d_64")]
    pub embedding_size: usize,
    /// Each stage's output channels.
    pub hidden_sizes: Vec<usize>,
    /// Each stage's number of blocks.
    pub depths: Vec<usize>,
    /// `"basic"` (two 3×3 convolutions) or `"bottleneck"` (1×1, 3×3, 1×1
    /// at a quarter of the width).
    #[serde(default = "d_bottleneck")]
    pub layer_type: String,
    #[serde(default = "d_relu")]
    pub hidden_act: String,
    #[serde(default)]
    pub downsample_in_first_stage: bool,
    #[serde(default)]
    pub downsample_in_bottleneck: bool,
}

fn d_3() -> usize {
    3
}
fn d_64() -> usize {
    64
}
fn d_bottleneck() -> String {
    "bottleneck".into()
}
fn d_relu() -> String {
    "relu".into()
}

/// torchvision's BatchNorm eps (transformers' `ResNetConvLayer` too).
const EPS: f64 = 1e-5;

impl ResNetConfig {
    /// torchvision's `resnet{depth}` (18, 34, 50, 101 or 152).
    pub fn torchvision(depth: usize) -> Option<Self> {
        let (depths, basic) = match depth {
            18 => (vec![2, 2, 2, 2], true),
            34 => (vec![3, 4, 6, 3], true),
            50 => (vec![3, 4, 6, 3], false),
            101 => (vec![3, 4, 23, 3], false),
            152 => (vec![3, 8, 36, 3], false),
            _ => return None,
        };
        let widths = [64, 128, 256, 512];
        Some(Self {
            num_channels: 3,
            embedding_size: 64,
            hidden_sizes: widths
                .iter()
                .map(|w| if basic { *w } else { w * 4 })
                .collect(),
            depths,
            layer_type: if basic { "basic" } else { "bottleneck" }.into(),
            hidden_act: "relu".into(),
            downsample_in_first_stage: false,
            downsample_in_bottleneck: false,
        })
    }

    /// Refuses the variants clasp does not build, saying which key.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.hidden_sizes.is_empty() || self.hidden_sizes.len() != self.depths.len() {
            return Err(format!(
                "{} hidden_sizes for {} depths",
                self.hidden_sizes.len(),
                self.depths.len()
            ));
        }
        if self.layer_type != "basic" && self.layer_type != "bottleneck" {
            return Err(format!(
                "layer_type {:?} (basic or bottleneck)",
                self.layer_type
            ));
        }
        if self.hidden_act != "relu" {
            return Err(format!("hidden_act {:?} (only relu)", self.hidden_act));
        }
        if self.downsample_in_bottleneck {
            return Err(
                "downsample_in_bottleneck: true (ResNet v1, the stride on the first \
                        1x1) is not supported; torchvision's ResNet is v1.5"
                    .into(),
            );
        }
        if self.layer_type == "bottleneck" && self.hidden_sizes.iter().any(|h| h % 4 != 0) {
            return Err("bottleneck widths must be multiples of 4".into());
        }
        Ok(())
    }

    /// The pooled feature's width: the last stage's channels.
    pub fn features(&self) -> usize {
        *self.hidden_sizes.last().unwrap_or(&0)
    }

    /// "ResNet-50" for torchvision's shapes, else a description.
    pub fn name(&self) -> String {
        for d in [18, 34, 50, 101, 152] {
            if Self::torchvision(d).as_ref() == Some(self) {
                return format!("ResNet-{d}");
            }
        }
        format!("ResNet ({} blocks {:?})", self.layer_type, self.depths)
    }
}

#[derive(Debug, Clone)]
struct Block {
    shortcut: Option<ConvBn>,
    /// Basic: 3×3 (stride), 3×3. Bottleneck: 1×1, 3×3 (stride), 1×1. The
    /// last has no activation: ReLU follows the residual sum.
    convs: Vec<ConvBn>,
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for c in &self.convs {
            h = c.forward(&h)?;
        }
        let residual = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((h + residual)?.relu()?)
    }
}

/// The tower. `vb` points at its root (`vision_model` in a dual encoder).
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBn,
    blocks: Vec<Block>,
}

impl ResNet {
    pub fn load(vb: VarBuilder, cfg: &ResNetConfig) -> Result<Self> {
        cfg.check().map_err(Error::Report)?;
        let conv = |vb: &VarBuilder, cin, cout, kernel, stride, act| {
            let s = ConvSpec {
                cin,
                cout,
                kernel,
                stride,
                groups: 1,
            };
            ConvBn::load(vb, "convolution.weight", "normalization", s, EPS, act)
        };
        let stem = conv(
            &vb.pp("embedder.embedder"),
            cfg.num_channels,
            cfg.embedding_size,
            7,
            2,
            Act::Relu,
        )?;
        let bottleneck = cfg.layer_type == "bottleneck";
        let mut blocks = Vec::new();
        let mut cin = cfg.embedding_size;
        for (s, (&out, &depth)) in cfg.hidden_sizes.iter().zip(&cfg.depths).enumerate() {
            let first_stride = if s > 0 || cfg.downsample_in_first_stage {
                2
            } else {
                1
            };
            for i in 0..depth {
                let stride = if i == 0 { first_stride } else { 1 };
                let lv = vb.pp(format!("encoder.stages.{s}.layers.{i}"));
                let shortcut = if cin != out || stride != 1 {
                    Some(conv(&lv.pp("shortcut"), cin, out, 1, stride, Act::None)?)
                } else {
                    None
                };
                let l = |j: usize| lv.pp(format!("layer.{j}"));
                let convs = if bottleneck {
                    let mid = out / 4;
                    vec![
                        conv(&l(0), cin, mid, 1, 1, Act::Relu)?,
                        conv(&l(1), mid, mid, 3, stride, Act::Relu)?,
                        conv(&l(2), mid, out, 1, 1, Act::None)?,
                    ]
                } else {
                    vec![
                        conv(&l(0), cin, out, 3, stride, Act::Relu)?,
                        conv(&l(1), out, out, 3, 1, Act::None)?,
                    ]
                };
                blocks.push(Block { shortcut, convs });
                cin = out;
            }
        }
        Ok(Self { stem, blocks })
    }

    /// The last feature map [B, C, H/32, W/32] (7×7 at 224 pixels).
    pub fn feature_map(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut x = max_pool_after_relu(&self.stem.forward(pixel_values)?, 3, 2, 1)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        Ok(x)
    }

    /// The pooled feature [B, C] (torchvision's input to `fc`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        global_avg_pool(&self.feature_map(pixel_values)?)
    }
}

/// A torchvision ResNet state-dict key in transformers' names
/// (`layer2.0.downsample.1.weight` to
/// `encoder.stages.1.layers.0.shortcut.normalization.weight`); `fc.*`
/// becomes `classifier.*`. `None` for keys outside the architecture.
pub fn from_torchvision(key: &str) -> Option<String> {
    if let Some(p) = key.strip_prefix("fc.") {
        return Some(format!("classifier.{p}"));
    }
    let conv_bn = |prefix: &str, part: &str| -> Option<String> {
        if let Some(j) = part.strip_prefix("conv") {
            let (j, p) = j.split_once('.')?;
            let j: usize = j.parse().ok()?;
            (p == "weight" && j >= 1)
                .then(|| format!("{prefix}.layer.{}.convolution.weight", j - 1))
        } else if let Some(j) = part.strip_prefix("bn") {
            let (j, p) = j.split_once('.')?;
            let j: usize = j.parse().ok()?;
            (j >= 1).then(|| format!("{prefix}.layer.{}.normalization.{p}", j - 1))
        } else {
            None
        }
    };
    if let Some(p) = key.strip_prefix("conv1.") {
        return (p == "weight").then(|| "embedder.embedder.convolution.weight".into());
    }
    if let Some(p) = key.strip_prefix("bn1.") {
        return Some(format!("embedder.embedder.normalization.{p}"));
    }
    let rest = key.strip_prefix("layer")?;
    let (s, rest) = rest.split_once('.')?;
    let s: usize = s.parse().ok()?;
    let (i, part) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    if s == 0 {
        return None;
    }
    let prefix = format!("encoder.stages.{}.layers.{i}", s - 1);
    if let Some(d) = part.strip_prefix("downsample.") {
        let (which, p) = d.split_once('.')?;
        return match which {
            "0" if p == "weight" => Some(format!("{prefix}.shortcut.convolution.weight")),
            "1" => Some(format!("{prefix}.shortcut.normalization.{p}")),
            _ => None,
        };
    }
    conv_bn(&prefix, part)
}

/// A torchvision ResNet state dict (already read) in transformers' names,
/// with the config its shapes give. Wide ResNets and ResNeXt (inner widths
/// other than a quarter of the output, or grouped 3×3s) are refused.
pub fn from_torchvision_dict(
    raw: HashMap<String, Tensor>,
) -> std::result::Result<(ResNetConfig, HashMap<String, Tensor>), String> {
    let dim = |k: &str, d: usize| -> std::result::Result<usize, String> {
        raw.get(k)
            .ok_or_else(|| format!("no {k}"))?
            .dims()
            .get(d)
            .copied()
            .ok_or_else(|| format!("{k} has no dimension {d}"))
    };
    let embedding_size = dim("conv1.weight", 0)?;
    let num_channels = dim("conv1.weight", 1)?;
    let bottleneck = raw.contains_key("layer1.0.conv3.weight");
    let mut depths = Vec::new();
    let mut hidden_sizes = Vec::new();
    for s in 1.. {
        let n = (0..)
            .take_while(|i| raw.contains_key(&format!("layer{s}.{i}.conv1.weight")))
            .count();
        if n == 0 {
            break;
        }
        let last = if bottleneck { "conv3" } else { "conv2" };
        let out = dim(&format!("layer{s}.0.{last}.weight"), 0)?;
        if bottleneck {
            let mid = dim(&format!("layer{s}.0.conv2.weight"), 0)?;
            let groups_in = dim(&format!("layer{s}.0.conv2.weight"), 1)?;
            if mid * 4 != out || groups_in != mid {
                return Err(format!(
                    "stage {s}: a bottleneck of inner width {mid} ({groups_in} per group) for \
                     {out} outputs: wide ResNets and ResNeXt are not supported"
                ));
            }
        }
        depths.push(n);
        hidden_sizes.push(out);
    }
    let cfg = ResNetConfig {
        num_channels,
        embedding_size,
        hidden_sizes,
        depths,
        layer_type: if bottleneck { "bottleneck" } else { "basic" }.into(),
        hidden_act: "relu".into(),
        downsample_in_first_stage: false,
        downsample_in_bottleneck: false,
    };
    cfg.check()?;
    let out = super::cnn::rename_keys(raw, from_torchvision, "torchvision ResNet")?;
    Ok((cfg, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchvision_keys_map_to_transformers_names() {
        let cases = [
            ("conv1.weight", "embedder.embedder.convolution.weight"),
            (
                "bn1.running_var",
                "embedder.embedder.normalization.running_var",
            ),
            (
                "layer1.0.conv1.weight",
                "encoder.stages.0.layers.0.layer.0.convolution.weight",
            ),
            (
                "layer3.5.bn3.bias",
                "encoder.stages.2.layers.5.layer.2.normalization.bias",
            ),
            (
                "layer2.0.downsample.0.weight",
                "encoder.stages.1.layers.0.shortcut.convolution.weight",
            ),
            (
                "layer2.0.downsample.1.running_mean",
                "encoder.stages.1.layers.0.shortcut.normalization.running_mean",
            ),
            ("fc.bias", "classifier.bias"),
        ];
        for (tv, hf) in cases {
            assert_eq!(from_torchvision(tv).as_deref(), Some(hf), "{tv}");
        }
        for k in [
            "features.0.0.weight",
            "layer0.0.conv1.weight",
            "conv1.bias",
            "layer1.0.conv0.weight",
        ] {
            assert_eq!(from_torchvision(k), None, "{k}");
        }
    }

    #[test]
    fn torchvision_depths_name_themselves() {
        assert_eq!(ResNetConfig::torchvision(50).unwrap().name(), "ResNet-50");
        assert_eq!(ResNetConfig::torchvision(18).unwrap().features(), 512);
        assert_eq!(ResNetConfig::torchvision(101).unwrap().features(), 2048);
        assert!(ResNetConfig::torchvision(20).is_none());
        let mut c = ResNetConfig::torchvision(50).unwrap();
        c.downsample_in_bottleneck = true;
        assert!(c.check().unwrap_err().contains("downsample_in_bottleneck"));
    }
}
