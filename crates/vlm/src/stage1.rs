//! A BLIP-2 stage-1 folder (`clasp train --task qformer`'s output, or a
//! `Blip2ForImageTextRetrieval` over BLIP-2's ViT) as the start of stage 2,
//! as BLIP-2 goes on: its locked CNN or ViT becomes the VLM's image tower and its Q-Former (queries, self- and cross-attention, the
//! queries' feed-forward; the text feed-forward stays behind) the
//! connector, with a fresh `language_projection` to the language model's
//! width.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use clasp_core::model::blip2::Blip2Config;
use clasp_core::model::config::VisionConfig;

use super::connector::{Connector, ConnectorKind};
use super::model::TowerSpec;
use crate::preprocess::{ImageProcessor, ImageProcessorConfig};
use crate::{Error, Result};

/// What a stage-1 folder gives a VLM: the tower's config, kind, tensors
/// (the tower's own names) and preprocessing, and the connector.
pub struct Stage1Parts {
    pub vision_cfg: VisionConfig,
    pub tower_spec: TowerSpec,
    pub tower: HashMap<String, Tensor>,
    pub processor: ImageProcessor,
    pub connector: Connector,
}

/// The connector a stage-1 Q-Former of `cfg` becomes.
pub fn connector_kind(cfg: &Blip2Config) -> Result<ConnectorKind> {
    let q = &cfg.qformer_config;
    if q.num_attention_heads == 0 || !q.hidden_size.is_multiple_of(q.num_attention_heads) {
        return Err(Error::Report(format!(
            "the Q-Former's {} heads do not divide its width {}",
            q.num_attention_heads, q.hidden_size
        )));
    }
    let kind = ConnectorKind::QFormer {
        queries: cfg.num_query_tokens,
        layers: q.num_hidden_layers,
        heads: q.num_attention_heads,
        head_dim: q.hidden_size / q.num_attention_heads,
        cross_every: q.cross_attention_frequency,
        intermediate: (q.intermediate_size != 4 * q.hidden_size).then_some(q.intermediate_size),
    };
    // The connector's Q-Former has BERT's activation and epsilon.
    let c = super::connector::qformer_config(kind, q.encoder_hidden_size);
    if c.hidden_act != q.hidden_act || c.layer_norm_eps != q.layer_norm_eps {
        return Err(Error::Report(format!(
            "the Q-Former uses {:?} and LayerNorm eps {}; clasp's Q-Former connector uses BERT's \
             ({:?}, {})",
            q.hidden_act, q.layer_norm_eps, c.hidden_act, c.layer_norm_eps
        )));
    }
    Ok(kind)
}

/// Reads the stage-1 folder `dir` for a language model `text_dim` wide;
/// the projection is drawn from `seed`.
pub fn read(dir: &Path, text_dim: usize, seed: u64, device: &Device) -> Result<Stage1Parts> {
    let cfg = Blip2Config::from_file(&dir.join("config.json"))?;
    let (vision_cfg, tower_spec) = match &cfg.cnn {
        Some(c) => (c.vision_config(), TowerSpec::Cnn(c.clone())),
        None => (
            cfg.vision_config.vision_config(),
            TowerSpec::Blip2(cfg.vision_config.clone()),
        ),
    };
    let kind = connector_kind(&cfg)?;
    let w = dir.join("model.safetensors");
    let all = candle_core::safetensors::load(&w, device).map_err(|e| Error::Weights {
        path: w.clone(),
        reason: e.to_string(),
    })?;
    let tower: HashMap<String, Tensor> = all
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("vision_model.")?.to_string(), v.clone())))
        .collect();
    let width = vision_cfg.hidden_size;
    // Everything the connector has that the folder holds; the projection new.
    let fresh = Connector::new(kind, width, text_dim, seed, device)?;
    let tensors: HashMap<String, Tensor> = fresh
        .vars()
        .iter()
        .map(|(k, v)| (k.clone(), all.get(k).unwrap_or(v.as_tensor()).clone()))
        .collect();
    let missing = fresh
        .vars()
        .iter()
        .filter(|(k, _)| !k.starts_with("language_projection.") && !all.contains_key(k))
        .count();
    if missing > 0 {
        return Err(Error::Weights {
            path: w,
            reason: format!("{missing} of the Q-Former's tensors are missing"),
        });
    }
    let connector = Connector::from_tensors(kind, width, text_dim, &tensors)?;
    let pp = dir.join("preprocessor_config.json");
    let processor = ImageProcessor::new(if pp.is_file() {
        ImageProcessorConfig::from_file(&pp)?
    } else if let Some(c) = &cfg.cnn {
        c.processor()
    } else {
        // BlipImageProcessor's rule, which is Chinese-CLIP's.
        ImageProcessorConfig::chinese_clip_default(vision_cfg.image_size as u32)
    });
    Ok(Stage1Parts {
        vision_cfg,
        tower_spec,
        tower,
        processor,
        connector,
    })
}
