//! open_clip's CLIP models with CNN image towers: OpenAI's ResNets (RN50,
//! RN101, RN50x4, RN50x16, RN50x64; `vision_cfg.layers` a list) and timm's
//! ConvNeXt (LAION's models; `vision_cfg.timm_model_name`). Their
//! `vision_cfg` is read as a [`CnnConfig`], and their `visual.*` tensors
//! keep open_clip's own names (transformers has no CLIP with a CNN tower
//! to translate to). The towers end in the embedding already (the
//! ResNet's attention pool projects; the ConvNeXt has its `head.proj`), so
//! the checkpoint's `visual_projection` is the identity.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::cnn_tower::CnnConfig;
use super::convnext::ConvNextConfig;
use super::modified_resnet::ModifiedResNetConfig;
use crate::{Error, Result};

/// The tower's config from an open_clip `model_cfg` with a CNN tower, and a
/// ViT-shaped `vision_cfg` (image size, width) for the parts of the
/// translation that read only those.
pub fn config(model: &Value) -> std::result::Result<(CnnConfig, Value), String> {
    let v = &model["vision_cfg"];
    let embed = model["embed_dim"].as_u64().ok_or("embed_dim missing")? as usize;
    let get = |k: &str, d: u64| v.get(k).and_then(Value::as_u64).unwrap_or(d) as usize;
    let image_size = get("image_size", 224);
    let only = |known: &[&str]| -> std::result::Result<(), String> {
        for (k, val) in v.as_object().into_iter().flatten() {
            if !known.contains(&k.as_str()) && !val.is_null() {
                return Err(format!("vision_cfg.{k} = {val} is not supported"));
            }
        }
        Ok(())
    };
    let cnn = if let Some(name) = v.get("timm_model_name").and_then(Value::as_str) {
        only(&[
            "timm_model_name",
            "timm_model_pretrained",
            "timm_pool",
            "timm_proj",
            "timm_proj_bias",
            "timm_drop",
            "timm_drop_path",
            "image_size",
        ])?;
        let pool = v.get("timm_pool").and_then(Value::as_str).unwrap_or("avg");
        let proj = v
            .get("timm_proj")
            .and_then(Value::as_str)
            .unwrap_or("linear");
        let bias = v
            .get("timm_proj_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !matches!(pool, "" | "avg") || proj != "linear" || bias {
            return Err(format!(
                "`{name}` with timm_pool {pool:?}, timm_proj {proj:?}, timm_proj_bias {bias} \
                 (only an average pool and a bias-free linear projection)"
            ));
        }
        let c = ConvNextConfig::timm(name, image_size, embed).ok_or_else(|| {
            format!("`{name}` (timm ConvNeXt towers only: convnext_tiny .. xxlarge)")
        })?;
        CnnConfig::ConvNext(c)
    } else {
        only(&["layers", "width", "head_width", "image_size", "patch_size"])?;
        let r = ModifiedResNetConfig {
            layers: serde_json::from_value(v["layers"].clone()).map_err(|e| e.to_string())?,
            width: get("width", 64),
            head_width: get("head_width", 64),
            image_size,
            output_dim: embed,
        };
        r.check()?;
        CnnConfig::ModifiedResNet(r)
    };
    let vit_shaped = json!({
        "image_size": image_size, "layers": 0, "width": cnn.features(),
        "head_width": 1, "patch_size": 32,
    });
    Ok((cnn, vit_shaped))
}

/// Moves every `visual.*` tensor of `sd` to `out` as `vision_model.*` and
/// adds the identity `visual_projection.weight` [embed, embed].
pub fn move_visual(
    sd: &mut HashMap<String, Tensor>,
    out: &mut HashMap<String, Tensor>,
    cnn: &CnnConfig,
    path: &Path,
) -> Result<()> {
    let last = match cnn {
        CnnConfig::ConvNext(_) => "visual.head.proj.weight",
        _ => "visual.attnpool.c_proj.weight",
    };
    let keys: Vec<String> = sd
        .keys()
        .filter(|k| k.starts_with("visual."))
        .cloned()
        .collect();
    if !keys.iter().any(|k| k == last) {
        return Err(Error::Weights {
            path: path.to_path_buf(),
            reason: format!("a {} config, but no `{last}` in the weights", cnn.name()),
        });
    }
    for k in keys {
        let t = sd.remove(&k).expect("listed above");
        out.insert(format!("vision_model.{}", &k["visual.".len()..]), t);
    }
    let embed = cnn.features();
    out.insert(
        "visual_projection.weight".into(),
        Tensor::eye(embed, DType::F32, &Device::Cpu)?,
    );
    Ok(())
}
