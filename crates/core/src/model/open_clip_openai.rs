//! OpenAI's own CLIP checkpoints (`RN50.pt`, `ViT-B-32.pt`, ...): a
//! TorchScript archive or a plain state dict in OpenAI's names, which are
//! open_clip's. Their architecture is read from the tensors' shapes, as
//! open_clip's `build_model_from_openai_state_dict` does, and the file is
//! written once as an open_clip folder (config with OpenAI's preprocessing,
//! and safetensors) under the cache, which every verb then loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::{Error, Result};

/// open_clip's `model_cfg` of an OpenAI state dict, from its shapes.
/// OpenAI's models use QuickGELU and 64-wide attention heads.
pub fn model_cfg(shapes: &HashMap<String, Vec<usize>>) -> std::result::Result<Value, String> {
    let dim = |k: &str, i: usize| -> std::result::Result<usize, String> {
        shapes
            .get(k)
            .and_then(|s| s.get(i).copied())
            .ok_or_else(|| format!("no {k} (dimension {i})"))
    };
    // Distinct values of the name's `part`-th dotted field among keys with `prefix`.
    let count = |prefix: &str, part: usize| {
        let mut seen: Vec<&str> = shapes
            .keys()
            .filter(|k| k.starts_with(prefix))
            .filter_map(|k| k.split('.').nth(part))
            .collect();
        seen.sort();
        seen.dedup();
        seen.len()
    };
    let vision = if shapes.contains_key("visual.proj") {
        let width = dim("visual.conv1.weight", 0)?;
        let patch = dim("visual.conv1.weight", 3)?;
        let grid = ((dim("visual.positional_embedding", 0)? - 1) as f64)
            .sqrt()
            .round() as usize;
        json!({"layers": count("visual.transformer.resblocks.", 3), "width": width,
               "patch_size": patch, "image_size": patch * grid})
    } else if shapes.contains_key("visual.attnpool.positional_embedding") {
        let layers: Vec<usize> = (1..=4)
            .map(|b| count(&format!("visual.layer{b}."), 2))
            .collect();
        let grid = ((dim("visual.attnpool.positional_embedding", 0)? - 1) as f64)
            .sqrt()
            .round() as usize;
        json!({"layers": layers, "width": dim("visual.layer1.0.conv1.weight", 0)?,
               "image_size": grid * 32})
    } else {
        return Err("neither a ViT (visual.proj) nor a ResNet (visual.attnpool) CLIP".into());
    };
    let width = dim("ln_final.weight", 0)?;
    Ok(json!({
        "embed_dim": dim("text_projection", 1)?,
        "quick_gelu": true,
        "vision_cfg": vision,
        "text_cfg": {
            "context_length": dim("positional_embedding", 0)?,
            "vocab_size": dim("token_embedding.weight", 0)?,
            "width": width,
            "heads": width / 64,
            "layers": count("transformer.resblocks.", 2),
        }
    }))
}

/// The open_clip folder of an OpenAI checkpoint file, written once under
/// the cache (keyed by the file's path, size and modification time).
pub fn as_open_clip_dir(pt: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(pt).map_err(|e| Error::io(pt, e))?;
    let stamp = format!(
        "{}:{}:{:?}",
        std::fs::canonicalize(pt)
            .unwrap_or(pt.to_path_buf())
            .display(),
        meta.len(),
        meta.modified().ok()
    );
    let hash = blake3::hash(stamp.as_bytes()).to_hex();
    let out = clasp_common::cache_root()
        .join("openai-checkpoints")
        .join(&hash.as_str()[..16]);
    if out.join(super::open_clip::CONFIG_FILE).is_file() {
        return Ok(out);
    }
    let sd = super::torch_file::read_state_dict(pt)?;
    let shapes = sd
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    let model = model_cfg(&shapes).map_err(|reason| Error::Weights {
        path: pt.to_path_buf(),
        reason: format!("not an OpenAI CLIP checkpoint: {reason}"),
    })?;
    let cfg = json!({
        "model_cfg": model,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711],
                           "interpolation": "bicubic", "resize_mode": "shortest"}
    });
    crate::atomic::write_dir(&out, |tmp| {
        let c = tmp.join(super::open_clip::CONFIG_FILE);
        std::fs::write(
            &c,
            serde_json::to_string_pretty(&cfg).expect("JSON serialises"),
        )
        .map_err(|e| Error::io(&c, e))?;
        let w = tmp.join(super::open_clip::WEIGHT_FILES[0]);
        candle_core::safetensors::save(&sd, &w).map_err(|e| Error::Weights {
            path: w.clone(),
            reason: e.to_string(),
        })
    })?;
    Ok(out)
}
