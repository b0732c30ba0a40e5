//! clasp's encoders: image and text preprocessing (`preprocess`), the
//! CLIP-family architectures and their loading (`model`), the loaded-once
//! embedding API (`encoder`) and zero-shot scoring (`zeroshot`), datasets
//! (`data`) and ONNX export (`export`).
//! It knows no CLI, HTTP, search, training or language model.

pub mod data;
pub mod encoder;
pub mod export;
pub mod model;
pub mod preprocess;
pub mod video;
pub mod zeroshot;

pub use clasp_common::{atomic, progress, rng, vecmath, Error, Result};
pub use encoder::{BatchEmbeddings, Encoder, Failure};
