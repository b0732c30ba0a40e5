//! Symmetric InfoNCE (open_clip's `ClipLoss`).

use candle_core::{Tensor, D};

use super::{eye, logits_per_image, Batch, Objective, Registered};
use crate::Result;

pub const REGISTERED: Registered = Registered {
    name: "infonce",
    aliases: &["clip"],
    build: |_, _| Ok(Box::new(InfoNce)),
};

/// Symmetric InfoNCE: the mean of the image→text and text→image
/// cross-entropies with the matching pair as the target (open_clip's
/// `ClipLoss`).
pub struct InfoNce;

impl Objective for InfoNce {
    fn name(&self) -> &str {
        "infonce"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        let logits = logits_per_image(b)?;
        let n = logits.dim(0)?;
        let diag = eye(n, logits.dtype(), logits.device())?;
        let ce = |l: &Tensor| -> Result<Tensor> {
            let lsm = candle_nn::ops::log_softmax(l, D::Minus1)?;
            Ok((lsm * &diag)?
                .sum_all()?
                .neg()?
                .affine(1.0 / n as f64, 0.0)?)
        };
        let li = ce(&logits)?;
        let lt = ce(&logits.t()?.contiguous()?)?;
        Ok(((li + lt)? * 0.5)?)
    }
}
