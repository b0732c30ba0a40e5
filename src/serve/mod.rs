//! The HTTP service: embeddings, similarity, zero-shot classification and
//! search over a store, behind a dynamic batching engine.

pub mod api;
pub mod batcher;
mod body;
mod error;
pub mod metrics;
pub mod openapi;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;

pub use api::Limits;
pub use batcher::{BatchConfig, Batcher};

use crate::{Encoder, Error, Result};

pub struct ServeConfig {
    pub addr: SocketAddr,
    pub model_name: String,
    pub batch: BatchConfig,
    pub limits: Limits,
    pub store: Option<PathBuf>,
    pub store_model: Option<i64>,
}

pub fn router(state: api::Shared) -> Router {
    Router::new()
        .route("/v1/embeddings", post(api::embeddings))
        .route("/v1/similarity", post(api::similarity))
        .route("/v1/classify", post(api::classify))
        .route("/v1/search", post(api::search_endpoint))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/openapi.json", get(api::openapi))
        .fallback(api::not_found)
        // Bodies are read (and limited) by the handlers themselves.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting connections and
/// drains the requests in flight.
pub async fn serve(
    encoder: Encoder,
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    let metrics = Arc::new(metrics::Metrics::new());
    let encoder = Arc::new(encoder);
    let batcher = Batcher::start(encoder.clone(), cfg.batch, metrics.clone());
    let state = Arc::new(api::AppState {
        encoder,
        model_name: cfg.model_name,
        batcher,
        metrics,
        limits: cfg.limits,
        store: cfg.store,
        store_model: cfg.store_model,
        search: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| Error::Report(format!("cannot listen on {}: {e}", cfg.addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Report(format!("listener address: {e}")))?;
    on_listening(local);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Report(format!("server error: {e}")))
}

/// Default request timeout.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
