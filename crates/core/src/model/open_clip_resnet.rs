//! open_clip's ResNet CLIP models (OpenAI's RN50, RN101, RN50x4, RN50x16,
//! RN50x64): their `vision_cfg` read as a [`ModifiedResNetConfig`], and
//! their `visual.*` tensors kept under open_clip's own names (transformers
//! has no CLIP ResNet to translate to). The attention pool's output
//! projection already gives the embedding, so the checkpoint's
//! `visual_projection` is the identity.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::modified_resnet::ModifiedResNetConfig;
use crate::{Error, Result};

/// The tower's config from an open_clip `model_cfg` whose
/// `vision_cfg.layers` is a list, and a ViT-shaped `vision_cfg` (image size,
/// feature width) for the parts of the translation that read only those.
pub fn config(model: &Value) -> std::result::Result<(ModifiedResNetConfig, Value), String> {
    let v = &model["vision_cfg"];
    let layers: Vec<usize> =
        serde_json::from_value(v["layers"].clone()).map_err(|e| e.to_string())?;
    let get = |k: &str, d: Option<u64>| -> std::result::Result<usize, String> {
        v.get(k)
            .and_then(Value::as_u64)
            .or(d)
            .map(|x| x as usize)
            .ok_or_else(|| format!("vision_cfg.{k} missing"))
    };
    for (k, val) in v.as_object().into_iter().flatten() {
        let known = matches!(
            k.as_str(),
            "layers" | "width" | "head_width" | "image_size" | "patch_size"
        );
        if !known && !val.is_null() {
            return Err(format!("vision_cfg.{k} = {val} (a ModifiedResNet has layers, width, head_width, image_size)"));
        }
    }
    let embed = model["embed_dim"].as_u64().ok_or("embed_dim missing")? as usize;
    let r = ModifiedResNetConfig {
        layers,
        width: get("width", Some(64))?,
        head_width: get("head_width", Some(64))?,
        image_size: get("image_size", Some(224))?,
        output_dim: embed,
    };
    r.check()?;
    let vit_shaped = json!({
        "image_size": r.image_size, "layers": 0, "width": r.feature_dim(),
        "head_width": r.head_width, "patch_size": 32,
    });
    Ok((r, vit_shaped))
}

/// Moves every `visual.*` tensor of `sd` to `out` as `vision_model.*` and
/// adds the identity `visual_projection.weight` [embed, embed].
pub fn move_visual(
    sd: &mut HashMap<String, Tensor>,
    out: &mut HashMap<String, Tensor>,
    embed: usize,
    path: &Path,
) -> Result<()> {
    let keys: Vec<String> = sd
        .keys()
        .filter(|k| k.starts_with("visual."))
        .cloned()
        .collect();
    if !keys.iter().any(|k| k == "visual.attnpool.c_proj.weight") {
        return Err(Error::Weights {
            path: path.to_path_buf(),
            reason: "a ResNet CLIP config, but no `visual.attnpool.c_proj.weight` in the weights"
                .into(),
        });
    }
    for k in keys {
        let t = sd.remove(&k).expect("listed above");
        out.insert(format!("vision_model.{}", &k["visual.".len()..]), t);
    }
    out.insert(
        "visual_projection.weight".into(),
        Tensor::eye(embed, DType::F32, &Device::Cpu)?,
    );
    Ok(())
}
