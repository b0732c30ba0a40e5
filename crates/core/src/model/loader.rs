//! Resolves a model argument (a local directory or a Hugging Face Hub id) to
//! the files of a checkpoint, and opens its weights.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// The files of one checkpoint in the Hugging Face layout.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user passed: a directory or a Hub id.
    pub spec: String,
    pub dir: PathBuf,
    /// config.json, or open_clip_config.json for open_clip's layout.
    pub config: PathBuf,
    pub weights: PathBuf,
    pub preprocessor_config: Option<PathBuf>,
    pub layout: Layout,
}

/// How a checkpoint directory is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// transformers': config.json, model.safetensors or pytorch_model.bin.
    Hf,
    /// open_clip's: open_clip_config.json and open_clip_model.safetensors
    /// or open_clip_pytorch_model.bin (see `model::open_clip`).
    OpenClip,
}

const WEIGHT_FILES: &[&str] = &["model.safetensors", "pytorch_model.bin"];
/// The files beside config and weights: fetched from the Hub when present,
/// and copied into checkpoints that training writes.
pub const SIDE_FILES: &[&str] = &[
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
];

/// Resolves `spec`: an existing directory is used as it is; an OpenAI CLIP
/// `.pt` file (TorchScript or a state dict) as the open_clip folder it is
/// converted to once; anything else that looks like a Hub id (`name` or `owner/name`) is fetched into the hf-hub cache.
pub fn resolve(spec: &str) -> Result<ModelFiles> {
    let path = Path::new(spec);
    if path.is_dir() {
        return from_dir(spec, path);
    }
    if path.is_file() && path.extension().is_some_and(|e| e == "pt" || e == "pth") {
        // OpenAI's CLIP checkpoints (TorchScript or a state dict).
        let dir = super::open_clip_openai::as_open_clip_dir(path)?;
        return from_dir(spec, &dir);
    }
    if path.exists() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            reason: "a model must be a directory holding config.json and weights, not a file"
                .into(),
        });
    }
    let looks_like_path = spec.starts_with('.')
        || spec.starts_with('/')
        || spec.starts_with('~')
        || spec.matches('/').count() > 1;
    if looks_like_path {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such model directory"),
        ));
    }
    from_hub(spec)
}

fn from_dir(spec: &str, dir: &Path) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    let oc = dir.join(super::open_clip::CONFIG_FILE);
    if !config.is_file() && oc.is_file() {
        let weights = super::open_clip::weights_in(dir).ok_or_else(|| Error::MissingWeights {
            dir: dir.to_path_buf(),
        })?;
        return Ok(ModelFiles {
            spec: spec.to_string(),
            dir: dir.to_path_buf(),
            config: oc,
            weights,
            preprocessor_config: None,
            layout: Layout::OpenClip,
        });
    }
    if !config.is_file() {
        return Err(Error::Config {
            path: config,
            reason: "missing; a model directory needs config.json (or open_clip's open_clip_config.json)".into(),
        });
    }
    let weights = WEIGHT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::MissingWeights {
            dir: dir.to_path_buf(),
        })?;
    let pp = dir.join("preprocessor_config.json");
    Ok(ModelFiles {
        spec: spec.to_string(),
        dir: dir.to_path_buf(),
        config,
        weights,
        preprocessor_config: pp.is_file().then_some(pp),
        layout: Layout::Hf,
    })
}

/// Fetches one file of a Hub repository (or finds it in the cache).
type HubGet = Box<dyn Fn(&str) -> std::result::Result<PathBuf, String>>;

fn from_hub(id: &str) -> Result<ModelFiles> {
    let hub_err = |reason: String| Error::Hub {
        model: id.to_string(),
        reason,
    };
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    // One file of the repository, or why not; the reason is reported for
    // config.json when neither layout's config is there.
    let get: HubGet = if offline {
        let cache = hf_hub::Cache::from_env().model(id.to_string());
        Box::new(move |f: &str| {
            cache
                .get(f)
                .ok_or_else(|| "HF_HUB_OFFLINE is set and it is not in the local cache".into())
        })
    } else {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(true)
            .build()
            .map_err(|e| hub_err(e.to_string()))?;
        let repo = api.model(id.to_string());
        Box::new(move |f: &str| repo.get(f).map_err(|e| e.to_string()))
    };
    // transformers' layout first; a repository with only open_clip's
    // config (most LAION and DataComp models) is open_clip's layout.
    let (config, weight_files) = match get("config.json") {
        Ok(c) => (c, WEIGHT_FILES),
        Err(e) => match get(super::open_clip::CONFIG_FILE) {
            Ok(c) => (c, super::open_clip::WEIGHT_FILES),
            Err(_) => return Err(hub_err(e)),
        },
    };
    let mut files = vec![config];
    // The first weight file that exists, then whatever side files exist.
    files.extend(weight_files.iter().find_map(|f| get(f).ok()));
    files.extend(SIDE_FILES.iter().filter_map(|f| get(f).ok()));
    // hf-hub puts every file of one revision in one snapshot directory.
    let dir = files[0]
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| hub_err("cache path has no parent".into()))?;
    from_dir(id, &dir)
}

pub use clasp_common::json::{parse_json, read_json};

/// Whether `path` is a `torch.save` file clasp reads through
/// [`super::torch_file`] (a training checkpoint such as open_clip's
/// `epoch_N.pt`, its state dict nested and perhaps `module.`-prefixed).
fn is_torch_save(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "pt" || e == "pth")
}

/// A checkpoint's tensors by name as f32, from safetensors, a pickled
/// state dict (.bin), or a `torch.save` training checkpoint (.pt/.pth), on
/// the CPU.
pub fn read_tensors(path: &Path) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
    if is_torch_save(path) {
        return super::torch_file::read_state_dict(path);
    }
    let bad = |e: candle_core::Error| Error::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let t: std::collections::HashMap<String, candle_core::Tensor> =
        if path.extension().is_some_and(|e| e == "bin") {
            candle_core::pickle::read_all(path)
                .map_err(bad)?
                .into_iter()
                .collect()
        } else {
            candle_core::safetensors::load(path, &Device::Cpu).map_err(bad)?
        };
    t.into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32).map_err(bad)?)))
        .collect()
}

/// Opens the weights as a `VarBuilder` (safetensors are memory-mapped).
pub fn var_builder(files: &ModelFiles, device: &Device) -> Result<VarBuilder<'static>> {
    let w = &files.weights;
    let bad = |e: candle_core::Error| Error::Weights {
        path: w.clone(),
        reason: e.to_string(),
    };
    if is_torch_save(w) {
        Ok(VarBuilder::from_tensors(
            read_tensors(w)?,
            DType::F32,
            device,
        ))
    } else if w.extension().is_some_and(|e| e == "bin") {
        VarBuilder::from_pth(w, DType::F32, device).map_err(bad)
    } else {
        // SAFETY: the file is memory-mapped read-only; clasp never writes a
        // checkpoint in place (writes go to a temporary file then rename).
        unsafe { VarBuilder::from_mmaped_safetensors(&[w], DType::F32, device) }.map_err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_weights_names_the_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("config.json"), "{}").unwrap();
        let err = resolve(d.path().to_str().unwrap()).unwrap_err();
        assert!(matches!(err, Error::MissingWeights { .. }), "{err}");
        assert!(err.to_string().contains(d.path().to_str().unwrap()));
    }

    #[test]
    fn nonexistent_path_is_not_sent_to_the_hub() {
        let err = resolve("./no/such/model").unwrap_err();
        assert!(err.to_string().contains("./no/such/model"), "{err}");
        assert!(!matches!(err, Error::Hub { .. }));
    }
}
