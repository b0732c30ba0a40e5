//! AdamW with decoupled weight decay over two parameter groups, a cosine
//! schedule with warmup, global grad-norm clipping and CLIP's temperature
//! clamp.
//!
//! Decay is applied to weight matrices only. Excluded, as open_clip does:
//! tensors with fewer than two dimensions, norms, biases and `logit_scale`;
//! and, as this project specifies, token, position and class embeddings.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::Result;

/// ln(100): CLIP clamps the log temperature here.
pub const MAX_LOG_SCALE: f64 = 4.605170185988092;

/// Whether a parameter is exempt from weight decay.
pub fn no_decay(name: &str, ndim: usize) -> bool {
    ndim < 2
        || name.ends_with(".bias")
        || name.contains("layer_norm")
        || name.contains("layernorm")
        || name.contains("LayerNorm")
        || name.contains("logit_scale")
        || name.contains("logit_bias")
        || name.contains("token_embedding")
        || name.contains("position_embedding")
        || name.contains("word_embeddings")
        || name.contains("token_type_embeddings")
        || name.contains("class_embedding")
}

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// open_clip's defaults for ViT models.
    fn default() -> Self {
        Self {
            lr: 5e-4,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
        }
    }
}

/// AdamW with two parameter groups (decay and no decay), computing torch's
/// update: θ ← θ(1 − lr·wd); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
/// θ ← θ − (lr/(1−β₁ᵗ))·m / (√v/√(1−β₂ᵗ) + ε).
///
/// Written here rather than taken from candle-nn because candle-nn's AdamW
/// keeps its moments private, and a resumable training state must save and
/// restore them.
pub struct GroupedAdamW {
    params: Vec<Param>,
    cfg: AdamWConfig,
    lr: f64,
    step_t: usize,
    log_scale: Option<Var>,
}

struct Param {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    /// The moments of CPU f32 parameters, updated in place by one fused pass
    /// (`m`/`v` above are then unused until [`GroupedAdamW::state`]).
    cpu: Option<(Vec<f32>, Vec<f32>)>,
    decay: bool,
}

/// Whether the fused CPU update applies to this parameter.
fn fused_cpu(v: &Var) -> bool {
    let t = v.as_tensor();
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
}

impl GroupedAdamW {
    pub fn new(vars: &[(String, Var)], cfg: AdamWConfig) -> Result<Self> {
        let mut params = Vec::new();
        let mut log_scale = None;
        for (name, v) in vars {
            if name == "logit_scale" {
                log_scale = Some(v.clone());
            }
            let n = v.as_tensor().elem_count();
            params.push(Param {
                name: name.clone(),
                var: v.clone(),
                m: v.as_tensor().zeros_like()?,
                v: v.as_tensor().zeros_like()?,
                cpu: fused_cpu(v).then(|| (vec![0f32; n], vec![0f32; n])),
                decay: !no_decay(name, v.rank()),
            });
        }
        Ok(Self {
            params,
            cfg,
            lr: cfg.lr,
            step_t: 0,
            log_scale,
        })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    pub fn steps(&self) -> usize {
        self.step_t
    }

    /// One update, then the temperature clamp to [0, ln 100].
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let c = self.cfg;
        let t = self.step_t as i32;
        let step_size = self.lr / (1.0 - c.beta1.powi(t));
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            if let Some((m, v)) = &mut p.cpu {
                let g = g.contiguous()?;
                let gv = crate::model::cpu_kernels::F32View::new(&g)?;
                let theta = p.var.as_tensor();
                let tv = crate::model::cpu_kernels::F32View::new(theta)?;
                let wd = if p.decay { c.weight_decay } else { 0.0 };
                let new = adamw_cpu(
                    tv.as_slice(),
                    gv.as_slice(),
                    m,
                    v,
                    self.lr,
                    wd,
                    c,
                    step_size,
                    bc2_sqrt,
                );
                drop(tv);
                p.var
                    .set(&Tensor::from_vec(new, theta.shape(), theta.device())?)?;
                continue;
            }
            let mut theta = p.var.as_tensor().detach();
            if p.decay && c.weight_decay != 0.0 {
                theta = (theta * (1.0 - self.lr * c.weight_decay))?;
            }
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((p.v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let update = ((&p.m / denom)? * step_size)?;
            p.var.set(&(theta - update)?)?;
        }
        if let Some(s) = &self.log_scale {
            let clamped = s.as_tensor().clamp(0f32, MAX_LOG_SCALE as f32)?;
            s.set(&clamped)?;
        }
        Ok(())
    }

    /// The optimiser state for a resumable checkpoint: both moments of every
    /// parameter, by name.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            let (m, v) = match &p.cpu {
                Some((m, v)) => {
                    let shape = p.var.as_tensor().shape();
                    let dev = p.var.as_tensor().device();
                    (
                        Tensor::from_vec(m.clone(), shape, dev).expect("moment shape"),
                        Tensor::from_vec(v.clone(), shape, dev).expect("moment shape"),
                    )
                }
                None => (p.m.clone(), p.v.clone()),
            };
            out.push((format!("m.{}", p.name), m));
            out.push((format!("v.{}", p.name), v));
        }
        out
    }

    /// Restores [`Self::state`] and the step count.
    pub fn load_state(
        &mut self,
        state: &std::collections::HashMap<String, Tensor>,
        steps: usize,
    ) -> Result<()> {
        for p in &mut self.params {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| crate::Error::Report(format!("training state lacks `{k}`")))
            };
            p.m = get(format!("m.{}", p.name))?;
            p.v = get(format!("v.{}", p.name))?;
            if let Some((m, v)) = &mut p.cpu {
                *m = p.m.flatten_all()?.to_vec1::<f32>()?;
                *v = p.v.flatten_all()?.to_vec1::<f32>()?;
            }
        }
        self.step_t = steps;
        Ok(())
    }
}

/// One fused pass of torch's AdamW over a CPU parameter: updates the moments
/// in place and returns the new weights. The arithmetic is torch's, in f32
/// with f64 scalars, element by element.
#[allow(clippy::too_many_arguments)]
fn adamw_cpu(
    theta: &[f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f64,
    wd: f64,
    c: AdamWConfig,
    step_size: f64,
    bc2_sqrt: f64,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; theta.len()];
    let decay = (1.0 - lr * wd) as f32;
    let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
    let (ob1, ob2) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
    let (ss, bc2, eps) = (step_size as f32, bc2_sqrt as f32, c.eps as f32);
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(ci, ((o, m), v))| {
            let base = ci * CHUNK;
            for i in 0..o.len() {
                let gi = g[base + i];
                m[i] = b1 * m[i] + ob1 * gi;
                v[i] = b2 * v[i] + ob2 * gi * gi;
                let denom = v[i].sqrt() / bc2 + eps;
                o[i] = theta[base + i] * decay - ss * (m[i] / denom);
            }
        });
    out
}

/// The global L2 norm of all gradients; when above `max_norm`, every
/// gradient is scaled by max_norm / norm (torch's clip_grad_norm_, with its
/// 1e-6 guard). Returns the norm before clipping.
pub fn clip_grad_norm(vars: &[(String, Var)], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let coef = max_norm / (norm + 1e-6);
        for (_, v) in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * coef)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// open_clip's cosine schedule: linear warmup to `base` over `warmup` steps,
/// then a half cosine to 0 at `total`.
pub fn cosine_lr(step: usize, base: f64, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let e = (step - warmup) as f64;
    let es = (total.saturating_sub(warmup)).max(1) as f64;
    0.5 * (1.0 + (std::f64::consts::PI * e / es).cos()) * base
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_and_decay_groups() {
        assert!((cosine_lr(0, 1.0, 10, 100) - 0.1).abs() < 1e-12);
        assert!((cosine_lr(9, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(10, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(55, 1.0, 10, 100) - 0.5).abs() < 1e-12);
        assert!(cosine_lr(100, 1.0, 10, 100).abs() < 1e-12);
        assert!(no_decay("text_model.embeddings.token_embedding.weight", 2));
        assert!(no_decay("vision_model.pre_layrnorm.weight", 1));
        assert!(no_decay("logit_scale", 0));
        assert!(!no_decay(
            "vision_model.embeddings.patch_embedding.weight",
            4
        ));
        assert!(!no_decay(
            "text_model.encoder.layers.0.self_attn.q_proj.weight",
            2
        ));
    }
}
