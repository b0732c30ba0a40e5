//! ALBEF's momentum towers: an exponential moving average of the learning
//! model's weights, whose similarities soften the contrastive targets
//! ([`super::objectives::DistilledInfoNce`]).
//!
//! As ALBEF does, the EMA starts as a copy of the model and is updated at
//! the start of every step, before its features are computed:
//! `ema = m · ema + (1 − m) · θ`. It is saved in the run's state (tensors
//! named `momentum.<parameter>`) and resumed with it.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::TrainConfig;
use super::model::Trainable;
use crate::{Error, Result};
use clasp_core::model::Model;

/// The state-file prefix of the EMA's tensors.
const PREFIX: &str = "momentum.";

pub struct Momentum {
    m: f64,
    ema: Vec<(String, Tensor)>,
}

impl Momentum {
    /// The run's momentum towers when `momentum` is set: resumed from the
    /// saved state when it holds them, else a copy of the model.
    pub fn start(
        cfg: &TrainConfig,
        t: &Trainable,
        saved: Option<&HashMap<String, Tensor>>,
        has_teacher: bool,
    ) -> Result<Option<Self>> {
        let m = cfg.objective_params.momentum.momentum;
        if m <= 0.0 {
            return Ok(None);
        }
        if !(0.0..1.0).contains(&m) {
            return Err(Error::Report(format!(
                "--momentum {m}: the EMA's momentum lies in [0, 1) (ALBEF: 0.995)"
            )));
        }
        let a = cfg.objective_params.momentum.distill_alpha;
        if !(0.0..=1.0).contains(&a) {
            return Err(Error::Report(format!(
                "--distill-alpha {a}: the teacher's weight in the targets lies in [0, 1] (ALBEF: 0.4)"
            )));
        }
        if has_teacher {
            return Err(Error::Report(
                "--momentum distils from the run's own EMA; it cannot be combined with --teacher"
                    .into(),
            ));
        }
        let ema = t
            .vars()
            .into_iter()
            .map(|(name, v)| {
                let x = match saved.and_then(|s| s.get(&format!("{PREFIX}{name}"))) {
                    Some(x) => x.to_device(v.device())?.to_dtype(DType::F32)?,
                    None => v.as_tensor().detach().copy()?,
                };
                Ok((name, x))
            })
            .collect::<Result<_>>()?;
        Ok(Some(Self { m, ema }))
    }

    /// Moves the EMA toward the model's current weights and returns the
    /// momentum model (an inference model over the EMA's values).
    pub fn advance(&mut self, t: &Trainable) -> Result<Model> {
        let current: HashMap<String, Tensor> = t
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        for (name, e) in &mut self.ema {
            if let Some(x) = current.get(name) {
                *e = ((&*e * self.m)? + (x * (1.0 - self.m))?)?;
            }
        }
        let tensors: HashMap<String, Tensor> = self.ema.iter().cloned().collect();
        let device = self.ema.first().map(|(_, e)| e.device().clone());
        let device = device.unwrap_or(candle_core::Device::Cpu);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        Model::load(vb, &t.config)
    }

    /// Adds the EMA to the state's tensors.
    pub fn save_into(&self, state: &mut HashMap<String, Tensor>) {
        for (name, e) in &self.ema {
            state.insert(format!("{PREFIX}{name}"), e.clone());
        }
    }
}
