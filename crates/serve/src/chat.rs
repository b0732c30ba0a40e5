//! `POST /v1/chat/completions`: OpenAI's chat API over a vision-language
//! model, answered by the continuous-batching engine (`generation`).
//!
//! Request fields: `messages` (roles `system`, `user`, `assistant`; content
//! a string or an array of `text` and `image_url` parts), `max_tokens` (or
//! `max_completion_tokens`), `temperature` (OpenAI's default, 1), `top_p`,
//! `seed`, `stop` (a string or up to 4), `stream`, `stream_options.
//! include_usage`, `n` (1 only). Images are data URLs with base64 bytes, or
//! local paths (`file://` or absolute) under the folder the server was
//! started with (`--allow-local-images`). Remote URLs are not fetched.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::body::{count, number, parse_json, prepare_images_with, read_body, strings};
use super::error::{guarded, ApiError};
use super::generation::{ChatEvent, ChatJob, GenEngine};
use super::metrics::Metrics;
use super::state::Limits;
use crate::llm::{GenerateOptions, Generation, SamplingParams, StopReason};
use crate::vlm::{ChatModel, Part, Turn};

#[path = "chat/request.rs"]
mod request;
use request::*;
pub(crate) use request::{fresh_seed, temperature_top_p};

pub struct ChatState {
    pub engine: GenEngine,
    pub vlm: Arc<dyn ChatModel>,
    /// The same model when it is native: it also draws
    /// (`/v1/images/generations`).
    pub native: Option<Arc<crate::vlm::native::NativeModel>>,
    /// Held while a drawing runs: one at a time.
    pub drawing: tokio::sync::Mutex<()>,
    pub model_name: String,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// Local image paths are read only under this folder (canonical).
    pub local_images: Option<PathBuf>,
    /// The embedding model and store that `clasp_retrieve` searches.
    pub retrieval: Option<super::api::Shared>,
}

pub type ChatShared = Arc<ChatState>;

/// The chat routes; with `standalone`, also `/health` and `/metrics` (when
/// no embedding model serves them).
pub fn router(state: ChatShared, standalone: bool) -> Router {
    let mut r = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/models", get(models));
    if state.native.is_some() {
        r = r.route("/v1/images/generations", post(super::images::generations));
    }
    if standalone {
        r = r
            .route("/health", get(health))
            .route("/metrics", get(metrics));
    }
    r.with_state(state)
}

async fn health(State(st): State<ChatShared>) -> Response {
    axum::Json(json!({"status": "ok", "vlm": st.model_name, "in_flight": st.engine.in_flight()}))
        .into_response()
}

async fn metrics(State(st): State<ChatShared>) -> Response {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    (h, st.metrics.render()).into_response()
}

async fn models(State(st): State<ChatShared>) -> Response {
    axum::Json(json!({"object": "list", "data": [
        {"id": st.model_name, "object": "model", "created": 0, "owned_by": "clasp"}
    ]}))
    .into_response()
}

/// A turn of text parts only.
fn text_turn(role: String, parts: Vec<RawPart>) -> Turn {
    Turn {
        role,
        parts: parts
            .into_iter()
            .filter_map(|p| match p {
                RawPart::Text(t) => Some(Part::Text(t)),
                RawPart::Image { .. } | RawPart::Video { .. } => None,
            })
            .collect(),
    }
}

/// Decodes and prepares the images (on blocking threads), in order.
async fn prepare_turns(
    st: &ChatState,
    turns: Vec<(String, Vec<RawPart>)>,
) -> Result<Vec<Turn>, ApiError> {
    let mut raw = Vec::new();
    let mut videos = Vec::new();
    for (_, parts) in &turns {
        for p in parts {
            match p {
                RawPart::Image { field, bytes } => raw.push((field.clone(), bytes.clone())),
                RawPart::Video { field, bytes } => videos.push((field.clone(), bytes.clone())),
                RawPart::Text(_) => {}
            }
        }
    }
    let first = raw.first().or(videos.first());
    match (st.vlm.image_processor(), first) {
        (Some(_), _) => {}
        (None, Some((field, _))) => {
            return Err(ApiError::bad(
                field,
                "this server's model reads no images (a language model alone, --llm)",
            ))
        }
        (None, None) => {
            return Ok(turns
                .into_iter()
                .map(|(role, parts)| text_turn(role, parts))
                .collect())
        }
    };
    // Through the model: a LLaVA-NeXT model tiles each image.
    let model = st.vlm.clone();
    let mut pixels = prepare_images_with(st.limits.max_pixels, raw, move |img| {
        model.prepare_image(img)
    })
    .await?
    .into_iter();
    let mut videos = prepare_videos(st.vlm.clone(), videos).await?.into_iter();
    Ok(turns
        .into_iter()
        .map(|(role, parts)| Turn {
            role,
            parts: parts
                .into_iter()
                .map(|p| match p {
                    RawPart::Text(s) => Part::Text(s),
                    RawPart::Image { .. } => pixels.next().expect("one prepared image per part"),
                    RawPart::Video { .. } => videos.next().expect("one prepared video per part"),
                })
                .collect(),
        })
        .collect())
}

/// Samples and prepares the videos' frames through the model (FFmpeg reads
/// each from a temporary file), on a blocking thread; an error names the
/// field.
async fn prepare_videos(
    model: Arc<dyn ChatModel>,
    videos: Vec<(String, Vec<u8>)>,
) -> Result<Vec<Part>, ApiError> {
    if videos.is_empty() {
        return Ok(Vec::new());
    }
    tokio::task::spawn_blocking(move || {
        videos
            .into_iter()
            .map(|(field, bytes)| {
                let bad = |e: String| ApiError::bad(field.clone(), e);
                let dir = tempfile::tempdir().map_err(|e| bad(e.to_string()))?;
                let path = dir.path().join("video");
                std::fs::write(&path, &bytes).map_err(|e| bad(e.to_string()))?;
                model.prepare_video(&path).map_err(|e| bad(e.to_string()))
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

/// Retrieves for the last user message's text and puts the photos (as
/// numbered image parts, with their paths and captions) before its own
/// parts, and the instruction to cite after them. Returns the sources used.
async fn augment(
    st: &ChatState,
    turns: &mut [Turn],
    r: &Retrieve,
) -> Result<Vec<crate::rag::Source>, ApiError> {
    let emb = st.retrieval.clone().expect("checked when parsed");
    let Some(last) = turns.iter_mut().rev().find(|t| t.role == "user") else {
        return Err(ApiError::bad(
            "clasp_retrieve",
            "no user message to retrieve for",
        ));
    };
    let question: Vec<&str> = last
        .parts
        .iter()
        .filter_map(|p| match p {
            Part::Text(s) => Some(s.as_str()),
            Part::Image(_) | Part::Tiled(_) | Part::Video(_) => None,
        })
        .collect();
    let q = crate::rag::RagQuery {
        question: question.join("\n"),
        image: None,
        k: r.k,
        hybrid: r.hybrid,
    };
    if q.question.trim().is_empty() {
        return Err(ApiError::bad(
            "clasp_retrieve",
            "the last user message has no text to retrieve with",
        ));
    }
    let vlm = st.vlm.clone();
    let (parts, used) = tokio::task::spawn_blocking(move || -> crate::Result<_> {
        let (Some(store), Some(model)) = (&emb.store, emb.store_model) else {
            return Err(crate::Error::Report("no store".into()));
        };
        let sources = emb.search.with(store, model, |catalog, engine| {
            crate::rag::retrieve(&emb.encoder, catalog, engine, &q)
        })?;
        let (parts, skipped) = crate::rag::source_parts(vlm.as_ref(), &sources);
        let used: Vec<_> = sources
            .into_iter()
            .filter(|s| !skipped.iter().any(|(k, _)| k.n == s.n))
            .collect();
        Ok((parts, used))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let own = std::mem::take(&mut last.parts);
    last.parts = parts;
    last.parts.extend(own);
    last.parts.push(Part::Text(crate::rag::CITE.into()));
    Ok(used)
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos | StopReason::Stop | StopReason::Cancelled => "stop",
        StopReason::Length | StopReason::Context => "length",
    }
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.ids.len(),
        "total_tokens": g.prompt_tokens + g.ids.len(),
    })
}

fn failed(message: String, bad: bool) -> ApiError {
    if bad {
        ApiError::bad("messages", message)
    } else {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub async fn completions(State(st): State<ChatShared>, req: Request) -> Response {
    let st2 = st.clone();
    guarded(&st.limits, &st.metrics, "chat_completions", async move {
        let st = st2;
        let m = parse_json(&read_body(&st.limits, req.into_body()).await?)?;
        let parsed = parse_request(&m, &st)?;
        let mut turns = prepare_turns(&st, parsed.turns).await?;
        let sources = match &parsed.retrieve {
            Some(r) => augment(&st, &mut turns, r).await?,
            None => Vec::new(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let job = ChatJob {
            turns,
            opts: parsed.opts,
            events: tx,
            at: Instant::now(),
        };
        if let Err(busy) = st.engine.submit(job) {
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                class: "queue_full",
                message: format!(
                    "the server is busy ({} requests queued or running); retry shortly",
                    busy.in_flight
                ),
                param: None,
                retry_after: Some(1),
            });
        }
        // The prompt is accepted (or refused) before any answer goes out,
        // so a bad prompt is a 400 even when streaming.
        match rx.recv().await {
            Some(ChatEvent::Started { .. }) => {}
            Some(ChatEvent::Failed { message, bad }) => return Err(failed(message, bad)),
            _ => return Err(failed("the generation engine stopped".into(), false)),
        }
        let id = format!("chatcmpl-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let model = st.model_name.clone();
        let sources = (parsed.retrieve.is_some()).then(|| json!(sources));
        if parsed.stream {
            return Ok(stream(
                rx,
                id,
                created,
                model,
                parsed.include_usage,
                sources,
            ));
        }
        let mut text = String::new();
        loop {
            match rx.recv().await {
                Some(ChatEvent::Text(s)) => text.push_str(&s),
                Some(ChatEvent::Done(g)) => {
                    let mut body = json!({
                        "id": id,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": finish_reason(g.stop_reason),
                        }],
                        "usage": usage(&g),
                    });
                    if let Some(s) = sources {
                        body["clasp_sources"] = s;
                    }
                    return Ok(axum::Json(body).into_response());
                }
                Some(ChatEvent::Failed { message, bad }) => return Err(failed(message, bad)),
                Some(ChatEvent::Started { .. }) => {}
                None => return Err(failed("the generation engine stopped".into(), false)),
            }
        }
    })
    .await
}

/// Server-sent events in OpenAI's chunk format: the role first, then the
/// content pieces, then the finish reason, the usage when asked, `[DONE]`.
/// When the client goes away the stream (and with it the receiver) is
/// dropped, and the engine frees the row at its next step.
fn stream(
    rx: mpsc::UnboundedReceiver<ChatEvent>,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    sources: Option<Value>,
) -> Response {
    let chunk =
        move |delta: Value, finish: Option<&str>, usage: Option<Value>, extra: Option<Value>| {
            let mut c = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": if usage.is_some() { json!([]) } else {
                    json!([{"index": 0, "delta": delta, "finish_reason": finish}])
                },
            });
            if let Some(u) = usage {
                c["usage"] = u;
            }
            if let Some(s) = extra {
                c["clasp_sources"] = s;
            }
            SseEvent::default().data(c.to_string())
        };
    enum Phase {
        Role(Option<Value>),
        Body,
        Usage(Value),
        Done,
        End,
    }
    let state = (rx, Phase::Role(sources), chunk);
    let events = futures_util::stream::unfold(state, move |(mut rx, phase, chunk)| async move {
        let ev = match phase {
            Phase::Role(sources) => {
                let e = chunk(
                    json!({"role": "assistant", "content": ""}),
                    None,
                    None,
                    sources,
                );
                return Some((
                    Ok::<_, std::convert::Infallible>(e),
                    (rx, Phase::Body, chunk),
                ));
            }
            Phase::Usage(u) => {
                let e = chunk(json!({}), None, Some(u), None);
                return Some((Ok(e), (rx, Phase::Done, chunk)));
            }
            Phase::Done => {
                return Some((
                    Ok(SseEvent::default().data("[DONE]")),
                    (rx, Phase::End, chunk),
                ))
            }
            Phase::End => return None,
            Phase::Body => rx.recv().await,
        };
        let (e, next) = match ev {
            Some(ChatEvent::Text(s)) => {
                (chunk(json!({"content": s}), None, None, None), Phase::Body)
            }
            Some(ChatEvent::Done(g)) => (
                chunk(json!({}), Some(finish_reason(g.stop_reason)), None, None),
                if include_usage {
                    Phase::Usage(usage(&g))
                } else {
                    Phase::Done
                },
            ),
            Some(ChatEvent::Failed { message, .. }) => (
                SseEvent::default()
                    .data(json!({"error": {"message": message, "type": "internal"}}).to_string()),
                Phase::Done,
            ),
            Some(ChatEvent::Started { .. }) => {
                (SseEvent::default().comment("started"), Phase::Body)
            }
            None => return None,
        };
        Some((Ok(e), (rx, next, chunk)))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
