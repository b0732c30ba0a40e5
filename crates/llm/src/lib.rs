//! Language models: llama-family decoders from GGUF files or Hugging Face
//! `LlamaForCausalLM` checkpoints, their tokenizer and chat template, and
//! generation.
//!
//! - `gguf`: reading GGUF files with errors that name the file and the key or
//!   tensor;
//! - `llama`: the architecture (one file, built from GGUF or a VarBuilder),
//!   with its config (`config`) and projections (`linear`, on the block
//!   kernels of `quant`);
//! - `tokenizer`: the byte-level BPE built from GGUF metadata, and chat
//!   templates;
//! - `lora`: LoRA adapters in PEFT's layout;
//! - `sampling`: greedy and seeded sampling;
//! - `generate`: the prefill/decode loop, streaming and batches;
//! - `continuous`: a running batch that sequences join and leave between
//!   decode steps.

use clasp_common::{atomic, rng};
pub use clasp_common::{Error, Result};

pub mod config;
pub mod continuous;
pub mod generate;
pub mod gguf;
mod linear;
pub mod llama;
pub mod lora;
mod ops;
pub mod quant;
pub mod sampling;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

pub use generate::{
    generate, generate_batch, generate_batch_prompts, generate_prompt, GenerateOptions, Generation,
    Prompt, StopReason,
};
pub use gguf::GgufFile;
pub use llama::{Llama, LlamaConfig, Precision};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{LlmTokenizer, Message};

use crate::atomic::write_json;

/// A loaded language model with its tokenizer.
#[derive(Debug, Clone)]
pub struct LanguageModel {
    pub model: Llama,
    pub tokenizer: LlmTokenizer,
    source: PathBuf,
}

/// Where a `--model` argument points for a language model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LlmSource {
    Gguf(PathBuf),
    /// A Hugging Face directory with config.json, model.safetensors and
    /// tokenizer.json.
    HfDir(PathBuf),
}

/// Whether `path` names a language model: a `.gguf` file, a folder holding
/// one, or a folder whose config.json says `llama`.
pub fn resolve(path: &Path) -> Result<LlmSource> {
    if path.is_file() {
        // Any file is read as GGUF, so a wrong one gets the magic-number error.
        return Ok(LlmSource::Gguf(path.to_path_buf()));
    }
    if !path.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        ));
    }
    let mut ggufs: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    ggufs.sort();
    match ggufs.len() {
        1 => return Ok(LlmSource::Gguf(ggufs.remove(0))),
        0 => {}
        _ => {
            return Err(Error::Config {
                path: path.to_path_buf(),
                reason: format!(
                    "{} GGUF files here; pass one of them: {}",
                    ggufs.len(),
                    ggufs
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
        }
    }
    if path.join("config.json").is_file() {
        return Ok(LlmSource::HfDir(path.to_path_buf()));
    }
    Err(Error::Config {
        path: path.to_path_buf(),
        reason: "no .gguf file and no config.json: not a language model".into(),
    })
}

/// Whether `path` looks like a language model rather than a dual encoder
/// (a GGUF, or a config.json whose model_type is llama).
pub fn is_language_model(path: &Path) -> bool {
    match resolve(path) {
        Ok(LlmSource::Gguf(_)) => true,
        Ok(LlmSource::HfDir(d)) => std::fs::read_to_string(d.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v.get("model_type")
                    .and_then(|m| m.as_str())
                    .map(|m| m == "llama")
            })
            .unwrap_or(false),
        Err(_) => false,
    }
}

impl LanguageModel {
    /// Loads a language model. GGUF weights stay quantized with
    /// `Precision::Quantized` or are dequantized with `Precision::F32`;
    /// Hugging Face checkpoints are f32 either way.
    pub fn load(path: &Path, precision: Precision, device: &Device) -> Result<Self> {
        match resolve(path)? {
            LlmSource::Gguf(p) => {
                let mut g = GgufFile::open(&p)?;
                // The architecture first: a model clasp cannot run is named as such.
                let cfg = LlamaConfig::from_gguf(&g)?;
                let tokenizer = LlmTokenizer::from_gguf(&g)?;
                g.forget_metadata();
                let model = Llama::from_gguf(&mut g, cfg, precision, device)?;
                Ok(Self {
                    model,
                    tokenizer,
                    source: p,
                })
            }
            LlmSource::HfDir(d) => {
                let cfg_path = d.join("config.json");
                let text =
                    std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
                let cfg = LlamaConfig::from_hf_json(&text, &cfg_path)?;
                let weights = d.join("model.safetensors");
                if !weights.is_file() {
                    return Err(Error::MissingWeights { dir: d.clone() });
                }
                let bad = |e: candle_core::Error| Error::Weights {
                    path: weights.clone(),
                    reason: e.to_string(),
                };
                // SAFETY: the file is memory-mapped read-only; clasp writes
                // checkpoints to a temporary folder and renames it into place,
                // never in place.
                let vb = unsafe {
                    candle_nn::VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device)
                }
                .map_err(bad)?;
                let model = Llama::from_hf(vb, cfg).map_err(|e| match e {
                    Error::Candle(c) => bad(c),
                    other => other,
                })?;
                let tokenizer = LlmTokenizer::from_hf_dir(&d)?;
                Ok(Self {
                    model,
                    tokenizer,
                    source: d,
                })
            }
        }
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Writes a `LlamaForCausalLM` checkpoint (config.json, f32
    /// model.safetensors, tokenizer.json, tokenizer_config.json,
    /// generation_config.json) that transformers loads. The folder is
    /// written beside `dir` and renamed into place, so a crash leaves either
    /// the old checkpoint or the new one.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        crate::atomic::write_dir(dir, |tmp| {
            let bos = self.tokenizer.bos_id();
            let eos = self.tokenizer.eos_id();
            let cfg = self.model.hf_config(bos, eos);
            write_json(&tmp.join("config.json"), &cfg)?;
            write_json(
                &tmp.join("generation_config.json"),
                &serde_json::json!({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}),
            )?;
            let tensors = self.model.hf_tensors()?;
            let w = tmp.join("model.safetensors");
            candle_core::safetensors::save(
                &tensors
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
                &w,
            )
            .map_err(|e| Error::Weights {
                path: w.clone(),
                reason: e.to_string(),
            })?;
            self.tokenizer.save_hf(tmp)
        })
    }
}
