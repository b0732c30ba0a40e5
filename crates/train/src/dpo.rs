//! Direct preference optimisation (Rafailov et al. 2023) as TRL's
//! `DPOTrainer` computes it: each completion's log-probability summed over
//! its tokens, under the policy and under the reference (the same model with
//! its LoRA adapter disabled), the log-ratios' difference
//! `δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))`, and the loss
//! averaged over the pairs:
//! - **sigmoid** (DPO): `−log σ(β δ)`;
//! - **hinge** (SLiC): `max(0, 1 − β δ)`;
//! - **ipo**: `(δ̄ − 1/(2β))²`, with each log-ratio divided by its
//!   completion's token count (TRL's length normalisation);
//! - **robust** (rDPO, label smoothing ε): `(−(1−ε) log σ(β δ) + ε log σ(−β δ)) / (1 − 2ε)`.
//!
//! The rewards TRL logs are `β (log π − log π_ref)` of each completion.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::llm::Llama;
use crate::{Error, Result};

/// The preference loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PrefLoss {
    #[default]
    Sigmoid,
    Hinge,
    Ipo,
    Robust,
}

impl PrefLoss {
    pub const NAMES: &'static str = "sigmoid, hinge, ipo, robust";

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "sigmoid" => PrefLoss::Sigmoid,
            "hinge" => PrefLoss::Hinge,
            "ipo" => PrefLoss::Ipo,
            "robust" => PrefLoss::Robust,
            other => {
                return Err(Error::Report(format!(
                    "unknown preference loss {other:?} ({})",
                    Self::NAMES
                )))
            }
        })
    }
}

/// β, the loss, and the label smoothing of `robust`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpoLoss {
    pub beta: f64,
    pub loss: PrefLoss,
    pub label_smoothing: f64,
}

impl Default for DpoLoss {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss: PrefLoss::Sigmoid,
            label_smoothing: 0.0,
        }
    }
}

/// A preference run's keys (flat in the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PreferenceParams {
    /// The preference pairs (JSON lines in TRL's format).
    pub prefs: Option<std::path::PathBuf>,
    pub beta: f64,
    pub pref_loss: PrefLoss,
    pub label_smoothing: f64,
}

impl Default for PreferenceParams {
    fn default() -> Self {
        let d = DpoLoss::default();
        Self {
            prefs: None,
            beta: d.beta,
            pref_loss: d.loss,
            label_smoothing: d.label_smoothing,
        }
    }
}

impl PreferenceParams {
    pub fn loss(&self) -> DpoLoss {
        DpoLoss {
            beta: self.beta,
            loss: self.pref_loss,
            label_smoothing: self.label_smoothing,
        }
    }
}

/// Summed completion log-probabilities `[B]` of the chosen and the
/// rejected completions, and their token counts.
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub chosen_len: Vec<usize>,
    pub rejected_len: Vec<usize>,
}

/// What TRL logs of a batch: batch means.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DpoStats {
    pub loss: f32,
    pub rewards_chosen: f32,
    pub rewards_rejected: f32,
    pub rewards_accuracy: f32,
    pub rewards_margin: f32,
    pub logps_chosen: f32,
    pub logps_rejected: f32,
}

/// `log σ(x)`, stably: `min(x, 0) − log(1 + e^{−|x|})`.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0f32)? - soft)?)
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len().max(1) as f32
}

impl DpoLoss {
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.beta.is_nan() || self.beta <= 0.0 {
            return Err(format!("beta must be positive, not {}", self.beta));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!(
                "label smoothing must lie in [0, 0.5), not {}",
                self.label_smoothing
            ));
        }
        if self.label_smoothing > 0.0 && self.loss != PrefLoss::Robust {
            return Err("label smoothing applies to the robust loss only (as in TRL)".into());
        }
        Ok(())
    }

    /// The loss (a scalar with the policy's graph) and the batch's stats.
    /// `reference` carries no graph.
    pub fn loss(&self, policy: &PairLogps, reference: &PairLogps) -> Result<(Tensor, DpoStats)> {
        let dev = policy.chosen.device();
        let chosen_ratio = (&policy.chosen - reference.chosen.detach())?;
        let rejected_ratio = (&policy.rejected - reference.rejected.detach())?;
        let beta = self.beta;
        let per_pair = match self.loss {
            PrefLoss::Sigmoid => {
                log_sigmoid(&((&chosen_ratio - &rejected_ratio)? * beta)?)?.neg()?
            }
            PrefLoss::Hinge => (1.0 - ((&chosen_ratio - &rejected_ratio)? * beta)?)?.relu()?,
            PrefLoss::Ipo => {
                let lens = |l: &[usize]| {
                    let v: Vec<f32> = l.iter().map(|&n| n.max(1) as f32).collect();
                    Tensor::new(v.as_slice(), dev)
                };
                let c = chosen_ratio.div(&lens(&policy.chosen_len)?)?;
                let r = rejected_ratio.div(&lens(&policy.rejected_len)?)?;
                ((c - r)? - 1.0 / (2.0 * beta))?.sqr()?
            }
            PrefLoss::Robust => {
                let eps = self.label_smoothing;
                let z = ((&chosen_ratio - &rejected_ratio)? * beta)?;
                let clean = (log_sigmoid(&z)? * -(1.0 - eps))?;
                let flipped = (log_sigmoid(&z.neg()?)? * -eps)?;
                ((clean - flipped)? / (1.0 - 2.0 * eps))?
            }
        };
        let loss = per_pair.mean_all()?;
        let rc: Vec<f32> = (chosen_ratio.detach() * beta)?.to_vec1()?;
        let rr: Vec<f32> = (rejected_ratio.detach() * beta)?.to_vec1()?;
        let acc: Vec<f32> = rc
            .iter()
            .zip(&rr)
            .map(|(c, r)| if c > r { 1.0 } else { 0.0 })
            .collect();
        let margins: Vec<f32> = rc.iter().zip(&rr).map(|(c, r)| c - r).collect();
        let stats = DpoStats {
            loss: loss.to_scalar()?,
            rewards_chosen: mean(&rc),
            rewards_rejected: mean(&rr),
            rewards_accuracy: mean(&acc),
            rewards_margin: mean(&margins),
            logps_chosen: mean(&policy.chosen.detach().to_vec1()?),
            logps_rejected: mean(&policy.rejected.detach().to_vec1()?),
        };
        Ok((loss, stats))
    }
}

/// The summed log-probability `[B]` of each completion after its prefix:
/// `prefixes[i]` holds the prefix's input embeddings `[t_i, hidden]` (the
/// prompt, images spliced in), `completions[i]` the completion's ids. One
/// right-padded batch through the training forward; the graph reaches the
/// LoRA adapter the model holds (and the prefixes).
pub fn completion_logps(
    llm: &Llama,
    prefixes: &[Tensor],
    completions: &[&[u32]],
) -> Result<Tensor> {
    let b = prefixes.len();
    let dev = llm.device();
    let hidden = llm.config().hidden_size;
    let lens: Vec<usize> = prefixes
        .iter()
        .zip(completions)
        .map(|(p, c)| Ok(p.dim(0)? + c.len()))
        .collect::<Result<_>>()?;
    let t = lens.iter().copied().max().unwrap_or(0);
    let (mut rows, mut idx, mut targets, mut owner) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, (p, c)) in prefixes.iter().zip(completions).enumerate() {
        if c.is_empty() {
            return Err(Error::Report(format!("pair {i}: an empty completion")));
        }
        let ids = Tensor::new(*c, dev)?.unsqueeze(0)?;
        let mut parts = vec![p.clone(), llm.embed(&ids)?.squeeze(0)?];
        if lens[i] < t {
            parts.push(Tensor::zeros((t - lens[i], hidden), DType::F32, dev)?);
        }
        rows.push(Tensor::cat(&parts, 0)?);
        // Position p predicts token p + 1: the completion's tokens.
        let start = p.dim(0)?;
        for (k, &tok) in c.iter().enumerate() {
            idx.push((i * t + start + k - 1) as u32);
            targets.push(tok);
            owner.push(i);
        }
    }
    let h = llm.forward_train(&Tensor::stack(&rows, 0)?)?;
    let picked = h
        .reshape((b * t, hidden))?
        .index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?;
    let logp = candle_nn::ops::log_softmax(&llm.logits_train(&picked)?, D::Minus1)?;
    let tok = logp
        .gather(&Tensor::new(targets.as_slice(), dev)?.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    // Sum each sequence's tokens: [B, M] ones-where-owned times [M].
    let m = owner.len();
    let mut sel = vec![0f32; b * m];
    for (j, &i) in owner.iter().enumerate() {
        sel[i * m + j] = 1.0;
    }
    let sel = Tensor::from_vec(sel, (b, m), dev)?;
    Ok(sel.matmul(&tok.unsqueeze(1)?)?.squeeze(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn pair(c: &[f32], r: &[f32]) -> PairLogps {
        PairLogps {
            chosen: Tensor::new(c, &Device::Cpu).unwrap(),
            rejected: Tensor::new(r, &Device::Cpu).unwrap(),
            chosen_len: vec![2; c.len()],
            rejected_len: vec![4; r.len()],
        }
    }

    #[test]
    fn losses_by_formula() {
        let (pol, refr) = (
            pair(&[-10.0, -20.0], &[-12.0, -18.0]),
            pair(&[-11.0, -19.0], &[-11.0, -19.0]),
        );
        // δ = (1 − (−1), (−1) − 1) = (2, −2); β = 0.5 → βδ = (1, −1).
        let f = |loss, eps| {
            let l = DpoLoss {
                beta: 0.5,
                loss,
                label_smoothing: eps,
            };
            l.loss(&pol, &refr).unwrap().1.loss as f64
        };
        let ls = |x: f64| -(1.0 + (-x).exp()).ln();
        assert!((f(PrefLoss::Sigmoid, 0.0) - (-(ls(1.0) + ls(-1.0)) / 2.0)).abs() < 1e-6);
        assert!((f(PrefLoss::Hinge, 0.0) - 1.0).abs() < 1e-6);
        // IPO: chosen ratios / 2, rejected / 4: (0.5 + 0.25, −0.5 − 0.25) − 1.
        let ipo = ((0.75f64 - 1.0).powi(2) + (-0.75f64 - 1.0).powi(2)) / 2.0;
        assert!((f(PrefLoss::Ipo, 0.0) - ipo).abs() < 1e-6);
        let e = 0.2;
        let rob = |x: f64| (-(1.0 - e) * ls(x) + e * ls(-x)) / (1.0 - 2.0 * e);
        assert!((f(PrefLoss::Robust, e) - (rob(1.0) + rob(-1.0)) / 2.0).abs() < 1e-6);
        let s = DpoLoss::default().loss(&pol, &refr).unwrap().1;
        assert!((s.rewards_chosen - 0.0).abs() < 1e-6 && (s.rewards_accuracy - 0.5).abs() < 1e-6);
    }
}
