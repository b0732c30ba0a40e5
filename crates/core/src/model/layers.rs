//! Building blocks shared by the towers: linear layers, layer norm, activations,
//! multi-head attention and the MLP. They are built from a `VarBuilder` with the
//! parameter names that transformers uses, so checkpoints load as they are.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::config::Activation;
use super::cpu_kernels::{self, uniform_segments, F32View, LinearRef, Mask};
use super::grad_kernels::{self, SoftmaxMask};
use super::int8::QuantMatrix;
use super::packed::PackedF32;
use crate::Result;
use std::sync::Arc;

#[path = "layers/fused.rs"]
mod fused;
pub(crate) use fused::*;

/// `y = x W^T + b` over the last dimension, for inputs of any rank.
#[derive(Debug, Clone)]
pub struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
    /// The int8 weights (`--precision int8`), used by the fused CPU path.
    pub(crate) int8: Option<Arc<QuantMatrix>>,
    /// The checkpoint name it was loaded from (`...q_proj`), if any.
    pub(crate) name: Option<Arc<str>>,
    /// The weights packed for the f32 kernels (inference encoders only).
    pub(crate) packed: Option<Arc<PackedF32>>,
}

/// Where a layer's int8 weights come from: `Ok(Some)` read by name from a
/// quantized checkpoint, `Ok(None)` to quantize the f32 weights.
pub type Int8Source<'a> = &'a dyn Fn(&str) -> Result<Option<QuantMatrix>>;

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            int8: None,
            name: None,
            packed: None,
        }
    }

    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            name: Some(vb.prefix().into()),
            ..Self::new(weight, bias)
        })
    }

    /// This layer's weights in int8: those it runs on already, else from
    /// `src` by name, else quantized.
    pub(crate) fn int8_weights(&self, src: Int8Source) -> Result<QuantMatrix> {
        if let Some(q) = &self.int8 {
            return Ok(QuantMatrix::clone(q));
        }
        let (n, k) = self.weight.dims2()?;
        if let Some(name) = &self.name {
            if let Some(q) = src(name)? {
                if (q.rows(), q.cols()) != (n, k) {
                    return Err(crate::Error::Shape(format!(
                        "int8 weight {name} is [{}, {}], the layer is [{n}, {k}]",
                        q.rows(),
                        q.cols()
                    )));
                }
                return Ok(q);
            }
        }
        let w = F32View::new(&self.weight)?;
        QuantMatrix::quantize(w.as_slice(), n, k).map_err(crate::Error::Shape)
    }

    /// Switches the fused CPU path of this layer to int8 (dropping any f32
    /// packing, which int8 does not read).
    pub fn quantize_int8(&mut self, src: Int8Source) -> Result<()> {
        self.int8 = Some(Arc::new(self.int8_weights(src)?));
        self.packed = None;
        Ok(())
    }

    /// Packs the weights for the prepacked kernels (see `packed`): in bf16
    /// when `bf16`, else in f32 when this CPU has a packed f32 kernel
    /// (otherwise the `gemm` crate keeps running them).
    pub fn pack(&mut self, bf16: bool) -> Result<()> {
        let kernel = bf16 || super::packed::F32Kernel::selected().is_some();
        if kernel && self.int8.is_none() && self.weight.device().is_cpu() {
            let (n, k) = self.weight.dims2()?;
            let w = F32View::new(&self.weight)?;
            self.packed = Some(Arc::new(if bf16 {
                PackedF32::pack_bf16(w.as_slice(), n, k)
            } else {
                PackedF32::pack(w.as_slice(), n, k)
            }));
        }
        Ok(())
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Concatenates several linears along the output dimension so that one GEMM
    /// computes them all (used to fuse the q, k and v projections).
    pub fn concat(parts: &[&Linear]) -> Result<Self> {
        let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
        let weight = Tensor::cat(&weights, 0)?;
        let bias = match parts
            .iter()
            .map(|l| l.bias.as_ref())
            .collect::<Option<Vec<_>>>()
        {
            Some(b) => Some(Tensor::cat(&b, 0)?),
            None => None,
        };
        Ok(Self::new(weight, bias))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused_grad(x) {
            return Ok(grad_kernels::linear(x, &self.weight, self.bias.as_ref())?);
        }
        // Flatten the leading dims so the GEMM sees one [N, in] x [in, out]
        // product; the transposed weight is read through strides, not copied.
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("linear input has at least one dim");
        let n: usize = dims[..dims.len() - 1].iter().product();
        let mut out_dims = dims.clone();
        *out_dims.last_mut().unwrap() = self.weight.dim(0)?;
        // Weights packed for an inference-only encoder (`pack`) run on the
        // packed kernels, as the fused layers' do.
        if self.packed.is_some()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && !crate::model::grad_mode()
        {
            let x = x.contiguous()?;
            let xv = F32View::new(&x)?;
            let lw = LinearWeights::new(self)?;
            let mut y = vec![0f32; n * lw.out];
            cpu_kernels::linear_into(xv.as_slice(), n, &lw.get(), &mut y, false);
            return Ok(Tensor::from_vec(y, out_dims, x.device())?);
        }
        let x2 = x.reshape((n, in_dim))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y.reshape(out_dims)?)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
    pub(crate) eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.is_contiguous() && x.dtype() == DType::F32 && !crate::model::grad_mode() {
            // candle's fused kernel: one pass, no temporaries (no backward).
            return Ok(candle_nn::ops::layer_norm(
                x,
                &self.weight,
                &self.bias,
                self.eps as f32,
            )?);
        }
        if fused_grad(x) {
            return Ok(grad_kernels::layer_norm(
                x,
                &self.weight,
                &self.bias,
                self.eps,
            )?);
        }
        if is_half(x) {
            // As torch's autocast does: the statistics in f32, the result in
            // the input's half type.
            let f32 = Self {
                weight: self.weight.to_dtype(DType::F32)?,
                bias: self.bias.to_dtype(DType::F32)?,
                eps: self.eps,
            };
            return Ok(f32.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?);
        }
        // Differentiable composition, the same arithmetic as torch's layer_norm.
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// bf16 or f16: mixed-precision training's compute types.
fn is_half(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// Whether training on this tensor goes through the fused CPU ops of
/// `grad_kernels` rather than composed candle ops.
fn fused_grad(x: &Tensor) -> bool {
    crate::model::grad_mode() && grad_kernels::applies(x)
}

pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    if fused_grad(x) {
        return Ok(grad_kernels::activate(x, act)?);
    }
    Ok(match act {
        Activation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        Activation::Gelu => x.gelu_erf()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Relu => x.relu()?,
    })
}

/// Multi-head self-attention with separate q/k/v/out projections, named as in
/// transformers (`q_proj`... for CLIP; BERT's names are mapped by its loader).
#[derive(Debug, Clone)]
pub struct Attention {
    pub(crate) qkv: Linear,
    /// The separate projections. Training updates their variables in place,
    /// which the load-time concatenation `qkv` does not see, so grad mode
    /// concatenates them afresh on every forward.
    parts: [Linear; 3],
    pub(crate) out: Linear,
    pub(crate) heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn new(q: Linear, k: Linear, v: Linear, out: Linear, heads: usize) -> Result<Self> {
        let hidden = q.weight.dim(0)?;
        Ok(Self {
            qkv: Linear::concat(&[&q, &k, &v])?,
            parts: [q, k, v],
            out,
            heads,
            head_dim: hidden / heads,
        })
    }

    pub fn load_clip(vb: VarBuilder, hidden: usize, heads: usize) -> Result<Self> {
        let l = |n: &str| Linear::load(vb.pp(n), hidden, hidden, true);
        Self::new(
            l("q_proj")?,
            l("k_proj")?,
            l("v_proj")?,
            l("out_proj")?,
            heads,
        )
    }

    /// The fused q/k/v product and the output projection to int8 (q, k and
    /// v are quantized, or read, one by one: per-channel scales do not
    /// change when their rows are stacked).
    pub fn quantize_int8(&mut self, src: Int8Source) -> Result<()> {
        let parts = self
            .parts
            .iter()
            .map(|l| l.int8_weights(src))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&QuantMatrix> = parts.iter().collect();
        self.qkv.int8 = Some(Arc::new(
            QuantMatrix::stack(&refs).map_err(crate::Error::Shape)?,
        ));
        self.out.quantize_int8(src)
    }

    /// Packs the fused q/k/v product and the output projection for the
    /// prepacked kernels.
    pub fn pack(&mut self, bf16: bool) -> Result<()> {
        self.qkv.pack(bf16)?;
        self.out.pack(bf16)
    }

    /// The named linears (q, k, v, out), as a checkpoint holds them.
    pub(crate) fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.parts.iter().chain(std::iter::once(&self.out))
    }

    /// `x`: [B, T, C].
    pub fn forward(&self, x: &Tensor, mask: &AttnMask) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (h, d) = (self.heads, self.head_dim);
        let qkv = if crate::model::grad_mode() {
            let [q, k, v] = &self.parts;
            Linear::concat(&[q, k, v])?.forward(x)?
        } else {
            self.qkv.forward(x)?
        };
        if fused_grad(&qkv) {
            let ctx = grad_kernels::attention(&qkv, h, mask.softmax_mask()?)?;
            return self.out.forward(&ctx);
        }
        let qkv = qkv.reshape((b, t, 3, h, d))?;
        // [3, B, H, T, D]
        let qkv = qkv.permute((2, 0, 3, 1, 4))?.contiguous()?;
        let scale = 1.0 / (d as f64).sqrt();
        let q = (qkv.get(0)? * scale)?;
        let k = qkv.get(1)?;
        let v = qkv.get(2)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(m) = mask.additive(x)? {
            scores = scores.broadcast_add(&m)?;
        }
        // candle's fused softmax is not tracked for backprop (it would
        // silently cut the gradient through q and k), so grad mode composes it.
        let probs = if is_half(&scores) {
            // In f32, as torch's autocast runs softmax.
            candle_nn::ops::softmax(&scores.to_dtype(DType::F32)?, D::Minus1)?
                .to_dtype(scores.dtype())?
        } else if crate::model::grad_mode() {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let ctx = probs.matmul(&v)?; // [B, H, T, D]
        let ctx = ctx.transpose(1, 2)?.reshape((b, t, c))?;
        self.out.forward(&ctx)
    }
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
    pub(crate) act: Activation,
}

impl Mlp {
    pub fn new(fc1: Linear, fc2: Linear, act: Activation) -> Self {
        Self { fc1, fc2, act }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = activate(&self.fc1.forward(x)?, self.act)?;
        self.fc2.forward(&h)
    }

    pub fn quantize_int8(&mut self, src: Int8Source) -> Result<()> {
        self.fc1.quantize_int8(src)?;
        self.fc2.quantize_int8(src)
    }

    pub fn pack(&mut self, bf16: bool) -> Result<()> {
        self.fc1.pack(bf16)?;
        self.fc2.pack(bf16)
    }
}

/// What each query may attend to.
#[derive(Debug, Clone)]
pub enum AttnMask {
    /// Everything (the ViT).
    None,
    /// Itself and earlier positions (CLIP's text tower).
    Causal,
    /// Keys where the 0/1 attention mask [B, T] is 1 (BERT). Holds the
    /// additive form [B, T]: 0, or the dtype's lowest value as transformers uses.
    Padding(Tensor),
}

impl AttnMask {
    pub fn padding(attention_mask: &Tensor) -> Result<Self> {
        let m = attention_mask.to_dtype(DType::F32)?;
        Ok(AttnMask::Padding(((1.0 - m)? * f32::MIN as f64)?))
    }

    /// The mask in the form of the fused softmax.
    fn softmax_mask(&self) -> Result<SoftmaxMask> {
        Ok(match self {
            AttnMask::None => SoftmaxMask::None,
            AttnMask::Causal => SoftmaxMask::Causal,
            AttnMask::Padding(add) => {
                SoftmaxMask::Keys(std::sync::Arc::new(add.flatten_all()?.to_vec1::<f32>()?))
            }
        })
    }

    /// The additive mask for the candle-op path, broadcastable to [B, H, T, T],
    /// in `x`'s dtype.
    fn additive(&self, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(match self {
            AttnMask::None => None,
            AttnMask::Causal => Some(causal_mask(x.dim(1)?, x.device())?.to_dtype(x.dtype())?),
            AttnMask::Padding(add) => {
                let (b, t) = add.dims2()?;
                Some(add.reshape((b, 1, 1, t))?.to_dtype(x.dtype())?)
            }
        })
    }
}

/// A pre-norm transformer block as CLIP's ViT and text towers use it.
#[derive(Debug, Clone)]
pub struct PreNormBlock {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    mlp: Mlp,
}

impl PreNormBlock {
    pub fn new(ln1: LayerNorm, attn: Attention, ln2: LayerNorm, mlp: Mlp) -> Self {
        Self {
            ln1,
            attn,
            ln2,
            mlp,
        }
    }

    pub fn load(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        heads: usize,
        eps: f64,
        act: Activation,
    ) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::load(vb.pp("layer_norm1"), hidden, eps)?,
            attn: Attention::load_clip(vb.pp("self_attn"), hidden, heads)?,
            ln2: LayerNorm::load(vb.pp("layer_norm2"), hidden, eps)?,
            mlp: Mlp::new(
                Linear::load(vb.pp("mlp.fc1"), hidden, intermediate, true)?,
                Linear::load(vb.pp("mlp.fc2"), intermediate, hidden, true)?,
                act,
            ),
        })
    }

    pub fn forward(&self, x: &Tensor, mask: &AttnMask) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        Ok((&x + self.mlp.forward(&self.ln2.forward(&x)?)?)?)
    }
}

/// A layer whose attention and MLP linears can run in int8.
pub(crate) trait Int8Layer {
    fn attn_mlp(&mut self) -> (&mut Attention, &mut Mlp);
    fn attn_mlp_ref(&self) -> (&Attention, &Mlp);
}

impl Int8Layer for PreNormBlock {
    fn attn_mlp(&mut self) -> (&mut Attention, &mut Mlp) {
        (&mut self.attn, &mut self.mlp)
    }
    fn attn_mlp_ref(&self) -> (&Attention, &Mlp) {
        (&self.attn, &self.mlp)
    }
}

/// A tower's stack of transformer layers, whose attention and MLP linears
/// (the towers' GEMMs) can run in int8 or on the packed kernels.
pub(crate) trait LayerStack {
    /// Quantizes every layer's attention and MLP linears.
    fn quantize_int8(&mut self, src: Int8Source) -> Result<()>;
    /// Packs them for the prepacked kernels (f32, or bf16 when `bf16`).
    fn pack(&mut self, bf16: bool) -> Result<()>;
    /// The linears that `quantize_int8` quantizes, by their checkpoint names.
    fn int8_linears(&self) -> Vec<&Linear>;
}

impl<L: Int8Layer> LayerStack for Vec<L> {
    fn quantize_int8(&mut self, src: Int8Source) -> Result<()> {
        for l in self {
            let (attn, mlp) = l.attn_mlp();
            attn.quantize_int8(src)?;
            mlp.quantize_int8(src)?;
        }
        Ok(())
    }

    fn pack(&mut self, bf16: bool) -> Result<()> {
        for l in self {
            let (attn, mlp) = l.attn_mlp();
            attn.pack(bf16)?;
            mlp.pack(bf16)?;
        }
        Ok(())
    }

    fn int8_linears(&self) -> Vec<&Linear> {
        self.iter()
            .flat_map(|l| {
                let (attn, mlp) = l.attn_mlp_ref();
                attn.linears().chain([&mlp.fc1, &mlp.fc2])
            })
            .collect()
    }
}

/// The two bias-free projections into the joint space and the logit scale,
/// named as every dual encoder of transformers names them.
pub fn load_heads(
    vb: &VarBuilder,
    vision_hidden: usize,
    text_hidden: usize,
    projection_dim: usize,
) -> Result<(Linear, Linear, Tensor)> {
    Ok((
        Linear::load(
            vb.pp("visual_projection"),
            vision_hidden,
            projection_dim,
            false,
        )?,
        Linear::load(vb.pp("text_projection"), text_hidden, projection_dim, false)?,
        vb.get((), "logit_scale")?,
    ))
}

/// Additive causal mask [T, T]: 0 on and below the diagonal, -inf above.
pub fn causal_mask(t: usize, device: &candle_core::Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (t, t), device)?)
}

/// The mean of `states` [B, T, C] over the positions where the 0/1 `mask`
/// [B, T] is 1, as sentence-transformers' mean pooling (count clamped at 1e-9).
pub fn masked_mean(states: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(states.dtype())?.unsqueeze(2)?; // [B, T, 1]
    let sum = states.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
    Ok(sum.broadcast_div(&count)?)
}

#[cfg(test)]
#[path = "layers_tests.rs"]
mod tests;
