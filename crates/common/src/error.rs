//! The library's error type. Every variant that concerns an input names it, so a
//! person reading the message knows which file or model to look at.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: empty file (0 bytes)")]
    EmptyFile { path: PathBuf },

    #[error("{path}: not a decodable image: {reason}")]
    ImageDecode { path: PathBuf, reason: String },

    #[error("{path}: is a directory, not an image file")]
    IsDirectory { path: PathBuf },

    #[error("{path}: no images found in this directory ({skipped} other files skipped)")]
    NoImages { path: PathBuf, skipped: usize },

    #[error("{path}: invalid config: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("unsupported architecture `{model_type}` in {path}; supported model_type values: {supported}")]
    UnsupportedArchitecture {
        path: PathBuf,
        model_type: String,
        supported: String,
    },

    #[error("{dir}: no weights found (expected model.safetensors or pytorch_model.bin)")]
    MissingWeights { dir: PathBuf },

    #[error("{path}: cannot read weights: {reason}")]
    Weights { path: PathBuf, reason: String },

    #[error("{dir}: no tokenizer found (expected tokenizer.json, vocab.json + merges.txt, or vocab.txt)")]
    MissingTokenizer { dir: PathBuf },

    #[error("{path}: cannot load tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("tokenization failed: {0}")]
    Tokenize(String),

    #[error(
        "model `{model}` is not a local directory and could not be fetched from the Hugging Face Hub: {reason}\n\
         hint: download it elsewhere and pass the directory instead, e.g. `--model /path/to/{model}` \
         (it must hold config.json, model.safetensors and the tokenizer files)"
    )]
    Hub { model: String, reason: String },

    #[error("dataset: {0}")]
    Dataset(String),

    #[error("embedding cache {path}: {reason}")]
    Cache { path: PathBuf, reason: String },

    #[error("{0}")]
    Report(String),

    #[error("{path}: {reason}")]
    Gguf { path: PathBuf, reason: String },

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("{0}")]
    Generate(String),

    #[error("shape mismatch: {0}")]
    Shape(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
