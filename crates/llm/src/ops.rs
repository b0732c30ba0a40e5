//! The llama forward pass's building blocks that have two implementations
//! (fused for inference, differentiable for training), and the rotary tables.

use candle_core::{Device, Tensor};

use super::config::{LlamaConfig, RopeLayout};
use super::linear::{Group, Linear};
use crate::Result;
use clasp_kernels::grad_kernels as gk;

/// Which implementation of the normalisation, rotary and softmax ops a pass
/// uses: candle's fused kernels (inference; they have no backward), or ops
/// with a backward (training): clasp's fused training kernels on f32 CPU
/// tensors (`model::grad_kernels`), compositions of candle ops elsewhere.
/// An `Autograd` pass is a whole causal sequence from position 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ops {
    Fused,
    Autograd,
}

impl Ops {
    pub(super) fn rms_norm(self, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        Ok(match self {
            Ops::Fused => candle_nn::ops::rms_norm(x, w, eps)?,
            Ops::Autograd if gk::applies(x) => gk::rms_norm(x, w, eps)?,
            Ops::Autograd => candle_nn::ops::rms_norm_slow(x, w, eps)?,
        })
    }

    /// `silu(gate) * up`.
    pub(super) fn swiglu(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Ops::Autograd if gk::applies(gate) => gk::swiglu(gate, up)?,
            _ => (candle_nn::ops::silu(gate)? * up)?,
        })
    }

    pub(super) fn rope(
        self,
        layout: RopeLayout,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        use candle_nn::rotary_emb as r;
        Ok(match (self, layout) {
            (Ops::Fused, RopeLayout::Interleaved) => r::rope_i(x, cos, sin)?,
            (Ops::Fused, RopeLayout::Half) => r::rope(x, cos, sin)?,
            (Ops::Autograd, RopeLayout::Interleaved) => r::rope_i_slow(x, cos, sin)?,
            (Ops::Autograd, RopeLayout::Half) => r::rope_slow(x, cos, sin)?,
        })
    }

    pub(super) fn linear(self, l: &Linear, x: &Tensor) -> Result<Tensor> {
        match self {
            Ops::Fused => l.forward(x),
            Ops::Autograd => l.forward_frozen(x),
        }
    }

    pub(super) fn group(self, g: &Group, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Ops::Fused => g.forward(x),
            Ops::Autograd => g.forward_frozen(x),
        }
    }

    pub(super) fn softmax(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Ops::Fused => candle_nn::ops::softmax_last_dim(x)?,
            Ops::Autograd => candle_nn::ops::softmax(x, candle_core::D::Minus1)?,
        })
    }
}

/// q/k projection rows from GGUF's interleaved rotary order back to
/// transformers' rotate-half order.
pub fn interleaved_to_half_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()?)
}

/// The inverse of [`interleaved_to_half_rows`]: transformers' rotate-half
/// row order to GGUF's interleaved one.
pub fn half_to_interleaved_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?
        .contiguous()?)
}

/// cos and sin tables `[max_pos, d/2]`, computed in f32 as transformers does:
/// inv_freq = 1 / theta^(2i/d), angle = (pos / factor) * inv_freq.
pub(super) fn rope_tables(cfg: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / cfg.head_dim as f32))
        .collect();
    let n = cfg.max_position_embeddings;
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        let pos = p as f32 / cfg.rope_linear_factor;
        for f in &inv {
            let a = pos * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}
