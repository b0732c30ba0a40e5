//! Contrastive objectives, written with candle ops so they differentiate.
//!
//! Both follow open_clip (`open_clip/loss.py`): `ClipLoss` for symmetric
//! InfoNCE and `SigLipLoss` for the sigmoid loss, on L2-normalised features
//! with the temperature kept as a log scale (`logit_scale`, exponentiated
//! here, as CLIPModel does). Objectives are pluggable through [`Objective`]
//! and combine with weights through [`Combined`].

use candle_core::{DType, Device, Tensor, D};

use crate::Result;

/// What an objective sees of one batch.
pub struct Batch<'a> {
    /// L2-normalised image features [B, P].
    pub image: &'a Tensor,
    /// L2-normalised text features [B, P]; row i pairs with image row i.
    pub text: &'a Tensor,
    /// The learnable log temperature (a scalar).
    pub log_scale: &'a Tensor,
    /// SigLIP's learnable bias (a scalar), when the model has one.
    pub bias: Option<&'a Tensor>,
}

pub trait Objective: Send + Sync {
    fn name(&self) -> &str;
    /// The loss of a batch (a scalar tensor).
    fn loss(&self, b: &Batch) -> Result<Tensor>;
}

fn eye(n: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::eye(n, dtype, dev)?)
}

/// exp(log_scale) · image · textᵀ, as `logits_per_image`.
pub fn logits_per_image(b: &Batch) -> Result<Tensor> {
    let scale = b.log_scale.exp()?;
    Ok(b.image.matmul(&b.text.t()?)?.broadcast_mul(&scale)?)
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
}

/// A weighted sum of objectives.
pub struct Combined {
    pub parts: Vec<(f64, Box<dyn Objective>)>,
}

impl Objective for Combined {
    fn name(&self) -> &str {
        "combined"
    }
    fn loss(&self, b: &Batch) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for (w, o) in &self.parts {
            let l = (o.loss(b)? * *w)?;
            total = Some(match total {
                None => l,
                Some(t) => (t + l)?,
            });
        }
        total.ok_or_else(|| crate::Error::Report("no objective configured".into()))
    }
}

/// Parses `name[:weight],...` (e.g. `infonce,siglip:0.5`).
pub fn parse_objectives(spec: &str) -> Result<Combined> {
    let mut parts: Vec<(f64, Box<dyn Objective>)> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, w) = match item.split_once(':') {
            Some((n, w)) => (
                n,
                w.parse::<f64>().map_err(|_| {
                    crate::Error::Report(format!(
                        "objective `{item}`: weight `{w}` is not a number"
                    ))
                })?,
            ),
            None => (item, 1.0),
        };
        let o: Box<dyn Objective> = match name {
            "infonce" | "clip" => Box::new(InfoNce),
            "siglip" => Box::new(SigLip),
            other => {
                return Err(crate::Error::Report(format!(
                    "unknown objective `{other}` (available: infonce, siglip)"
                )))
            }
        };
        parts.push((w, o));
    }
    if parts.is_empty() {
        return Err(crate::Error::Report("no objective given".into()));
    }
    Ok(Combined { parts })
}
