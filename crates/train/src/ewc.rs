//! Elastic weight consolidation (Kirkpatrick et al. 2017) for incremental
//! alignment: after training on a first dataset, the diagonal Fisher of its
//! loss is estimated and saved with the checkpoint (`fisher.safetensors`,
//! holding `fisher.NAME` and the weights themselves as `theta.NAME`). Training
//! on new data then adds λ/2 · Σ F_i (θ_i − θ*_i)², which holds the weights
//! that mattered for the old data near their old values.
//!
//! The Fisher is the batch-level empirical one: the mean over N batches of
//! the squared gradient of the batch's InfoNCE loss (a contrastive loss has no
//! per-example likelihood to square). The penalty's gradient λ F (θ − θ*) is
//! added to the step's gradients directly: it is exact and needs no graph.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

/// The file name inside a checkpoint directory.
pub const FISHER_FILE: &str = "fisher.safetensors";

/// Running sum of squared gradients, per parameter name.
#[derive(Default)]
pub struct FisherSum {
    sums: HashMap<String, Tensor>,
    batches: usize,
}

impl FisherSum {
    pub fn add(&mut self, vars: &[(String, Var)], grads: &GradStore) -> Result<()> {
        for (name, v) in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let sq = g.to_dtype(DType::F32)?.sqr()?;
                let next = match self.sums.remove(name) {
                    Some(s) => (s + sq)?,
                    None => sq,
                };
                self.sums.insert(name.clone(), next);
            }
        }
        self.batches += 1;
        Ok(())
    }

    /// Writes the mean and the current weights to `path` atomically.
    pub fn save(&self, vars: &[(String, Var)], path: &Path) -> Result<()> {
        let n = self.batches.max(1) as f64;
        let mut out: HashMap<String, Tensor> = HashMap::new();
        for (name, v) in vars {
            if let Some(s) = self.sums.get(name) {
                out.insert(format!("fisher.{name}"), (s / n)?);
                out.insert(format!("theta.{name}"), v.as_tensor().to_dtype(DType::F32)?);
            }
        }
        let tmp = path.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&out, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }
}

/// The penalty's terms for the parameters the Fisher file covers.
pub struct Ewc {
    terms: Vec<(Var, Tensor, Tensor)>, // (θ, F, θ*)
}

impl Ewc {
    /// Reads `fisher.safetensors` (or a directory holding it) for `vars`.
    /// Parameters the file lacks are not penalised; a file that covers none of
    /// them, or disagrees on a shape, is an error naming it.
    pub fn load(path: &Path, vars: &[(String, Var)]) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(FISHER_FILE)
        } else {
            path.to_path_buf()
        };
        if !file.is_file() {
            return Err(Error::Report(format!(
                "{}: no Fisher estimate here (train the old task with --fisher-batches N to write one)",
                file.display()
            )));
        }
        let mut t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu)?;
        let mut terms = Vec::new();
        for (name, v) in vars {
            let (Some(f), Some(theta)) = (
                t.remove(&format!("fisher.{name}")),
                t.remove(&format!("theta.{name}")),
            ) else {
                continue;
            };
            if f.dims() != v.dims() || theta.dims() != v.dims() {
                return Err(Error::Report(format!(
                    "{}: `{name}` has shape {:?} there but {:?} in the model",
                    file.display(),
                    f.dims(),
                    v.dims()
                )));
            }
            let dev = v.device();
            terms.push((v.clone(), f.to_device(dev)?, theta.to_device(dev)?));
        }
        if terms.is_empty() {
            return Err(Error::Report(format!(
                "{}: covers none of the model's trainable parameters",
                file.display()
            )));
        }
        Ok(Self { terms })
    }

    /// Adds λ F (θ − θ*) to each parameter's gradient and returns the
    /// penalty λ/2 Σ F (θ − θ*)².
    pub fn apply(&self, lambda: f64, grads: &mut GradStore) -> Result<f64> {
        if lambda == 0.0 {
            return Ok(0.0);
        }
        let mut penalty = 0f64;
        for (v, f, theta) in &self.terms {
            let d = (v.as_tensor() - theta)?;
            let fd = (f * &d)?;
            penalty += (&fd * &d)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            let g = (fd * lambda)?;
            let total = match grads.get(v.as_tensor()) {
                Some(old) => (old + g)?,
                None => g,
            };
            grads.insert(v.as_tensor(), total);
        }
        Ok(0.5 * lambda * penalty)
    }
}
