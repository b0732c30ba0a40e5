//! open_clip's own checkpoint layout: `open_clip_config.json` (`model_cfg`,
//! `preprocess_cfg`) beside `open_clip_model.safetensors` or
//! `open_clip_pytorch_model.bin`, as LAION and DataComp publish their models,
//! or beside open_clip's training output (`epoch_N.pt`). Without
//! vocabulary files the tokenizer is the CLIP BPE open_clip bundles
//! ([`crate::preprocess::clip_bpe`]).
//!
//! For the ViT models (ViT-B-32, B-16, L-14, H-14 and their `-quickgelu`
//! variants) open_clip's `CLIP` is transformers' `CLIPModel` under other
//! names: the config and the state dict are translated once at load, and the
//! model is clasp's CLIP. What differs in substance:
//! - q, k and v are one stacked `in_proj` (split here);
//! - the projections are stored [width, embed] (transposed here);
//! - the text is pooled at the largest token id (`text_global_pool`
//!   "argmax"), which transformers does for `eos_token_id == 2`, so the
//!   translated config says 2;
//! - the tokenizer pads with id 0 rather than the end-of-text id (the
//!   causal mask makes the padding irrelevant; clasp pads as open_clip does).
//!
//! The CNN towers (OpenAI's ResNets, timm's ConvNeXt) stay in open_clip's
//! names under a CLIP with a CNN tower ([`super::open_clip_cnn`]). Towers
//! clasp cannot run (other timm towers, attentional pooling, text towers
//! from Hugging Face) are refused with what is supported.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{Error, Result};

pub const CONFIG_FILE: &str = "open_clip_config.json";
pub const WEIGHT_FILES: &[&str] = &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"];

/// The weights of an open_clip folder: its published files
/// ([`WEIGHT_FILES`]), or else open_clip's own training output,
/// `epoch_latest.pt` or the highest `epoch_N.pt` (a dict whose
/// `state_dict` has the `module.` prefix when trained with DDP).
pub fn weights_in(dir: &Path) -> Option<std::path::PathBuf> {
    if let Some(p) = WEIGHT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
    {
        return Some(p);
    }
    let latest = dir.join("epoch_latest.pt");
    if latest.is_file() {
        return Some(latest);
    }
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u64 = name
                .strip_prefix("epoch_")?
                .strip_suffix(".pt")?
                .parse()
                .ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

const SUPPORTED: &str = "open_clip ViT models with a transformer text tower (ViT-B-32, ViT-B-16, \
     ViT-L-14, ViT-H-14 and their -quickgelu variants, or any config of that form), OpenAI's \
     ResNets (RN50, RN101, RN50x4, RN50x16, RN50x64), and timm ConvNeXt towers (convnext_base, \
     convnext_base_w, convnext_large, ... with timm_pool \"\" or avg and a linear projection)";

fn d_64() -> usize {
    64
}
fn d_4() -> f64 {
    4.0
}
fn d_77() -> usize {
    77
}
fn d_49408() -> usize {
    49408
}
fn d_512() -> usize {
    512
}
fn d_8() -> usize {
    8
}
fn d_12() -> usize {
    12
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionCfg {
    pub image_size: usize,
    pub layers: usize,
    pub width: usize,
    pub patch_size: usize,
    #[serde(default = "d_64")]
    pub head_width: usize,
    #[serde(default = "d_4")]
    pub mlp_ratio: f64,
    /// Everything else: must be absent or at open_clip's default.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextCfg {
    #[serde(default = "d_77")]
    pub context_length: usize,
    #[serde(default = "d_49408")]
    pub vocab_size: usize,
    #[serde(default = "d_512")]
    pub width: usize,
    #[serde(default = "d_8")]
    pub heads: usize,
    #[serde(default = "d_12")]
    pub layers: usize,
    #[serde(default = "d_4")]
    pub mlp_ratio: f64,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelCfg {
    pub embed_dim: usize,
    #[serde(default)]
    pub quick_gelu: bool,
    pub vision_cfg: VisionCfg,
    pub text_cfg: TextCfg,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// A parsed open_clip_config.json.
#[derive(Debug, Clone)]
pub struct OpenClipConfig {
    pub model: ModelCfg,
    pub preprocess: Value,
    /// A CNN image tower: OpenAI's ResNets (the RN50 family, `vision_cfg`'s
    /// `layers` a list) or timm's ConvNeXt (LAION's ConvNeXt models);
    /// `model.vision_cfg` then carries only its image size and width.
    pub cnn: Option<super::cnn_tower::CnnConfig>,
}

/// Whether an open_clip tower flag leaves the architecture as CLIP's (absent,
/// null or open_clip's default); any other value is refused.
fn neutral(key: &str, v: &Value) -> bool {
    match key {
        // Training-only or equal to CLIP's architecture at these values.
        "patch_dropout" => true,
        "ls_init_value" => v.is_null(),
        "no_ln_pre" | "final_ln_after_pool" | "attentional_pool" | "attn_pooler_queries" => {
            v.is_null() || v == &json!(false)
        }
        "pool_type" => v.is_null() || v == "tok",
        "output_tokens" => v.is_null() || v == &json!(false),
        "pos_embed_type" => v.is_null() || v == "learnable",
        "act_kwargs" | "norm_kwargs" => v.is_null() || v == &json!({}),
        "layers" | "width" | "heads" | "hf_tokenizer_name" | "tokenizer_kwargs" => true,
        "embed_cls" => v.is_null() || v == &json!(false),
        "pad_id" => v.is_null() || v == &json!(0),
        "proj_bias" => v.is_null() || v == &json!(false),
        "proj_type" => v.is_null() || v == "linear",
        "causal_mask" => v.is_null() || v == &json!(true),
        _ => false,
    }
}

impl OpenClipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        // A bare model config (open_clip's bundled files) or the Hub's
        // {"model_cfg", "preprocess_cfg"}.
        let (model, preprocess) = match v.get("model_cfg") {
            Some(m) => (
                m.clone(),
                v.get("preprocess_cfg").cloned().unwrap_or(Value::Null),
            ),
            None => (v.clone(), Value::Null),
        };
        let unsupported = |what: String| Error::UnsupportedArchitecture {
            path: path.to_path_buf(),
            model_type: format!("open_clip {what}"),
            supported: SUPPORTED.into(),
        };
        let mut model = model;
        let timm = model["vision_cfg"]
            .get("timm_model_name")
            .is_some_and(|v| !v.is_null());
        let cnn = if timm || model["vision_cfg"]["layers"].is_array() {
            let (c, vit_shaped) = super::open_clip_cnn::config(&model).map_err(|e| {
                unsupported(if timm {
                    format!("timm image tower: {e}")
                } else {
                    format!("ModifiedResNet image tower: {e}")
                })
            })?;
            model["vision_cfg"] = vit_shaped;
            Some(c)
        } else {
            None
        };
        if model["text_cfg"]
            .get("hf_model_name")
            .is_some_and(|v| !v.is_null())
        {
            return Err(unsupported(format!(
                "Hugging Face text tower `{}`",
                model["text_cfg"]["hf_model_name"].as_str().unwrap_or("?")
            )));
        }
        let m: ModelCfg =
            serde_json::from_value(model).map_err(|e| bad(format!("model_cfg: {e}")))?;
        for (tower, other) in [
            ("vision_cfg", &m.vision_cfg.other),
            ("text_cfg", &m.text_cfg.other),
            ("model_cfg", &m.other),
        ] {
            for (k, v) in other {
                let known_top = tower == "model_cfg"
                    && matches!(
                        k.as_str(),
                        "custom_text" | "cast_dtype" | "init_logit_bias" | "init_logit_scale"
                    );
                if known_top && (k != "init_logit_bias" || v.is_null()) {
                    continue;
                }
                if !neutral(k, v) {
                    return Err(unsupported(format!("{tower}.{k} = {v}")));
                }
            }
        }
        if !m.vision_cfg.width.is_multiple_of(m.vision_cfg.head_width) {
            return Err(bad(format!(
                "vision width {} is not a multiple of head_width {}",
                m.vision_cfg.width, m.vision_cfg.head_width
            )));
        }
        Ok(Self {
            model: m,
            preprocess,
            cnn,
        })
    }

    /// The `CLIPConfig` (config.json) of the same model.
    pub fn hf_config(&self) -> Value {
        let (m, v, t) = (&self.model, &self.model.vision_cfg, &self.model.text_cfg);
        let act = if m.quick_gelu { "quick_gelu" } else { "gelu" };
        let mut out = json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": m.embed_dim,
            "logit_scale_init_value": 2.6592,
            "text_config": {
                "model_type": "clip_text_model",
                "vocab_size": t.vocab_size,
                "hidden_size": t.width,
                "intermediate_size": (t.width as f64 * t.mlp_ratio) as usize,
                "num_hidden_layers": t.layers,
                "num_attention_heads": t.heads,
                "max_position_embeddings": t.context_length,
                "hidden_act": act,
                "layer_norm_eps": 1e-5,
                "projection_dim": m.embed_dim,
                // open_clip pools at the largest id (argmax), which
                // transformers does for the legacy eos_token_id 2.
                "bos_token_id": t.vocab_size.saturating_sub(2),
                "eos_token_id": 2,
                "pad_token_id": 0
            },
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": v.width,
                "intermediate_size": (v.width as f64 * v.mlp_ratio) as usize,
                "num_hidden_layers": v.layers,
                "num_attention_heads": v.width / v.head_width,
                "num_channels": 3,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "hidden_act": act,
                "layer_norm_eps": 1e-5,
                "projection_dim": m.embed_dim
            }
        });
        if let Some(c) = &self.cnn {
            out["vision_config"] = c.to_vision_json();
        }
        out
    }

    /// The preprocessor_config.json of the same preprocessing: open_clip's
    /// eval transform (resize the shortest side, centre crop, or a squash)
    /// in CLIPImageProcessor's terms.
    pub fn hf_preprocessor(&self, path: &Path) -> Result<Value> {
        let p = &self.preprocess;
        let size = self.model.vision_cfg.image_size;
        let mean = p
            .get("mean")
            .cloned()
            .unwrap_or(json!([0.48145466, 0.4578275, 0.40821073]));
        let std = p
            .get("std")
            .cloned()
            .unwrap_or(json!([0.26862954, 0.26130258, 0.27577711]));
        let resample = match p
            .get("interpolation")
            .and_then(Value::as_str)
            .unwrap_or("bicubic")
        {
            "bicubic" => 3,
            "bilinear" => 2,
            other => {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    reason: format!(
                    "preprocess_cfg.interpolation `{other}` is not supported (bicubic, bilinear)"
                ),
                })
            }
        };
        let common = json!({
            "do_resize": true, "resample": resample, "do_rescale": true,
            "rescale_factor": 1.0 / 255.0, "do_normalize": true, "image_mean": mean, "image_std": std,
            "do_convert_rgb": true
        });
        let mut out = match p
            .get("resize_mode")
            .and_then(Value::as_str)
            .unwrap_or("shortest")
        {
            // torchvision's CenterCrop rounds odd margins half to even.
            "shortest" => json!({"image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": size}, "do_center_crop": true,
                "crop_size": {"height": size, "width": size},
                "clasp_crop_rounding": "torchvision"}),
            "squash" => json!({"image_processor_type": "ChineseCLIPImageProcessor",
                "size": {"height": size, "width": size}, "do_center_crop": false,
                "crop_size": {"height": size, "width": size}}),
            other => {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    reason: format!(
                        "preprocess_cfg.resize_mode `{other}` is not supported (shortest, squash)"
                    ),
                })
            }
        };
        for (k, v) in common.as_object().expect("an object") {
            out[k] = v.clone();
        }
        Ok(out)
    }
}

/// open_clip's state dict under transformers' `CLIPModel` names.
pub fn to_hf_tensors(
    cfg: &OpenClipConfig,
    mut sd: HashMap<String, Tensor>,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    if let Some(c) = &cfg.cnn {
        super::open_clip_cnn::move_visual(&mut sd, &mut out, c, path)?;
    }
    let mut take = |k: &str| {
        sd.remove(k).ok_or_else(|| Error::Weights {
            path: path.to_path_buf(),
            reason: format!("the open_clip state dict lacks `{k}`"),
        })
    };
    let (v, t) = (&cfg.model.vision_cfg, &cfg.model.text_cfg);
    let blocks = |take: &mut dyn FnMut(&str) -> Result<Tensor>,
                  out: &mut HashMap<String, Tensor>,
                  src: &str,
                  dst: &str,
                  n: usize,
                  width: usize|
     -> Result<()> {
        for i in 0..n {
            let (s, d) = (format!("{src}.{i}"), format!("{dst}.{i}"));
            for (a, b) in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")] {
                for p in ["weight", "bias"] {
                    out.insert(format!("{d}.{b}.{p}"), take(&format!("{s}.{a}.{p}"))?);
                }
            }
            let w = take(&format!("{s}.attn.in_proj_weight"))?;
            let bias = take(&format!("{s}.attn.in_proj_bias"))?;
            for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                out.insert(
                    format!("{d}.self_attn.{name}.weight"),
                    w.narrow(0, j * width, width)?.contiguous()?,
                );
                out.insert(
                    format!("{d}.self_attn.{name}.bias"),
                    bias.narrow(0, j * width, width)?.contiguous()?,
                );
            }
            for (a, b) in [
                ("attn.out_proj", "self_attn.out_proj"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ] {
                for p in ["weight", "bias"] {
                    out.insert(format!("{d}.{b}.{p}"), take(&format!("{s}.{a}.{p}"))?);
                }
            }
        }
        Ok(())
    };
    if cfg.cnn.is_none() {
        let ve = "vision_model.embeddings";
        out.insert(
            format!("{ve}.patch_embedding.weight"),
            take("visual.conv1.weight")?,
        );
        out.insert(
            format!("{ve}.class_embedding"),
            take("visual.class_embedding")?,
        );
        out.insert(
            format!("{ve}.position_embedding.weight"),
            take("visual.positional_embedding")?,
        );
        for (a, b) in [
            ("visual.ln_pre", "vision_model.pre_layrnorm"),
            ("visual.ln_post", "vision_model.post_layernorm"),
        ] {
            for p in ["weight", "bias"] {
                out.insert(format!("{b}.{p}"), take(&format!("{a}.{p}"))?);
            }
        }
        blocks(
            &mut take,
            &mut out,
            "visual.transformer.resblocks",
            "vision_model.encoder.layers",
            v.layers,
            v.width,
        )?;
        out.insert(
            "visual_projection.weight".into(),
            take("visual.proj")?.t()?.contiguous()?,
        );
    }
    let te = "text_model.embeddings";
    out.insert(
        format!("{te}.token_embedding.weight"),
        take("token_embedding.weight")?,
    );
    out.insert(
        format!("{te}.position_embedding.weight"),
        take("positional_embedding")?,
    );
    blocks(
        &mut take,
        &mut out,
        "transformer.resblocks",
        "text_model.encoder.layers",
        t.layers,
        t.width,
    )?;
    for p in ["weight", "bias"] {
        out.insert(
            format!("text_model.final_layer_norm.{p}"),
            take(&format!("ln_final.{p}"))?,
        );
    }
    out.insert(
        "text_projection.weight".into(),
        take("text_projection")?.t()?.contiguous()?,
    );
    out.insert("logit_scale".into(), take("logit_scale")?.reshape(())?);
    // Buffers open_clip may have saved (the causal mask), nothing else.
    sd.retain(|k, _| k != "attn_mask");
    if let Some(k) = sd.keys().next() {
        return Err(Error::Weights {
            path: path.to_path_buf(),
            reason: format!(
                "the open_clip state dict has `{k}`, which a ViT CLIP does not ({} unexpected)",
                sd.len()
            ),
        });
    }
    Ok(out)
}

/// An open_clip checkpoint translated: config.json, preprocessor_config.json
/// and the tensors as transformers names them.
pub struct Translated {
    pub config_json: Value,
    pub preprocessor_json: Value,
    pub tensors: HashMap<String, Tensor>,
}

/// Reads and translates the open_clip checkpoint with `config` and `weights`.
pub fn translate(config: &Path, weights: &Path) -> Result<Translated> {
    let cfg = OpenClipConfig::from_file(config)?;
    let sd = super::loader::read_tensors(weights)?;
    Ok(Translated {
        config_json: cfg.hf_config(),
        preprocessor_json: cfg.hf_preprocessor(config)?,
        tensors: to_hf_tensors(&cfg, sd, weights)?,
    })
}

/// Writes the open_clip checkpoint in `dir` as a transformers `CLIPModel`
/// checkpoint in `out` (atomically): config.json, model.safetensors,
/// preprocessor_config.json, and the tokenizer files the directory has, or
/// else the CLIP BPE open_clip bundles (vocab.json, merges.txt). Returns
/// whether the directory had any.
pub fn write_hf(dir: &Path, out: &Path) -> Result<bool> {
    let config = dir.join(CONFIG_FILE);
    let weights = weights_in(dir).ok_or_else(|| Error::MissingWeights {
        dir: dir.to_path_buf(),
    })?;
    let t = translate(&config, &weights)?;
    let vision_type = t.config_json["vision_config"]["model_type"].clone();
    if vision_type != "clip_vision_model" {
        return Err(Error::UnsupportedArchitecture {
            path: config,
            model_type: format!("open_clip CLIP with a {vision_type} image tower"),
            supported: "ViT image towers: transformers' CLIPModel has no CNN tower; clasp \
                        runs this model in open_clip's own layout"
                .into(),
        });
    }
    let tok_files: Vec<&str> = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
    ]
    .into_iter()
    .filter(|f| dir.join(f).is_file())
    .collect();
    crate::atomic::write_dir(out, |tmp| {
        let w = tmp.join("model.safetensors");
        candle_core::safetensors::save(&t.tensors, &w).map_err(|e| Error::Weights {
            path: w.clone(),
            reason: e.to_string(),
        })?;
        for (name, v) in [
            ("config.json", &t.config_json),
            ("preprocessor_config.json", &t.preprocessor_json),
        ] {
            let p = tmp.join(name);
            let text = serde_json::to_string_pretty(v).expect("JSON values serialise");
            std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
        }
        for f in &tok_files {
            std::fs::copy(dir.join(f), tmp.join(f)).map_err(|e| Error::io(dir.join(f), e))?;
        }
        if tok_files.is_empty() {
            // open_clip's own tokenizer, the BPE its package bundles.
            crate::preprocess::clip_bpe::write(tmp)?;
        }
        Ok(())
    })?;
    Ok(!tok_files.is_empty())
}

#[cfg(test)]
#[path = "open_clip_tests.rs"]
mod tests;
