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
        self.peft_tensors_for(PeftBase::Llava)
    }

    /// The tensors in PEFT's names for an adapter of `base`.
    pub fn peft_tensors_for(&self, base: PeftBase) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, slots) in self.layers.iter().enumerate() {
            for (j, p) in slots.iter().enumerate() {
                if let Some(p) = p {
                    let m = module_in(base, i, TARGETS[j]);
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
        self.peft_config_for(PeftBase::Llava)
    }

    /// [`Self::peft_config`] for an adapter of `base`.
    pub fn peft_config_for(&self, base: PeftBase) -> serde_json::Value {
        let names: Vec<&str> = TARGETS
            .iter()
            .copied()
            .filter(|t| self.cfg.slot(t).is_some())
            .collect();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": match base {
                PeftBase::Llava => serde_json::Value::Null,
                PeftBase::CausalLm => "CAUSAL_LM".into(),
            },
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
            "target_modules": match base {
                PeftBase::Llava => format!(
                    r".*language_model\.layers\.\d+\.(self_attn|mlp)\.({})",
                    names.join("|")
                ),
                PeftBase::CausalLm => format!(
                    r"model\.layers\.\d+\.(self_attn|mlp)\.({})",
                    names.join("|")
                ),
            },
            "modules_to_save": null,
        })
    }

    /// Writes `adapter_model.safetensors` and `adapter_config.json` into
    /// `dir` (a folder being written; the caller renames it into place),
    /// for a `LlavaForConditionalGeneration` over a model of config `model`.
    pub fn save_peft(&self, dir: &Path, model: &LlamaConfig) -> Result<()> {
        self.save_peft_for(dir, model, PeftBase::Llava)
    }

    /// [`Self::save_peft`] for an adapter of `base`. A model held in GGUF's
    /// interleaved rotary order has its q and k adapters' B rows put back
    /// in Hugging Face's order, as its weights are when saved.
    pub fn save_peft_for(&self, dir: &Path, model: &LlamaConfig, base: PeftBase) -> Result<()> {
        let layout = self.in_layout(model, RopeLayout::Half)?;
        let w = dir.join("adapter_model.safetensors");
        let map: HashMap<String, Tensor> = layout.peft_tensors_for(base).into_iter().collect();
        candle_core::safetensors::save(&map, &w).map_err(|e| Error::Weights {
            path: w.clone(),
            reason: e.to_string(),
        })?;
        crate::atomic::write_json(
            &dir.join("adapter_config.json"),
            &self.peft_config_for(base),
        )
    }

    /// This adapter with its q and k B rows in `to`'s order, for a model
    /// whose weights are held in `model.rope_layout`'s (nothing moves for a
    /// model in Hugging Face's order).
    fn in_layout(&self, model: &LlamaConfig, to: RopeLayout) -> Result<Lora> {
        let mut out = self.clone();
        if model.rope_layout == RopeLayout::Half {
            return Ok(out);
        }
        for slots in out.layers.iter_mut() {
            for (j, heads) in [
                (Proj::Q as usize, model.num_heads),
                (Proj::K as usize, model.num_kv_heads),
            ] {
                if let Some(p) = slots[j].as_mut() {
                    p.b = match to {
                        RopeLayout::Half => super::ops::interleaved_to_half_rows(&p.b, heads)?,
                        RopeLayout::Interleaved => {
                            super::ops::half_to_interleaved_rows(&p.b, heads)?
                        }
                    };
                }
            }
        }
        Ok(out)
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
        // Saved in Hugging Face's order; held in the model's.
        Self {
            cfg: LoraConfig {
                rank,
                alpha,
                targets,
            },
            layers,
        }
        .in_layout(model, RopeLayout::Interleaved)
    }

    /// Whether `dir` holds an adapter.
    pub fn present(dir: &Path) -> bool {
        dir.join("adapter_config.json").is_file()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An adapter on q and k of a model held in GGUF's interleaved order is
    /// saved in Hugging Face's row order and read back as it was.
    #[test]
    fn q_and_k_adapters_cross_the_rotary_layouts() {
        let model = LlamaConfig {
            vocab_size: 16,
            hidden_size: 8,
            intermediate_size: 16,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_linear_factor: 1.0,
            max_position_embeddings: 32,
            tie_word_embeddings: true,
            rope_layout: RopeLayout::Interleaved,
        };
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            targets: vec!["q_proj".into(), "k_proj".into(), "v_proj".into()],
        };
        let mut lora = Lora::init(&cfg, &model, 3, &Device::Cpu).unwrap();
        // B is zero at init: give it distinct rows.
        for slots in lora.layers.iter_mut() {
            for p in slots.iter_mut().flatten() {
                let (o, r) = p.b.dims2().unwrap();
                let v: Vec<f32> = (0..o * r).map(|x| x as f32).collect();
                p.b = Tensor::from_vec(v, (o, r), &Device::Cpu).unwrap();
            }
        }
        let d = tempfile::tempdir().unwrap();
        lora.save_peft_for(d.path(), &model, PeftBase::CausalLm)
            .unwrap();
        let saved = candle_core::safetensors::load(
            d.path().join("adapter_model.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let b = |l: &Lora, j: usize| {
            l.layers[0][j]
                .as_ref()
                .unwrap()
                .b
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let q = saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].clone();
        let want = super::super::ops::interleaved_to_half_rows(
            &lora.layers[0][0].as_ref().unwrap().b,
            model.num_heads,
        )
        .unwrap();
        assert_eq!(
            q.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_ne!(
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b(&lora, 0)
        );
        let back = Lora::load_peft(d.path(), &model, &Device::Cpu).unwrap();
        for j in [0, 1, 2] {
            assert_eq!(b(&back, j), b(&lora, j), "target {j}");
        }
    }
}
