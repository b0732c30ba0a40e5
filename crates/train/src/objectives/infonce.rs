//! Symmetric InfoNCE (open_clip's `ClipLoss`), and ALBEF's momentum
//! distillation of it.

use std::ops::Range;

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::{eye, Batch, Objective, Registered};
use crate::{Error, Result};

pub const REGISTERED: Registered = Registered {
    name: "infonce",
    aliases: &["clip"],
    build: |p, _| {
        Ok(if p.momentum.momentum > 0.0 {
            Box::new(DistilledInfoNce {
                alpha: p.momentum.distill_alpha,
            })
        } else {
            Box::new(InfoNce)
        })
    },
};

/// ALBEF's momentum distillation (Li et al. 2021): an EMA copy of the
/// learning towers whose similarities soften the targets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MomentumParams {
    /// The EMA's momentum m (0: off; ALBEF uses 0.995): after every step's
    /// update, teacher = m · teacher + (1 − m) · student.
    pub momentum: f64,
    /// The weight α of the teacher's softmax in the targets (ALBEF: 0.4).
    pub distill_alpha: f64,
}

impl Default for MomentumParams {
    fn default() -> Self {
        Self {
            momentum: 0.0,
            distill_alpha: 0.4,
        }
    }
}

/// Symmetric InfoNCE: the mean of the image→text and text→image
/// cross-entropies with the matching pair as the target (open_clip's
/// `ClipLoss`).
pub struct InfoNce;

impl Objective for InfoNce {
    fn name(&self) -> &str {
        "infonce"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        loss(b, None)
    }
    fn local_loss(&self, b: &Batch, rows: Range<usize>) -> Option<Result<Tensor>> {
        Some(local_loss(b, None, rows))
    }
}

/// InfoNCE under momentum distillation: each row's target is α ·
/// softmax(the momentum towers' similarities at the student's temperature,
/// without a graph) + (1 − α) · the matching pair, as ALBEF's
/// `ALBEF.forward` computes `sim_i2t_targets` (in-batch, without its queue).
/// The momentum towers' features come as the batch's teacher.
pub struct DistilledInfoNce {
    pub alpha: f64,
}

impl Objective for DistilledInfoNce {
    fn name(&self) -> &str {
        "infonce"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        loss(b, Some(self.alpha))
    }
    fn local_loss(&self, b: &Batch, rows: Range<usize>) -> Option<Result<Tensor>> {
        Some(local_loss(b, Some(self.alpha), rows))
    }
}

/// The loss over every row: [`local_loss`] of all of them.
fn loss(b: &Batch, alpha: Option<f64>) -> Result<Tensor> {
    local_loss(b, alpha, 0..b.image.dim(0)?)
}

/// InfoNCE of rows `rows` only (open_clip's `ClipLoss` with `local_loss`;
/// all rows give the batch's loss): those images against every text and
/// those texts against every image, each cross-entropy averaged over the
/// rows, the labels offset by the rows' start. Only the rows' logits are
/// computed.
fn local_loss(b: &Batch, alpha: Option<f64>, rows: Range<usize>) -> Result<Tensor> {
    let (a, len) = (rows.start, rows.len());
    let n = b.image.dim(0)?;
    let scale = b.log_scale.exp()?;
    let side = |q: &Tensor, k: &Tensor| -> Result<Tensor> {
        Ok(q.narrow(0, a, len)?
            .matmul(&k.t()?)?
            .broadcast_mul(&scale)?)
    };
    let (li, lt) = (side(b.image, b.text)?, side(b.text, b.image)?);
    let diag = eye(n, li.dtype(), li.device())?.narrow(0, a, len)?;
    let (ti, tt) = match alpha {
        None => (diag.clone(), diag.clone()),
        Some(alpha) => {
            let t = b.teacher.ok_or_else(|| {
                Error::Report("momentum distillation needs the momentum towers' features".into())
            })?;
            let scale = b.log_scale.detach().exp()?;
            let soft = |q: &Tensor, k: &Tensor| -> Result<Tensor> {
                let s = q
                    .narrow(0, a, len)?
                    .matmul(&k.t()?)?
                    .broadcast_mul(&scale)?;
                let p = candle_nn::ops::softmax(&s.contiguous()?, D::Minus1)?;
                Ok(((p * alpha)? + (&diag * (1.0 - alpha))?)?)
            };
            (soft(t.image, t.text)?, soft(t.text, t.image)?)
        }
    };
    let ce = |l: &Tensor, target: &Tensor| -> Result<Tensor> {
        let lsm = candle_nn::ops::log_softmax(l, D::Minus1)?;
        Ok((lsm * target)?
            .sum_all()?
            .neg()?
            .affine(1.0 / len as f64, 0.0)?)
    };
    Ok(((ce(&li, &ti)? + ce(&lt, &tt)?)? * 0.5)?)
}
