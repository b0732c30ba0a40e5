//! OpenAI CLIP's image ResNets (RN50, RN101, RN50x4, RN50x16, RN50x64) as
//! open_clip's `ModifiedResNet` builds them: a stem of three 3×3
//! convolutions and a 2×2 average pool; bottleneck blocks that downsample by
//! average pooling (before the third convolution, and before the
//! shortcut's 1×1 convolution) rather than by strided convolutions; and
//! attention pooling: the mean of the last feature map, with a learned
//! positional embedding, attends to every position in one multi-head
//! attention whose output projection (`c_proj`) gives the embedding itself.
//!
//! Keys are open_clip's, under `visual.` in its state dict (`conv1`, `bn1`,
//! `layer1.0.downsample.0`, `attnpool.q_proj`, ...). Inference only (see
//! [`super::cnn`]).

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::cnn::{Act, ConvBn, ConvSpec};
use super::layers::Linear;
use crate::{Error, Result};

/// open_clip's `vision_cfg` for a ResNet tower, and the embedding width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModifiedResNetConfig {
    /// Blocks per stage (RN50: [3, 4, 6, 3]).
    pub layers: Vec<usize>,
    /// The stem's width (RN50: 64; RN50x4: 80).
    pub width: usize,
    /// Channels per attention head in the pooling (64).
    #[serde(default = "d_64")]
    pub head_width: usize,
    pub image_size: usize,
    /// The embedding width, `c_proj`'s output (open_clip's `embed_dim`).
    pub output_dim: usize,
}

fn d_64() -> usize {
    64
}

const EPS: f64 = 1e-5;

impl ModifiedResNetConfig {
    /// The last feature map's channels (`width * 32`).
    pub fn feature_dim(&self) -> usize {
        self.width * 32
    }

    pub fn heads(&self) -> usize {
        self.width * 32 / self.head_width.max(1)
    }

    pub fn check(&self) -> std::result::Result<(), String> {
        if self.layers.len() != 4 {
            return Err(format!(
                "{} stages (a ModifiedResNet has 4)",
                self.layers.len()
            ));
        }
        if self.width == 0 || !self.width.is_multiple_of(2) || self.head_width == 0 {
            return Err(format!(
                "width {} (even) and head_width {}",
                self.width, self.head_width
            ));
        }
        if !self.feature_dim().is_multiple_of(self.head_width)
            || !self.image_size.is_multiple_of(32)
        {
            return Err(format!(
                "image_size {} (a multiple of 32) and width {}·32 over heads of {}",
                self.image_size, self.width, self.head_width
            ));
        }
        Ok(())
    }

    /// "RN50"-style name of OpenAI's shapes, else a description.
    pub fn name(&self) -> String {
        let known = [
            ("RN50", [3, 4, 6, 3], 64),
            ("RN101", [3, 4, 23, 3], 64),
            ("RN50x4", [4, 6, 10, 6], 80),
            ("RN50x16", [6, 8, 18, 8], 96),
            ("RN50x64", [3, 15, 36, 10], 128),
        ];
        known
            .iter()
            .find(|(_, l, w)| self.layers == l && self.width == *w)
            .map(|(n, _, _)| format!("CLIP {n}"))
            .unwrap_or_else(|| {
                format!("CLIP ModifiedResNet {:?} width {}", self.layers, self.width)
            })
    }
}

#[derive(Debug, Clone)]
struct Bottleneck {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
    /// Average pooling of this size before `conv3` and the shortcut.
    stride: usize,
    downsample: Option<ConvBn>,
}

fn avg_pool(x: &Tensor, k: usize) -> Result<Tensor> {
    Ok(if k > 1 { x.avg_pool2d(k)? } else { x.clone() })
}

impl Bottleneck {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv2.forward(&self.conv1.forward(x)?)?;
        let h = self.conv3.forward(&avg_pool(&h, self.stride)?)?;
        let id = match &self.downsample {
            Some(d) => d.forward(&avg_pool(x, self.stride)?)?,
            None => x.clone(),
        };
        Ok((h + id)?.relu()?)
    }
}

#[derive(Debug, Clone)]
struct AttentionPool {
    positional_embedding: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    c: Linear,
    heads: usize,
}

impl AttentionPool {
    /// [B, C, H, W] to [B, output_dim]: the mean position (first) and every
    /// position, each with its positional embedding; the mean's query over
    /// all of them.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = x.reshape((b, c, h * w))?.transpose(1, 2)?; // [B, HW, C]
        let mean = tokens.mean_keepdim(1)?;
        let seq = Tensor::cat(&[&mean, &tokens], 1)?; // [B, HW+1, C]
        let (n, pc) = self.positional_embedding.dims2()?;
        if n != h * w + 1 || pc != c {
            return Err(Error::Shape(format!(
                "attention pooling: a {h}x{w} map of {c} channels, positional embedding [{n}, {pc}] \
                 (the image size the model was built for)"
            )));
        }
        let seq = seq
            .broadcast_add(&self.positional_embedding)?
            .contiguous()?;
        let hd = c / self.heads;
        let split = |t: Tensor, len: usize| -> Result<Tensor> {
            Ok(t.reshape((b, len, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = self.q.forward(&seq.narrow(1, 0, 1)?)?;
        let q = (split(q, 1)? * (hd as f64).powf(-0.5))?; // [B, H, 1, hd]
        let k = split(self.k.forward(&seq)?, n)?; // [B, H, N, hd]
        let v = split(self.v.forward(&seq)?, n)?;
        let att =
            candle_nn::ops::softmax(&q.matmul(&k.transpose(2, 3)?.contiguous()?)?, D::Minus1)?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, c))?; // [B, C]
        self.c.forward(&o)
    }
}

/// The tower. `vb` points at its root (open_clip's `visual`).
#[derive(Debug, Clone)]
pub struct ModifiedResNet {
    stem: [ConvBn; 3],
    blocks: Vec<Bottleneck>,
    attnpool: AttentionPool,
}

impl ModifiedResNet {
    pub fn load(vb: VarBuilder, cfg: &ModifiedResNetConfig) -> Result<Self> {
        cfg.check().map_err(Error::Report)?;
        let conv = |vb: &VarBuilder, conv: &str, bn: &str, cin, cout, kernel, act| {
            let s = ConvSpec {
                cin,
                cout,
                kernel,
                stride: 1,
                groups: 1,
            };
            ConvBn::load(vb, &format!("{conv}.weight"), bn, s, EPS, act)
        };
        let w = cfg.width;
        // The stem's first convolution has stride 2.
        let first = ConvBn::load(
            &vb,
            "conv1.weight",
            "bn1",
            ConvSpec {
                cin: 3,
                cout: w / 2,
                kernel: 3,
                stride: 2,
                groups: 1,
            },
            EPS,
            Act::Relu,
        )?;
        let stem = [
            first,
            conv(&vb, "conv2", "bn2", w / 2, w / 2, 3, Act::Relu)?,
            conv(&vb, "conv3", "bn3", w / 2, w, 3, Act::Relu)?,
        ];
        let mut blocks = Vec::new();
        let mut cin = w;
        for (s, &n) in cfg.layers.iter().enumerate() {
            let planes = w << s;
            for i in 0..n {
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let bv = vb.pp(format!("layer{}.{i}", s + 1));
                let downsample = if stride > 1 || cin != planes * 4 {
                    Some(conv(
                        &bv,
                        "downsample.0",
                        "downsample.1",
                        cin,
                        planes * 4,
                        1,
                        Act::None,
                    )?)
                } else {
                    None
                };
                blocks.push(Bottleneck {
                    conv1: conv(&bv, "conv1", "bn1", cin, planes, 1, Act::Relu)?,
                    conv2: conv(&bv, "conv2", "bn2", planes, planes, 3, Act::Relu)?,
                    conv3: conv(&bv, "conv3", "bn3", planes, planes * 4, 1, Act::None)?,
                    stride,
                    downsample,
                });
                cin = planes * 4;
            }
        }
        let c = cfg.feature_dim();
        let grid = cfg.image_size / 32;
        let av = vb.pp("attnpool");
        let attnpool = AttentionPool {
            positional_embedding: av.get((grid * grid + 1, c), "positional_embedding")?,
            q: Linear::load(av.pp("q_proj"), c, c, true)?,
            k: Linear::load(av.pp("k_proj"), c, c, true)?,
            v: Linear::load(av.pp("v_proj"), c, c, true)?,
            c: Linear::load(av.pp("c_proj"), c, cfg.output_dim, true)?,
            heads: cfg.heads(),
        };
        Ok(Self {
            stem,
            blocks,
            attnpool,
        })
    }

    /// The last feature map [B, width·32, H/32, W/32].
    pub fn feature_map(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut x = pixel_values.to_dtype(DType::F32)?;
        for c in &self.stem {
            x = c.forward(&x)?;
        }
        x = x.avg_pool2d(2)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        Ok(x)
    }

    /// The image embedding [B, output_dim] (open_clip's `visual(x)`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.attnpool.forward(&self.feature_map(pixel_values)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shapes_name_themselves() {
        let rn50 = ModifiedResNetConfig {
            layers: vec![3, 4, 6, 3],
            width: 64,
            head_width: 64,
            image_size: 224,
            output_dim: 1024,
        };
        assert_eq!(rn50.name(), "CLIP RN50");
        assert_eq!((rn50.feature_dim(), rn50.heads()), (2048, 32));
        assert!(rn50.check().is_ok());
        let bad = ModifiedResNetConfig {
            image_size: 200,
            ..rn50
        };
        assert!(bad.check().unwrap_err().contains("image_size"));
    }
}
