//! Knowledge distillation from a frozen teacher on in-batch similarities.

use candle_core::{Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::{logits_per_image, Batch, Objective, ObjectiveEnv, ObjectiveParams, Registered};
use crate::Result;

pub const REGISTERED: Registered = Registered {
    name: "distill",
    aliases: &[],
    build,
};

fn build(p: &ObjectiveParams, env: &ObjectiveEnv) -> Result<Box<dyn Objective>> {
    let d = &p.distill;
    if d.distill_feature <= 0.0 {
        return Ok(Box::new(Distill::new(d.distill_temp)));
    }
    let teacher_dim = env.teacher_dim.ok_or_else(|| {
        crate::Error::Report("objective `distill` needs a teacher (--teacher CHECKPOINT)".into())
    })?;
    Ok(Box::new(Distill::with_feature(
        d.distill_temp,
        d.distill_feature,
        env.dim,
        teacher_dim,
        env.seed,
        env.device,
    )?))
}

/// Distillation's parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DistillParams {
    /// Distillation temperature T (both similarity distributions are
    /// softened by it; the loss is scaled by T²).
    pub distill_temp: f64,
    /// Weight of distillation's feature-level cosine term (0: off).
    pub distill_feature: f64,
}

impl Default for DistillParams {
    fn default() -> Self {
        Self {
            distill_temp: 1.0,
            distill_feature: 0.0,
        }
    }
}

/// Knowledge distillation on in-batch similarities: with teacher and
/// student logits each exp(own log scale) · image · textᵀ, the loss is
/// T² · ½ (KL(P_t ‖ P_s) over rows + the same over columns), P = softmax(logits
/// / T), each KL summed over a row and averaged over rows (torch's
/// `kl_div(..., reduction="batchmean")`), as Hinton et al. scale it.
///
/// With a `feature` term (weight λ_f and a learned projection W from the
/// student's feature width to the teacher's), it adds
/// λ_f · ½ (mean(1 − cos(W s_img, t_img)) + mean(1 − cos(W s_txt, t_txt))):
/// the student's features are pulled towards the teacher's themselves, not
/// only their similarity structure.
pub struct Distill {
    pub temp: f64,
    pub feature: Option<(f64, Var)>,
}

impl Distill {
    pub fn new(temp: f64) -> Self {
        Self {
            temp,
            feature: None,
        }
    }

    /// With the feature-level term: W [teacher_dim, student_dim] starts as
    /// the identity where the widths agree, else uniform ±1/√student_dim
    /// (torch's `nn.Linear` init) from `seed`.
    pub fn with_feature(
        temp: f64,
        weight: f64,
        student_dim: usize,
        teacher_dim: usize,
        seed: u64,
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let w = if student_dim == teacher_dim {
            Tensor::eye(student_dim, candle_core::DType::F32, dev)?
        } else {
            let bound = 1.0 / (student_dim as f64).sqrt();
            let v = crate::rng::Rng(seed ^ 0x0D15_7111).symmetric(teacher_dim * student_dim, bound);
            Tensor::from_vec(v, (teacher_dim, student_dim), dev)?
        };
        Ok(Self {
            temp,
            feature: Some((weight, Var::from_tensor(&w)?)),
        })
    }
}

impl Objective for Distill {
    fn name(&self) -> &str {
        "distill"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        let t = b.teacher.ok_or_else(|| {
            crate::Error::Report(
                "objective `distill` needs a teacher (--teacher CHECKPOINT)".into(),
            )
        })?;
        let n = b.image.dim(0)? as f64;
        let student = (logits_per_image(b)? / self.temp)?;
        let teacher = (t
            .image
            .matmul(&t.text.t()?)?
            .broadcast_mul(&t.log_scale.exp()?)?
            / self.temp)?
            .detach();
        let kl = |tl: &Tensor, sl: &Tensor| -> Result<Tensor> {
            let lt = candle_nn::ops::log_softmax(tl, D::Minus1)?;
            let ls = candle_nn::ops::log_softmax(sl, D::Minus1)?;
            Ok((lt.exp()? * (lt - ls)?)?.sum_all()?)
        };
        let rows = kl(&teacher, &student)?;
        let cols = kl(&teacher.t()?.contiguous()?, &student.t()?.contiguous()?)?;
        let mut loss = ((rows + cols)? * (0.5 * self.temp * self.temp / n))?;
        if let Some((weight, w)) = &self.feature {
            // 1 − cos(W s, t), t unit-norm already; averaged over the batch.
            let gap = |s: &Tensor, t: &Tensor| -> Result<Tensor> {
                let p = s.matmul(&w.as_tensor().t()?)?;
                let cos = (p.mul(&t.detach())?.sum(1)? / p.sqr()?.sum(1)?.sqrt()?)?;
                Ok((cos.neg()? + 1.0)?.mean_all()?)
            };
            let f = ((gap(b.image, t.image)? + gap(b.text, t.text)?)? * (0.5 * weight))?;
            loss = (loss + f)?;
        }
        Ok(loss)
    }
    fn vars(&self) -> Vec<(String, Var)> {
        self.feature
            .iter()
            .map(|(_, w)| ("distill.projection.weight".to_string(), w.clone()))
            .collect()
    }
}
