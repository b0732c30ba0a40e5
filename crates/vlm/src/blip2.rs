//! The saved VLM of BLIP-2's own design: transformers'
//! `Blip2ForConditionalGeneration` (model type `blip-2`).
//!
//! A VLM whose image tower is `Blip2VisionModel` and whose connector is the
//! Q-Former is written in this layout rather than Llava's:
//! - `config.json`: `vision_config` (`blip_2_vision_model`),
//!   `qformer_config` (`blip_2_qformer`, no text feed-forward:
//!   `use_qformer_text_input` false, as the captioning checkpoints have it),
//!   a `llama` `text_config` whose vocabulary holds `<image>`,
//!   `num_query_tokens` and `image_token_index`;
//! - `model.safetensors` (f32): `vision_model.*`, `query_tokens`,
//!   `qformer.*`, `language_projection.*`, `language_model.model.*` and
//!   `language_model.lm_head.weight` (untied);
//! - the tokenizer with `<image>`, `preprocessor_config.json`
//!   (`BlipImageProcessor`) and `processor_config.json`
//!   (`Blip2Processor` with `num_query_tokens`).
//!
//! Prompts follow `Blip2Processor`: the text is encoded as the tokenizer
//! encodes it by default, and `num_query_tokens` image tokens go before it
//! (before its bos, too).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
pub use clasp_core::model::blip2::blip_processor_json;
use clasp_core::model::blip2::{Blip2Config, Blip2VisionConfig};

use super::connector::{qformer_config, Connector, ConnectorKind};
use super::model::{FeatureSelect, TowerSpec, Vlm, VlmConfig};
use crate::llm::LlamaConfig;
use crate::preprocess::ImageProcessorConfig;
use crate::{Error, Result};

/// Whether a config.json's value is a `Blip2ForConditionalGeneration`'s
/// (a `blip-2` model that names that architecture: every `Blip2Config`
/// has a text config, retrieval models' included).
pub fn is_generation_config(v: &serde_json::Value) -> bool {
    v["model_type"] == "blip-2"
        && v["architectures"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "Blip2ForConditionalGeneration"))
}

/// The tensors a Q-Former connector owns in BLIP-2's names.
fn is_connector_tensor(name: &str) -> bool {
    name == "query_tokens"
        || name.starts_with("qformer.")
        || name.starts_with("language_projection.")
}

impl Vlm {
    /// [`Vlm::expand_images`] for BLIP-2: every image's tokens first, then
    /// the text without its placeholders (each with the newline after it).
    pub(crate) fn prefix_images(&self, ids: &[u32]) -> Vec<u32> {
        let img = self.cfg.image_token_index;
        let images = ids.iter().filter(|&&i| i == img).count();
        let newline = self
            .tokenizer
            .encode("\n", false)
            .ok()
            .filter(|v| v.len() == 1)
            .map(|v| v[0]);
        let mut out = vec![img; images * self.image_tokens()];
        let mut after_image = false;
        for &id in ids {
            if id == img {
                after_image = true;
                continue;
            }
            if !(after_image && Some(id) == newline) {
                out.push(id);
            }
            after_image = false;
        }
        out
    }

    /// The `Blip2ForConditionalGeneration` config.json of this model.
    pub(crate) fn blip2_config(&self, vision: &Blip2VisionConfig) -> Result<serde_json::Value> {
        let ConnectorKind::QFormer { queries, .. } = self.cfg.connector else {
            return Err(Error::Report(
                "a VLM on BLIP-2's ViT is saved as Blip2ForConditionalGeneration, which needs the \
                 Q-Former connector"
                    .into(),
            ));
        };
        let mut q = serde_json::to_value(qformer_config(self.cfg.connector, vision.hidden_size))
            .expect("a config serialises");
        q["model_type"] = serde_json::json!("blip_2_qformer");
        Ok(serde_json::json!({
            "architectures": ["Blip2ForConditionalGeneration"],
            "model_type": "blip-2",
            "vision_config": vision.to_hf_json(),
            "qformer_config": q,
            "text_config": self.text_config_json(),
            "num_query_tokens": queries,
            "image_token_index": self.cfg.image_token_index,
            "use_decoder_only_language_model": true,
            "tie_word_embeddings": false,
            "torch_dtype": "float32",
        }))
    }

    /// `Blip2Processor`'s processor_config.json.
    pub(crate) fn blip2_processor_json(&self) -> serde_json::Value {
        serde_json::json!({
            "processor_class": "Blip2Processor",
            "num_query_tokens": self.image_tokens(),
        })
    }

    /// Loads a `Blip2ForConditionalGeneration` folder whose language model
    /// is llama-family (config.json already read as `v`).
    pub(crate) fn load_blip2(dir: &Path, v: &serde_json::Value, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let bad = |reason: String| Error::Config {
            path: cfg_path.clone(),
            reason,
        };
        if v["use_decoder_only_language_model"] == false
            || v["text_config"]["model_type"] != "llama"
        {
            return Err(bad(format!(
                "text_config model_type {}: clasp runs BLIP-2 with a llama-family language model",
                v["text_config"]["model_type"]
            )));
        }
        let b = Blip2Config::from_file(&cfg_path)?;
        if b.cnn.is_some() {
            return Err(bad("a CNN tower in a Blip2ForConditionalGeneration".into()));
        }
        let image_token_index = b.image_token_index.ok_or_else(|| {
            bad(
                "no image_token_index: clasp places the queries' outputs at the image tokens, \
                 as transformers does when the config names them"
                    .into(),
            )
        })?;
        let kind = super::stage1::connector_kind(&b)?;
        let text_cfg = LlamaConfig::from_hf_json(&v["text_config"].to_string(), &cfg_path)?;
        let w = dir.join("model.safetensors");
        if !w.is_file() {
            return Err(Error::MissingWeights {
                dir: dir.to_path_buf(),
            });
        }
        let mut all = super::checkpoint::load_prefixed(&w, &[""], device)?;
        let mut take = |prefix: &str| -> HashMap<String, Tensor> {
            let keys: Vec<String> = all
                .keys()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect();
            keys.into_iter()
                .map(|k| {
                    let t = all.remove(&k).expect("listed");
                    (k[prefix.len()..].to_string(), t)
                })
                .collect()
        };
        let vision_tensors = take("vision_model.");
        let llm_tensors = take("language_model.");
        let connector_tensors: HashMap<String, Tensor> = all
            .into_iter()
            .filter(|(k, _)| is_connector_tensor(k))
            .collect();
        let vision_cfg = b.vision_config.vision_config();
        let connector = Connector::from_tensors(
            kind,
            vision_cfg.hidden_size,
            text_cfg.hidden_size,
            &connector_tensors,
        )?;
        let lang = super::checkpoint::LanguageHalf::read(
            dir,
            text_cfg,
            llm_tensors,
            image_token_index,
            ImageProcessorConfig::chinese_clip_default(vision_cfg.image_size as u32),
            device,
        )?;
        let cfg = VlmConfig {
            vision_feature_layer: -1,
            select: FeatureSelect::Full,
            connector: connector.kind(),
            image_token: lang.image_token,
            image_token_index,
            anyres: None,
            video_token_index: None,
        };
        Self::from_parts(
            cfg,
            vision_cfg,
            TowerSpec::Blip2(b.vision_config.clone()),
            vision_tensors,
            connector,
            lang.llm,
            lang.tokenizer,
            lang.processor,
        )?
        .with_saved_adapter(dir, device)
    }
}
