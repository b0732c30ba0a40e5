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

use super::body::{count, number, parse_json, prepare_images, read_body, strings};
use super::error::{guarded, ApiError};
use super::generation::{ChatEvent, ChatJob, GenEngine};
use super::metrics::Metrics;
use super::state::Limits;
use crate::llm::{GenerateOptions, Generation, SamplingParams, StopReason};
use crate::vlm::{Part, Turn, Vlm};

pub struct ChatState {
    pub engine: GenEngine,
    pub vlm: Arc<Vlm>,
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

/// A parsed request: the conversation (images still as bytes), options.
struct ChatRequest {
    turns: Vec<(String, Vec<RawPart>)>,
    opts: GenerateOptions,
    stream: bool,
    include_usage: bool,
    retrieve: Option<Retrieve>,
}

/// clasp's extension field `clasp_retrieve: {"k": 3, "hybrid": false}`:
/// retrieve photos from the server's store with the last user message's
/// text, and put them into that message as numbered images to cite.
struct Retrieve {
    k: usize,
    hybrid: bool,
}

fn parse_retrieve(v: &Value, st: &ChatState) -> Result<Retrieve, ApiError> {
    let f = "clasp_retrieve";
    if st.retrieval.is_none() {
        return Err(ApiError::bad(
            f,
            "this server has no store to retrieve from; start it with --model M --store S as well as --vlm",
        ));
    }
    let o = v
        .as_object()
        .ok_or_else(|| ApiError::bad(f, "expected {\"k\": N, \"hybrid\": bool}"))?;
    let k = match o.get("k") {
        None => 3,
        Some(k) => match k.as_u64() {
            Some(k @ 1..=16) => k as usize,
            _ => {
                return Err(ApiError::bad(
                    format!("{f}.k"),
                    "expected an integer from 1 to 16",
                ))
            }
        },
    };
    let hybrid = match o.get("hybrid") {
        None => false,
        Some(h) => h
            .as_bool()
            .ok_or_else(|| ApiError::bad(format!("{f}.hybrid"), "expected a boolean"))?,
    };
    Ok(Retrieve { k, hybrid })
}

enum RawPart {
    Text(String),
    Image { field: String, bytes: Vec<u8> },
}

/// A seed for requests that give none: different for each request.
fn fresh_seed() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ N.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

fn options(m: &Map<String, Value>) -> Result<GenerateOptions, ApiError> {
    let max_tokens = match count(m, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => count(m, "max_tokens")?,
    };
    let max_new_tokens = match max_tokens {
        Some(0) => return Err(ApiError::bad("max_tokens", "must be at least 1")),
        Some(n) => n as usize,
        None => 256,
    };
    let temperature = number(m, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad("temperature", "must be between 0 and 2"));
    }
    let top_p = number(m, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", "must be in (0, 1]"));
    }
    let seed = match m.get("seed") {
        None | Some(Value::Null) => fresh_seed(),
        Some(v) => v
            .as_i64()
            .map(|s| s as u64)
            .or_else(|| v.as_u64())
            .ok_or_else(|| ApiError::bad("seed", "expected an integer"))?,
    };
    let stop = match m.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => strings(v, "stop")?,
    };
    if stop.len() > 4 {
        return Err(ApiError::bad("stop", "at most 4 stop strings"));
    }
    if let Some(n) = count(m, "n")? {
        if n != 1 {
            return Err(ApiError::bad("n", "only n = 1 is supported"));
        }
    }
    Ok(GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            seed,
            ..Default::default()
        },
        stop,
        suppress_tokens: Vec::new(),
    })
}

/// An `image_url` part's bytes: a base64 data URL, or a local file under
/// the allowed folder.
fn image_bytes(url: &str, field: &str, local: Option<&Path>) -> Result<Vec<u8>, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((_, b64)) = rest.split_once(";base64,") else {
            return Err(ApiError::bad(
                field,
                "a data URL must be base64: data:image/...;base64,...",
            ));
        };
        return base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| ApiError::bad(field, format!("invalid base64 in the data URL: {e}")));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(ApiError::bad(
            field,
            "remote image URLs are not fetched; send the image as a data URL (data:image/jpeg;base64,...)",
        ));
    }
    let path = Path::new(url.strip_prefix("file://").unwrap_or(url));
    let Some(root) = local else {
        return Err(ApiError::bad(
            field,
            "local image paths are refused; start the server with --allow-local-images DIR, or send a data URL",
        ));
    };
    if !path.is_absolute() {
        return Err(ApiError::bad(
            field,
            "expected a data URL or an absolute path",
        ));
    }
    let real = path
        .canonicalize()
        .map_err(|e| ApiError::bad(field, format!("{}: {e}", path.display())))?;
    if !real.starts_with(root) {
        return Err(ApiError::bad(
            field,
            format!(
                "{} is outside the folder allowed for local images ({})",
                path.display(),
                root.display()
            ),
        ));
    }
    std::fs::read(&real).map_err(|e| ApiError::bad(field, format!("{}: {e}", path.display())))
}

fn parse_request(m: &Map<String, Value>, st: &ChatState) -> Result<ChatRequest, ApiError> {
    let msgs = match m.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(_) => {
            return Err(ApiError::bad(
                "messages",
                "expected a non-empty array of messages",
            ))
        }
        None => return Err(ApiError::bad("messages", "required")),
    };
    let mut turns = Vec::with_capacity(msgs.len());
    let mut images = 0;
    for (i, msg) in msgs.iter().enumerate() {
        let f = format!("messages[{i}]");
        let role = msg
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad(format!("{f}.role"), "expected a string"))?;
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad(
                    format!("{f}.role"),
                    format!("unknown role `{other}` (system, user or assistant)"),
                ))
            }
        };
        let parts = match msg.get("content") {
            Some(Value::String(s)) => vec![RawPart::Text(s.clone())],
            Some(Value::Null) | None if role == "assistant" => Vec::new(),
            Some(Value::Array(parts)) => {
                let mut out = Vec::with_capacity(parts.len());
                for (j, p) in parts.iter().enumerate() {
                    let pf = format!("{f}.content[{j}]");
                    match p.get("type").and_then(Value::as_str) {
                        Some("text") => out.push(RawPart::Text(
                            p.get("text")
                                .and_then(Value::as_str)
                                .ok_or_else(|| {
                                    ApiError::bad(format!("{pf}.text"), "expected a string")
                                })?
                                .to_string(),
                        )),
                        Some("image_url") => {
                            let field = format!("{pf}.image_url");
                            let url = match p.get("image_url") {
                                Some(Value::String(u)) => u.as_str(),
                                Some(Value::Object(o)) => {
                                    o.get("url").and_then(Value::as_str).ok_or_else(|| {
                                        ApiError::bad(format!("{field}.url"), "expected a string")
                                    })?
                                }
                                _ => {
                                    return Err(ApiError::bad(
                                        field,
                                        "expected {\"url\": \"data:image/...;base64,...\"}",
                                    ))
                                }
                            };
                            let bytes = image_bytes(url, &field, st.local_images.as_deref())?;
                            images += 1;
                            out.push(RawPart::Image { field, bytes });
                        }
                        _ => {
                            return Err(ApiError::bad(
                                format!("{pf}.type"),
                                "expected \"text\" or \"image_url\"",
                            ))
                        }
                    }
                }
                out
            }
            _ => {
                return Err(ApiError::bad(
                    format!("{f}.content"),
                    "expected a string or an array of parts",
                ))
            }
        };
        turns.push((role.to_string(), parts));
    }
    if images > st.limits.max_items {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_items",
            format!(
                "{images} images in one request; the limit is {}",
                st.limits.max_items
            ),
        ));
    }
    let stream = match m.get("stream") {
        None | Some(Value::Null) => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::bad("stream", "expected a boolean"))?,
    };
    let include_usage = m
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let retrieve = match m.get("clasp_retrieve") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_retrieve(v, st)?),
    };
    Ok(ChatRequest {
        turns,
        opts: options(m)?,
        stream,
        include_usage,
        retrieve,
    })
}

/// Decodes and prepares the images (on blocking threads), in order.
async fn prepare_turns(
    st: &ChatState,
    turns: Vec<(String, Vec<RawPart>)>,
) -> Result<Vec<Turn>, ApiError> {
    let mut raw = Vec::new();
    for (_, parts) in &turns {
        for p in parts {
            if let RawPart::Image { field, bytes } = p {
                raw.push((field.clone(), bytes.clone()));
            }
        }
    }
    let processor = st.vlm.image_processor().clone();
    let mut pixels = prepare_images(st.limits.max_pixels, processor, raw)
        .await?
        .into_iter();
    Ok(turns
        .into_iter()
        .map(|(role, parts)| Turn {
            role,
            parts: parts
                .into_iter()
                .map(|p| match p {
                    RawPart::Text(s) => Part::Text(s),
                    RawPart::Image { .. } => {
                        Part::Image(pixels.next().expect("one prepared image per part").data)
                    }
                })
                .collect(),
        })
        .collect())
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
            Part::Image(_) => None,
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
        let (parts, skipped) = crate::rag::source_parts(&vlm, &sources);
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
