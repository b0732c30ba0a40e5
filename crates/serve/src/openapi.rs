//! The OpenAPI 3.1 description served at `GET /openapi.json`.

use serde_json::{json, Value};

fn error_response(desc: &str) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn post(summary: &str, request: Value, response: Value) -> Value {
    json!({"post": {
        "summary": summary,
        "requestBody": {"required": true, "content": {"application/json": {"schema": request}}},
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": response}}},
            "400": error_response("Malformed JSON, base64 or image; `param` names the field"),
            "408": error_response("The request took longer than the timeout"),
            "413": error_response("Body, item count or image pixels over the limit"),
            "503": error_response("Queue full (with Retry-After)"),
        }
    }})
}

/// The chat completions request, built in parts (one `json!` of it all
/// passes the macro's recursion limit).
fn chat_request() -> Value {
    let text = json!({"type": "object", "required": ["type", "text"], "properties": {
        "type": {"const": "text"}, "text": {"type": "string"}}});
    let image = json!({"type": "object", "required": ["type", "image_url"], "properties": {
        "type": {"const": "image_url"},
        "image_url": {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}}}});
    // A video (data URL or allowed local path) for a LLaVA-NeXT-Video model: 8 frames sampled.
    let video = json!({"type": "object", "required": ["type", "video_url"], "properties": {
        "type": {"const": "video_url"},
        "video_url": {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}}}});
    let content = json!({"oneOf": [{"type": "string"}, {"type": "null"},
        {"type": "array", "items": {"oneOf": [text, image, video]}}]});
    let message = json!({"type": "object", "required": ["role"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]}, "content": content}});
    let stop = json!({"oneOf": [{"type": "string"}, {"type": "array", "maxItems": 4, "items": {"type": "string"}}]});
    let retrieve = json!({"type": "object", "properties": {
        "k": {"type": "integer", "minimum": 1, "maximum": 16}, "hybrid": {"type": "boolean"}}});
    json!({"type": "object", "required": ["messages"], "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": message},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer"},
        "stop": stop,
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "n": {"const": 1},
        "clasp_retrieve": retrieve}})
}

/// The image generation request (`images.rs`).
fn draw_request() -> Value {
    json!({"type": "object", "required": ["prompt"], "properties": {
        "prompt": {"type": "string", "pattern": "\\S"},
        "model": {"type": "string"},
        "n": {"type": "integer", "minimum": 1, "maximum": 4},
        "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$",
            "description": "WIDTHxHEIGHT in pixels, multiples of the tokenizer's pixels per code"},
        "response_format": {"const": "b64_json"},
        "seed": {"type": "integer", "minimum": 0},
        "guidance_scale": {"type": "number", "minimum": 0, "default": 3},
        "negative_prompt": {"type": "string"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_k": {"type": "integer", "minimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}})
}

/// A list field as the server reads it (`body::strings`, `body::b64_images`):
/// an array of `item`s with at least `min` of them, or, when one is enough,
/// a single bare `item`.
fn list(item: &Value, min: usize) -> Value {
    let array = json!({"type": "array", "items": item, "minItems": min});
    if min <= 1 {
        json!({"oneOf": [item, array]})
    } else {
        array
    }
}

/// The paths of the embedding side (`--model`) and of the chat side
/// (`--vlm`).
const EMBEDDING_PATHS: &[&str] = &[
    "/v1/embeddings",
    "/v1/similarity",
    "/v1/classify",
    "/v1/search",
    "/v1/thumbnail",
    "/v1/video",
    "/",
];
const CHAT_PATHS: &[&str] = &["/v1/chat/completions", "/v1/models"];
/// The path a native chat model (`--vlm NATIVE_DIR`) adds.
const DRAW_PATHS: &[&str] = &["/v1/images/generations"];

/// The document of a server that serves the embedding endpoints, the chat
/// endpoints (`draws`: with a native model's drawing) or both: it lists only
/// the paths that answer.
pub fn document_for(embedding: bool, chat: bool, draws: bool) -> Value {
    let mut doc = document();
    if let Some(paths) = doc["paths"].as_object_mut() {
        for (served, list) in [
            (embedding, EMBEDDING_PATHS),
            (chat, CHAT_PATHS),
            (chat && draws, DRAW_PATHS),
        ] {
            if !served {
                for p in list {
                    paths.remove(*p);
                }
            }
        }
    }
    doc
}

/// Every path clasp can serve.
pub fn document() -> Value {
    let text = json!({"type": "string"});
    let image =
        json!({"type": "string", "contentEncoding": "base64", "contentMediaType": "image/*"});
    let strings = list(&text, 0);
    let b64 = list(&image, 0);
    json!({
        "openapi": "3.1.0",
        "info": {"title": "clasp", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Embeddings, similarity, zero-shot classification and image search with CLIP-family models; chat completions with a vision-language model."},
        "paths": {
            "/v1/embeddings": post(
                "Embed texts and/or images (OpenAI embeddings shape; texts first, then images, each in input order). Also accepts multipart/form-data with `input` and `image` parts.",
                json!({"type": "object",
                    "anyOf": [
                        {"required": ["input"], "properties": {"input": list(&text, 1)}},
                        {"required": ["images"], "properties": {"images": list(&image, 1)}}],
                    "properties": {
                    "input": strings,
                    "images": b64,
                    "model": {"type": ["string", "null"]},
                    "encoding_format": {"enum": ["float", "base64", null]},
                    "dimensions": {"type": ["integer", "null"], "minimum": 1}}}),
                json!({"type": "object", "properties": {
                    "object": {"const": "list"},
                    "data": {"type": "array", "items": {"type": "object", "properties": {
                        "object": {"const": "embedding"}, "index": {"type": "integer"},
                        "embedding": {"type": "array", "items": {"type": "number"}}}}},
                    "model": {"type": "string"},
                    "usage": {"type": "object"}}})),
            "/v1/similarity": post(
                "logits_per_image (images x texts) as the model computes it, and probs: the softmax over texts, or for SigLIP each pair's sigmoid (probs_kind says which)",
                json!({"type": "object", "required": ["images", "texts"], "properties": {
                    "images": list(&image, 1), "texts": list(&text, 1)}}),
                json!({"type": "object", "properties": {
                    "logits_per_image": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                    "probs": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                    "probs_kind": {"type": "string", "enum": ["softmax", "sigmoid"]},
                    "logit_scale": {"type": "number"},
                    "logit_bias": {"type": ["number", "null"]}}})),
            "/v1/classify": post(
                "Zero-shot labels with CLIP's prompt ensemble; probability is the softmax over the labels at scale 100, or for SigLIP each label's own sigmoid. Each image and each label counts once against the server's item limit (a label's template prompts are not counted).",
                json!({"type": "object", "required": ["images", "labels"], "properties": {
                    "images": b64, "labels": list(&text, 2), "templates": list(&text, 1)}}),
                json!({"type": "object", "properties": {"data": {"type": "array", "items": {"type": "object", "properties": {
                    "index": {"type": "integer"}, "label": {"type": "string"}, "probability": {"type": "number"},
                    "scores": {"type": "object", "additionalProperties": {"type": "number"}}}}}}})),
            "/v1/search": post(
                "Search the store: text or algebra (`\"a dog\" + 2:\"snow\" - night`) and/or an image",
                json!({"type": "object",
                    "anyOf": [{"required": ["query"]}, {"required": ["image"], "properties": {"image": list(&image, 1)}}, {"required": ["image_path"]}],
                    "properties": {
                    "query": {"type": "string", "pattern": "\\S"}, "image": b64,
                    "image_path": {"type": "string", "description": "an image the store has indexed, as the query (more like this)"},
                    "k": {"type": "integer", "minimum": 1, "maximum": 1000}, "dir": {"type": "string"},
                    "rerank": {"type": "string", "pattern": "^itm(\\+sim)?(:[1-9][0-9]*)?$",
                        "description": "Re-score the first stage's top K (32) with the server's fusion model (--rerank-model): itm orders by its match probability, itm+sim by its match logit plus the similarity. Text queries only."}}}),
                json!({"type": "object", "properties": {"data": {"type": "array", "items": {"type": "object", "properties": {
                    "path": {"type": "string"}, "score": {"type": "number"}, "caption": {"type": ["string", "null"]},
                    "itm": {"type": "number", "description": "the fusion model's match probability, when re-ranked"},
                    "start": {"type": "number", "description": "a video segment's start, in seconds (`path` is the video)"},
                    "end": {"type": "number", "description": "a video segment's end, in seconds"}}}}}})),
            "/v1/thumbnail": {"get": {
                "summary": "A JPEG thumbnail of an indexed image, or of an indexed video's frame at `t` (the search page's grid); other paths get 404",
                "parameters": [
                    {"name": "path", "in": "query", "required": true, "schema": {"type": "string", "minLength": 1}},
                    {"name": "size", "in": "query", "schema": {"type": "integer", "minimum": 16, "maximum": 2048, "default": 256}},
                    {"name": "t", "in": "query", "schema": {"type": "number", "minimum": 0}}],
                "responses": {"200": {"description": "image/jpeg"}, "400": error_response("Bad size or t, or no path"),
                              "404": error_response("Not an indexed image"), "503": error_response("No store")}}},
            "/v1/video": {"get": {
                "summary": "An indexed video's bytes, with HTTP byte ranges (the search page's player); other paths get 404",
                "parameters": [
                    {"name": "path", "in": "query", "required": true, "schema": {"type": "string", "minLength": 1}}],
                "responses": {"200": {"description": "the video"}, "206": {"description": "a byte range of it"},
                              "400": error_response("No path"), "404": error_response("Not an indexed video"),
                              "503": error_response("No store")}}},
            "/": {"get": {"summary": "The search page (HTML)", "responses": {"200": {"description": "text/html"}}}},
            "/v1/chat/completions": post(
                "OpenAI chat completions over the vision-language model (`--vlm`), with continuous batching. `stream: true` answers server-sent events of `chat.completion.chunk` objects, then `[DONE]`. clasp's extension `clasp_retrieve` puts photos retrieved from the store (`--store`) into the last user message and answers `clasp_sources`.",
                chat_request(),
                json!({"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"const": "chat.completion"}, "model": {"type": "string"},
                    "choices": {"type": "array", "items": {"type": "object", "properties": {
                        "index": {"type": "integer"},
                        "message": {"type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}},
                        "finish_reason": {"enum": ["stop", "length"]}}}},
                    "usage": {"type": "object", "properties": {
                        "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}},
                    "clasp_sources": {"type": "array", "items": {"type": "object"}}}})),
            "/v1/images/generations": post(
                "OpenAI image generation with the native model (`--vlm NATIVE_DIR`): image tokens sampled with classifier-free guidance (`guidance_scale`, against `negative_prompt`, Emu3's by default), decoded by its VQ tokenizer; PNGs as base64. Image i of a request uses seed + i.",
                draw_request(),
                json!({"type": "object", "properties": {
                    "created": {"type": "integer"}, "size": {"type": "string"},
                    "data": {"type": "array", "items": {"type": "object", "properties": {
                        "b64_json": {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"}}}}}})),
            "/v1/models": {"get": {"summary": "The chat model (OpenAI's list shape)", "responses": {"200": {"description": "OK"}}}},
            "/health": {"get": {"summary": "Health check", "responses": {"200": {"description": "OK"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OK"}}}}
        },
        "components": {"schemas": {"Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}}}}}}}
    })
}
