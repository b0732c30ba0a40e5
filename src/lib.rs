//! clasp: CLIP-family dual encoders in Rust — load Hugging Face checkpoints,
//! embed images and texts into one space, and build search, evaluation,
//! training and serving on top.
//!
//! Layout: `model/` (architectures and loading), `preprocess/` (images and
//! text), and `encoder` (the loaded-once API the rest builds on).

pub mod data;
pub mod encoder;
pub mod error;
pub mod eval;
pub mod index;
pub mod model;
pub mod preprocess;
pub mod progress;
pub mod serve;
pub mod train;

pub use encoder::{BatchEmbeddings, Encoder, Failure};
pub use error::{Error, Result};
