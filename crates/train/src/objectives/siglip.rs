//! The sigmoid loss of SigLIP (open_clip's `SigLipLoss`).

use candle_core::Tensor;

use super::{eye, logits_per_image, Batch, Objective, Registered};
use crate::Result;

pub const REGISTERED: Registered = Registered {
    name: "siglip",
    aliases: &[],
    build: |_, _| Ok(Box::new(SigLip)),
};

/// log σ(x) = min(x, 0) − log(1 + e^{−|x|}), stable for any x.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_abs = x.abs()?.neg()?;
    let soft = (neg_abs.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0f32)? - soft)?)
}

/// The sigmoid loss of SigLIP (open_clip's `SigLipLoss`): every pair is a
/// binary problem, +1 on the diagonal and −1 off it, summed and divided by
/// the batch size.
pub struct SigLip;

impl Objective for SigLip {
    fn name(&self) -> &str {
        "siglip"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        let mut logits = logits_per_image(b)?;
        if let Some(bias) = b.bias {
            logits = logits.broadcast_add(bias)?;
        }
        let n = logits.dim(0)?;
        let labels = ((eye(n, logits.dtype(), logits.device())? * 2.0)? - 1.0)?;
        let ls = log_sigmoid(&(labels * logits)?)?;
        Ok(ls.sum_all()?.neg()?.affine(1.0 / n as f64, 0.0)?)
    }
    /// open_clip's SigLIP under data parallelism: the rows' images against
    /// every text, summed and divided by the rows' count.
    fn local_loss(&self, b: &Batch, rows: std::ops::Range<usize>) -> Option<Result<Tensor>> {
        let f = || -> Result<Tensor> {
            let (a, len) = (rows.start, rows.len());
            let mut logits = b
                .image
                .narrow(0, a, len)?
                .matmul(&b.text.t()?)?
                .broadcast_mul(&b.log_scale.exp()?)?;
            if let Some(bias) = b.bias {
                logits = logits.broadcast_add(bias)?;
            }
            let n = b.text.dim(0)?;
            let eye = eye(n, logits.dtype(), logits.device())?.narrow(0, a, len)?;
            let labels = ((eye * 2.0)? - 1.0)?;
            let ls = log_sigmoid(&(labels * logits)?)?;
            Ok(ls.sum_all()?.neg()?.affine(1.0 / len as f64, 0.0)?)
        };
        Some(f())
    }
}
