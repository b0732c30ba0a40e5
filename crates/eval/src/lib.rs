//! Evaluation: retrieval Recall@K, zero-shot classification, alignment
//! diagnostics (computed as CLIP_benchmark computes them) and captioning metrics (as
//! pycocoevalcap computes them), with an embedding cache so re-runs are fast.

use clasp_common::{progress, vecmath};
pub use clasp_common::{Error, Result};
use clasp_core::{data, preprocess, Encoder};
use clasp_llm as llm;
use clasp_vlm as vlm;

pub mod cache;
pub mod caption;
pub mod captioning;
pub mod chair;
pub mod diagnose;
pub mod embed;
pub mod frechet;
pub mod metrics;
pub mod plot;
pub mod pope;
pub mod report;
pub mod rerank;
pub mod retrieval;
pub mod vq;
pub mod zeroshot;

pub use crate::preprocess::prompts;
pub use cache::EmbeddingCache;
pub use embed::EmbedContext;
pub use metrics::{ClassificationMetrics, RetrievalMetrics, RECALL_KS};
