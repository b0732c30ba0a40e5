//! A native model as transformers' `Emu3ForConditionalGeneration` folder:
//! config.json (`text_config`, `vq_config`, `vocabulary_map`),
//! model.safetensors (`model.text_model.*`, `model.vqmodel.*`,
//! `lm_head.weight`), the tokenizer with Emu3Processor's special tokens
//! named in tokenizer_config.json, preprocessor_config.json
//! (Emu3ImageProcessor) and processor_config.json.

use super::*;
use crate::checkpoint::load_prefixed;

const TEXT: &str = "model.text_model.";
const VQ: &str = "model.vqmodel.";

/// Whether `dir` holds an Emu3 model (config.json `model_type` "emu3").
pub fn is_native(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|c| c["model_type"] == "emu3")
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Report(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

impl NativeModel {
    /// `vocabulary_map`: the structure tokens and every code token by id.
    fn vocabulary_map(&self) -> serde_json::Map<String, serde_json::Value> {
        let t = &self.tokens;
        let mut m = serde_json::Map::new();
        for (name, id) in t.structure() {
            m.insert(name.into(), id.into());
        }
        for c in 0..t.codebook {
            m.insert(visual_token(c), (t.first_code + c as u32).into());
        }
        m
    }

    fn config_json(&self, lm: &Llama) -> serde_json::Value {
        let (bos, eos) = (self.tokenizer.bos_id(), self.tokenizer.eos_id());
        let mut text = lm.hf_config(bos, eos);
        text["model_type"] = "emu3_text_model".into();
        text["rope_parameters"] =
            serde_json::json!({"rope_type": "default", "rope_theta": lm.config().rope_theta});
        text["attention_dropout"] = 0.0.into();
        text["pad_token_id"] = eos.into();
        if let Some(o) = text.as_object_mut() {
            o.remove("architectures");
            o.remove("rope_scaling");
            o.remove("rope_theta");
        }
        let mut vq = serde_json::to_value(self.vq.config()).unwrap_or_default();
        vq["model_type"] = "emu3_vqgan".into();
        serde_json::json!({
            "architectures": ["Emu3ForConditionalGeneration"],
            "model_type": "emu3",
            "text_config": text,
            "vq_config": vq,
            "vocabulary_map": self.vocabulary_map(),
            "tie_word_embeddings": false,
        })
    }

    /// Every tensor of the checkpoint by its saved name.
    pub fn checkpoint_tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.checkpoint_tensors_with(&self.llm)
    }

    /// [`Self::checkpoint_tensors`] with `lm` as the decoder.
    fn checkpoint_tensors_with(&self, lm: &Llama) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (k, v) in lm.hf_tensors()? {
            let name = match k.strip_prefix("model.") {
                Some(rest) => format!("{TEXT}{rest}"),
                None => k,
            };
            out.insert(name, v);
        }
        for (k, v) in &self.vq_tensors {
            out.insert(format!("{VQ}{k}"), v.clone());
        }
        Ok(out)
    }

    /// Writes the `Emu3ForConditionalGeneration` folder, atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_with(&self.llm, dir)
    }

    /// [`Self::save`] with `lm` (the same vocabulary and tokens; e.g. the
    /// decoder a training run has changed) as the decoder.
    pub fn save_with(&self, lm: &Llama, dir: &Path) -> Result<()> {
        crate::atomic::write_dir(dir, |tmp| {
            write_json(&tmp.join("config.json"), &self.config_json(lm))?;
            crate::checkpoint::write_model_files(
                tmp,
                &self.checkpoint_tensors_with(lm)?,
                &self.tokenizer,
            )?;
            // Emu3Processor reads its tokens from the tokenizer's attributes.
            let tc = tmp.join("tokenizer_config.json");
            let text = std::fs::read_to_string(&tc).map_err(|e| Error::io(&tc, e))?;
            let mut v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Report(e.to_string()))?;
            v["extra_special_tokens"] = serde_json::json!({
                "image_token": PLACEHOLDER, "boi_token": BOI, "eoi_token": EOI,
                "image_wrapper_token": WRAPPER, "eof_token": EOF,
            });
            write_json(&tc, &v)?;
            let mut pp = self.processor.config().to_hf_json();
            pp["image_processor_type"] = "Emu3ImageProcessor".into();
            write_json(&tmp.join("preprocessor_config.json"), &pp)?;
            if let Some(t) = self.tokenizer.chat_template() {
                let p = tmp.join("chat_template.jinja");
                let template = crate::checkpoint::processor_chat_template(t, PLACEHOLDER);
                std::fs::write(&p, template).map_err(|e| Error::io(&p, e))?;
            }
            write_json(
                &tmp.join("processor_config.json"),
                &serde_json::json!({"processor_class": "Emu3Processor"}),
            )
        })
    }

    /// Loads a folder written by [`Self::save`] (or an Emu3 checkpoint whose
    /// text model is llama-shaped and whose tokenizer has Emu3's tokens).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !is_native(dir) {
            return Err(Error::Config {
                path: cfg_path,
                reason: "model_type is not emu3: not a native (Emu3) model; make one with `clasp assemble --native`"
                    .into(),
            });
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: cfg_path.clone(),
            reason: e.to_string(),
        })?;
        // Emu3's text model is llama's architecture under its own name.
        let mut text_json = v["text_config"].clone();
        text_json["model_type"] = "llama".into();
        let text_cfg = llm::LlamaConfig::from_hf_json(&text_json.to_string(), &cfg_path)?;
        let vq_cfg = Emu3VqConfig::from_file(&cfg_path)?;
        let w = dir.join("model.safetensors");
        if !w.is_file() {
            return Err(Error::MissingWeights {
                dir: dir.to_path_buf(),
            });
        }
        let mut text_tensors: HashMap<String, Tensor> = load_prefixed(&w, &[TEXT], device)?
            .into_iter()
            .map(|(k, t)| (format!("model.{k}"), t))
            .collect();
        if let Some(head) = load_prefixed(&w, &["lm_head."], device)?.remove("weight") {
            text_tensors.insert("lm_head.weight".into(), head);
        }
        let llm = Llama::from_hf(
            candle_nn::VarBuilder::from_tensors(text_tensors, DType::F32, device),
            text_cfg,
        )
        .map_err(|e| Error::Weights {
            path: w.clone(),
            reason: e.to_string(),
        })?;
        let tokenizer = LlmTokenizer::from_hf_dir(dir)?;
        let tokens = ImageTokens::find(&tokenizer, vq_cfg.codebook_size)?;
        let processor = ImageProcessor::new(clasp_core::model::emu3_vq::processor_config(dir)?);
        let vq_tensors = clasp_core::model::emu3_vq::read_tensors(dir, device)?;
        Self::from_parts(vq_cfg, vq_tensors, llm, tokenizer, tokens, processor)
    }
}
