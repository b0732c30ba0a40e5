//! The HTTP handlers. Bodies are read and parsed by hand (`body`), not by
//! axum's `Json` extractor, so every malformed field gets a 400 that names it,
//! and body reading counts against the request timeout (`error::guarded`).

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};

use super::batcher::Item;
use super::body::{
    b64_images, check_items, count, images_to_items, optional, parse_json, read_body, strings,
};
use super::error::{guarded, ApiError};
pub use super::state::{AppState, Limits, Shared, StoreSpec};
use crate::index::{query, search};
use crate::preprocess::prompts;
use crate::vecmath::dot;

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
async fn embedding_inputs(st: &Shared, req: Request) -> Result<EmbeddingInputs, ApiError> {
    let is_multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if is_multipart {
        // The whole body first, so multipart bodies meet the same limit
        // (and the same drain) as JSON ones.
        let (parts, body) = req.into_parts();
        let bytes = read_body(&st.limits, body).await?;
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
        return Ok(EmbeddingInputs {
            texts,
            images,
            base64: false,
            dimensions: None,
        });
    }
    let bytes = read_body(&st.limits, req.into_body()).await?;
    let m = parse_json(&bytes)?;
    let texts = match m.get("input") {
        Some(v) => strings(v, "input")?,
        None => Vec::new(),
    };
    let images = match m.get("images") {
        Some(v) => b64_images(v, "images")?,
        None => Vec::new(),
    };
    optional(
        &m,
        "model",
        |v| v.as_str().map(|_| ()),
        "expected a string (the name is not used)",
    )?;
    let base64 = match m.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(f) => match f.as_str() {
            Some("float") => false,
            Some("base64") => true,
            _ => {
                return Err(ApiError::bad(
                    "encoding_format",
                    "expected \"float\" or \"base64\"",
                ))
            }
        },
    };
    let dims = st.encoder.embedding_dim();
    let dimensions = match count(&m, "dimensions") {
        Ok(None) => None,
        Ok(Some(d)) if d >= 1 && d as usize <= dims => Some(d as usize),
        _ => {
            return Err(ApiError::bad(
                "dimensions",
                format!("expected an integer from 1 to the model's {dims}"),
            ))
        }
    };
    Ok(EmbeddingInputs {
        texts,
        images,
        base64,
        dimensions,
    })
}

/// What an embeddings request asks for.
struct EmbeddingInputs {
    texts: Vec<String>,
    images: Vec<(String, Vec<u8>)>,
    /// `encoding_format: "base64"`: each vector as base64 of its
    /// little-endian f32 bytes (what the `openai` client sends by default).
    base64: bool,
    /// Keep the first `dimensions` values and renormalise (Matryoshka-style).
    dimensions: Option<usize>,
}

/// One embedding in the requested shape: truncated and renormalised to
/// `dimensions`, as floats or as base64 of little-endian f32.
fn encode_embedding(mut v: Vec<f32>, dimensions: Option<usize>, base64: bool) -> Value {
    if let Some(d) = dimensions {
        v.truncate(d);
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            v.iter_mut().for_each(|x| *x /= n);
        }
    }
    if base64 {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        json!(v)
    }
}

/// `POST /v1/embeddings`: OpenAI's request and response shapes; texts
/// (`input`) come first in `data`, then images, each in input order.
pub async fn embeddings(State(st): State<Shared>, req: Request) -> Response {
    let st2 = st.clone();
    guarded(&st.limits, &st.metrics, "embeddings", async move {
        let st = st2;
        let EmbeddingInputs {
            texts,
            images,
            base64,
            dimensions,
        } = embedding_inputs(&st, req).await?;
        if texts.is_empty() && images.is_empty() {
            return Err(ApiError::bad(
                "input",
                "give `input` (texts) and/or `images` (base64)",
            ));
        }
        check_items(&st, texts.len() + images.len())?;
        // Tokens as the text tower sees them (special tokens included, after
        // truncation to its context).
        let n_tokens: usize = if texts.is_empty() {
            0
        } else {
            st.encoder
                .tokenizer()
                .encode(&texts)
                .map_err(|e| ApiError::bad("input", e.to_string()))?
                .mask
                .iter()
                .map(|m| m.iter().filter(|&&x| x != 0).count())
                .sum()
        };
        let mut items: Vec<Item> = texts.into_iter().map(Item::Text).collect();
        items.extend(images_to_items(&st, images).await?);
        let vectors = embed_items(&st, items).await?;
        let data: Vec<Value> = vectors
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                json!({"object": "embedding", "index": i,
                       "embedding": encode_embedding(v, dimensions, base64)})
            })
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

/// `POST /v1/similarity`: `{"images": [...], "texts": [...]}` →
/// `logits_per_image` (as the model computes them, SigLIP's bias included)
/// and probabilities: per-image softmax over the texts, or for SigLIP each
/// pair's sigmoid (`probs_kind`).
pub async fn similarity(State(st): State<Shared>, req: Request) -> Response {
    let st2 = st.clone();
    guarded(&st.limits, &st.metrics, "similarity", async move {
        let st = st2;
        let m = parse_json(&read_body(&st.limits, req.into_body()).await?)?;
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
        let internal = |e: candle_core::Error| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        };
        let model = st.encoder.model();
        let scale = model
            .logit_scale()
            .exp()
            .and_then(|s| s.to_scalar::<f32>())
            .map_err(internal)? as f64;
        let bias = match model.logit_bias() {
            Some(b) => Some(b.to_scalar::<f32>().map_err(internal)? as f64),
            None => None,
        };
        let (tv, iv) = v.split_at(n_t);
        let logits: Vec<Vec<f64>> = iv
            .iter()
            .map(|i| {
                tv.iter()
                    .map(|t| scale * dot(i, t) as f64 + bias.unwrap_or(0.0))
                    .collect()
            })
            .collect();
        // SigLIP scores each pair on its own (sigmoid); CLIP over the texts.
        let probs: Vec<Vec<f64>> = logits.iter().map(|r| st.encoder.probabilities(r)).collect();
        let kind = if bias.is_some() { "sigmoid" } else { "softmax" };
        Ok(axum::Json(
            json!({"logits_per_image": logits, "probs": probs, "probs_kind": kind,
                             "logit_scale": scale, "logit_bias": bias}),
        )
        .into_response())
    })
    .await
}

/// `POST /v1/classify`: `{"images": [...], "labels": [...], "templates"?: [...]}`.
pub async fn classify(State(st): State<Shared>, req: Request) -> Response {
    let st2 = st.clone();
    guarded(&st.limits, &st.metrics, "classify", async move {
        let st = st2;
        let m = parse_json(&read_body(&st.limits, req.into_body()).await?)?;
        let labels = strings(
            m.get("labels")
                .ok_or_else(|| ApiError::bad("labels", "missing"))?,
            "labels",
        )?;
        if labels.len() < 2 {
            return Err(ApiError::bad("labels", "give at least two labels"));
        }
        let templates = match m.get("templates") {
            Some(v) => {
                let t = strings(v, "templates")?;
                if t.is_empty() {
                    return Err(ApiError::bad(
                        "templates",
                        "must not be empty; leave it out for the default ensemble",
                    ));
                }
                t
            }
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
        // Inputs count, not the label x template prompts they expand to:
        // a caller cannot see the expansion, and the default ensemble has
        // 18 templates.
        check_items(&st, images.len() + labels.len())?;
        let prompts_all = prompts::class_prompts(&labels, &templates);
        let mut items: Vec<Item> = prompts_all.into_iter().map(Item::Text).collect();
        let n_p = items.len();
        items.extend(images_to_items(&st, images).await?);
        let v = embed_items(&st, items).await?;
        let classes = clasp_core::zeroshot::ensemble(&v[..n_p], templates.len());
        let scoring = st.encoder.zero_shot_scoring().map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        let data: Vec<Value> = v[n_p..]
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let (best, p) = clasp_core::zeroshot::class_probabilities(img, &classes, scoring);
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

/// `POST /v1/search`: `{"query": "\"a dog\" + 2:\"snow\"", "image"?: base64, "k"?: 10, "dir"?: "...",
/// "rerank"?: "itm:32"}`.
/// The bytes of an image the store has indexed (`/v1/search`'s
/// `image_path`: "more like this" for a hit); any other path is refused, so
/// the endpoint reads no file the index does not hold.
async fn indexed_image(
    st: &Shared,
    store: &StoreSpec,
    model: i64,
    path: &str,
) -> Result<Vec<u8>, ApiError> {
    let (st2, store, p) = (st.clone(), store.clone(), path.to_string());
    let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e);
    tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let indexed = st2
            .search
            .with(&store, model, |catalog, _| catalog.caption_of(&p))
            .map_err(|e| internal(e.to_string()))?;
        let bad = |why: &str| ApiError::bad("image_path", format!("{p}: {why}"));
        if indexed.is_none() {
            return Err(bad("not an image this server's store has indexed"));
        }
        std::fs::read(&p).map_err(|e| bad(&format!("cannot be read ({e})")))
    })
    .await
    .map_err(|e| internal(e.to_string()))?
}

pub async fn search_endpoint(State(st): State<Shared>, req: Request) -> Response {
    let st2 = st.clone();
    guarded(&st.limits, &st.metrics, "search", async move {
        let st = st2;
        let (Some(store), Some(model_id)) = (st.store.clone(), st.store_model) else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_store",
                "this server has no store; start it with --store PATH",
            ));
        };
        let m = parse_json(&read_body(&st.limits, req.into_body()).await?)?;
        let k = match m.get("k") {
            None => 10,
            Some(v) => v.as_u64().filter(|k| (1..=1000).contains(k)).ok_or_else(|| ApiError::bad("k", "expected an integer in 1..=1000"))? as usize,
        };
        // Re-ranking with the fusion model: a text query only.
        let rerank = match m.get("rerank") {
            None => None,
            Some(v) => {
                let r: crate::index::rerank::Rerank = v
                    .as_str()
                    .ok_or_else(|| ApiError::bad("rerank", "expected a string such as \"itm:32\""))?
                    .parse()
                    .map_err(|e: String| ApiError::bad("rerank", e))?;
                let model = st.reranker.clone().ok_or_else(|| {
                    ApiError::bad("rerank", "this server has no fusion model; start it with --rerank-model DIR")
                })?;
                let text = m.get("query").and_then(Value::as_str).filter(|_| m.get("image").is_none());
                let terms = text.map(query::parse_expr).transpose().map_err(|e| ApiError::bad("query", e.to_string()))?;
                let texts: Vec<String> = terms
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| t.weight > 0.0)
                    .filter_map(|t| match t.kind {
                        query::TermKind::Text(s) => Some(s),
                        query::TermKind::Image(_) => None,
                    })
                    .collect();
                let text = crate::index::rerank::check_query(&texts, usize::from(text.is_none()))
                    .map_err(|e| ApiError::bad("rerank", e.to_string()))?;
                Some((r, model, text))
            }
        };
        let mut terms: Vec<(f32, Vec<f32>)> = Vec::new();
        if let Some(v) = m.get("query") {
            let s = v.as_str().ok_or_else(|| ApiError::bad("query", "expected a string"))?;
            let parsed = query::parse_expr(s).map_err(|e| ApiError::bad("query", e.to_string()))?;
            let mut items = Vec::new();
            let mut weights = Vec::new();
            for t in parsed {
                match t.kind {
                    query::TermKind::Text(s) => items.push(Item::Text(s)),
                    query::TermKind::Image(_) => {
                        return Err(ApiError::bad("query", "server-side file paths are not accepted; send the image as `image` (base64)"))
                    }
                }
                weights.push(t.weight);
            }
            let v = embed_items(&st, items).await?;
            terms.extend(weights.into_iter().zip(v));
        }
        if let Some(v) = m.get("image") {
            let imgs = b64_images(v, "image")?;
            let items = images_to_items(&st, imgs).await?;
            terms.extend(embed_items(&st, items).await?.into_iter().map(|e| (1.0, e)));
        }
        if let Some(v) = m.get("image_path") {
            let p = v.as_str().ok_or_else(|| ApiError::bad("image_path", "expected a string"))?;
            let bytes = indexed_image(&st, &store, model_id, p).await?;
            let items = images_to_items(&st, vec![("image_path".into(), bytes)]).await?;
            terms.extend(embed_items(&st, items).await?.into_iter().map(|e| (1.0, e)));
        }
        if terms.is_empty() {
            return Err(ApiError::bad(
                "query",
                "give `query` (text or algebra), `image` (base64) and/or `image_path` (an indexed image)",
            ));
        }
        let q = query::combine(st.encoder.embedding_dim(), terms)
            .map_err(|e| ApiError::bad("query", e.to_string()))?;
        let dir = match m.get("dir") {
            None => None,
            Some(v) => Some(v.as_str().ok_or_else(|| ApiError::bad("dir", "expected a string"))?.to_string()),
        };
        let st2 = st.clone();
        let (hits, missing) = tokio::task::spawn_blocking(move || -> crate::Result<(Vec<Value>, Vec<String>)> {
            let dirs: Vec<String> = dir.into_iter().collect();
            st2.search.with(&store, model_id, |catalog, engine| {
                let first = rerank.as_ref().map_or(k, |(r, ..)| r.candidates.max(k));
                let mut hits = search::vector_search(engine, catalog, &q, first, &dirs)?;
                if let Some((r, model, text)) = &rerank {
                    hits = crate::index::rerank::rerank(model, text, hits, r.score)?;
                    hits.truncate(k);
                }
                // Each hit with its caption (sidecar, EXIF), when it has one.
                let hits = hits
                    .into_iter()
                    .map(|h| {
                        let caption = catalog.description_of(&h.path)?;
                        let mut hit = json!({"path": h.path, "score": h.score, "caption": caption});
                        if let Some(itm) = h.itm {
                            hit["itm"] = json!(itm);
                        }
                        if let Some(s) = h.span {
                            hit["start"] = json!(s.start);
                            hit["end"] = json!(s.end);
                        }
                        Ok(hit)
                    })
                    .collect::<crate::Result<Vec<Value>>>()?;
                Ok((hits, engine.unanswered()))
            })
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
        if missing.is_empty() {
            Ok(axum::Json(json!({"data": hits})).into_response())
        } else {
            // --allow-partial: some shards were down; say which.
            Ok(axum::Json(json!({"data": hits, "partial": true, "missing": missing})).into_response())
        }
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

/// A known route with the wrong method: 405 in the same JSON error shape.
pub async fn method_not_allowed() -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint takes another method (POST for /v1/*, GET for /health, /metrics and /openapi.json)",
    )
    .into_response()
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
