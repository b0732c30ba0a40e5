//! A model whose parameters are trainable variables, loaded from and saved to
//! the Hugging Face checkpoint layout.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::{Error, Result};
use clasp_core::model::{self, Model, ModelConfig};

pub struct Trainable {
    pub varmap: VarMap,
    /// The model over the variables. Use it in grad mode only: inference
    /// kernels keep load-time fused copies of some weights (q/k/v), which do
    /// not follow optimiser updates. For inference take [`Self::snapshot`].
    pub model: Model,
    pub config: ModelConfig,
    /// config.json as read, written back unchanged.
    pub config_json: serde_json::Value,
    /// Where the tokenizer and preprocessor files come from.
    pub source_dir: PathBuf,
    /// preprocessor_config.json when it is not a file in `source_dir` (an
    /// open_clip checkpoint's, translated from its `preprocess_cfg`).
    pub preprocessor_json: Option<serde_json::Value>,
}

fn werr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// config.json read once: as written (kept to write back) and parsed.
fn read_config(path: &Path) -> Result<(serde_json::Value, ModelConfig)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let config = ModelConfig::from_json(&text, path)?;
    Ok((clasp_core::model::loader::parse_json(&text, path)?, config))
}

impl Trainable {
    /// Loads a checkpoint directory (model.safetensors) as variables.
    pub fn from_checkpoint(spec: &str, device: &Device) -> Result<Self> {
        let files = model::resolve(spec)?;
        if files.layout == model::loader::Layout::OpenClip {
            // Translated to CLIPModel; what training saves is that layout.
            let t = model::open_clip::translate(&files.config, &files.weights)?;
            let config = ModelConfig::from_json(&t.config_json.to_string(), &files.config)?;
            let varmap = VarMap::new();
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
            let model = Model::load(vb, &config)?;
            for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
                let src = t.tensors.get(name).ok_or_else(|| {
                    werr(
                        &files.weights,
                        format!("no tensor for `{name}` after translation"),
                    )
                })?;
                var.set(&src.to_device(device)?)?;
            }
            return Ok(Self {
                varmap,
                model,
                config,
                config_json: t.config_json,
                source_dir: files.dir,
                preprocessor_json: Some(t.preprocessor_json),
            });
        }
        if files.weights.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(werr(
                &files.weights,
                "training needs model.safetensors (convert pytorch_model.bin first)",
            ));
        }
        let (config_json, config) = read_config(&files.config)?;
        let mut varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Model::load(vb, &config)?;
        varmap
            .load(&files.weights)
            .map_err(|e| werr(&files.weights, e))?;
        Ok(Self {
            varmap,
            model,
            config,
            config_json,
            source_dir: files.dir,
            preprocessor_json: None,
        })
    }

    /// A model with freshly created variables for the config.json in `dir`
    /// (their values are candle's default initialisation; presets overwrite
    /// them with CLIP's).
    pub fn from_config_dir(dir: &Path, device: &Device) -> Result<Self> {
        let (config_json, config) = read_config(&dir.join("config.json"))?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Model::load(vb, &config)?;
        Ok(Self {
            varmap,
            model,
            config,
            config_json,
            source_dir: dir.to_path_buf(),
            preprocessor_json: None,
        })
    }

    /// A separate inference model built from the variables' current values.
    pub fn snapshot(&self) -> Result<Model> {
        let tensors: std::collections::HashMap<String, candle_core::Tensor> = self
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &self.device());
        Model::load(vb, &self.config)
    }

    /// Mixed precision: the model over the variables cast to `dtype` (bf16).
    /// The casts are part of the graph, so backpropagation ends in the f32
    /// variables, which the optimiser updates (f32 master weights, as torch's
    /// autocast keeps them). The logit scale stays f32, as autocast leaves it;
    /// so do the features the loss sees (`step`). Build it afresh for every
    /// step: it holds the values of the moment.
    pub fn compute_model(&self, dtype: DType) -> Result<Model> {
        let device = self.device();
        let tensors: std::collections::HashMap<String, candle_core::Tensor> = self
            .vars()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        let vb = VarBuilder::from_tensors(tensors, dtype, &device);
        let mut m = Model::load(vb, &self.config)?;
        m.set_logit_scale(self.model.logit_scale().clone());
        Ok(m)
    }

    /// Where the variables live (the logit scale is always one of them).
    fn device(&self) -> Device {
        self.model.logit_scale().device().clone()
    }

    /// The parameters, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Writes a checkpoint in the Hugging Face layout (config.json,
    /// model.safetensors, tokenizer and preprocessor files) atomically: into a
    /// sibling temporary directory, then renamed over `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::atomic::write_dir(dir, |tmp| {
            let weights = tmp.join("model.safetensors");
            self.varmap.save(&weights).map_err(|e| werr(&weights, e))?;
            let cfg = serde_json::to_string_pretty(&self.config_json).expect("config serialises");
            std::fs::write(tmp.join("config.json"), cfg)
                .map_err(|e| Error::io(tmp.join("config.json"), e))?;
            for f in model::loader::SIDE_FILES {
                let src = self.source_dir.join(f);
                if src.is_file() {
                    std::fs::copy(&src, tmp.join(f)).map_err(|e| Error::io(&src, e))?;
                }
            }
            if let Some(pp) = &self.preprocessor_json {
                let p = tmp.join("preprocessor_config.json");
                let text = serde_json::to_string_pretty(pp).expect("JSON values serialise");
                std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
            }
            Ok(())
        })
    }
}
