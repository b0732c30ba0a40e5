//! Alignment objectives from the seed documents that work on one batch's
//! features: Dynamic Anchoring Alignment (DAA), VSE++ triplet ranking with
//! hard in-batch negatives, and the BCIF paper's geometric consistency loss.
//!
//! Each is written from its formula (see the issue text quoted in the doc
//! comments); `scripts/gen_objective_fixtures.py` writes the same formulas in
//! torch, and `tests/train_parity.rs` holds values and gradients to 1e-5.
//!
//! Choices the formulas leave open, made the same way in the reference:
//! - DAA's weights are computed from detached features: they say which rows
//!   count more, and are not themselves trained (with a gradient through them
//!   the model could lower the loss by moving the weights onto easy rows).
//! - Hard negatives are picked on detached similarities (ties go to the lowest
//!   index, as torch's `max` does); the gradient then flows through the
//!   picked similarities only, as through torch's `max`/`topk`.
//! - Triplet and geometric losses use cosine similarities (no temperature).

use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::loss::{logits_per_image, Batch, Objective};
use crate::Result;

/// Tunables of the objectives (config keys of the same names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ObjectiveParams {
    /// DAA's weighting temperature τ_w.
    pub daa_temp: f64,
    /// VSE++ margin.
    pub triplet_margin: f64,
    /// `max`: the hardest negative (VSE++'s max-violation); `sum`: all.
    pub triplet_mode: TripletMode,
    /// Geometric consistency margin.
    pub geometric_margin: f64,
    /// How many hardest negatives the geometric loss takes per anchor.
    pub geometric_k: usize,
    /// Distillation temperature T (both similarity distributions are
    /// softened by it; the loss is scaled by T²).
    pub distill_temp: f64,
    /// Weight of distillation's feature-level cosine term (0: off).
    pub distill_feature: f64,
    /// The adversarial discriminator's settings.
    #[serde(flatten)]
    pub adv: super::adversarial::AdvParams,
}

impl Default for ObjectiveParams {
    fn default() -> Self {
        Self {
            daa_temp: 0.05,
            triplet_margin: 0.2,
            triplet_mode: TripletMode::Max,
            geometric_margin: 0.3,
            geometric_k: 3,
            distill_temp: 1.0,
            distill_feature: 0.0,
            adv: Default::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TripletMode {
    Max,
    Sum,
}

impl std::str::FromStr for TripletMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "max" => Ok(Self::Max),
            "sum" => Ok(Self::Sum),
            o => Err(format!("triplet mode `{o}`: expected max or sum")),
        }
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

/// 0/1 masks over `scores` [n, n] that mark, in each row and in each column,
/// the `k` largest off-diagonal entries; ties go to the lower index. Read
/// from one copy of the scores.
fn hardest_masks(scores: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let n = scores.dim(0)?;
    let s: Vec<Vec<f32>> = scores.detach().to_dtype(DType::F32)?.to_vec2()?;
    let mask = |by_row: bool| -> Result<Tensor> {
        let mut m = vec![0f32; n * n];
        for a in 0..n {
            let at = |o: usize| if by_row { s[a][o] } else { s[o][a] };
            let mut others: Vec<usize> = (0..n).filter(|&o| o != a).collect();
            // Stable sort: equal scores keep index order.
            others.sort_by(|&x, &y| at(y).total_cmp(&at(x)));
            for &o in others.iter().take(k) {
                m[if by_row { a * n + o } else { o * n + a }] = 1.0;
            }
        }
        Ok(Tensor::from_vec(m, (n, n), scores.device())?.to_dtype(scores.dtype())?)
    };
    Ok((mask(true)?, mask(false)?))
}

/// Hinge costs of every (anchor, negative) pair, both directions:
/// `[image anchors: margin + s[i, j] − s[i, i], text anchors: margin + s[i, j] − s[j, j]]`,
/// each clamped at 0. Diagonal entries are not negatives: callers mask them.
fn hinge_costs(s: &Tensor, margin: f64) -> Result<(Tensor, Tensor)> {
    let n = s.dim(0)?;
    let d = (s * Tensor::eye(n, s.dtype(), s.device())?)?.sum(1)?; // the positives, [n]
    let by_image = (s.broadcast_sub(&d.reshape((n, 1))?)? + margin)?.relu()?;
    let by_text = (s.broadcast_sub(&d.reshape((1, n))?)? + margin)?.relu()?;
    Ok((by_image, by_text))
}

/// The hinge costs of each anchor's `k` hardest negatives, image anchors
/// (rows of `s`) and text anchors (columns), summed. Hardest by cost is
/// hardest by similarity within an anchor.
fn hardest_hinge_sum(s: &Tensor, margin: f64, k: usize) -> Result<Tensor> {
    let (by_image, by_text) = hinge_costs(s, margin)?;
    let (mi, mt) = hardest_masks(s, k)?;
    Ok(((by_image * mi)?.sum_all()? + (by_text * mt)?.sum_all()?)?)
}

/// VSE++ (Faghri et al.): a hinge with a margin between each positive pair
/// and its negatives, in both directions: image anchors against other
/// captions, caption anchors against other images. `Max` takes the hardest
/// negative per anchor (max-violation), `Sum` all of them. The sum over
/// anchors is divided by the batch size, so the weight means the same at any
/// batch size.
pub struct Triplet {
    pub margin: f64,
    pub mode: TripletMode,
}

impl Objective for Triplet {
    fn name(&self) -> &str {
        "triplet"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        let s = b.image.matmul(&b.text.t()?)?;
        let n = s.dim(0)?;
        let k = match self.mode {
            TripletMode::Max => 1,
            TripletMode::Sum => n,
        };
        let total = hardest_hinge_sum(&s, self.margin, k)?;
        Ok((total / n as f64)?)
    }
}

/// The BCIF paper's geometric consistency loss: mean(max(0, s_neg − s_pos +
/// margin)) over the `k` hardest in-batch negatives of each anchor, image
/// anchors and text anchors alike. A batch of one has no negatives: 0.
pub struct Geometric {
    pub margin: f64,
    pub k: usize,
}

impl Objective for Geometric {
    fn name(&self) -> &str {
        "geometric"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        let s = b.image.matmul(&b.text.t()?)?;
        let n = s.dim(0)?;
        let k = self.k.min(n.saturating_sub(1));
        if k == 0 {
            // Keeps the graph, so every feature gets a (zero) gradient.
            return Ok((s.sum_all()? * 0.0)?);
        }
        let total = hardest_hinge_sum(&s, self.margin, k)?;
        Ok((total / (2 * n * k) as f64)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hardest_mask_picks_the_largest_off_diagonal_with_ties_to_the_lower_index() {
        let s = Tensor::new(
            &[
                [9f32, 1., 1., 0.],
                [5., 9., 2., 5.],
                [0., 3., 9., 3.],
                [1., 1., 1., 1.],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let m: Vec<Vec<f32>> = hardest_masks(&s, 1).unwrap().0.to_vec2().unwrap();
        assert_eq!(
            m,
            vec![
                vec![0., 1., 0., 0.],
                vec![1., 0., 0., 0.],
                vec![0., 1., 0., 0.],
                vec![1., 0., 0., 0.]
            ]
        );
        let c: Vec<Vec<f32>> = hardest_masks(&s, 2).unwrap().1.to_vec2().unwrap();
        // Column 0 (rows 1,2,3 hold 5, 0, 1): rows 1 and 3.
        assert_eq!((c[1][0], c[2][0], c[3][0]), (1., 0., 1.));
        for (j, row) in c.iter().enumerate() {
            assert_eq!(row[j], 0.);
        }
        for j in 0..4 {
            assert_eq!(c.iter().map(|row| row[j]).sum::<f32>(), 2.);
        }
    }

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
