//! What every handler shares: the model, the batcher, the metrics and the limits.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::batcher::Batcher;
use super::metrics::Metrics;
use crate::index::engine::{self, VectorSearch};
use crate::index::{Catalog, ANN_THRESHOLD};
use crate::{Encoder, Result};

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_items: usize,
    pub max_pixels: u64,
    pub request_timeout: Duration,
}

pub struct AppState {
    pub encoder: Arc<Encoder>,
    pub model_name: String,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub store: Option<PathBuf>,
    pub store_model: Option<i64>,
    /// The store's catalog and engine, shared by searches.
    pub search: SearchCache,
    /// The search page's thumbnails.
    pub thumbs: super::page::Thumbnails,
}

/// The store's catalog and search engine, opened by the first search and
/// kept; reopened when the store's generation has moved (an index run
/// changed it), so later searches see the new files.
#[derive(Default)]
pub struct SearchCache(Mutex<Option<SearchState>>);

struct SearchState {
    catalog: Catalog,
    engine: Box<dyn VectorSearch>,
    generation: i64,
}

impl SearchCache {
    /// Runs `f` with the current catalog and engine of `store`. Searches
    /// take turns on the one SQLite connection.
    pub fn with<R>(
        &self,
        store: &Path,
        model: i64,
        f: impl FnOnce(&Catalog, &dyn VectorSearch) -> Result<R>,
    ) -> Result<R> {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let stale = match guard.as_ref() {
            None => true,
            Some(s) => s.catalog.generation()? != s.generation,
        };
        if stale {
            let catalog = Catalog::open(store)?;
            let generation = catalog.generation()?;
            let engine = engine::open_engine(&catalog, model, ANN_THRESHOLD)?;
            *guard = Some(SearchState {
                catalog,
                engine,
                generation,
            });
        }
        match guard.as_ref() {
            Some(s) => f(&s.catalog, s.engine.as_ref()),
            None => unreachable!("opened above"),
        }
    }
}

pub type Shared = Arc<AppState>;
