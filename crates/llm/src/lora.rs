//! LoRA on the language model's projections (Hu et al.; PEFT's `LoraLayer`):
//! `y = W x + (alpha / r) · B (A x)`, with A `[r, in]` drawn as PEFT draws it
//! (Kaiming-uniform, bound `1/sqrt(in)`) and B `[out, r]` zero, so a fresh
//! adapter changes nothing.
//!
//! Adapters are saved in PEFT's layout (`adapter_model.safetensors` with
//! `base_model.model.<module>.lora_A.weight` / `lora_B.weight`, and
//! `adapter_config.json`), under the module names of the model they adapt,
//! so `PeftModel.from_pretrained` loads them; `Llama::merge_lora` folds
//! them into the weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::config::{LlamaConfig, RopeLayout};
use crate::rng::Rng;
use crate::{Error, Result};

/// The projections LoRA can adapt, in the order a block holds them.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A projection LoRA can adapt, named; its value is its index in [`TARGETS`]
/// (and in a block's adapter slots).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    Q = 0,
    K = 1,
    V = 2,
    O = 3,
    Gate = 4,
    Up = 5,
    Down = 6,
}

/// Which sub-module holds a target (`self_attn` or `mlp`).
fn parent(target: &str) -> &'static str {
    if matches!(target, "gate_proj" | "up_proj" | "down_proj") {
        "mlp"
    } else {
        "self_attn"
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Names from [`TARGETS`].
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: TARGETS.iter().map(|t| t.to_string()).collect(),
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Checks the rank, alpha and target names.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("the LoRA rank must be at least 1".into());
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(format!("LoRA alpha must be > 0, got {}", self.alpha));
        }
        if self.targets.is_empty() {
            return Err("LoRA needs at least one target module".into());
        }
        for t in &self.targets {
            if !TARGETS.contains(&t.as_str()) {
                return Err(format!(
                    "unknown LoRA target `{t}`; the targets are {}",
                    TARGETS.join(", ")
                ));
            }
        }
        Ok(())
    }

    fn slot(&self, target: &str) -> Option<usize> {
        self.targets
            .iter()
            .any(|t| t == target)
            .then(|| TARGETS.iter().position(|t| *t == target))
            .flatten()
    }
}

/// One adapted projection.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
}

impl LoraPair {
    /// `scale · B (A x)` for `x` `[.., in]`.
    pub fn delta(&self, x: &Tensor, scale: f64) -> Result<Tensor> {
        let h = x.broadcast_matmul(&self.a.t()?)?;
        Ok((h.broadcast_matmul(&self.b.t()?)? * scale)?)
    }
}

/// The adapters of every layer: `layers[i][j]` adapts `TARGETS[j]` of
/// layer i, when targeted.
#[derive(Debug, Clone)]
pub struct Lora {
    pub cfg: LoraConfig,
    pub layers: Vec<[Option<LoraPair>; 7]>,
}

/// `(out, in)` of a target.
fn dims(c: &LlamaConfig, target: &str) -> (usize, usize) {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    match target {
        "q_proj" => (c.num_heads * c.head_dim, h),
        "k_proj" | "v_proj" => (c.num_kv_heads * c.head_dim, h),
        "o_proj" => (h, c.num_heads * c.head_dim),
        "gate_proj" | "up_proj" => (i, h),
        _ => (h, i),
    }
}

/// The model a PEFT adapter's module names belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeftBase {
    /// `LlavaForConditionalGeneration` (transformers 5 names).
    Llava,
    /// `LlamaForCausalLM`: the language model alone.
    CausalLm,
}

impl PeftBase {
    fn layers(self) -> &'static str {
        match self {
            PeftBase::Llava => "model.language_model.layers",
            PeftBase::CausalLm => "model.layers",
        }
    }
}

/// The module path of layer `i`'s target inside a
/// `LlavaForConditionalGeneration` (transformers 5 names).
fn module(i: usize, target: &str) -> String {
    module_in(PeftBase::Llava, i, target)
}

fn module_in(base: PeftBase, i: usize, target: &str) -> String {
    format!("{}.{i}.{}.{target}", base.layers(), parent(target))
}

impl Lora {
    /// A fresh adapter: A drawn, B zero.
    pub fn init(cfg: &LoraConfig, model: &LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.check().map_err(Error::Report)?;
        let mut rng = Rng(seed ^ 0x4C6F_5241);
        let mut layers = Vec::with_capacity(model.num_layers);
        for _ in 0..model.num_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for (j, t) in TARGETS.iter().enumerate() {
                if cfg.slot(t).is_none() {
                    continue;
                }
                let (out, inp) = dims(model, t);
                let bound = 1.0 / (inp as f64).sqrt();
                let a = rng.symmetric(cfg.rank * inp, bound);
                slots[j] = Some(LoraPair {
                    a: Tensor::from_vec(a, (cfg.rank, inp), device)?,
                    b: Tensor::zeros((out, cfg.rank), DType::F32, device)?,
                });
            }
            layers.push(slots);
        }
        Ok(Self {
            cfg: cfg.clone(),
            layers,
        })
    }

    /// The same adapter on trainable variables, with the variables named
    /// as PEFT saves them.
    pub fn into_vars(self) -> Result<(Self, Vec<(String, Var)>)> {
        let mut vars = Vec::new();
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, slots) in self.layers.into_iter().enumerate() {
            let mut out: [Option<LoraPair>; 7] = Default::default();
            for (j, p) in slots.into_iter().enumerate() {
                let Some(p) = p else { continue };
                let m = module(i, TARGETS[j]);
                let a = Var::from_tensor(&p.a)?;
                let b = Var::from_tensor(&p.b)?;
                out[j] = Some(LoraPair {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                });
                vars.push((format!("base_model.model.{m}.lora_A.weight"), a));
                vars.push((format!("base_model.model.{m}.lora_B.weight"), b));
            }
            layers.push(out);
        }
        Ok((
            Self {
                cfg: self.cfg,
                layers,
            },
            vars,
        ))
    }

    /// The tensors in PEFT's names.
    pub fn peft_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, slots) in self.layers.iter().enumerate() {
            for (j, p) in slots.iter().enumerate() {
                if let Some(p) = p {
                    let m = module(i, TARGETS[j]);
                    out.push((format!("base_model.model.{m}.lora_A.weight"), p.a.clone()));
                    out.push((format!("base_model.model.{m}.lora_B.weight"), p.b.clone()));
                }
            }
        }
        out
    }

    /// PEFT's `adapter_config.json`. The targets are a regular expression
    /// over the language model's layers, so the vision tower's own
    /// `q_proj`s are not adapted.
    pub fn peft_config(&self) -> serde_json::Value {
        let names: Vec<&str> = TARGETS
            .iter()
            .copied()
            .filter(|t| self.cfg.slot(t).is_some())
            .collect();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": null,
            "base_model_name_or_path": null,
            "r": self.cfg.rank,
            "lora_alpha": self.cfg.alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "target_modules": format!(
                r".*language_model\.layers\.\d+\.(self_attn|mlp)\.({})",
                names.join("|")
            ),
            "modules_to_save": null,
        })
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into
    /// `dir` (a folder being written; the caller renames it into place).
    /// q and k must be in Hugging Face's rotate-half row order.
    pub fn save_peft(&self, dir: &Path, layout: RopeLayout) -> Result<()> {
        if layout != RopeLayout::Half
            && self
                .cfg
                .targets
                .iter()
                .any(|t| t == "q_proj" || t == "k_proj")
        {
            return Err(Error::Report(
                "LoRA on q_proj/k_proj is saved for a language model in Hugging Face's layout; start stage 2 from a VLM checkpoint (--init)".into(),
            ));
        }
        let w = dir.join("adapter_model.safetensors");
        let map: HashMap<String, Tensor> = self.peft_tensors().into_iter().collect();
        candle_core::safetensors::save(&map, &w).map_err(|e| Error::Weights {
            path: w.clone(),
            reason: e.to_string(),
        })?;
        crate::atomic::write_json(&dir.join("adapter_config.json"), &self.peft_config())
    }

    /// Reads a PEFT adapter from `dir`, for a model of config `model`.
    pub fn load_peft(dir: &Path, model: &LlamaConfig, device: &Device) -> Result<Self> {
        let cp = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cp).map_err(|e| Error::io(&cp, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: cp.clone(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| Error::Config {
            path: cp.clone(),
            reason,
        };
        let rank = v["r"]
            .as_u64()
            .ok_or_else(|| bad("no integer `r`".into()))? as usize;
        let alpha = v["lora_alpha"]
            .as_f64()
            .ok_or_else(|| bad("no number `lora_alpha`".into()))?;
        let w = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&w, device).map_err(|e| Error::Weights {
            path: w.clone(),
            reason: e.to_string(),
        })?;
        // The names say which model the adapter was made for; adapters
        // saved in bf16 or f16 are widened to the f32 they run in.
        let base = if tensors.keys().any(|k| k.contains(PeftBase::Llava.layers())) {
            PeftBase::Llava
        } else {
            PeftBase::CausalLm
        };
        let mut targets: Vec<String> = Vec::new();
        let mut layers = Vec::with_capacity(model.num_layers);
        for i in 0..model.num_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for (j, t) in TARGETS.iter().enumerate() {
                let m = module_in(base, i, t);
                let (a, b) = (
                    tensors.get(&format!("base_model.model.{m}.lora_A.weight")),
                    tensors.get(&format!("base_model.model.{m}.lora_B.weight")),
                );
                let (Some(a), Some(b)) = (a, b) else { continue };
                let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
                let (out, inp) = dims(model, t);
                if a.dims() != [rank, inp] || b.dims() != [out, rank] {
                    return Err(Error::Weights {
                        path: w.clone(),
                        reason: format!(
                            "{m}: lora_A {:?} and lora_B {:?}, expected [{rank}, {inp}] and [{out}, {rank}]",
                            a.dims(),
                            b.dims()
                        ),
                    });
                }
                if !targets.iter().any(|x| x == t) {
                    targets.push(t.to_string());
                }
                slots[j] = Some(LoraPair { a, b });
            }
            layers.push(slots);
        }
        if targets.is_empty() {
            return Err(Error::Weights {
                path: w,
                reason: "no lora_A/lora_B tensors for the language model's layers".into(),
            });
        }
        targets.sort_by_key(|t| TARGETS.iter().position(|x| x == t));
        if model.rope_layout != RopeLayout::Half
            && targets.iter().any(|t| t == "q_proj" || t == "k_proj")
        {
            return Err(Error::Weights {
                path: w,
                reason: "LoRA on q_proj/k_proj is in Hugging Face's row order; this model holds q and k in GGUF's interleaved order (load it from a Hugging Face checkpoint)".into(),
            });
        }
        Ok(Self {
            cfg: LoraConfig {
                rank,
                alpha,
                targets,
            },
            layers,
        })
    }

    /// Whether `dir` holds an adapter.
    pub fn present(dir: &Path) -> bool {
        dir.join("adapter_config.json").is_file()
    }
}
