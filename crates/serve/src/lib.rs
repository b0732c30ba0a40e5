//! The HTTP service: embeddings, similarity, zero-shot classification and
//! search over a store, behind a dynamic batching engine, with a search page
//! at `/`; and chat
//! completions over a vision-language model, behind a continuous-batching
//! generation engine.

use clasp_common::vecmath;
pub use clasp_common::{Error, Result};
use clasp_core::{model, preprocess, Encoder};
use clasp_index as index;
use clasp_llm as llm;
use clasp_vlm as vlm;

pub mod api;
pub mod batcher;
mod body;
pub mod chat;
mod error;
pub mod generation;
mod images;
pub mod metrics;
pub mod openapi;
pub mod page;
pub mod rag;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;

pub use api::Limits;
pub use batcher::{BatchConfig, Batcher};
pub use generation::{GenConfig, GenEngine};
pub use state::StoreSpec;

use crate::vlm::native::NativeModel;
use crate::vlm::{ChatModel, Vlm};

pub struct ServeConfig {
    pub addr: SocketAddr,
    pub model_name: String,
    pub batch: BatchConfig,
    pub limits: Limits,
    pub store: Option<state::StoreSpec>,
    pub store_model: Option<i64>,
    /// The fusion model `/v1/search` re-ranks with (`"rerank": "itm:K"`).
    pub reranker: Option<clasp_core::model::blip2::Blip2Retrieval>,
}

/// What `serve` answers chat completions with.
/// The model a chat server answers with.
pub enum ChatModelKind {
    /// A bridge (LLaVA-style) model.
    Bridge(Box<Vlm>),
    /// A native (Emu3-layout) model: it also draws.
    Native(Box<NativeModel>),
    /// A language model alone: text conversations.
    Text(Box<crate::vlm::TextChat>),
}

pub struct ChatConfig {
    pub vlm: ChatModelKind,
    pub model_name: String,
    pub engine: GenConfig,
    /// Local image paths are read only under this folder.
    pub local_images: Option<PathBuf>,
}

/// The embedding routes.
pub fn router(state: api::Shared) -> Router {
    Router::new()
        .route("/v1/embeddings", post(api::embeddings))
        .route("/v1/similarity", post(api::similarity))
        .route("/v1/classify", post(api::classify))
        .route("/v1/search", post(api::search_endpoint))
        .route("/v1/thumbnail", get(page::thumbnail))
        .route("/v1/video", get(page::video))
        .route("/", get(page::page))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then stops accepting connections and
/// drains the requests in flight. `encoder` serves the embedding endpoints,
/// `chat` the chat completions; at least one is needed.
pub async fn serve(
    encoder: Option<Encoder>,
    chat: Option<ChatConfig>,
    cfg: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<()> {
    let metrics = Arc::new(metrics::Metrics::new());
    let mut app = Router::new();
    let standalone = encoder.is_none();
    let mut embedding: Option<api::Shared> = None;
    if let Some(encoder) = encoder {
        let encoder = Arc::new(encoder);
        let batcher = Batcher::start(encoder.clone(), cfg.batch, metrics.clone());
        let state = Arc::new(api::AppState {
            encoder,
            model_name: cfg.model_name,
            batcher,
            metrics: metrics.clone(),
            limits: cfg.limits.clone(),
            store: cfg.store,
            store_model: cfg.store_model,
            reranker: cfg.reranker.map(Arc::new),
            search: Default::default(),
            thumbs: Default::default(),
        });
        app = app.merge(router(state.clone()));
        embedding = Some(state);
    }
    let (embedding_served, chat_served) = (embedding.is_some(), chat.is_some());
    let draws = matches!(
        chat,
        Some(ChatConfig {
            vlm: ChatModelKind::Native(_),
            ..
        })
    );
    if let Some(c) = chat {
        let local_images = match c.local_images {
            Some(d) => Some(d.canonicalize().map_err(|e| Error::io(&d, e))?),
            None => None,
        };
        let (vlm, native): (Arc<dyn ChatModel>, _) = match c.vlm {
            ChatModelKind::Bridge(v) => (Arc::new(*v), None),
            ChatModelKind::Text(t) => (Arc::new(*t), None),
            ChatModelKind::Native(n) => {
                let n = Arc::new(*n);
                (n.clone(), Some(n))
            }
        };
        let engine = GenEngine::start(vlm.clone(), c.engine, metrics.clone());
        let state = Arc::new(chat::ChatState {
            engine,
            vlm,
            native,
            drawing: Default::default(),
            model_name: c.model_name,
            limits: cfg.limits,
            metrics,
            local_images,
            // Retrieval-augmented requests search the embedding side's store.
            retrieval: embedding.filter(|e| e.store.is_some()),
        });
        app = app.merge(chat::router(state, standalone));
    } else if standalone {
        return Err(Error::Report(
            "nothing to serve: give an embedding model, a vision-language model, or both".into(),
        ));
    }
    // The document lists only the paths this server answers.
    let doc = axum::Json(openapi::document_for(embedding_served, chat_served, draws));
    let app = app
        .route("/openapi.json", get(move || async move { doc.clone() }))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        // Bodies are read (and limited) by the handlers themselves.
        .layer(axum::extract::DefaultBodyLimit::disable());
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| Error::Report(format!("cannot listen on {}: {e}", cfg.addr)))?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::Report(format!("listener address: {e}")))?;
    on_listening(local);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Report(format!("server error: {e}")))
}

/// Default request timeout.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
