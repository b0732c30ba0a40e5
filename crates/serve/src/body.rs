//! Reading request bodies within the limits, and parsing their fields and
//! images, so every malformed field gets a 400 that names it.

use std::io::Cursor;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use base64::Engine;
use serde_json::Value;

use super::batcher::Item;
use super::error::ApiError;
use super::state::{Limits, Shared};
use crate::preprocess::image::decode_image;
use crate::preprocess::ImageProcessor;

/// Reads a request body, up to the body limit.
///
/// Over the limit, the rest of the body is read and thrown away (at most
/// another limit's worth, for at most [`DRAIN_TIME`]) before the 413 goes out.
/// Most clients write their whole body before they read the answer; closing
/// the connection under them turns the 413 into a broken pipe, and they never
/// learn why. This is nginx's lingering close, bounded so a huge upload still
/// cannot hold the server. axum's `to_bytes` stops at the limit and drops the
/// body, so it cannot do this.
pub(crate) async fn read_body(limits: &Limits, mut body: Body) -> Result<Bytes, ApiError> {
    use axum::body::HttpBody;
    let limit = limits.max_body_bytes;
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

pub(crate) fn parse_json(bytes: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad("body", "the body must be a JSON object")),
        Err(e) => Err(ApiError::bad("body", format!("malformed JSON: {e}"))),
    }
}

pub(crate) fn strings(v: &Value, field: &str) -> Result<Vec<String>, ApiError> {
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

/// An optional field (absent or null: None) read by `read`; a value it
/// cannot read is a 400 saying what was `expected`.
pub(crate) fn optional<T>(
    m: &serde_json::Map<String, Value>,
    key: &str,
    read: impl Fn(&Value) -> Option<T>,
    expected: &str,
) -> Result<Option<T>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => read(v)
            .map(Some)
            .ok_or_else(|| ApiError::bad(key, expected)),
    }
}

/// An optional number field.
pub(crate) fn number(
    m: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<f64>, ApiError> {
    optional(m, key, Value::as_f64, "expected a number")
}

/// An optional non-negative integer field.
pub(crate) fn count(
    m: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<u64>, ApiError> {
    optional(m, key, Value::as_u64, "expected a non-negative integer")
}

pub(crate) fn check_items(st: &Shared, n: usize) -> Result<(), ApiError> {
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
pub(crate) async fn images_to_items(
    st: &Shared,
    images: Vec<(String, Vec<u8>)>,
) -> Result<Vec<Item>, ApiError> {
    let processor = st.encoder.image_processor().clone();
    let px = prepare_images(st.limits.max_pixels, processor, images).await?;
    Ok(px.into_iter().map(Item::Image).collect())
}

/// Decodes `(field, bytes)` images and prepares their pixels with
/// `processor`, on blocking threads; an error names the field.
pub(crate) async fn prepare_images(
    max_pixels: u64,
    processor: ImageProcessor,
    images: Vec<(String, Vec<u8>)>,
) -> Result<Vec<crate::preprocess::Pixels>, ApiError> {
    prepare_images_with(max_pixels, images, move |img| processor.process_pixels(img)).await
}

/// Decodes `(field, bytes)` images and prepares each with `prepare`, on
/// blocking threads, refusing an image above `max_pixels` before it is
/// decoded; an error names the field.
pub(crate) async fn prepare_images_with<T: Send + 'static>(
    max_pixels: u64,
    images: Vec<(String, Vec<u8>)>,
    prepare: impl Fn(&image::RgbImage) -> crate::Result<T> + Send + Sync + 'static,
) -> Result<Vec<T>, ApiError> {
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
                    if w as u64 * h as u64 > max_pixels {
                        return Err(ApiError {
                            status: StatusCode::PAYLOAD_TOO_LARGE,
                            class: "pixel_limit",
                            message: format!(
                                "image is {w}x{h}, over the limit of {max_pixels} pixels"
                            ),
                            param: Some(field),
                            retry_after: None,
                        });
                    }
                }
                let img = decode_image(&bytes, std::path::Path::new(&field)).map_err(|e| {
                    ApiError::bad(field.clone(), format!("not a decodable image: {e}"))
                })?;
                prepare(&img).map_err(|e| ApiError::bad(field, e.to_string()))
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

pub(crate) fn b64_images(v: &Value, field: &str) -> Result<Vec<(String, Vec<u8>)>, ApiError> {
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
