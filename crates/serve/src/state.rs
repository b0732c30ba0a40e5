//! What every handler shares: the model, the batcher, the metrics and the limits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::batcher::Batcher;
use super::metrics::Metrics;
use crate::index::engine::VectorSearch;
use crate::index::{store, ConnectOptions, Store, ANN_THRESHOLD};
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
    pub store: Option<StoreSpec>,
    pub store_model: Option<i64>,
    /// The fusion model that re-ranks searches, when the server has one.
    pub reranker: Option<Arc<clasp_core::model::blip2::Blip2Retrieval>>,
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
    catalog: Box<dyn Store>,
    engine: Box<dyn VectorSearch>,
    generation: i64,
}

impl SearchCache {
    /// Runs `f` with the current catalog and engine of `store`. Searches
    /// take turns on the one store connection. Call it from blocking code
    /// (a PostgreSQL store's client blocks).
    pub fn with<R>(
        &self,
        store: &StoreSpec,
        model: i64,
        f: impl FnOnce(&mut dyn Store, &dyn VectorSearch) -> Result<R>,
    ) -> Result<R> {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let stale = match guard.as_mut() {
            None => true,
            // A store that cannot answer is reopened (a restarted server).
            Some(s) => s.catalog.generation().map_or(true, |g| g != s.generation),
        };
        if stale {
            *guard = None;
            let mut catalog = store::open(&store.spec, false, &store.options)?;
            let generation = catalog.generation()?;
            let engine = catalog.engine(model, ANN_THRESHOLD)?;
            *guard = Some(SearchState {
                catalog,
                engine,
                generation,
            });
        }
        match guard.as_mut() {
            Some(s) => f(s.catalog.as_mut(), s.engine.as_ref()),
            None => unreachable!("opened above"),
        }
    }
}

/// Where a server's store is and how to reach it.
#[derive(Clone, Debug)]
pub struct StoreSpec {
    /// A SQLite path or a PostgreSQL URL.
    pub spec: String,
    pub options: ConnectOptions,
}

pub type Shared = Arc<AppState>;
