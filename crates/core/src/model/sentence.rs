//! A sentence-transformers text encoder: a BERT checkpoint (config.json with
//! `model_type: "bert"`, model.safetensors, tokenizer files) whose sentence
//! embedding pools the last hidden states as `1_Pooling/config.json` says
//! (mean over real tokens, or [CLS]) and is L2-normalised, as
//! sentence-transformers' `Pooling` and `Normalize` modules compute it. Used
//! where a text-only encoder is the right tool, e.g. `clasp mine` with
//! all-MiniLM-L6-v2.

use std::path::Path;

use candle_core::{Device, Tensor};

use super::chinese_clip::BertTextModel;
use super::config::BertConfig;
use super::loader::read_json;
use super::vit::l2_normalize;
use crate::preprocess::TextTokenizer;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
}

pub struct SentenceEncoder {
    bert: BertTextModel,
    tokenizer: TextTokenizer,
    pooling: Pooling,
    device: Device,
}

/// Whether `dir` holds a plain BERT checkpoint (config.json `model_type`
/// "bert"), which `SentenceEncoder` loads, rather than a dual encoder.
pub fn is_bert_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|c| c["model_type"] == "bert")
}

impl SentenceEncoder {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let files = super::resolve(&dir.to_string_lossy())?;
        let cfg: BertConfig =
            serde_json::from_value(read_json(&files.config)?).map_err(|e| Error::Config {
                path: files.config.clone(),
                reason: e.to_string(),
            })?;
        let pool_cfg = dir.join("1_Pooling/config.json");
        let pooling = if pool_cfg.is_file() {
            let p = read_json(&pool_cfg)?;
            // sentence-transformers 5+ writes `pooling_mode`; older
            // versions one boolean per mode.
            let mode = p["pooling_mode"].as_str();
            let on = |k: &str| p[k].as_bool() == Some(true);
            match mode {
                Some("mean") => Pooling::Mean,
                Some("cls") => Pooling::Cls,
                None if on("pooling_mode_mean_tokens") => Pooling::Mean,
                None if on("pooling_mode_cls_token") => Pooling::Cls,
                _ => {
                    return Err(Error::Config {
                        path: pool_cfg,
                        reason: "only mean and [CLS] pooling are supported".into(),
                    })
                }
            }
        } else {
            // sentence-transformers' default for a bare transformers model.
            Pooling::Mean
        };
        // sentence-transformers truncates at max_seq_length (before version 5
        // in sentence_bert_config.json, since then the tokenizer's
        // model_max_length).
        let field = |file: &str, key: &str| {
            read_json(&dir.join(file))
                .ok()
                .and_then(|c| c[key].as_u64())
        };
        let max_len = field("sentence_bert_config.json", "max_seq_length")
            .or_else(|| field("tokenizer_config.json", "model_max_length"))
            .map_or(cfg.max_position_embeddings, |n| n as usize)
            .min(cfg.max_position_embeddings);
        let vb = super::loader::var_builder(&files, device)?;
        Ok(Self {
            bert: BertTextModel::load(vb, &cfg)?,
            tokenizer: TextTokenizer::from_dir(&files.dir, max_len)?,
            pooling,
            device: device.clone(),
        })
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Unit-length sentence embeddings [N, C].
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Tensor> {
        let (ids, mask) = self
            .tokenizer
            .encode(texts)?
            .to_tensors(true, &self.device)?;
        let pooled = match self.pooling {
            Pooling::Cls => self.bert.forward(&ids, &mask)?,
            Pooling::Mean => {
                super::layers::masked_mean(&self.bert.token_states(&ids, &mask)?, &mask)?
            }
        };
        l2_normalize(&pooled)
    }
}
