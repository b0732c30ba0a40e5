//! The building blocks of Emu3's VQ-VAE, in transformers' module layout
//! (`Emu3VQVAEConv3d`, `Emu3VQVAEResnetBlock`, `Emu3VQVAESpatialNorm`, ...),
//! so that the weights' names are the checkpoint's. Every block is made of
//! candle ops that carry gradients, so the same model trains.
//!
//! candle has no 3-d convolution; [`Conv3d`] is the sum over the temporal
//! taps of 2-d convolutions on the frames each tap reads.

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};

use super::Emu3VqConfig;
use crate::Result;

/// `Emu3VQVAEConv3d`: a 3-d convolution over [B, C, T, H, W] with spatial
/// stride 1, its spatial padding `(k - 1) / 2` on each side (the odd pixel
/// first), and a causal temporal padding of 2 frames at the front; or
/// ([`Conv3d::pointwise`]) a plain 1×1×1 `nn.Conv3d`.
pub struct Conv3d {
    /// One [O, C, kh, kw] kernel per temporal tap.
    taps: Vec<Tensor>,
    bias: Tensor,
    stride_t: usize,
    pad_hw: (usize, usize),
    pad_t: usize,
}

impl Conv3d {
    pub fn load(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: [usize; 3],
        stride_t: usize,
    ) -> Result<Self> {
        Self::build(vb, cin, cout, k, stride_t, 2)
    }

    /// `nn.Conv3d(cin, cout, 1)`: no padding at all.
    pub fn pointwise(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Self::build(vb, cin, cout, [1, 1, 1], 1, 0)
    }

    fn build(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: [usize; 3],
        stride_t: usize,
        pad_t: usize,
    ) -> Result<Self> {
        let vb = if pad_t > 0 { vb.pp("conv") } else { vb };
        let w = vb.get((cout, cin, k[0], k[1], k[2]), "weight")?;
        let bias = vb.get(cout, "bias")?;
        let taps = (0..k[0])
            .map(|t| w.narrow(2, t, 1)?.squeeze(2))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pad = k[1] - 1;
        Ok(Self {
            taps,
            bias,
            stride_t,
            pad_hw: (pad / 2 + pad % 2, pad / 2),
            pad_t,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.pad_with_zeros(2, self.pad_t, 0)?;
        if self.pad_hw != (0, 0) {
            let (a, b) = self.pad_hw;
            x = x.pad_with_zeros(3, a, b)?.pad_with_zeros(4, a, b)?;
        }
        let x = x.contiguous()?;
        let (b, c, t, h, w) = x.dims5()?;
        let k = self.taps.len();
        let t_out = (t - k) / self.stride_t + 1;
        let mut sum: Option<Tensor> = None;
        for (tap, kernel) in self.taps.iter().enumerate() {
            let idx: Vec<u32> = (0..t_out)
                .map(|i| (i * self.stride_t + tap) as u32)
                .collect();
            let idx = Tensor::new(idx.as_slice(), x.device())?;
            let frames = x
                .index_select(&idx, 2)?
                .permute((0, 2, 1, 3, 4))?
                .reshape((b * t_out, c, h, w))?;
            let y = frames.conv2d(kernel, 0, 1, 1, 1)?;
            sum = Some(match sum {
                Some(s) => (s + y)?,
                None => y,
            });
        }
        let y = sum.expect("a kernel has at least one tap");
        let (_, o, ho, wo) = y.dims4()?;
        let y = y.reshape((b, t_out, o, ho, wo))?.permute((0, 2, 1, 3, 4))?;
        Ok(y.broadcast_add(&self.bias.reshape((1, o, 1, 1, 1))?)?)
    }
}

/// `nn.BatchNorm3d` in evaluation mode (Emu3's VQ model is frozen): the
/// running statistics, eps 1e-5.
pub struct BatchNorm3d {
    scale: Tensor,
    shift: Tensor,
}

impl BatchNorm3d {
    pub fn load(vb: VarBuilder, c: usize) -> Result<Self> {
        let mean = vb.get(c, "running_mean")?;
        let var = vb.get(c, "running_var")?;
        let scale = vb.get(c, "weight")?.div(&(var + 1e-5)?.sqrt()?)?;
        let shift = (vb.get(c, "bias")? - mean.mul(&scale)?)?;
        let shape = (1, c, 1, 1, 1);
        Ok(Self {
            scale: scale.reshape(shape)?,
            shift: shift.reshape(shape)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)?)
    }
}

/// `Emu3VQVAETemporalResnetBlock`: BatchNorm, SiLU and causal 3×3×3
/// convolutions, with a residual.
pub struct TemporalResnetBlock {
    norm1: BatchNorm3d,
    conv1: Conv3d,
    norm2: BatchNorm3d,
    conv2: Conv3d,
    shortcut: Option<Conv3d>,
}

impl TemporalResnetBlock {
    pub fn load(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self {
            norm1: BatchNorm3d::load(vb.pp("norm1"), cin)?,
            conv1: Conv3d::load(vb.pp("conv1"), cin, cout, [3, 3, 3], 1)?,
            norm2: BatchNorm3d::load(vb.pp("norm2"), cout)?,
            conv2: Conv3d::load(vb.pp("conv2"), cout, cout, [3, 3, 3], 1)?,
            shortcut: if cin != cout {
                Some(Conv3d::pointwise(vb.pp("nin_shortcut"), cin, cout)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let residual = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((residual + h)?)
    }
}

fn conv2d(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    padding: usize,
    stride: usize,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(candle_nn::conv2d(cin, cout, k, cfg, vb)?)
}

/// A 3×3 convolution, padding 1.
pub fn conv3x3(vb: VarBuilder, cin: usize, cout: usize) -> Result<Conv2d> {
    conv2d(vb, cin, cout, 3, 1, 1)
}

fn group_norm(vb: VarBuilder, c: usize) -> Result<GroupNorm> {
    Ok(candle_nn::group_norm(32, c, 1e-6, vb)?)
}

/// `Emu3VQVAESpatialNorm`: GroupNorm modulated by the codes' embeddings,
/// resized (nearest) to the feature map: `norm(x) * conv_y(q) + conv_b(q)`.
pub struct SpatialNorm {
    norm: GroupNorm,
    conv_y: Conv2d,
    conv_b: Conv2d,
}

/// GroupNorm in the encoder, [`SpatialNorm`] in the decoder.
pub enum Norm {
    Group(GroupNorm),
    Spatial(SpatialNorm),
}

impl Norm {
    /// `quant`: the codes' channels for a spatial norm, `None` for GroupNorm.
    pub fn load(vb: VarBuilder, quant: Option<usize>, c: usize) -> Result<Self> {
        Ok(match quant {
            None => Norm::Group(group_norm(vb, c)?),
            Some(q) => Norm::Spatial(SpatialNorm {
                norm: group_norm(vb.pp("norm_layer"), c)?,
                conv_y: conv2d(vb.pp("conv_y"), q, c, 1, 0, 1)?,
                conv_b: conv2d(vb.pp("conv_b"), q, c, 1, 0, 1)?,
            }),
        })
    }

    pub fn forward(&self, x: &Tensor, quant: Option<&Tensor>) -> Result<Tensor> {
        match (self, quant) {
            (Norm::Group(n), _) => Ok(n.forward(x)?),
            (Norm::Spatial(s), Some(q)) => {
                let (_, _, h, w) = x.dims4()?;
                let q = if q.dims()[2..] == [h, w] {
                    q.clone()
                } else {
                    q.upsample_nearest2d(h, w)?
                };
                let y = s.norm.forward(x)?;
                Ok(y.mul(&s.conv_y.forward(&q)?)?.add(&s.conv_b.forward(&q)?)?)
            }
            (Norm::Spatial(_), None) => Err(crate::Error::Shape(
                "a spatial norm needs the codes' embeddings".into(),
            )),
        }
    }
}

/// `Emu3VQVAEResnetBlock`.
pub struct ResnetBlock {
    norm1: Norm,
    conv1: Conv2d,
    norm2: Norm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn load(vb: VarBuilder, cin: usize, cout: usize, quant: Option<usize>) -> Result<Self> {
        Ok(Self {
            norm1: Norm::load(vb.pp("norm1"), quant, cin)?,
            conv1: conv3x3(vb.pp("conv1"), cin, cout)?,
            norm2: Norm::load(vb.pp("norm2"), quant, cout)?,
            conv2: conv3x3(vb.pp("conv2"), cout, cout)?,
            shortcut: if cin != cout {
                Some(conv2d(vb.pp("nin_shortcut"), cin, cout, 1, 0, 1)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor, quant: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, quant)?.silu()?)?;
        let h = self
            .conv2
            .forward(&self.norm2.forward(&h, quant)?.silu()?)?;
        let residual = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((residual + h)?)
    }
}

/// `Emu3VQVAEAttentionBlock` with its norm in front and the residual:
/// self-attention over the feature map's positions.
pub struct Attention {
    norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    /// `attn` and `norm`: the attention's and its norm's weights.
    pub fn load(
        attn: VarBuilder,
        norm: VarBuilder,
        cfg: &Emu3VqConfig,
        c: usize,
        quant: Option<usize>,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        if d != c {
            return Err(crate::Error::Shape(format!(
                "Emu3 VQ config: attention is {d} wide (hidden_size) but its feature map has {c} channels"
            )));
        }
        Ok(Self {
            norm: Norm::load(norm, quant, c)?,
            q: candle_nn::linear(d, d, attn.pp("q_proj"))?,
            k: candle_nn::linear(d, d, attn.pp("k_proj"))?,
            v: candle_nn::linear(d, d, attn.pp("v_proj"))?,
            out: candle_nn::linear(d, d, attn.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    pub fn forward(&self, x: &Tensor, quant: Option<&Tensor>) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = h * w;
        // Contiguous before the projections: candle 0.11's CPU matmul folds
        // a batch against a broadcast weight into one gemm that assumes the
        // rows adjacent, and a transposed view gives wrong values
        // (huggingface/candle#3744, #3758).
        let seq = self
            .norm
            .forward(x, quant)?
            .reshape((b, c, n))?
            .transpose(1, 2)?
            .contiguous()?;
        let hd = c / self.heads;
        let split = |l: &Linear| -> Result<Tensor> {
            Ok(l.forward(&seq)?
                .reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (split(&self.q)?, split(&self.k)?, split(&self.v)?);
        let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * (hd as f64).powf(-0.5))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        let y = self
            .out
            .forward(&y)?
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?;
        Ok((x + y)?)
    }
}

/// A level of the encoder or decoder: residual blocks, each followed by
/// attention at the attention levels, then the resampling convolution.
pub struct Level {
    blocks: Vec<ResnetBlock>,
    attn: Vec<Attention>,
    resample: Option<Conv2d>,
}

impl Level {
    /// The encoder's levels (`down_block.down.{i}`).
    pub fn down(vb: VarBuilder, cfg: &Emu3VqConfig) -> Result<Vec<Self>> {
        let mult = &cfg.channel_multiplier;
        let mut levels = Vec::new();
        for (i, &m) in mult.iter().enumerate() {
            let vb = vb.pp(i);
            let mut cin = cfg.base_channels * if i == 0 { 1 } else { mult[i - 1] };
            let cout = cfg.base_channels * m;
            let (mut blocks, mut attn) = (Vec::new(), Vec::new());
            for j in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::load(vb.pp("block").pp(j), cin, cout, None)?);
                cin = cout;
                if cfg.attn_resolutions.contains(&i) {
                    attn.push(Attention::load(
                        vb.pp("attn").pp(j),
                        vb.pp("attn_norms").pp(j),
                        cfg,
                        cout,
                        None,
                    )?);
                }
            }
            let resample = if i + 1 < mult.len() {
                Some(conv2d(vb.pp("downsample.conv"), cout, cout, 3, 0, 2)?)
            } else {
                None
            };
            levels.push(Self {
                blocks,
                attn,
                resample,
            });
        }
        Ok(levels)
    }

    /// The decoder's levels (`up_block.up.{i}`), in the order they run
    /// (the deepest first).
    pub fn up(vb: VarBuilder, cfg: &Emu3VqConfig) -> Result<Vec<Self>> {
        let mult = &cfg.channel_multiplier;
        let quant = Some(cfg.embed_dim);
        let mut cin = cfg.base_channels * mult[mult.len() - 1];
        let mut levels = Vec::new();
        for i in (0..mult.len()).rev() {
            let vb = vb.pp(i);
            let cout = cfg.base_channels * mult[i];
            let (mut blocks, mut attn) = (Vec::new(), Vec::new());
            for j in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::load(vb.pp("block").pp(j), cin, cout, quant)?);
                cin = cout;
                if cfg.attn_resolutions.contains(&i) {
                    attn.push(Attention::load(
                        vb.pp("attn").pp(j),
                        vb.pp("attn_norms").pp(j),
                        cfg,
                        cout,
                        quant,
                    )?);
                }
            }
            let resample = if i != 0 {
                Some(conv3x3(vb.pp("upsample.conv"), cout, cout)?)
            } else {
                None
            };
            levels.push(Self {
                blocks,
                attn,
                resample,
            });
        }
        Ok(levels)
    }

    pub fn forward_down(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.run(x, None)?;
        if let Some(conv) = &self.resample {
            // The asymmetric padding: one zero row and column after.
            x = conv.forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
        }
        Ok(x)
    }

    pub fn forward_up(&self, x: &Tensor, quant: &Tensor) -> Result<Tensor> {
        let mut x = self.run(x, Some(quant))?;
        if let Some(conv) = &self.resample {
            let (_, _, h, w) = x.dims4()?;
            x = conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?;
        }
        Ok(x)
    }

    fn run(&self, x: &Tensor, quant: Option<&Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for (j, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, quant)?;
            if let Some(a) = self.attn.get(j) {
                x = a.forward(&x, quant)?;
            }
        }
        Ok(x)
    }
}

/// `Emu3VQVAEMiddleBlock`: a residual block, attention, a residual block.
pub struct Middle {
    block_1: ResnetBlock,
    attn: Attention,
    block_2: ResnetBlock,
}

impl Middle {
    pub fn load(
        vb: VarBuilder,
        cfg: &Emu3VqConfig,
        c: usize,
        quant: Option<usize>,
    ) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::load(vb.pp("block_1"), c, c, quant)?,
            attn: Attention::load(vb.pp("attn_1"), vb.pp("attn_norm"), cfg, c, quant)?,
            block_2: ResnetBlock::load(vb.pp("block_2"), c, c, quant)?,
        })
    }

    pub fn forward(&self, x: &Tensor, quant: Option<&Tensor>) -> Result<Tensor> {
        let x = self.block_1.forward(x, quant)?;
        let x = self.attn.forward(&x, quant)?;
        self.block_2.forward(&x, quant)
    }
}

/// Repeats each frame of [B, C, T, H, W] twice along T (nearest ×2).
pub fn repeat_frames(x: &Tensor) -> Result<Tensor> {
    let t = x.dims()[2];
    let idx: Vec<u32> = (0..2 * t as u32).map(|i| i / 2).collect();
    Ok(x.contiguous()?
        .index_select(&Tensor::new(idx.as_slice(), x.device())?, 2)?)
}
