//! Reading a chat completion request: messages with text and image parts (data URLs, or files under --image-root), sampling options, stop strings and clasp_retrieve, each bad field named in a 400.

use super::*;

/// A parsed request: the conversation (images still as bytes), options.
pub(super) struct ChatRequest {
    pub(super) turns: Vec<(String, Vec<RawPart>)>,
    pub(super) opts: GenerateOptions,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    pub(super) retrieve: Option<Retrieve>,
}

/// clasp's extension field `clasp_retrieve: {"k": 3, "hybrid": false}`:
/// retrieve photos from the server's store with the last user message's
/// text, and put them into that message as numbered images to cite.
pub(super) struct Retrieve {
    pub(super) k: usize,
    pub(super) hybrid: bool,
}

pub(super) fn parse_retrieve(v: &Value, st: &ChatState) -> Result<Retrieve, ApiError> {
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

pub(super) enum RawPart {
    Text(String),
    Image {
        field: String,
        bytes: Vec<u8>,
    },
    /// A video's file (a data URL's bytes or an allowed local path's).
    Video {
        field: String,
        bytes: Vec<u8>,
    },
}

/// A seed for requests that give none: different for each request.
pub(crate) fn fresh_seed() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ N.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
}

/// `temperature` (OpenAI's default, 1; at most 2) and `top_p` (in (0, 1]).
pub(crate) fn temperature_top_p(m: &Map<String, Value>) -> Result<(f64, f64), ApiError> {
    let temperature = number(m, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad("temperature", "must be between 0 and 2"));
    }
    let top_p = number(m, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", "must be in (0, 1]"));
    }
    Ok((temperature, top_p))
}

pub(super) fn options(m: &Map<String, Value>) -> Result<GenerateOptions, ApiError> {
    let max_tokens = match count(m, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => count(m, "max_tokens")?,
    };
    let max_new_tokens = match max_tokens {
        Some(0) => return Err(ApiError::bad("max_tokens", "must be at least 1")),
        Some(n) => n as usize,
        None => 256,
    };
    let (temperature, top_p) = temperature_top_p(m)?;
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
pub(super) fn image_bytes(
    url: &str,
    field: &str,
    local: Option<&Path>,
) -> Result<Vec<u8>, ApiError> {
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

pub(super) fn parse_request(
    m: &Map<String, Value>,
    st: &ChatState,
) -> Result<ChatRequest, ApiError> {
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
                        Some(kind @ ("image_url" | "video_url")) => {
                            let field = format!("{pf}.{kind}");
                            let url = match p.get(kind) {
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
                            out.push(if kind == "image_url" {
                                RawPart::Image { field, bytes }
                            } else {
                                RawPart::Video { field, bytes }
                            });
                        }
                        _ => {
                            return Err(ApiError::bad(
                                format!("{pf}.type"),
                                "expected \"text\", \"image_url\" or \"video_url\"",
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
