//! A VQ image tokenizer of clasp's own (`clasp train --task vq`): Emu3's
//! VQ-VAE architecture ([`Emu3Vq`]) at a size this machine trains, on the
//! dataset's photos, through the one training loop ([`super::run::run`]).
//!
//! - **Losses** (van den Oord et al. 2017): the reconstruction's mean
//!   absolute error, the codebook loss `|sg(z) − e|²` and the commitment
//!   loss `β |z − sg(e)|²`, with the straight-through estimator carrying the
//!   decoder's gradient past the nearest-code choice (the codes' embeddings
//!   also condition the decoder's spatial norms, MoVQ's design, and take the
//!   same straight-through value).
//! - **Codebook usage**: each step logs the codes used in its batch and
//!   their perplexity; after the first step and every `vq_restart_every`
//!   steps the codes no batch used since the last check are restarted at
//!   latents drawn from the current batch (seeded), and the count is logged
//!   as `restarted`. The first check is the codebook's data-dependent
//!   initialisation.
//! - **Geometry**: `vq_image_size` pixels square (the photos resized
//!   straight to it), channel multipliers 1, 2, 2, 4 (8 pixels a code), one
//!   frame (`temporal_downsample_factor` 1: an image tokenizer; Emu3's own
//!   repeats an image 4 times to fill its temporal axis).
//! - **Initialisation** as transformers' `Emu3VQVAE._init_weights` (Kaiming
//!   normal on fan-out for convolutions, PyTorch's default for linear
//!   layers, norms at 1 and 0), except the codebook, uniform in ±1/N as
//!   Emu3's quantizer itself draws it (transformers' generic init would
//!   overwrite it with N(0, 1), far from the encoder's first latents), and
//!   the encoder's `conv_out` and `quant_conv`, at a tenth of Kaiming's
//!   scale (at full scale the first latents are several units per
//!   dimension, and the codes seeded from them drive the decoder's spatial
//!   norms to outputs several times the pixel range).
//!   BatchNorm stays at its initial statistics (mean 0, variance 1), as the
//!   model runs in evaluation mode in transformers.
//!
//! It saves an `Emu3VQVAE` folder (config.json, model.safetensors,
//! preprocessor_config.json for Emu3ImageProcessor) that transformers and
//! `clasp tokenize-image` load.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use clasp_common::atomic::{write_dir, write_json};
use clasp_common::rng::Rng;
use clasp_core::model::emu3_vq::{Emu3Vq, Emu3VqConfig};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::hooks::StepLog;
use super::optim::{self, GroupedAdamW};
use super::order::{self, Order};
use super::run::{Prepare, Task};
use super::state::{self, checkpoint_dir, State};
use crate::data::PairSet;
use crate::preprocess::image::{ImageProcessor, ImageProcessorConfig, ResizeTo};
use crate::{Error, Result};

/// A VQ run's keys (flat in the config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VqParams {
    pub vq_codebook_size: usize,
    /// The first level's channels (the others are 2, 2 and 4 times it).
    pub vq_channels: usize,
    pub vq_res_blocks: usize,
    /// Training images' side in pixels (a multiple of 8).
    pub vq_image_size: usize,
    /// The commitment loss's weight.
    pub vq_beta: f64,
    /// Steps between dead-code restarts (0: none).
    pub vq_restart_every: usize,
}

impl Default for VqParams {
    fn default() -> Self {
        Self {
            vq_codebook_size: 1024,
            vq_channels: 32,
            vq_res_blocks: 1,
            vq_image_size: 64,
            vq_beta: 0.25,
            vq_restart_every: 50,
        }
    }
}

/// The keys a VQ run alone reads.
pub const VQ_KEYS: &[&str] = &[
    "vq_codebook_size",
    "vq_channels",
    "vq_res_blocks",
    "vq_image_size",
    "vq_beta",
    "vq_restart_every",
];

/// The state entry holding the codes' use since the last restart check.
const USAGE: &str = "clasp.vq_usage";

impl VqParams {
    pub fn check(&self) -> Result<()> {
        let bad = |k: &str, why: &str| Err(Error::Report(format!("{k}: {why}")));
        if self.vq_codebook_size < 2 {
            return bad("vq_codebook_size", "a codebook needs at least 2 codes");
        }
        if self.vq_channels == 0 || !self.vq_channels.is_multiple_of(32) {
            return bad(
                "vq_channels",
                "a positive multiple of 32 (GroupNorm's groups)",
            );
        }
        if self.vq_image_size == 0 || !self.vq_image_size.is_multiple_of(8) {
            return bad(
                "vq_image_size",
                "a positive multiple of 8 (the pixels per code)",
            );
        }
        if !(self.vq_beta.is_finite() && self.vq_beta >= 0.0) {
            return bad("vq_beta", "a weight of at least 0");
        }
        Ok(())
    }

    /// The architecture a new run trains.
    pub fn architecture(&self) -> Emu3VqConfig {
        Emu3VqConfig {
            codebook_size: self.vq_codebook_size,
            temporal_downsample_factor: 1,
            base_channels: self.vq_channels,
            num_res_blocks: self.vq_res_blocks,
            hidden_size: self.vq_channels * 4,
            ..Emu3VqConfig::default()
        }
    }

    /// Emu3ImageProcessor at this run's size.
    pub fn processor(&self) -> ImageProcessorConfig {
        let p = std::path::Path::new("preprocessor_config.json");
        let n = (self.vq_image_size * self.vq_image_size) as u32;
        let json = format!(
            r#"{{"image_processor_type": "Emu3ImageProcessor", "image_mean": [0.5, 0.5, 0.5],
               "image_std": [0.5, 0.5, 0.5], "min_pixels": {n}, "max_pixels": {n}}}"#
        );
        ImageProcessorConfig::from_json(&json, p).expect("a valid processor config")
    }
}

/// A VQ run in progress.
pub struct VqTrainer {
    cfg: TrainConfig,
    out: PathBuf,
    dev: Device,
    arch: Emu3VqConfig,
    vars: Vec<(String, Var)>,
    opt: GroupedAdamW,
    /// Training resizes straight to the square.
    train_proc: ImageProcessor,
    saved_proc: ImageProcessorConfig,
    set: PairSet,
    per_image: Vec<Vec<usize>>,
    /// Each code's use since the last restart check.
    usage: Vec<f32>,
    order: Order,
    step: usize,
}

fn write_folder(
    dir: &Path,
    arch: &Emu3VqConfig,
    tensors: &HashMap<String, Tensor>,
    proc: &ImageProcessorConfig,
) -> Result<()> {
    write_dir(dir, |tmp| {
        let mut cfg = serde_json::to_value(arch).map_err(|e| Error::Report(e.to_string()))?;
        cfg["model_type"] = "emu3_vqgan".into();
        cfg["architectures"] = serde_json::json!(["Emu3VQVAE"]);
        write_json(&tmp.join("config.json"), &cfg)?;
        let w = tmp.join("model.safetensors");
        candle_core::safetensors::save(tensors, &w).map_err(|e| Error::Weights {
            path: w.clone(),
            reason: e.to_string(),
        })?;
        let mut pp = proc.to_hf_json();
        pp["image_processor_type"] = "Emu3ImageProcessor".into();
        write_json(&tmp.join("preprocessor_config.json"), &pp)
    })
}

/// A fresh model's tensors, by the rules of the module notes.
fn initial_tensors(
    arch: &Emu3VqConfig,
    seed: u64,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    // The names and shapes: the model built once over a scratch map.
    let map = candle_nn::VarMap::new();
    Emu3Vq::load(VarBuilder::from_varmap(&map, DType::F32, dev), arch)?;
    let shapes: BTreeMap<String, Vec<usize>> = map
        .data()
        .lock()
        .map_err(|_| Error::Report("the variable map's lock is poisoned".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    let mut rng = Rng(seed ^ 0x7E57_0C0D);
    let fan = |shape: &[usize]| -> (usize, usize) {
        let field: usize = shape[2..].iter().product();
        (shape[1] * field, shape[0] * field)
    };
    let mut out = HashMap::new();
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let norm = name
            .split('.')
            .any(|p| p.starts_with("norm") || p.starts_with("attn_norm"));
        let v: Vec<f32> = if name == "quantize.embedding.weight" {
            let bound = 1.0 / arch.codebook_size as f64;
            (0..n)
                .map(|_| ((rng.uniform() as f64 * 2.0 - 1.0) * bound) as f32)
                .collect()
        } else if name.ends_with("running_mean") {
            vec![0.0; n]
        } else if name.ends_with("running_var") {
            vec![1.0; n]
        } else if shape.len() == 1 && norm {
            vec![if name.ends_with(".weight") { 1.0 } else { 0.0 }; n]
        } else if shape.len() >= 3 {
            // The latents' last two convolutions start at a tenth of the
            // scale: latents of order one instead of several units.
            let last = name == "encoder.conv_out.weight" || name == "quant_conv.conv.weight";
            let std = (2.0 / fan(shape).1 as f64).sqrt() * if last { 0.1 } else { 1.0 };
            rng.normal(n, std)
        } else {
            // A linear weight, or a bias with its layer's fan-in.
            let w = name.strip_suffix("bias").map(|p| format!("{p}weight"));
            let fan_in = match (shape.len(), w.as_ref().and_then(|w| shapes.get(w))) {
                (2, _) => shape[1],
                (_, Some(ws)) if ws.len() >= 3 => fan(ws).0,
                (_, Some(ws)) => ws[1],
                _ => shape[0],
            };
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n)
                .map(|_| ((rng.uniform() as f64 * 2.0 - 1.0) * bound) as f32)
                .collect()
        };
        out.insert(name.clone(), Tensor::from_vec(v, shape.as_slice(), dev)?);
    }
    Ok(out)
}

#[path = "vq_step.rs"]
mod step;
