//! BCIF's contrastive branch on a vision-language model, against the real
//! generative loss (`--objective lm,infonce:W,geometric:W --schedule bcif`).
//!
//! - The image side: the mean of the connector's output tokens, through a
//!   learned linear head, L2-normalised.
//! - The text side: the mean of the language model's last hidden states over
//!   the caption in a text-only pass, through its own head, normalised. With
//!   the language model frozen (stage 1) that pass runs without a graph;
//!   with LoRA (stage 2) the contrastive gradient reaches the adapter.
//! - The contrastive objectives are the registry's (`infonce`, `geometric`
//!   with its k hardest in-batch negatives, ...) on those features, with a
//!   learned temperature.
//! - With a schedule λ(p) (`bcif`: 1 through the warm-up, down to 0.2 by
//!   half-way), the step's loss is λ·contrastive + (1 − λ)·LM; without one,
//!   LM + the contrastive parts at their own weights.
//!
//! The two losses are differentiated separately and their gradients summed
//! with those weights, so the gradient-conflict probe (the cosine between
//! them on the connector) costs nothing extra.

use candle_core::{DType, Device, Tensor, Var};

use super::config::TrainConfig;
use super::objectives::{Batch, ObjectiveEnv};
use super::schedule::{self, Combined, Weight};
use crate::rng::Rng;
use crate::{Error, Result};
use clasp_vlm::heads::{image_side, text_side};
use clasp_vlm::Vlm;

/// The contrastive branch: heads, temperature and objectives.
pub struct Branch {
    image_head: Var,
    text_head: Var,
    log_scale: Var,
    objective: Combined,
    /// λ(p), when the schedule trades the branch against the LM loss.
    trade: Option<Weight>,
    /// Whether the LM loss is in the objective at all.
    pub lm: bool,
}

/// The parts of a VLM run's objective: whether `lm` is among them, and the
/// rest (the contrastive ones) as a spec.
fn split_spec(spec: &str) -> (bool, String) {
    let mut lm = false;
    let rest: Vec<String> = schedule::top_level_items(spec)
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter(|s| {
            let is_lm = s.split(':').next().map(str::trim) == Some("lm");
            lm |= is_lm;
            !is_lm
        })
        .map(str::to_string)
        .collect();
    (lm, rest.join(","))
}

/// What the branch computed for one step.
pub struct Losses {
    /// The contrastive parts' weighted sum (a scalar with a graph).
    pub contrastive: Tensor,
    /// Each part's unweighted value.
    pub parts: Vec<(String, f64)>,
    /// The parts' unweighted sum, for the conflict probe, when some part's
    /// weight is 0 now (else the weighted sum's gradient serves).
    pub probe: Option<Tensor>,
}

impl Branch {
    /// The branch a config asks for: None when the objective is the LM
    /// loss alone.
    pub fn from_config(cfg: &TrainConfig, hidden: usize, device: &Device) -> Result<Option<Self>> {
        let (lm, rest) = split_spec(&cfg.vlm_objective());
        if rest.is_empty() {
            if !lm {
                return Err(Error::Report("no objective given".into()));
            }
            if cfg.schedule.is_some() {
                return Err(Error::Report(
                    "--schedule trades a contrastive objective against lm: add one (e.g. lm,infonce:1)".into(),
                ));
            }
            return Ok(None);
        }
        let dim = cfg.contrastive_dim;
        let env = ObjectiveEnv {
            dim,
            seed: cfg.seed,
            device,
            teacher_dim: None,
        };
        let objective = schedule::parse_objectives(&rest, &cfg.objective_params, None, &env)?;
        if objective.ewc.is_some() || objective.parts.iter().any(|(_, o)| !o.vars().is_empty()) {
            return Err(Error::Report(
                "a vision-language run's contrastive branch takes infonce, siglip, triplet, daa or geometric"
                    .into(),
            ));
        }
        let trade = match cfg.schedule.as_deref().map(str::trim) {
            None => None,
            Some("bcif") => Some(Weight::bcif()),
            Some(s) => Some(Weight::parse(s)?),
        };
        if trade.is_some() && !lm {
            return Err(Error::Report(
                "--schedule trades the contrastive branch against lm: add lm to the objective"
                    .into(),
            ));
        }
        let mut rng = Rng(cfg.seed ^ 0xBC1F);
        let bound = 1.0 / (hidden as f64).sqrt();
        let head = |rng: &mut Rng| {
            Var::from_vec(rng.symmetric(dim * hidden, bound), (dim, hidden), device)
        };
        Ok(Some(Self {
            image_head: head(&mut rng)?,
            text_head: head(&mut rng)?,
            log_scale: Var::from_vec(vec![(1.0f32 / 0.07).ln()], (), device)?,
            objective,
            trade,
            lm,
        }))
    }

    /// The branch's trainable tensors, named as saved beside the checkpoint
    /// (`contrastive_heads.safetensors`).
    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (
                "contrastive.image_head.weight".into(),
                self.image_head.clone(),
            ),
            (
                "contrastive.text_head.weight".into(),
                self.text_head.clone(),
            ),
            ("contrastive.log_scale".into(), self.log_scale.clone()),
        ]
    }

    /// Whether a schedule trades the branch against the LM loss.
    pub fn trades(&self) -> bool {
        self.trade.is_some()
    }

    /// The weights of the LM loss and of the contrastive sum at progress p.
    pub fn weights(&self, p: f64) -> (f64, f64) {
        let lm = if self.lm { 1.0 } else { 0.0 };
        match &self.trade {
            Some(t) => {
                let l = t.at(p);
                (lm * (1.0 - l), l)
            }
            None => (lm, 1.0),
        }
    }

    /// L2-normalised image-side features `[B, P]` from the connector's
    /// tokens `[B, N, hidden]`.
    pub fn image_features(&self, tokens: &Tensor) -> Result<Tensor> {
        image_side(tokens, self.image_head.as_tensor())
    }

    /// L2-normalised text-side features `[B, P]`: the caption tokens alone
    /// through the language model, the mean of its last hidden states.
    pub fn text_features(&self, vlm: &Vlm, captions: &[Vec<u32>], graph: bool) -> Result<Tensor> {
        text_side(vlm, captions, self.text_head.as_tensor(), graph)
    }

    /// The contrastive parts on a batch's features, weighted by their own
    /// schedules at progress p (λ is applied by the caller).
    pub fn losses(&self, image: &Tensor, text: &Tensor, p: f64) -> Result<Losses> {
        let batch = Batch {
            image,
            text,
            log_scale: self.log_scale.as_tensor(),
            bias: None,
            teacher: None,
        };
        // Each part once: its value is logged, and the weighted sum (and the
        // probe's unweighted one) are made from the same tensors.
        let mut parts = Vec::new();
        let mut each = Vec::with_capacity(self.objective.parts.len());
        let mut unweighted: Option<Tensor> = None;
        for (_, o) in &self.objective.parts {
            let l = o.loss(&batch)?;
            parts.push((o.name().to_string(), l.to_scalar::<f32>()? as f64));
            unweighted = Some(match unweighted {
                None => l.clone(),
                Some(u) => (u + &l)?,
            });
            each.push(l);
        }
        let at = self.objective.at(p);
        // A part at weight 0 (e.g. `lm,infonce:0`, to watch the conflict
        // without training on it) has no gradient in the weighted sum; the
        // probe then reads the parts at weight 1.
        let probe = if at.weights.contains(&0.0) {
            unweighted
        } else {
            None
        };
        Ok(Losses {
            contrastive: at.weigh(&batch, |i| Ok(each[i].clone()))?,
            parts,
            probe,
        })
    }

    /// Restores the heads and temperature from saved tensors.
    pub fn load(&self, saved: &std::collections::HashMap<String, Tensor>) -> Result<()> {
        for (name, v) in self.vars() {
            let t = saved
                .get(&name)
                .ok_or_else(|| Error::Report(format!("no {name} to resume from")))?;
            v.set(t)?;
        }
        Ok(())
    }
}

/// `a·x + b·y` over every gradient in `vars` (a missing one is zero), into
/// `x`'s store.
pub fn mix_grads(
    vars: &[(String, Var)],
    x: &mut candle_core::backprop::GradStore,
    a: f64,
    y: &candle_core::backprop::GradStore,
    b: f64,
) -> Result<()> {
    for (_, v) in vars {
        let t = v.as_tensor();
        let gx = x.remove(t);
        let gy = y.get(t);
        let g = match (gx, gy) {
            (Some(gx), Some(gy)) => ((gx * a)? + (gy * b)?)?,
            (Some(gx), None) => (gx * a)?,
            (None, Some(gy)) => (gy * b)?,
            (None, None) => continue,
        };
        x.insert(t, g.to_dtype(DType::F32)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lm_term_is_split_from_the_contrastive_ones() {
        assert_eq!(
            split_spec("lm, infonce:0.5,geometric:linear(0,1)"),
            (true, "infonce:0.5,geometric:linear(0,1)".to_string())
        );
        assert_eq!(split_spec("infonce"), (false, "infonce".to_string()));
        assert_eq!(split_spec("lm"), (true, String::new()));
    }
}
