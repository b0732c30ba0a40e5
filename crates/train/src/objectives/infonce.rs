//! Symmetric InfoNCE (open_clip's `ClipLoss`), and ALBEF's momentum
//! distillation of it.

use candle_core::{Tensor, D};
use serde::{Deserialize, Serialize};

use super::{eye, logits_per_image, Batch, Objective, Registered};
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
}

fn loss(b: &Batch, alpha: Option<f64>) -> Result<Tensor> {
    let logits = logits_per_image(b)?;
    let n = logits.dim(0)?;
    let diag = eye(n, logits.dtype(), logits.device())?;
    let (ti, tt) = match alpha {
        None => (diag.clone(), diag.clone()),
        Some(alpha) => {
            let t = b.teacher.ok_or_else(|| {
                Error::Report("momentum distillation needs the momentum towers' features".into())
            })?;
            let scale = b.log_scale.detach().exp()?;
            let sim = t.image.matmul(&t.text.t()?)?.broadcast_mul(&scale)?;
            let soft = |s: &Tensor| -> Result<Tensor> {
                let p = candle_nn::ops::softmax(&s.contiguous()?, D::Minus1)?;
                Ok(((p * alpha)? + (&diag * (1.0 - alpha))?)?)
            };
            (soft(&sim)?, soft(&sim.t()?)?)
        }
    };
    let ce = |l: &Tensor, target: &Tensor| -> Result<Tensor> {
        let lsm = candle_nn::ops::log_softmax(l, D::Minus1)?;
        Ok((lsm * target)?
            .sum_all()?
            .neg()?
            .affine(1.0 / n as f64, 0.0)?)
    };
    let li = ce(&logits, &ti)?;
    let lt = ce(&logits.t()?.contiguous()?, &tt)?;
    Ok(((li + lt)? * 0.5)?)
}
