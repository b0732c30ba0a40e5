//! Building blocks of the convolutional image towers: a convolution with its
//! BatchNorm (inference statistics) and activation, and the depthwise
//! convolution kernel.
//!
//! These towers run for inference only: clasp uses a pretrained CNN as a
//! locked tower (LiT) or a frozen feature extractor (the bridge), never as
//! one that learns, so nothing here keeps a graph. BatchNorm is folded into
//! the convolution at each forward from the current parameters (a few
//! million multiplies against the convolutions' hundreds of millions), so a
//! tower built before its checkpoint's values were loaded still computes
//! with them.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::{Error, Result};

/// What follows a convolution's BatchNorm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Relu6,
}

/// `act(bn(conv(x)))`, transformers' `MobileNetV2ConvLayer` and torchvision's
/// `Conv2dNormActivation`: a bias-free convolution, BatchNorm, activation.
#[derive(Debug, Clone)]
pub struct ConvBn {
    /// [O, I / groups, k, k].
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: f64,
    stride: usize,
    padding: Padding,
    groups: usize,
    act: Act,
}

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// `kernel / 2` on every side: PyTorch's symmetric padding (torchvision).
    Symmetric(usize),
    /// TensorFlow's `SAME`: the output is `ceil(input / stride)` and the
    /// padding that needs, with the odd pixel at the bottom and right
    /// (EfficientNet's ports from TensorFlow).
    TfSame,
}

impl Padding {
    /// The (before, after) padding of one spatial dimension.
    fn amounts(self, input: usize, kernel: usize, stride: usize) -> (usize, usize) {
        match self {
            Padding::Symmetric(p) => (p, p),
            Padding::TfSame => {
                let out = input.div_ceil(stride);
                let total = ((out.max(1) - 1) * stride + kernel).saturating_sub(input);
                (total / 2, total - total / 2)
            }
        }
    }
}

/// The shape of a convolution.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
}

impl ConvBn {
    /// `conv` names the convolution's weight, `bn` the BatchNorm's prefix
    /// (`weight`, `bias`, `running_mean`, `running_var`). Padding is
    /// `kernel / 2`, PyTorch's symmetric "same" for odd kernels.
    pub fn load(
        vb: &VarBuilder,
        conv: &str,
        bn: &str,
        s: ConvSpec,
        eps: f64,
        act: Act,
    ) -> Result<Self> {
        if s.groups == 0 || !s.cin.is_multiple_of(s.groups) || !s.cout.is_multiple_of(s.groups) {
            return Err(Error::Shape(format!(
                "{conv}: {} groups do not divide {} inputs and {} outputs",
                s.groups, s.cin, s.cout
            )));
        }
        let bnv = vb.pp(bn);
        Ok(Self {
            weight: vb.get((s.cout, s.cin / s.groups, s.kernel, s.kernel), conv)?,
            gamma: bnv.get(s.cout, "weight")?,
            beta: bnv.get(s.cout, "bias")?,
            mean: bnv.get(s.cout, "running_mean")?,
            var: bnv.get(s.cout, "running_var")?,
            eps,
            stride: s.stride,
            padding: Padding::Symmetric(s.kernel / 2),
            groups: s.groups,
            act,
        })
    }

    /// The same convolution with TensorFlow's `SAME` padding.
    pub fn tf_same(mut self) -> Self {
        self.padding = Padding::TfSame;
        self
    }

    /// The BatchNorm-folded weight [O, I/g, k, k] and bias [O].
    fn folded(&self) -> Result<(Tensor, Tensor)> {
        let scale = (&self.gamma / (&self.var + self.eps)?.sqrt()?)?;
        let bias = (&self.beta - (&self.mean * &scale)?)?;
        let w = self
            .weight
            .broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
        Ok((w, bias))
    }

    /// x [B, C, H, W] (f32) to [B, O, H', W'].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, bias) = self.folded()?;
        let (o, ig, k, _) = w.dims4()?;
        let (_, _, h, wd) = x.dims4()?;
        let (top, bottom) = self.padding.amounts(h, k, self.stride);
        let (left, right) = self.padding.amounts(wd, k, self.stride);
        // Symmetric padding goes to the convolution itself; uneven padding
        // is added to the input first.
        let (x, pad) = if top == bottom && left == right && top == left {
            (x.clone(), top)
        } else {
            let x = x.pad_with_zeros(2, top, bottom)?;
            (x.pad_with_zeros(3, left, right)?, 0)
        };
        let x = &x;
        let y = if self.groups > 1 && ig == 1 && self.groups == o {
            depthwise(x, &w, &bias, self.stride, pad)?
        } else if k == 1 && self.stride == 1 && self.groups == 1 && pad == 0 {
            // A pointwise convolution is one GEMM per image: [O, C] x [C, HW].
            let (b, c, h, wd) = x.dims4()?;
            let w2 = w.reshape((o, c))?;
            let y = w2
                .broadcast_left(b)?
                .matmul(&x.reshape((b, c, h * wd))?)?
                .broadcast_add(&bias.reshape((1, o, 1))?)?;
            y.reshape((b, o, h, wd))?
        } else {
            x.conv2d(&w, pad, self.stride, 1, self.groups)?
                .broadcast_add(&bias.reshape((1, o, 1, 1))?)?
        };
        Ok(match self.act {
            Act::None => y,
            Act::Relu => y.relu()?,
            Act::Relu6 => y.clamp(0f32, 6f32)?,
        })
    }
}

/// A depthwise convolution (one k×k filter per channel) with bias, on the
/// CPU. candle runs grouped convolutions as one convolution per group, which
/// for hundreds of single-channel groups costs more in dispatch than in
/// arithmetic; this is the direct loop, one output plane per task.
pub(crate) fn depthwise(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, _, k, k2) = w.dims4()?;
    if o != c || k != k2 || stride == 0 {
        return Err(Error::Shape(format!(
            "depthwise: {c} channels, filters [{o}, 1, {k}, {k2}], stride {stride}"
        )));
    }
    if h + 2 * pad < k || wd + 2 * pad < k {
        return Err(Error::Shape(format!(
            "depthwise: a {h}x{wd} input is smaller than its {k}x{k} filter"
        )));
    }
    let oh = (h + 2 * pad - k) / stride + 1;
    let ow = (wd + 2 * pad - k) / stride + 1;
    let device = x.device().clone();
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let ws: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let bs: Vec<f32> = bias.to_dtype(DType::F32)?.to_vec1()?;
    let mut out = vec![0f32; b * c * oh * ow];
    out.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(plane, dst)| {
            let ch = plane % c;
            let src = &xs[plane * h * wd..(plane + 1) * h * wd];
            let f = &ws[ch * k * k..(ch + 1) * k * k];
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bs[ch];
                    for ky in 0..k {
                        // Input row of this tap; outside the image is zero.
                        let iy = (oy * stride + ky).wrapping_sub(pad);
                        if iy >= h {
                            continue;
                        }
                        let row = &src[iy * wd..(iy + 1) * wd];
                        for kx in 0..k {
                            let ix = (ox * stride + kx).wrapping_sub(pad);
                            if ix < wd {
                                acc += row[ix] * f[ky * k + kx];
                            }
                        }
                    }
                    dst[oy * ow + ox] = acc;
                }
            }
        });
    Ok(Tensor::from_vec(out, (b, c, oh, ow), &device)?)
}

/// A state dict with every key renamed by `rename`; `what` names the
/// architecture when some key has no new name (the first few are listed)
/// or none is left.
pub fn rename_keys(
    raw: std::collections::HashMap<String, Tensor>,
    rename: impl Fn(&str) -> Option<String>,
    what: &str,
) -> std::result::Result<std::collections::HashMap<String, Tensor>, String> {
    let mut out = std::collections::HashMap::with_capacity(raw.len());
    let mut unknown = Vec::new();
    for (k, v) in raw {
        match rename(&k) {
            Some(n) => {
                out.insert(n, v);
            }
            None => unknown.push(k),
        }
    }
    if out.is_empty() || !unknown.is_empty() {
        unknown.sort();
        unknown.truncate(5);
        return Err(format!(
            "not a {what} state dict (keys such as {})",
            unknown.join(", ")
        ));
    }
    Ok(out)
}

/// PyTorch's `MaxPool2d(kernel, stride, padding)` after a ReLU: the input
/// is non-negative, so zero padding never wins a window that holds a real
/// pixel, and equals PyTorch's negative-infinity padding.
pub fn max_pool_after_relu(x: &Tensor, kernel: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let x = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
    Ok(x.max_pool2d_with_stride(kernel, stride)?)
}

/// Global average pooling: [B, C, H, W] to [B, C].
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h * w))?.mean(2)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The direct depthwise loop against candle's grouped convolution, with
    /// padding and both strides.
    #[test]
    fn depthwise_equals_grouped_conv2d() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 9, 7), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 1, 3, 3), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        for stride in [1, 2] {
            let ours = depthwise(&x, &w, &bias, stride, 1).unwrap();
            let theirs = x
                .conv2d(&w, 1, stride, 1, 5)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 5, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let d = max_diff(&ours, &theirs);
            assert!(d < 1e-5, "stride {stride}: max diff {d}");
        }
    }

    /// TensorFlow's SAME padding: the output is ceil(input / stride), the
    /// odd pixel padded after (EfficientNet's ports).
    #[test]
    fn tf_same_padding_amounts() {
        assert_eq!(Padding::TfSame.amounts(224, 3, 2), (0, 1));
        assert_eq!(Padding::TfSame.amounts(56, 5, 2), (1, 2));
        assert_eq!(Padding::TfSame.amounts(14, 5, 1), (2, 2));
        assert_eq!(Padding::TfSame.amounts(7, 1, 1), (0, 0));
        assert_eq!(Padding::Symmetric(3).amounts(224, 7, 2), (3, 3));
    }

    /// Zero padding before the max equals negative-infinity padding on a
    /// non-negative input.
    #[test]
    fn max_pool_after_relu_pads_like_pytorch() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 5, 6), &dev)
            .unwrap()
            .relu()
            .unwrap();
        let y = max_pool_after_relu(&x, 3, 2, 1).unwrap();
        assert_eq!(y.dims(), &[1, 2, 3, 3]);
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        for c in 0..2 {
            for oy in 0..3 {
                for ox in 0..3 {
                    let mut m = f32::NEG_INFINITY;
                    for dy in 0..3 {
                        for dx in 0..3 {
                            let (iy, ix) = ((oy * 2 + dy) as isize - 1, (ox * 2 + dx) as isize - 1);
                            if (0..5).contains(&iy) && (0..6).contains(&ix) {
                                m = m.max(v[c * 30 + iy as usize * 6 + ix as usize]);
                            }
                        }
                    }
                    assert_eq!(got[c * 9 + oy * 3 + ox], m);
                }
            }
        }
    }

    /// Folding BatchNorm into the convolution equals running it after.
    #[test]
    fn folded_batchnorm_equals_conv_then_bn() {
        let dev = Device::Cpu;
        let mut t = std::collections::HashMap::new();
        let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &dev).unwrap();
        t.insert("c.weight".to_string(), r(&[4, 3, 3, 3]));
        t.insert("bn.weight".to_string(), r(&[4]));
        t.insert("bn.bias".to_string(), r(&[4]));
        t.insert("bn.running_mean".to_string(), r(&[4]));
        t.insert("bn.running_var".to_string(), r(&[4]).abs().unwrap());
        let vb = VarBuilder::from_tensors(t.clone(), DType::F32, &dev);
        let spec = ConvSpec {
            cin: 3,
            cout: 4,
            kernel: 3,
            stride: 2,
            groups: 1,
        };
        let conv = ConvBn::load(&vb, "c.weight", "bn", spec, 1e-5, Act::None).unwrap();
        let x = r(&[1, 3, 8, 8]);
        let ours = conv.forward(&x).unwrap();
        let y = x.conv2d(&t["c.weight"], 1, 2, 1, 1).unwrap();
        let sh = |n: &str| t[n].reshape((1, 4, 1, 1)).unwrap();
        let want = y
            .broadcast_sub(&sh("bn.running_mean"))
            .unwrap()
            .broadcast_div(&(sh("bn.running_var") + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&sh("bn.weight"))
            .unwrap()
            .broadcast_add(&sh("bn.bias"))
            .unwrap();
        let d = max_diff(&ours, &want);
        assert!(d < 1e-4, "max diff {d}");
    }
}
