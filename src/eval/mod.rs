//! Evaluation: retrieval Recall@K, zero-shot classification, alignment
//! diagnostics (computed as CLIP_benchmark computes them) and captioning metrics (as
//! pycocoevalcap computes them), with an embedding cache so re-runs are fast.

pub mod cache;
pub mod caption;
pub mod captioning;
pub mod diagnose;
pub mod embed;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod retrieval;
pub mod zeroshot;

pub use crate::preprocess::prompts;
pub use cache::EmbeddingCache;
pub use embed::EmbedContext;
pub use metrics::{ClassificationMetrics, RetrievalMetrics, RECALL_KS};
