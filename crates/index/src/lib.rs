//! Image search over folders: an incremental, crash-safe catalog of files and
//! vectors (embedded SQLite, or PostgreSQL with pgvector, behind
//! [`store::Store`]), exact and HNSW search engines, rclip-style query algebra,
//! hybrid BM25 + vector retrieval, and zero-shot classification of stored
//! images.

use clasp_common::{atomic, progress, vecmath};
pub use clasp_common::{Error, Result};
use clasp_core::{encoder, preprocess, Encoder};

pub mod catalog;
pub mod clip_retrieval;
pub mod embedder;
pub mod engine;
pub mod indexer;
pub mod postgres;
pub mod query;
pub mod rerank;
pub mod search;
pub mod store;
pub mod video_segments;
pub mod walk;

use std::path::Path;

pub use catalog::Catalog;
pub use embedder::Embedder;
pub use engine::{open_engine, VectorSearch};
pub use indexer::{index, IndexOptions, Summary};
pub use store::{ConnectOptions, Store};
pub use video_segments::VideoOptions;

/// Default number of vectors above which search uses the HNSW index.
pub const ANN_THRESHOLD: usize = 50_000;

/// The model's id in the catalog, registering it if new. Its content hash is
/// remembered against the weights file's size and mtime, so it is computed
/// once per model file.
pub fn model_id(catalog: &mut dyn Store, encoder: &dyn Embedder, spec: &str) -> Result<i64> {
    let w = encoder.weights();
    let w: &Path = &w;
    let meta = std::fs::metadata(w).map_err(|e| crate::Error::io(w, e))?;
    let (size, mtime) = (meta.len(), walk::mtime_ns(&meta));
    // The remembered key is the f32 one; another precision hashes afresh.
    let f32 = encoder.precision() == crate::encoder::Precision::F32;
    let key = match catalog.remembered_model_key(w, size, mtime)? {
        Some(k) if f32 => k,
        _ => encoder.content_hash()?,
    };
    // A local model is remembered by its absolute path, so the store finds
    // it again from any working directory; a Hub id stays as given.
    let local = Path::new(spec);
    let spec = if local.is_dir() {
        local
            .canonicalize()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| spec.to_string())
    } else {
        spec.to_string()
    };
    let id = catalog.model_id(&key, &spec, encoder.stored_dim())?;
    if f32 {
        catalog.remember_model_file(id, w, size, mtime)?;
    }
    Ok(id)
}
