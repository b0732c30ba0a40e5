//! Dynamic Anchoring Alignment (DAA). Its weights are computed from detached
//! features: they say which rows count more, and are not themselves trained
//! (with a gradient through them the model could lower the loss by moving the
//! weights onto easy rows).

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::{logits_per_image, Batch, Objective, Registered};
use crate::Result;

pub const REGISTERED: Registered = Registered {
    name: "daa",
    aliases: &[],
    build: |p, _| {
        Ok(Box::new(Daa {
            temp: p.daa.daa_temp,
        }))
    },
};

/// DAA's parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DaaParams {
    /// DAA's weighting temperature τ_w.
    pub daa_temp: f64,
}

impl Default for DaaParams {
    fn default() -> Self {
        Self { daa_temp: 0.05 }
    }
}

/// Row-wise per-pair cross-entropy of `logits` against the diagonal:
/// −log_softmax(logits)[i, i], shape [n].
fn diagonal_nll(logits: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let eye = Tensor::eye(n, logits.dtype(), logits.device())?;
    Ok((candle_nn::ops::log_softmax(logits, D::Minus1)? * eye)?
        .sum(1)?
        .neg()?)
}

/// DAA's per-pair weights: w = n · softmax((1 − cos(image_i, anchor)) / τ_w)
/// with the anchor the mean of the batch's text features; detached.
pub fn daa_weights(image: &Tensor, text: &Tensor, temp: f64) -> Result<Tensor> {
    let (image, text) = (image.detach(), text.detach());
    let n = image.dim(0)?;
    let anchor = text.mean_keepdim(0)?; // [1, P]
    let dots = image.broadcast_mul(&anchor)?.sum(1)?; // [n]
    let norms = (image.sqr()?.sum(1)?.sqrt()?
        * anchor.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64)?;
    // As torch's cosine_similarity: the norms' product is clamped at 1e-8.
    let cos = (dots / norms.clamp(1e-8f32, f32::MAX)?)?;
    let z = ((cos.neg()? + 1.0)? / temp)?;
    Ok((candle_nn::ops::softmax(&z, 0)? * n as f64)?)
}

/// Dynamic Anchoring Alignment: symmetric InfoNCE with each pair's two terms
/// weighted by [`daa_weights`].
pub struct Daa {
    pub temp: f64,
}

impl Objective for Daa {
    fn name(&self) -> &str {
        "daa"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        let n = b.image.dim(0)? as f64;
        let w = daa_weights(b.image, b.text, self.temp)?;
        let logits = logits_per_image(b)?;
        let li = (diagonal_nll(&logits)? * &w)?.sum_all()?;
        let lt = (diagonal_nll(&logits.t()?.contiguous()?)? * &w)?.sum_all()?;
        Ok(((li + lt)? * (0.5 / n))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn daa_weights_are_uniform_when_every_image_is_equally_far_from_the_anchor() {
        // Images on orthogonal axes, texts symmetric: every cosine is equal.
        let img = Tensor::eye(4, DType::F32, &Device::Cpu).unwrap();
        let txt = Tensor::ones((4, 4), DType::F32, &Device::Cpu).unwrap();
        let w: Vec<f32> = daa_weights(&img, &txt, 0.05).unwrap().to_vec1().unwrap();
        for v in w {
            assert!((v - 1.0).abs() < 1e-6, "{v}");
        }
    }
}
