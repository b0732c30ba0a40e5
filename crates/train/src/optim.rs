//! AdamW with decoupled weight decay over two parameter groups, a cosine
//! schedule with warmup, global grad-norm clipping and CLIP's temperature
//! clamp.
//!
//! Decay is applied to weight matrices only. Excluded, as open_clip does:
//! tensors with fewer than two dimensions, norms, biases and `logit_scale`;
//! and, as this project specifies, token, position and class embeddings.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

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
    /// This parameter's learning rate over the schedule's (1: the same).
    lr_scale: f64,
}

/// Whether the fused CPU update applies to this parameter.
fn fused_cpu(v: &Var) -> bool {
    let t = v.as_tensor();
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
}

impl GroupedAdamW {
    /// A run's optimiser: AdamW at the config's learning rate and weight
    /// decay over `vars`, with the moments of a resumed run (`saved`, at
    /// `step`).
    pub fn for_run(
        vars: &[(String, Var)],
        cfg: &super::config::TrainConfig,
        saved: Option<&std::collections::HashMap<String, Tensor>>,
        step: usize,
    ) -> Result<Self> {
        let mut opt = Self::new(
            vars,
            AdamWConfig {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..AdamWConfig::default()
            },
        )?;
        if let Some(s) = saved {
            opt.load_state(s, step)?;
        }
        Ok(opt)
    }

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
                lr_scale: 1.0,
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

    /// Gives the parameters whose names `pick` selects a learning rate of
    /// `scale` times the schedule's (a pretrained text tower fine-tuned more
    /// gently than the new heads above it, for one).
    pub fn scale_lr(&mut self, pick: impl Fn(&str) -> bool, scale: f64) {
        for p in &mut self.params {
            if pick(&p.name) {
                p.lr_scale = scale;
            }
        }
    }

    pub fn steps(&self) -> usize {
        self.step_t
    }

    /// One update, then the temperature clamp to [0, ln 100].
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let c = self.cfg;
        let t = self.step_t as i32;
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let lr = self.lr * p.lr_scale;
            let step_size = lr / (1.0 - c.beta1.powi(t));
            if let Some((m, v)) = &mut p.cpu {
                let g = g.contiguous()?;
                let gv = clasp_core::model::cpu_kernels::F32View::new(&g)?;
                let theta = p.var.as_tensor();
                let tv = clasp_core::model::cpu_kernels::F32View::new(theta)?;
                let wd = if p.decay { c.weight_decay } else { 0.0 };
                let new = adamw_cpu(
                    tv.as_slice(),
                    gv.as_slice(),
                    m,
                    v,
                    lr,
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
                theta = (theta * (1.0 - lr * c.weight_decay))?;
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

#[path = "optim/backward.rs"]
mod backward;
pub use backward::backward_step;

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

/// The parameter groups that per-module clipping and the gradient-conflict
/// probe address, by checkpoint name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamGroup {
    Vision,
    Text,
    Proj,
}

impl ParamGroup {
    pub const ALL: [ParamGroup; 3] = [Self::Vision, Self::Text, Self::Proj];

    /// The group of a parameter; None for the temperature and SigLIP's bias.
    pub fn of(name: &str) -> Option<Self> {
        if name.starts_with("vision_model.") {
            Some(Self::Vision)
        } else if name.starts_with("text_model.") {
            Some(Self::Text)
        } else if name.starts_with("visual_projection.") || name.starts_with("text_projection.") {
            Some(Self::Proj)
        } else {
            None
        }
    }

    pub fn members(self, vars: &[(String, Var)]) -> Vec<(String, Var)> {
        vars.iter()
            .filter(|(n, _)| Self::of(n) == Some(self))
            .cloned()
            .collect()
    }
}

impl std::str::FromStr for ParamGroup {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "vision" => Ok(Self::Vision),
            "text" => Ok(Self::Text),
            "proj" | "projections" => Ok(Self::Proj),
            o => Err(format!(
                "parameter group `{o}`: expected vision, text or proj"
            )),
        }
    }
}

/// Per-module clipping: each group's gradient norm is clipped to its own
/// max-norm (0: that group is left alone), as `clip_grad_norm_` on the
/// group's parameters. Returns the groups' norms before clipping.
pub fn clip_group_norms(
    vars: &[(String, Var)],
    grads: &mut GradStore,
    max_norms: &[(ParamGroup, f64)],
) -> Result<Vec<(ParamGroup, f64)>> {
    let mut norms = Vec::new();
    for &(g, max) in max_norms {
        if max > 0.0 {
            norms.push((g, clip_grad_norm(&g.members(vars), grads, max)?));
        }
    }
    Ok(norms)
}

/// The cosine between two gradients over `vars` (0 when either is zero).
pub fn grad_cosine(vars: &[(String, Var)], a: &GradStore, b: &GradStore) -> Result<f64> {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (_, v) in vars {
        let flat = |g: &GradStore| -> Result<Option<Vec<f32>>> {
            Ok(match g.get(v.as_tensor()) {
                Some(t) => Some(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?),
                None => None,
            })
        };
        let (x, y) = (flat(a)?, flat(b)?);
        let sumsq = |g: &[f32]| g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        na += x.as_deref().map_or(0.0, sumsq);
        nb += y.as_deref().map_or(0.0, sumsq);
        if let (Some(x), Some(y)) = (&x, &y) {
            dot += x
                .iter()
                .zip(y)
                .map(|(p, q)| *p as f64 * *q as f64)
                .sum::<f64>();
        }
    }
    Ok(if na > 0.0 && nb > 0.0 {
        dot / (na.sqrt() * nb.sqrt())
    } else {
        0.0
    })
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

    /// A parameter whose learning rate is scaled by k moves, over several
    /// steps with weight decay, exactly as under an optimiser whose base
    /// rate is k times smaller; the other parameters keep the base rate.
    #[test]
    fn a_scaled_group_steps_as_at_the_scaled_rate() {
        let dev = candle_core::Device::Cpu;
        let var = |seed: f32| {
            let v: Vec<f32> = (0..6).map(|i| seed + i as f32 * 0.3).collect();
            Var::from_tensor(&Tensor::from_vec(v, (2, 3), &dev).unwrap()).unwrap()
        };
        let run = |lr: f64, scale: Option<f64>| -> (Vec<f32>, Vec<f32>) {
            let (a, b) = (var(0.5), var(-1.0));
            let vars = vec![
                ("text_model.w".to_string(), a.clone()),
                ("text_projection.weight".to_string(), b.clone()),
            ];
            let cfg = AdamWConfig {
                lr,
                weight_decay: 0.1,
                ..AdamWConfig::default()
            };
            let mut opt = GroupedAdamW::new(&vars, cfg).unwrap();
            if let Some(k) = scale {
                opt.scale_lr(|n| n.starts_with("text_model."), k);
            }
            for step in 0..3 {
                let loss = ((a.as_tensor() * (step as f64 + 1.0))
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    + b.as_tensor().sqr().unwrap().sum_all().unwrap())
                .unwrap();
                opt.step(&loss.backward().unwrap()).unwrap();
            }
            let flat = |v: &Var| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            (flat(&a), flat(&b))
        };
        let (scaled_a, scaled_b) = run(1e-2, Some(0.25));
        let (slow_a, _) = run(2.5e-3, None);
        let (_, base_b) = run(1e-2, None);
        for (x, y) in scaled_a.iter().zip(&slow_a) {
            assert!((x - y).abs() < 1e-7, "{x} vs {y}");
        }
        assert_eq!(scaled_b, base_b);
    }

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

    /// Each group ends at min(its norm, its max-norm), groups with 0 and
    /// parameters outside every group are untouched; the cosine probe sees
    /// parallel, opposite and orthogonal gradients as 1, −1 and 0.
    #[test]
    fn group_clipping_and_the_conflict_cosine() {
        use candle_core::Device;
        let dev = Device::Cpu;
        let var = |v: &[f32]| Var::from_slice(v, v.len(), &dev).unwrap();
        let vars: Vec<(String, Var)> = [
            ("vision_model.a.weight", var(&[3.0, 4.0])),
            ("vision_model.b.bias", var(&[12.0])),
            ("text_model.a.weight", var(&[0.3, 0.4])),
            ("visual_projection.weight", var(&[6.0, 8.0])),
            ("logit_scale", var(&[100.0])),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
        // GradStore has no public constructor: a backward pass of
        // Σ v·c gives the gradient c for each variable.
        let store = |pairs: &[(&Var, Tensor)]| -> GradStore {
            let mut total = Tensor::zeros((), candle_core::DType::F32, &dev).unwrap();
            for (v, c) in pairs {
                total = (total + (v.as_tensor() * c).unwrap().sum_all().unwrap()).unwrap();
            }
            total.backward().unwrap()
        };
        let own: Vec<(&Var, Tensor)> = vars
            .iter()
            .map(|(_, v)| (v, v.as_tensor().detach()))
            .collect();
        let mut grads = store(&own);
        let norm = |g: &GradStore, grp: ParamGroup| -> f64 {
            grp.members(&vars)
                .iter()
                .map(|(_, v)| {
                    g.get(v.as_tensor())
                        .unwrap()
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap() as f64
                })
                .sum::<f64>()
                .sqrt()
        };
        let before = clip_group_norms(
            &vars,
            &mut grads,
            &[
                (ParamGroup::Vision, 1.3),
                (ParamGroup::Text, 0.8),
                (ParamGroup::Proj, 0.0),
            ],
        )
        .unwrap();
        assert_eq!(before.len(), 2);
        assert!((before[0].1 - 13.0).abs() < 1e-5 && (before[1].1 - 0.5).abs() < 1e-6);
        assert!((norm(&grads, ParamGroup::Vision) - 1.3).abs() < 1e-5);
        assert!((norm(&grads, ParamGroup::Text) - 0.5).abs() < 1e-6);
        assert!((norm(&grads, ParamGroup::Proj) - 10.0).abs() < 1e-6);
        let ls = grads
            .get(vars[4].1.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(ls, vec![100.0]);

        let one = &vars[..1];
        let c = |x: [f32; 2], y: [f32; 2]| {
            let g = |vals: [f32; 2]| store(&[(&vars[0].1, Tensor::new(&vals, &dev).unwrap())]);
            grad_cosine(one, &g(x), &g(y)).unwrap()
        };
        assert!((c([1.0, 2.0], [2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!((c([1.0, 2.0], [-1.0, -2.0]) + 1.0).abs() < 1e-12);
        assert!(c([1.0, 0.0], [0.0, 3.0]).abs() < 1e-12);
        assert_eq!(c([0.0, 0.0], [1.0, 1.0]), 0.0);
    }
}
