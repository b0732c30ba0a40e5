//! HTTP endpoints. Bodies are read and parsed by hand (not by axum's `Json`
//! extractor) so every malformed field gets a 400 that names it, and body
//! reading counts against the request timeout.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};

use super::batcher::{Batcher, Item};
use super::metrics::Metrics;
use crate::index::{self, engine, query, search, Catalog};
use crate::preprocess::image::decode_image;
use crate::preprocess::prompts;
use crate::Encoder;

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
}

pub type Shared = Arc<AppState>;

/// An error answer: `{"error": {"message", "type", "param"}}`, OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub class: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            class: "bad_request",
            message: message.into(),
            param: Some(param.into()),
            retry_after: None,
        }
    }
    fn new(status: StatusCode, class: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            class,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"message": self.message, "type": self.class, "param": self.param}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

type ApiResult = Result<Response, ApiError>;

/// Runs an endpoint under the request timeout, and records its latency,
/// status and error class.
async fn guarded<F>(st: &Shared, endpoint: &'static str, fut: F) -> Response
where
    F: std::future::Future<Output = ApiResult>,
{
    let t = Instant::now();
    let r = match tokio::time::timeout(st.limits.request_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "request took longer than {} ms",
                st.limits.request_timeout.as_millis()
            ),
        )),
    };
    let resp = match r {
        Ok(r) => r,
        Err(e) => {
            st.metrics.errors.with_label_values(&[e.class]).inc();
            e.into_response()
        }
    };
    st.metrics
        .request_seconds
        .with_label_values(&[endpoint])
        .observe(t.elapsed().as_secs_f64());
    st.metrics
        .requests
        .with_label_values(&[endpoint, resp.status().as_str()])
        .inc();
    resp
}

/// Reads a request body, up to the body limit.
///
/// Over the limit, the rest of the body is read and thrown away (at most
/// another limit's worth, for at most [`DRAIN_TIME`]) before the 413 goes out.
/// Most clients write their whole body before they read the answer; closing
/// the connection under them turns the 413 into a broken pipe, and they never
/// learn why. This is nginx's lingering close, bounded so a huge upload still
/// cannot hold the server. axum's `to_bytes` stops at the limit and drops the
/// body, so it cannot do this.
async fn read_body(st: &Shared, mut body: Body) -> Result<Bytes, ApiError> {
    use axum::body::HttpBody;
    let limit = st.limits.max_body_bytes;
    let mut buf = Vec::new();
    let mut seen = 0usize;
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx));
        let frame = match drain_until {
            None => next.await,
            Some(t) => match tokio::time::timeout_at(t, next).await {
                Ok(f) => f,
                Err(_) => break,
            },
        };
        let data = match frame {
            None => break,
            Some(Err(_)) if drain_until.is_some() => break,
            Some(Err(e)) => {
                return Err(ApiError::bad(
                    "body",
                    format!("cannot read the request body: {e}"),
                ))
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => d,
                Err(_) => continue, // trailers
            },
        };
        seen += data.len();
        if drain_until.is_some() {
            if seen > limit.saturating_mul(2) {
                break;
            }
        } else if seen > limit {
            drain_until = Some(tokio::time::Instant::now() + DRAIN_TIME);
            buf = Vec::new();
        } else {
            buf.extend_from_slice(&data);
        }
    }
    if drain_until.is_some() {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is over the limit of {limit} bytes"),
        ));
    }
    Ok(Bytes::from(buf))
}

/// How long an over-limit body is drained before the 413 goes out anyway.
const DRAIN_TIME: Duration = Duration::from_secs(5);

fn parse_json(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("body", "the body must be a JSON object")),
        Err(e) => Err(ApiError::bad("body", format!("malformed JSON: {e}"))),
    }
}

fn strings(v: &Value, field: &str) -> Result<Vec<String>, ApiError> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::bad(format!("{field}[{i}]"), "expected a string"))
            })
            .collect(),
        _ => Err(ApiError::bad(
            field,
            "expected a string or an array of strings",
        )),
    }
}

fn check_items(st: &Shared, n: usize) -> Result<(), ApiError> {
    if n > st.limits.max_items {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_items",
            format!(
                "{n} items in one request; the limit is {}",
                st.limits.max_items
            ),
        ));
    }
    Ok(())
}

/// Decodes and preprocesses images on blocking threads, refusing images
/// above the pixel limit before they are decoded (decompression bombs).
async fn images_to_items(
    st: &Shared,
    images: Vec<(String, Vec<u8>)>,
) -> Result<Vec<Item>, ApiError> {
    let st2 = st.clone();
    tokio::task::spawn_blocking(move || {
        use rayon::prelude::*;
        images
            .into_par_iter()
            .map(|(field, bytes)| {
                let dims = image::ImageReader::new(Cursor::new(&bytes))
                    .with_guessed_format()
                    .ok()
                    .and_then(|r| r.into_dimensions().ok());
                if let Some((w, h)) = dims {
                    if w as u64 * h as u64 > st2.limits.max_pixels {
                        return Err(ApiError {
                            status: StatusCode::PAYLOAD_TOO_LARGE,
                            class: "pixel_limit",
                            message: format!(
                                "image is {w}x{h}, over the limit of {} pixels",
                                st2.limits.max_pixels
                            ),
                            param: Some(field),
                            retry_after: None,
                        });
                    }
                }
                let img = decode_image(&bytes, std::path::Path::new(&field)).map_err(|e| {
                    ApiError::bad(field.clone(), format!("not a decodable image: {e}"))
                })?;
                let px = st2
                    .encoder
                    .image_processor()
                    .process(&img)
                    .map_err(|e| ApiError::bad(field, e.to_string()))?;
                Ok(Item::Image(px))
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

fn b64_images(v: &Value, field: &str) -> Result<Vec<(String, Vec<u8>)>, ApiError> {
    let arr = match v {
        Value::Array(a) => a.clone(),
        Value::String(_) => vec![v.clone()],
        _ => return Err(ApiError::bad(field, "expected an array of base64 strings")),
    };
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            let name = format!("{field}[{i}]");
            let s = x
                .as_str()
                .ok_or_else(|| ApiError::bad(&name, "expected a base64 string"))?;
            // Accept data URLs too.
            let s = s.split_once(";base64,").map(|(_, b)| b).unwrap_or(s);
            base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map(|b| (name.clone(), b))
                .map_err(|e| ApiError::bad(&name, format!("invalid base64: {e}")))
        })
        .collect()
}

async fn embed_items(st: &Shared, items: Vec<Item>) -> Result<Vec<Vec<f32>>, ApiError> {
    match st.batcher.embed(items).await {
        Err(full) => Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            class: "queue_full",
            message: format!(
                "the queue is full ({} items waiting); retry shortly",
                full.queued
            ),
            param: None,
            retry_after: Some(1),
        }),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            e,
        )),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Texts and images of an embeddings request, from JSON or multipart.
async fn embedding_inputs(
    st: &Shared,
    req: Request,
) -> Result<(Vec<String>, Vec<(String, Vec<u8>)>), ApiError> {
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if is_multipart {
        // The whole body first, so multipart bodies meet the same limit
        // (and the same drain) as JSON ones.
        let (parts, body) = req.into_parts();
        let bytes = read_body(st, body).await?;
        let req = Request::from_parts(parts, Body::from(bytes));
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::bad("body", format!("bad multipart body: {e}")))?;
        let (mut texts, mut images) = (Vec::new(), Vec::new());
        while let Some(field) = mp
            .next_field()
            .await
            .map_err(|e| ApiError::bad("body", format!("bad multipart field: {e}")))?
        {
            let name = field.name().unwrap_or("").to_string();
            let data = field
                .bytes()
                .await
                .map_err(|e| ApiError::bad(&name, e.body_text()))?;
            match name.as_str() {
                "input" | "text" | "texts" => texts.push(
                    String::from_utf8(data.to_vec())
                        .map_err(|_| ApiError::bad(&name, "text parts must be UTF-8"))?,
                ),
                "image" | "images" => {
                    images.push((format!("{name}[{}]", images.len()), data.to_vec()))
                }
                other => {
                    return Err(ApiError::bad(
                        other,
                        "unknown field (use input/text or image)",
                    ))
                }
            }
        }
        return Ok((texts, images));
    }
    let bytes = read_body(st, req.into_body()).await?;
    let m = parse_json(&bytes)?;
    let texts = match m.get("input") {
        Some(v) => strings(v, "input")?,
        None => Vec::new(),
    };
    let images = match m.get("images") {
        Some(v) => b64_images(v, "images")?,
        None => Vec::new(),
    };
    if let Some(f) = m.get("encoding_format") {
        if f.as_str() != Some("float") {
            return Err(ApiError::bad(
                "encoding_format",
                "only \"float\" is supported",
            ));
        }
    }
    Ok((texts, images))
}

/// `POST /v1/embeddings`: OpenAI's request and response shapes; texts
/// (`input`) come first in `data`, then images, each in input order.
pub async fn embeddings(State(st): State<Shared>, req: Request) -> Response {
    let st2 = st.clone();
    guarded(&st, "embeddings", async move {
        let st = st2;
        let (texts, images) = embedding_inputs(&st, req).await?;
        if texts.is_empty() && images.is_empty() {
            return Err(ApiError::bad(
                "input",
                "give `input` (texts) and/or `images` (base64)",
            ));
        }
        check_items(&st, texts.len() + images.len())?;
        let n_tokens: usize = texts.iter().map(|t| t.split_whitespace().count()).sum();
        let mut items: Vec<Item> = texts.into_iter().map(Item::Text).collect();
        items.extend(images_to_items(&st, images).await?);
        let vectors = embed_items(&st, items).await?;
        let data: Vec<Value> = vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v}))
            .collect();
        Ok(axum::Json(json!({
            "object": "list",
            "data": data,
            "model": st.model_name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }))
        .into_response())
    })
    .await
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// `POST /v1/similarity`: `{"images": [...], "texts": [...]}` →
/// `logits_per_image` (as CLIPModel) and per-image softmax over the texts.
pub async fn similarity(State(st): State<Shared>, req: Request) -> Response {
    let st2 = st.clone();
    guarded(&st, "similarity", async move {
        let st = st2;
        let m = parse_json(&read_body(&st, req.into_body()).await?)?;
        let texts = strings(
            m.get("texts")
                .ok_or_else(|| ApiError::bad("texts", "missing"))?,
            "texts",
        )?;
        let images = b64_images(
            m.get("images")
                .ok_or_else(|| ApiError::bad("images", "missing"))?,
            "images",
        )?;
        if texts.is_empty() || images.is_empty() {
            return Err(ApiError::bad(
                if texts.is_empty() { "texts" } else { "images" },
                "must not be empty",
            ));
        }
        check_items(&st, texts.len() + images.len())?;
        let n_t = texts.len();
        let mut items: Vec<Item> = texts.into_iter().map(Item::Text).collect();
        items.extend(images_to_items(&st, images).await?);
        let v = embed_items(&st, items).await?;
        let scale = st
            .encoder
            .model()
            .logit_scale()
            .exp()
            .and_then(|s| s.to_scalar::<f32>())
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })? as f64;
        let (tv, iv) = v.split_at(n_t);
        let logits: Vec<Vec<f64>> = iv
            .iter()
            .map(|i| tv.iter().map(|t| scale * dot(i, t)).collect())
            .collect();
        let probs: Vec<Vec<f64>> = logits.iter().map(|r| softmax(r)).collect();
        Ok(
            axum::Json(json!({"logits_per_image": logits, "probs": probs, "logit_scale": scale}))
                .into_response(),
        )
    })
    .await
}

/// `POST /v1/classify`: `{"images": [...], "labels": [...], "templates"?: [...]}`.
pub async fn classify(State(st): State<Shared>, req: Request) -> Response {
    let st2 = st.clone();
    guarded(&st, "classify", async move {
        let st = st2;
        let m = parse_json(&read_body(&st, req.into_body()).await?)?;
        let labels = strings(
            m.get("labels")
                .ok_or_else(|| ApiError::bad("labels", "missing"))?,
            "labels",
        )?;
        if labels.len() < 2 {
            return Err(ApiError::bad("labels", "give at least two labels"));
        }
        let templates = match m.get("templates") {
            Some(v) => strings(v, "templates")?,
            None => prompts::default_templates(matches!(
                st.encoder.config(),
                crate::model::ModelConfig::ChineseClip(_)
            )),
        };
        let images = b64_images(
            m.get("images")
                .ok_or_else(|| ApiError::bad("images", "missing"))?,
            "images",
        )?;
        let prompts_all = prompts::class_prompts(&labels, &templates);
        check_items(&st, images.len() + prompts_all.len())?;
        let mut items: Vec<Item> = prompts_all.into_iter().map(Item::Text).collect();
        let n_p = items.len();
        items.extend(images_to_items(&st, images).await?);
        let v = embed_items(&st, items).await?;
        let classes = prompts::ensemble(&v[..n_p], templates.len());
        let data: Vec<Value> = v[n_p..]
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let logits: Vec<f64> = classes.iter().map(|c| 100.0 * dot(img, c)).collect();
                let p = softmax(&logits);
                let best = (0..p.len()).fold(0, |b, j| if p[j] > p[b] { j } else { b });
                let scores: serde_json::Map<String, Value> = labels
                    .iter()
                    .zip(&p)
                    .map(|(l, x)| (l.clone(), json!(x)))
                    .collect();
                json!({"index": i, "label": labels[best], "probability": p[best], "scores": scores})
            })
            .collect();
        Ok(axum::Json(json!({"data": data})).into_response())
    })
    .await
}

/// `POST /v1/search`: `{"query": "\"a dog\" + 2:\"snow\"", "image"?: base64, "k"?: 10, "dir"?: "..."}`.
pub async fn search_endpoint(State(st): State<Shared>, req: Request) -> Response {
    let st2 = st.clone();
    guarded(&st, "search", async move {
        let st = st2;
        let (Some(store), Some(model_id)) = (st.store.clone(), st.store_model) else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_store",
                "this server has no store; start it with --store PATH",
            ));
        };
        let m = parse_json(&read_body(&st, req.into_body()).await?)?;
        let k = match m.get("k") {
            None => 10,
            Some(v) => v.as_u64().filter(|k| (1..=1000).contains(k)).ok_or_else(|| ApiError::bad("k", "expected an integer in 1..=1000"))? as usize,
        };
        let mut q = vec![0f32; st.encoder.embedding_dim()];
        let mut any = false;
        if let Some(v) = m.get("query") {
            let s = v.as_str().ok_or_else(|| ApiError::bad("query", "expected a string"))?;
            let terms = query::parse(&[s.to_string()]).map_err(|e| ApiError::bad("query", e.to_string()))?;
            let mut items = Vec::new();
            let mut weights = Vec::new();
            for t in terms {
                match t.kind {
                    query::TermKind::Text(s) => items.push(Item::Text(s)),
                    query::TermKind::Image(_) => {
                        return Err(ApiError::bad("query", "server-side file paths are not accepted; send the image as `image` (base64)"))
                    }
                }
                weights.push(t.weight);
            }
            let v = embed_items(&st, items).await?;
            for (w, e) in weights.iter().zip(v) {
                for (a, x) in q.iter_mut().zip(e) {
                    *a += w * x;
                }
            }
            any = true;
        }
        if let Some(v) = m.get("image") {
            let imgs = b64_images(v, "image")?;
            let items = images_to_items(&st, imgs).await?;
            for e in embed_items(&st, items).await? {
                for (a, x) in q.iter_mut().zip(e) {
                    *a += x;
                }
            }
            any = true;
        }
        if !any {
            return Err(ApiError::bad("query", "give `query` (text or algebra) and/or `image` (base64)"));
        }
        let n = q.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n == 0.0 {
            return Err(ApiError::bad("query", "the query terms cancel out"));
        }
        q.iter_mut().for_each(|x| *x /= n);
        let dir = match m.get("dir") {
            None => None,
            Some(v) => Some(v.as_str().ok_or_else(|| ApiError::bad("dir", "expected a string"))?.to_string()),
        };
        let hits = tokio::task::spawn_blocking(move || -> crate::Result<Vec<search::Hit>> {
            let catalog = Catalog::open(&store)?;
            let engine = engine::open_engine(&catalog, model_id, index::ANN_THRESHOLD)?;
            let dirs: Vec<String> = dir.into_iter().collect();
            search::vector_search(engine.as_ref(), &catalog, &q, k, &dirs)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
        Ok(axum::Json(json!({"data": hits})).into_response())
    })
    .await
}

pub async fn health(State(st): State<Shared>) -> Response {
    axum::Json(json!({"status": "ok", "model": st.model_name, "queued": st.batcher.queued()}))
        .into_response()
}

pub async fn metrics(State(st): State<Shared>) -> Response {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    (h, st.metrics.render()).into_response()
}

pub async fn openapi() -> Response {
    axum::Json(super::openapi::document()).into_response()
}

/// Unknown routes answer with the same JSON error shape.
pub async fn not_found() -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see GET /openapi.json",
    )
    .into_response()
}
