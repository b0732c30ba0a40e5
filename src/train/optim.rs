//! AdamW with decoupled weight decay over two parameter groups, a cosine
//! schedule with warmup, global grad-norm clipping and CLIP's temperature
//! clamp.
//!
//! Decay is applied to weight matrices only. Excluded, as open_clip does:
//! tensors with fewer than two dimensions, norms, biases and `logit_scale`;
//! and, as this project specifies, token, position and class embeddings.

use candle_core::backprop::GradStore;
use candle_core::Var;
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

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

/// AdamW over a decay group and a no-decay group (candle-nn's AdamW, which
/// computes torch's update: θ ← θ(1 − lr·wd) − lr·m̂/(√v̂ + ε)).
pub struct GroupedAdamW {
    decay: AdamW,
    plain: AdamW,
    log_scale: Option<Var>,
}

impl GroupedAdamW {
    pub fn new(vars: &[(String, Var)], cfg: AdamWConfig) -> Result<Self> {
        let (mut d, mut p) = (Vec::new(), Vec::new());
        let mut log_scale = None;
        for (name, v) in vars {
            if name == "logit_scale" {
                log_scale = Some(v.clone());
            }
            if no_decay(name, v.rank()) {
                p.push(v.clone());
            } else {
                d.push(v.clone());
            }
        }
        let params = |wd: f64| ParamsAdamW {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: wd,
        };
        Ok(Self {
            decay: AdamW::new(d, params(cfg.weight_decay))?,
            plain: AdamW::new(p, params(0.0))?,
            log_scale,
        })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.decay.set_learning_rate(lr);
        self.plain.set_learning_rate(lr);
    }

    /// One update, then the temperature clamp to [0, ln 100].
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.decay.step(grads)?;
        self.plain.step(grads)?;
        if let Some(s) = &self.log_scale {
            let clamped = s.as_tensor().clamp(0f32, MAX_LOG_SCALE as f32)?;
            s.set(&clamped)?;
        }
        Ok(())
    }
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
