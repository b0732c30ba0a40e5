//! The llama architecture's configuration, read from GGUF metadata or a
//! Hugging Face `config.json`: nothing is fixed to one model's sizes.

use serde::Deserialize;

use super::gguf::GgufFile;
use crate::{Error, Result};

/// How q and k pair their dimensions for the rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (0,1), (2,3), ...: GGUF's layout for llama.
    Interleaved,
    /// Pairs (i, i + d/2): Hugging Face's `rotate_half`.
    Half,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    /// Linear position scaling (positions divided by this factor); 1.0 for none.
    pub rope_linear_factor: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub rope_layout: RopeLayout,
}

/// The parts of a Hugging Face `config.json` that the architecture reads.
#[derive(Debug, Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    rope_scaling: Option<serde_json::Value>,
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
}

impl LlamaConfig {
    /// Reads the architecture from GGUF metadata (`{arch}.*` keys).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.get_string("general.architecture")?;
        if arch != "llama" {
            return Err(g.error(format!(
                "unsupported architecture `{arch}` (general.architecture); clasp runs: llama"
            )));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let hidden_size = g.get_usize(&k("embedding_length"))?;
        let num_heads = g.get_usize(&k("attention.head_count"))?;
        let num_kv_heads = if g.has_key(&k("attention.head_count_kv")) {
            g.get_usize(&k("attention.head_count_kv"))?
        } else {
            num_heads
        };
        let head_dim = if g.has_key(&k("rope.dimension_count")) {
            g.get_usize(&k("rope.dimension_count"))?
        } else {
            hidden_size / num_heads.max(1)
        };
        let rope_theta = if g.has_key(&k("rope.freq_base")) {
            g.get_f64(&k("rope.freq_base"))? as f32
        } else {
            10_000.0
        };
        let mut rope_linear_factor = 1.0;
        if g.has_key(&k("rope.scaling.type")) {
            let ty = g.get_string(&k("rope.scaling.type"))?;
            match ty.as_str() {
                "none" => {}
                "linear" => rope_linear_factor = g.get_f64(&k("rope.scaling.factor"))? as f32,
                other => {
                    return Err(g.error(format!(
                        "unsupported rope scaling `{other}` ({}); clasp supports none and linear",
                        k("rope.scaling.type")
                    )))
                }
            }
        }
        let vocab_size = if g.has_key(&k("vocab_size")) {
            g.get_usize(&k("vocab_size"))?
        } else {
            g.get_strings("tokenizer.ggml.tokens")?.len()
        };
        let cfg = Self {
            vocab_size,
            hidden_size,
            intermediate_size: g.get_usize(&k("feed_forward_length"))?,
            num_layers: g.get_usize(&k("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta,
            rope_linear_factor,
            max_position_embeddings: g.get_usize(&k("context_length"))?,
            tie_word_embeddings: !g.has_tensor("output.weight"),
            rope_layout: RopeLayout::Interleaved,
        };
        cfg.validate().map_err(|r| g.error(r))?;
        Ok(cfg)
    }

    /// Reads a `LlamaForCausalLM` config.json.
    pub fn from_hf_json(text: &str, path: &std::path::Path) -> Result<Self> {
        let cfg_err = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| cfg_err(e.to_string()))?;
        let mt = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if mt != "llama" {
            return Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                model_type: mt.to_string(),
                supported: "llama".into(),
            });
        }
        let h: HfConfig = serde_json::from_value(v).map_err(|e| cfg_err(e.to_string()))?;
        let num_kv_heads = h.num_key_value_heads.unwrap_or(h.num_attention_heads);
        // transformers 5 writes `rope_parameters`; 4.x wrote rope_theta and rope_scaling.
        let params = h.rope_parameters.as_ref();
        let rope_theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .map(|t| t as f32)
            .or(h.rope_theta)
            .unwrap_or(10_000.0);
        let scaling = params.or(h.rope_scaling.as_ref());
        let rope_type = scaling
            .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let rope_linear_factor = match rope_type {
            "default" => 1.0,
            "linear" => scaling
                .and_then(|s| s.get("factor"))
                .and_then(|f| f.as_f64())
                .ok_or_else(|| cfg_err("linear rope scaling without a factor".into()))?
                as f32,
            other => {
                return Err(cfg_err(format!(
                    "unsupported rope scaling `{other}`; clasp supports default and linear"
                )))
            }
        };
        let cfg = Self {
            vocab_size: h.vocab_size,
            hidden_size: h.hidden_size,
            intermediate_size: h.intermediate_size,
            num_layers: h.num_hidden_layers,
            num_heads: h.num_attention_heads,
            num_kv_heads,
            head_dim: h
                .head_dim
                .unwrap_or(h.hidden_size / h.num_attention_heads.max(1)),
            rms_norm_eps: h.rms_norm_eps,
            rope_theta,
            rope_linear_factor,
            max_position_embeddings: h.max_position_embeddings,
            tie_word_embeddings: h.tie_word_embeddings,
            rope_layout: RopeLayout::Half,
        };
        cfg.validate().map_err(cfg_err)?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return Err(format!(
                "{} attention heads is not a multiple of {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!("head dimension {} must be even", self.head_dim));
        }
        if self.num_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return Err("zero layers, width or vocabulary".into());
        }
        Ok(())
    }
}
