//! The saved VLM: transformers' `LlavaForConditionalGeneration` layout.
//!
//! - `config.json`: `model_type: llava` with a `clip_vision_model` vision
//!   config and a `llama` text config; `image_token_index`,
//!   `vision_feature_layer`, `vision_feature_select_strategy`,
//!   `projector_hidden_act: gelu`.
//! - `model.safetensors` (f32), in the names transformers 5 writes:
//!   `vision_tower.*` (CLIPVisionModel's, without `vision_model.`),
//!   `multi_modal_projector.linear_1/linear_2.*`, `language_model.model.*`
//!   and `language_model.lm_head.weight`. The language model's vocabulary
//!   gains one row for `<image>` (zeros: its embedding is never read, as
//!   image features replace it), and the head is written untied.
//! - the tokenizer with `<image>` as a special token, the chat template,
//!   `preprocessor_config.json` and `processor_config.json`, so
//!   `LlavaProcessor.from_pretrained` builds the same prompts.
//!
//! The resampler connector is not a transformers architecture: its model is
//! saved in the same layout, with its tensors under
//! `multi_modal_projector.resampler.*` and its sizes in `clasp_connector`;
//! clasp loads it, transformers does not.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::connector::{Connector, ConnectorKind};
use super::model::{FeatureSelect, TowerSpec, Vlm, VlmConfig};
use crate::atomic::write_json;
use crate::llm::lora::Lora;
use crate::llm::{Llama, LlamaConfig, LlmTokenizer};
use crate::preprocess::{ImageProcessor, ImageProcessorConfig};
use crate::{Error, Result};
use clasp_core::model::config::VisionConfig;

const PROJECTOR: &str = "multi_modal_projector.";

/// Whether `dir` holds a VLM checkpoint (config.json with `model_type:
/// llava`, or a `Blip2ForConditionalGeneration`).
pub fn is_vlm(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| {
            v["model_type"] == "llava"
                || v["model_type"] == "llava_next"
                || v["model_type"] == "llava_next_video"
                || super::blip2::is_generation_config(&v)
        })
}

/// The tensors of a safetensors file whose names start with one of
/// `prefixes` (the first that matches is stripped). Only those are read: the
/// file is memory-mapped and the rest never leaves the disk.
pub fn load_prefixed(
    path: &Path,
    prefixes: &[&str],
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let bad = |e: candle_core::Error| Error::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    // SAFETY: the file is mapped read-only and dropped before this returns
    // (every loaded tensor is copied out); clasp never writes a checkpoint in
    // place (writes go to a temporary folder that is renamed).
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(bad)?;
    let mut out = HashMap::new();
    for (name, _) in st.tensors() {
        if let Some(short) = prefixes.iter().find_map(|p| name.strip_prefix(p)) {
            out.insert(short.to_string(), st.load(&name, device).map_err(bad)?);
        }
    }
    Ok(out)
}

/// A language-model checkpoint's common files in `dir`: generation_config.json
/// (bos, eos, and eos as padding), model.safetensors and the tokenizer.
pub(crate) fn write_model_files(
    dir: &Path,
    tensors: &HashMap<String, Tensor>,
    tokenizer: &crate::llm::LlmTokenizer,
) -> Result<()> {
    let eos = tokenizer.eos_id();
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::json!({"bos_token_id": tokenizer.bos_id(), "eos_token_id": eos, "pad_token_id": eos}),
    )?;
    let w = dir.join("model.safetensors");
    candle_core::safetensors::save(tensors, &w).map_err(|e| Error::Weights {
        path: w.clone(),
        reason: e.to_string(),
    })?;
    tokenizer.save_hf(dir)
}

/// `t` [rows, cols] with zero rows appended up to `rows`.
fn pad_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    let (r, c) = t.dims2()?;
    if r >= rows {
        return Ok(t.clone());
    }
    Ok(Tensor::cat(
        &[t, &Tensor::zeros((rows - r, c), DType::F32, t.device())?],
        0,
    )?)
}

impl Vlm {
    /// The language model's config as transformers writes it, its
    /// vocabulary holding the image token, its head untied.
    pub(crate) fn text_config_json(&self) -> serde_json::Value {
        let mut text = self
            .llm
            .hf_config(self.tokenizer.bos_id(), self.tokenizer.eos_id());
        text["vocab_size"] = serde_json::json!(self.vocab_with_image());
        text["tie_word_embeddings"] = serde_json::json!(false);
        text
    }

    /// The Llava config.json of this model.
    pub fn llava_config(&self) -> serde_json::Value {
        let text = self.text_config_json();
        let vision = match self.vision_cnn() {
            // clasp's own: transformers' Llava reads ViT-like hidden states
            // [B, N, C], which a CNN's feature maps are not.
            Some(c) => c.to_vision_json(),
            None => {
                let mut v = serde_json::to_value(&self.vision_cfg).expect("config serialises");
                v["model_type"] = serde_json::json!("clip_vision_model");
                v
            }
        };
        let mut cfg = serde_json::json!({
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": self.cfg.image_token_index,
            "image_seq_length": self.image_tokens(),
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": true,
            "vision_feature_layer": self.cfg.vision_feature_layer,
            "vision_feature_select_strategy": match self.cfg.select {
                FeatureSelect::Default => "default",
                FeatureSelect::Full => "full",
            },
            "tie_word_embeddings": false,
            "text_config": text,
            "vision_config": vision,
            "torch_dtype": "float32",
        });
        if !matches!(self.cfg.connector, ConnectorKind::Mlp2xGelu) {
            cfg["clasp_connector"] = serde_json::to_value(self.cfg.connector).expect("serialises");
        }
        self.llava_next_config(&mut cfg);
        cfg
    }

    /// The language model's vocabulary with the image token.
    fn vocab_with_image(&self) -> usize {
        self.llm
            .config()
            .vocab_size
            .max(self.cfg.image_token_index as usize + 1)
            .max(self.cfg.video_token_index.map_or(0, |v| v as usize + 1))
    }

    /// Every tensor of the checkpoint by its saved name (Llava's, or
    /// BLIP-2's for a model on BLIP-2's ViT).
    pub fn checkpoint_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let (tower, projector) = match self.blip2_vision() {
            Some(_) => ("vision_model.", ""),
            None => ("vision_tower.", PROJECTOR),
        };
        let mut out = HashMap::new();
        for (k, v) in &self.vision_tensors {
            out.insert(format!("{tower}{k}"), v.clone());
        }
        for (k, v) in self.connector.vars() {
            out.insert(format!("{projector}{k}"), v.as_tensor().clone());
        }
        let vocab = self.vocab_with_image();
        let mut embed = None;
        for (k, v) in self.llm.hf_tensors()? {
            if k == "model.embed_tokens.weight" {
                embed = Some(v.clone());
                out.insert(format!("language_model.{k}"), pad_rows(&v, vocab)?);
            } else if k == "lm_head.weight" {
                out.insert(format!("language_model.{k}"), pad_rows(&v, vocab)?);
            } else {
                out.insert(format!("language_model.{k}"), v);
            }
        }
        if let Some(nl) = self.image_newline() {
            out.insert("image_newline".into(), nl.clone());
        }
        if !out.contains_key("language_model.lm_head.weight") {
            // A tied head, written out.
            let e = embed
                .ok_or_else(|| Error::Report("the language model has no embeddings".into()))?;
            out.insert("language_model.lm_head.weight".into(), pad_rows(&e, vocab)?);
        }
        Ok(out)
    }

    /// Writes the checkpoint into `dir`, atomically (a temporary folder
    /// renamed into place).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_with(dir, |_| Ok(()))
    }

    /// [`Self::save`], with `extra` writing more files into the folder
    /// before it is renamed into place (a training run's own tensors).
    pub fn save_with(&self, dir: &Path, extra: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        crate::atomic::write_dir(dir, |tmp| {
            extra(tmp)?;
            let blip2 = self.blip2_vision();
            write_json(
                &tmp.join("config.json"),
                &match blip2 {
                    Some(b) => self.blip2_config(b)?,
                    None => self.llava_config(),
                },
            )?;
            write_model_files(tmp, &self.checkpoint_tensors()?, &self.tokenizer)?;
            // A LoRA adapter goes beside the base weights, in PEFT's layout.
            if let Some(l) = self.llm.lora() {
                l.save_peft(tmp, self.llm.config())?;
            }
            if blip2.is_some() {
                write_json(
                    &tmp.join("preprocessor_config.json"),
                    &super::blip2::blip_processor_json(self.processor.config())?,
                )?;
                return write_json(
                    &tmp.join("processor_config.json"),
                    &self.blip2_processor_json(),
                );
            }
            write_json(
                &tmp.join("preprocessor_config.json"),
                &self.preprocessor_json(),
            )?;
            let processor = serde_json::json!({
                "processor_class": match (self.anyres(), self.video_token_index()) {
                    (_, Some(_)) => "LlavaNextVideoProcessor",
                    (Some(_), None) => "LlavaNextProcessor",
                    (None, None) => "LlavaProcessor",
                },
                "image_token": self.cfg.image_token,
                "patch_size": self.vision_cfg.patch_size,
                "vision_feature_select_strategy": match self.cfg.select {
                    FeatureSelect::Default => "default",
                    FeatureSelect::Full => "full",
                },
                "num_additional_image_tokens": 1,
            });
            let mut processor = processor;
            if self.video_token_index().is_some() {
                processor["video_token"] = serde_json::json!(crate::video::VIDEO_TOKEN);
                let mut v = self.processor.config().to_hf_json();
                if let Some(o) = v.as_object_mut() {
                    o.remove("image_processor_type");
                }
                v["video_processor_type"] = serde_json::json!("LlavaNextVideoVideoProcessor");
                write_json(&tmp.join("video_preprocessor_config.json"), &v)?;
            }
            if let Some(t) = self.tokenizer.chat_template() {
                // The processor's template, in the file transformers 5 reads:
                // the language model's, taught the multimodal message form.
                // The tokenizer keeps its own (tokenizer_config.json).
                let p = tmp.join("chat_template.jinja");
                std::fs::write(&p, processor_chat_template(t, &self.cfg.image_token))
                    .map_err(|e| Error::io(&p, e))?;
            }
            write_json(&tmp.join("processor_config.json"), &processor)
        })
    }

    /// Loads a checkpoint written by [`Vlm::save`] (or a transformers Llava
    /// checkpoint of a CLIP vision tower and a llama language model).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let bad = |reason: String| Error::Config {
            path: cfg_path.clone(),
            reason,
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if super::blip2::is_generation_config(&v) {
            return Self::load_blip2(dir, &v, device);
        }
        if !["llava", "llava_next", "llava_next_video"]
            .contains(&v["model_type"].as_str().unwrap_or(""))
        {
            return Err(bad(format!(
                "model_type is {}, not llava: not a vision-language checkpoint (make one with `clasp assemble` or `clasp train --llm ... --vision ...`)",
                v["model_type"]
            )));
        }
        let act = v["projector_hidden_act"].as_str().unwrap_or("gelu");
        if act != "gelu" {
            return Err(bad(format!(
                "projector_hidden_act `{act}`: clasp's connector uses gelu"
            )));
        }
        let layer = v["vision_feature_layer"]
            .as_i64()
            .ok_or_else(|| bad("vision_feature_layer must be one integer".into()))?;
        let select = match v["vision_feature_select_strategy"]
            .as_str()
            .unwrap_or("default")
        {
            "default" => FeatureSelect::Default,
            "full" => FeatureSelect::Full,
            o => return Err(bad(format!("unknown vision_feature_select_strategy `{o}`"))),
        };
        let connector: ConnectorKind = match v.get("clasp_connector") {
            Some(c) => serde_json::from_value(c.clone())
                .map_err(|e| bad(format!("clasp_connector: {e}")))?,
            None => ConnectorKind::Mlp2xGelu,
        };
        let (vision_cfg, cnn) = if let Some(parsed) =
            clasp_core::model::cnn_tower::parse_vision_config(&v["vision_config"])
        {
            let (c, vit) = parsed.map_err(|e| bad(format!("vision_config: {e}")))?;
            (vit, TowerSpec::Cnn(c))
        } else {
            let vit: VisionConfig = serde_json::from_value(v["vision_config"].clone())
                .map_err(|e| bad(format!("vision_config: {e}")))?;
            (vit, TowerSpec::ClipVit)
        };
        let text_cfg = LlamaConfig::from_hf_json(&v["text_config"].to_string(), &cfg_path)?;
        let image_token_index = v["image_token_index"]
            .as_u64()
            .or_else(|| v["image_token_id"].as_u64())
            .ok_or_else(|| bad("no image_token_index".into()))?
            as u32;

        let w = dir.join("model.safetensors");
        if !w.is_file() {
            return Err(Error::MissingWeights {
                dir: dir.to_path_buf(),
            });
        }
        let strip = |prefixes: &[&str]| load_prefixed(&w, prefixes, device);
        // transformers 5 writes `vision_tower.*`; 4.x wrote `vision_tower.vision_model.*`.
        let vision_tensors = strip(&["vision_tower.vision_model.", "vision_tower."])?;
        let connector_tensors = strip(&[PROJECTOR])?;
        let connector = Connector::from_tensors(
            connector,
            vision_cfg.hidden_size,
            text_cfg.hidden_size,
            &connector_tensors,
        )?;
        let llm_tensors = strip(&["language_model."])?;
        let lang = LanguageHalf::read(
            dir,
            text_cfg,
            llm_tensors,
            image_token_index,
            ImageProcessorConfig::clip_default(vision_cfg.image_size as u32),
            device,
        )?;
        let (llm, tokenizer, token, processor) =
            (lang.llm, lang.tokenizer, lang.image_token, lang.processor);
        let cfg = VlmConfig {
            vision_feature_layer: layer,
            select,
            connector: connector.kind(),
            image_token: token,
            image_token_index,
            anyres: None,
            video_token_index: None,
        };
        let mut vlm = Self::from_parts(
            cfg,
            vision_cfg,
            cnn,
            vision_tensors,
            connector,
            llm,
            tokenizer,
            processor,
        )?;
        if v["model_type"] != "llava" {
            vlm.read_anyres(&v, &w, device)
                .map_err(|e| bad(format!("LLaVA-NeXT: {e}")))?;
        }
        vlm.with_saved_adapter(dir, device)
    }

    /// The model with the PEFT adapter saved beside its weights in `dir`,
    /// if there is one, held unmerged.
    pub(crate) fn with_saved_adapter(mut self, dir: &Path, device: &Device) -> Result<Self> {
        if Lora::present(dir) {
            let lora = Lora::load_peft(dir, self.llm.config(), device)?;
            self.llm.set_lora(Some(&lora))?;
        }
        Ok(self)
    }
}

/// The language half of a saved VLM folder: the language model, the
/// tokenizer, the image token's text, and the image processor
/// (preprocessor_config.json, else `default_processor`).
pub(crate) struct LanguageHalf {
    pub llm: Llama,
    pub tokenizer: LlmTokenizer,
    pub image_token: String,
    pub processor: ImageProcessor,
}

impl LanguageHalf {
    pub(crate) fn read(
        dir: &Path,
        text_cfg: LlamaConfig,
        llm_tensors: HashMap<String, Tensor>,
        image_token_index: u32,
        default_processor: ImageProcessorConfig,
        device: &Device,
    ) -> Result<Self> {
        let w = dir.join("model.safetensors");
        let vb = candle_nn::VarBuilder::from_tensors(llm_tensors, DType::F32, device);
        let llm = Llama::from_hf(vb, text_cfg).map_err(|e| match e {
            Error::Candle(c) => Error::Weights {
                path: w.clone(),
                reason: c.to_string(),
            },
            other => other,
        })?;
        let tokenizer = LlmTokenizer::from_hf_dir(dir)?;
        let image_token = tokenizer
            .inner()
            .id_to_token(image_token_index)
            .ok_or_else(|| Error::Config {
                path: dir.join("config.json"),
                reason: format!("image_token_index {image_token_index} is not in the tokenizer"),
            })?;
        let pp = dir.join("preprocessor_config.json");
        let processor = ImageProcessor::new(if pp.is_file() {
            ImageProcessorConfig::from_file(&pp)?
        } else {
            default_processor
        });
        Ok(Self {
            llm,
            tokenizer,
            image_token,
            processor,
        })
    }
}

/// The processor's chat template: `llm_template` (which reads
/// `message['content']` as a string) behind a preamble that turns the
/// multimodal message form that transformers' documentation and every LLaVA
/// example use (`"content": [{"type": "image"}, {"type": "text", "text":
/// ...}]`) into the string clasp renders for it: each image part is the
/// placeholder, the parts joined by newlines (as `Vlm::conversation_prompt`).
/// String contents pass through unchanged. One line with no trailing
/// whitespace control, so the language model's template renders as it does
/// alone.
pub fn processor_chat_template(llm_template: &str, image_token: &str) -> String {
    let token = image_token.replace('\\', "\\\\").replace('\'', "\\'");
    format!(
        "{{%- set clasp_ns = namespace(messages=[]) -%}}\
         {{%- for m in messages -%}}\
         {{%- if m['content'] is string -%}}\
         {{%- set clasp_ns.messages = clasp_ns.messages + [m] -%}}\
         {{%- else -%}}\
         {{%- set part = namespace(text='', first=true) -%}}\
         {{%- for item in m['content'] -%}}\
         {{%- if not part.first -%}}{{%- set part.text = part.text ~ '\\n' -%}}{{%- endif -%}}\
         {{%- if item['type'] == 'image' -%}}{{%- set part.text = part.text ~ '{token}' -%}}\
         {{%- elif item['type'] == 'text' -%}}{{%- set part.text = part.text ~ item['text'] -%}}{{%- endif -%}}\
         {{%- set part.first = false -%}}\
         {{%- endfor -%}}\
         {{%- set clasp_ns.messages = clasp_ns.messages + [{{'role': m['role'], 'content': part.text}}] -%}}\
         {{%- endif -%}}\
         {{%- endfor -%}}\
         {{%- set messages = clasp_ns.messages %}}{llm_template}"
    )
}

#[cfg(test)]
mod tests {
    use super::processor_chat_template;

    /// SmolLM2-135M-Instruct's ChatML template (its GGUF's).
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// Renders as transformers does (trimmed blocks, stripped block lines).
    fn render(template: &str, messages: serde_json::Value) -> String {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template("t", template).unwrap();
        env.get_template("t")
            .unwrap()
            .render(minijinja::context! { messages => messages, add_generation_prompt => true })
            .unwrap()
    }

    /// The multimodal message form renders to the text clasp builds for the
    /// same turns (image parts as the placeholder, parts joined by newlines),
    /// and plain string contents render exactly as the language model's own
    /// template renders them.
    #[test]
    fn the_processor_template_renders_image_parts_as_clasp_does() {
        let t = processor_chat_template(CHATML, "<image>");
        let multimodal = serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "image"},
                {"type": "text", "text": "Describe the image."}
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "And these two?"},
                {"type": "image"},
                {"type": "image"}
            ]}
        ]);
        let strings = serde_json::json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "<image>\nDescribe the image."},
            {"role": "assistant", "content": "A dog."},
            {"role": "user", "content": "And these two?\n<image>\n<image>"}
        ]);
        let expected = render(CHATML, strings.clone());
        assert!(expected.contains("<|im_start|>user\n<image>\nDescribe the image.<|im_end|>"));
        assert_eq!(render(&t, multimodal), expected);
        assert_eq!(render(&t, strings), expected);
    }
}
