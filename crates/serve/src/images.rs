//! `POST /v1/images/generations`: OpenAI's image API over a native model's
//! drawing (`NativeModel::draw`: classifier-free guidance against Emu3's
//! negative prompt, rows enforced by constrained decoding, the VQ
//! tokenizer's decoder).
//!
//! Request fields: `prompt` (required, not empty), `n` (1 to 4 images),
//! `size` (OpenAI's `WIDTHxHEIGHT` in pixels, multiples of the tokenizer's
//! pixels per code; default: the square of its processor's pixel budget),
//! `response_format` (`b64_json` only: the server keeps no files to link
//! to), and clasp's own `seed`, `guidance_scale` (1: none; default 3),
//! `negative_prompt`, `temperature` (default 1), `top_k`, `top_p`. The
//! answer is `{"created", "data": [{"b64_json": PNG}], "size"}`; image `i`
//! of a request is drawn with seed `seed + i`. Drawings run one at a time
//! on a blocking thread; the time goes to the metrics as
//! `clasp_batch_compute_seconds{kind="draw"}`.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Map, Value};

use super::body::{count, number, parse_json, read_body};
use super::chat::ChatShared;
use super::error::{guarded, ApiError};
use crate::llm::sampling::SamplingParams;
use crate::vlm::native::{
    check_draw, default_draw_size, DrawOptions, NativeModel, NEGATIVE_PROMPT,
};

/// At most this many images a request.
const MAX_N: u64 = 4;

struct DrawRequest {
    prompt: String,
    n: usize,
    opts: DrawOptions,
}

fn text(m: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    super::body::optional(
        m,
        key,
        |v| v.as_str().map(String::from),
        "expected a string",
    )
}

fn parse(m: &Map<String, Value>, model: &NativeModel) -> Result<DrawRequest, ApiError> {
    let prompt = text(m, "prompt")?.ok_or_else(|| ApiError::bad("prompt", "say what to draw"))?;
    let n = count(m, "n")?.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(ApiError::bad("n", format!("from 1 to {MAX_N} images")));
    }
    if let Some(f) = text(m, "response_format")? {
        if f != "b64_json" {
            return Err(ApiError::bad(
                "response_format",
                "only b64_json: the server keeps no image files to link to",
            ));
        }
    }
    let size = match text(m, "size")? {
        None => default_draw_size(model.vq.config(), model.processor.config()),
        Some(s) => s
            .split_once('x')
            .and_then(|(w, h)| Some((h.trim().parse().ok()?, w.trim().parse().ok()?)))
            .ok_or_else(|| ApiError::bad("size", "expected WIDTHxHEIGHT in pixels, e.g. 64x64"))?,
    };
    check_draw(model.vq.config(), &prompt, size).map_err(|e| {
        let field = if prompt.trim().is_empty() {
            "prompt"
        } else {
            "size"
        };
        ApiError::bad(field, e.to_string())
    })?;
    let cfg = number(m, "guidance_scale")?.unwrap_or(3.0);
    if !(cfg.is_finite() && cfg >= 0.0) {
        return Err(ApiError::bad("guidance_scale", "a number of at least 0"));
    }
    let (temperature, top_p) = super::chat::temperature_top_p(m)?;
    let seed = match m.get("seed") {
        None | Some(Value::Null) => super::chat::fresh_seed(),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| ApiError::bad("seed", "expected a non-negative integer"))?,
    };
    Ok(DrawRequest {
        prompt,
        n: n as usize,
        opts: DrawOptions {
            size,
            cfg: cfg as f32,
            negative_prompt: text(m, "negative_prompt")?.unwrap_or_else(|| NEGATIVE_PROMPT.into()),
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_k: count(m, "top_k")?.unwrap_or(0) as usize,
                top_p: top_p as f32,
                repetition_penalty: 1.0,
                seed,
            },
        },
    })
}

/// Draws the request's images as base64 PNGs, one after another.
fn draw_all(model: &NativeModel, r: &DrawRequest) -> crate::Result<Vec<String>> {
    (0..r.n)
        .map(|i| {
            let mut o = r.opts.clone();
            o.sampling.seed = o.sampling.seed.wrapping_add(i as u64);
            let img = model.draw(&r.prompt, &o, &|_| {})?;
            let mut png = Vec::new();
            img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                .map_err(|e| crate::Error::Report(format!("encoding the PNG: {e}")))?;
            Ok(base64::engine::general_purpose::STANDARD.encode(png))
        })
        .collect()
}

pub async fn generations(State(st): State<ChatShared>, req: Request) -> Response {
    let st2 = st.clone();
    guarded(&st.limits, &st.metrics, "images_generations", async move {
        let st = st2;
        let Some(model) = st.native.clone() else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "the served model does not draw: /v1/images/generations needs a native (Emu3) \
                 model (`clasp serve --vlm NATIVE_DIR`)",
            ));
        };
        let m = parse_json(&read_body(&st.limits, req.into_body()).await?)?;
        let r = parse(&m, &model)?;
        // One drawing at a time: each already uses every core.
        let _turn = st.drawing.lock().await;
        let metrics = st.metrics.clone();
        let t = std::time::Instant::now();
        let images = tokio::task::spawn_blocking(move || draw_all(&model, &r).map(|d| (d, r)))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
        metrics
            .compute_seconds
            .with_label_values(&["draw"])
            .observe(t.elapsed().as_secs_f64());
        let (data, r) = images;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let f = r.opts.size;
        Ok(axum::Json(json!({
            "created": created,
            "data": data.into_iter().map(|b| json!({"b64_json": b})).collect::<Vec<_>>(),
            "size": format!("{}x{}", f.1, f.0),
        }))
        .into_response())
    })
    .await
}
