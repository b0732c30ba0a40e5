//! The bridge generation: a LLaVA-style vision-language model. A CLIP-family
//! vision tower gives patch features from a chosen layer; a connector
//! (LLaVA-1.5's `mlp2x_gelu`, or a Perceiver resampler) maps them to image
//! tokens in the language model's embedding space; the language model reads
//! them where the prompt has its `<image>` placeholder.
//!
//! - `connector`: the two connectors;
//! - `model`: the assembled model, its prompts and its generation;
//! - `chat`: conversations with text and image parts;
//! - `heads`: BCIF's contrastive heads (trained by `train::bcif`);
//! - `checkpoint`: the `LlavaForConditionalGeneration` layout that
//!   transformers loads; `blip2`: `Blip2ForConditionalGeneration`'s, for a
//!   model on BLIP-2's ViT and Q-Former;
//! - `anyres`: LLaVA-NeXT's high-resolution tiling
//!   (`LlavaNextForConditionalGeneration`); `video`: LLaVA-NeXT-Video's
//!   frames, pooled 2×2 (`LlavaNextVideoForConditionalGeneration`).

use clasp_common::{atomic, progress, rng};
pub use clasp_common::{Error, Result};
use clasp_core::{data, preprocess};
use clasp_llm as llm;

pub mod anyres;
pub mod blip2;
pub mod caption;
pub mod chat;
pub mod checkpoint;
pub mod connector;
pub mod heads;
pub mod model;
pub mod native;
pub mod reward;
pub mod stage1;
pub mod video;

pub use chat::{ChatModel, Part, TextChat, Turn};
pub use connector::{Connector, ConnectorKind};
pub use model::{FeatureSelect, TowerSpec, Vlm, VlmConfig};
