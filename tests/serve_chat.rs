//! `clasp serve --vlm`: OpenAI's chat completions on loopback, driven by the
//! official `openai` Python package (scripts/get-py-clients.sh installs it) and
//! by raw HTTP for what a client library hides: bad input, continuous
//! batching under concurrent requests, and a client that leaves mid-stream.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use common::Server;
use serde_json::{json, Value};

fn image(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/flickr8k/images")
        .join(name)
}

/// Held-out photos: the first four of the dev split.
const PHOTOS: [&str; 4] = [
    "2090545563_a4e66ec76b.jpg",
    "3393035454_2d2370ffd4.jpg",
    "3695064885_a6922f06b2.jpg",
    "1679557684_50a206e4a9.jpg",
];

fn data_url(p: &Path) -> String {
    format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).unwrap())
    )
}

fn vlm_server(dir: &Path, extra: &[&str]) -> Server {
    let vlm = common::assembled(dir);
    let mut args = vec!["serve", "--vlm", vlm.as_str(), "--addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A greedy request for one photo and an instruction.
fn ask(photo: &Path, max_tokens: usize) -> Value {
    json!({
        "model": "clasp",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(photo)}},
            {"type": "text", "text": "Describe the image."},
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_string()
}

/// `clasp chat`'s greedy answer for the same photo and turn.
fn cli_chat(vlm: &str, photo: &Path, max_tokens: usize) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(["chat", "--model", vlm, "--image", photo.to_str().unwrap()])
        .args(["--prompt", "<image>\nDescribe the image."])
        .args(["--max-tokens", &max_tokens.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim_end().to_string()
}

#[test]
fn the_openai_client_chats_with_and_without_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let s = vlm_server(dir.path(), &[]);
    let photo = image(PHOTOS[0]);
    let r = common::python_client(
        "openai_chat_check.py",
        &[s.base.as_str(), photo.to_str().unwrap()],
    );
    let plain = r["plain"].as_str().unwrap();
    assert!(!plain.is_empty());
    // The server's greedy answer is the CLI's (same model, turn and limit).
    let vlm = dir.path().join("vlm");
    assert_eq!(plain, cli_chat(vlm.to_str().unwrap(), &photo, 24));
    // Streaming gives the same text in pieces, then the same finish and usage.
    assert_eq!(r["streamed"], r["plain"]);
    assert_eq!(r["stream_finish"], r["plain_finish"]);
    assert_eq!(r["stream_usage"], r["plain_usage"]);
    let usage = &r["plain_usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=24).contains(&completion), "{usage}");
    // The prompt: the chat template's tokens plus 16 image tokens.
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 16, "{usage}");
    // The role chunk, at least one piece per... token or so, the finish
    // chunk and the usage chunk.
    assert!(r["chunks"].as_u64().unwrap() >= 4, "{r}");
    // A seed makes sampling reproducible.
    assert_eq!(r["seeded"][0], r["seeded"][1]);
}

#[test]
fn bad_chat_requests_get_400_naming_the_input_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("photos");
    std::fs::create_dir(&allowed).unwrap();
    let local = allowed.join("a.jpg");
    std::fs::copy(image(PHOTOS[1]), &local).unwrap();
    let s = vlm_server(
        dir.path(),
        &["--allow-local-images", allowed.to_str().unwrap()],
    );
    let part = |url: &str| json!({"type": "image_url", "image_url": {"url": url}});
    let with = |parts: Vec<Value>| json!({"messages": [{"role": "user", "content": parts}], "max_tokens": 4});
    let text = |t: &str| json!({"type": "text", "text": t});
    let not_image = format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b"plain text, not a JPEG")
    );
    let good = data_url(&image(PHOTOS[1]));
    let outside = image(PHOTOS[2]);
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "not an image",
            with(vec![part(&not_image), text("What is this?")]),
            "messages[0].content[0].image_url",
            "not a decodable image",
        ),
        (
            "two placeholders, one image",
            with(vec![
                part(&good),
                text("<image> and <image>: compare them."),
            ]),
            "messages",
            "2 <image> placeholders for 1 image",
        ),
        (
            "context overflow",
            with(vec![part(&good), text(&"many words ".repeat(5000))]),
            "messages",
            "context",
        ),
        (
            "malformed image_url",
            with(vec![json!({"type": "image_url", "image_url": 7})]),
            "messages[0].content[0].image_url",
            "expected",
        ),
        (
            "bad base64",
            with(vec![part("data:image/jpeg;base64,@@@")]),
            "messages[0].content[0].image_url",
            "invalid base64",
        ),
        (
            "remote URL",
            with(vec![part("https://example.com/a.jpg")]),
            "messages[0].content[0].image_url",
            "not fetched",
        ),
        (
            "a path outside the allowed folder",
            with(vec![part(outside.to_str().unwrap())]),
            "messages[0].content[0].image_url",
            "outside the folder",
        ),
        (
            "unknown role",
            json!({"messages": [{"role": "robot", "content": "hi"}]}),
            "messages[0].role",
            "unknown role",
        ),
        (
            "no messages",
            json!({"messages": []}),
            "messages",
            "non-empty",
        ),
        (
            "n > 1",
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}),
            "n",
            "n = 1",
        ),
        (
            "temperature out of range",
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}),
            "temperature",
            "between 0 and 2",
        ),
    ];
    for (name, body, param, needle) in cases {
        let (status, v, _) = s.post("/v1/chat/completions", &body);
        assert_eq!(status, 400, "{name}: {v}");
        assert_eq!(v["error"]["param"], param, "{name}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{name}: {msg}");
    }
    // A bad request does not stop the engine; a local path under the
    // allowed folder reads the same photo as its data URL.
    let (status, by_url, _) = s.post("/v1/chat/completions", &ask(&image(PHOTOS[1]), 8));
    assert_eq!(status, 200, "{by_url}");
    let mut by_path = ask(&image(PHOTOS[1]), 8);
    by_path["messages"][0]["content"][0]["image_url"]["url"] =
        json!(format!("file://{}", local.display()));
    let (status, v, _) = s.post("/v1/chat/completions", &by_path);
    assert_eq!(status, 200, "{v}");
    assert_eq!(content(&v), content(&by_url));
    // A server without --allow-local-images refuses paths.
    drop(s);
    let s = vlm_server(&dir.path().join("second"), &[]);
    let (status, v, _) = s.post("/v1/chat/completions", &by_path);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--allow-local-images"));
}

/// Requests that arrive while others decode join the running batch (the
/// decode steps see more than one row) and get exactly their sequential
/// answers.
#[test]
fn concurrent_chats_join_the_running_batch_and_equal_sequential_answers() {
    let dir = tempfile::tempdir().unwrap();
    let s = vlm_server(dir.path(), &["--max-batch-size", "8", "--max-wait-ms", "0"]);
    let sequential: Vec<String> = PHOTOS
        .iter()
        .map(|p| {
            let (status, v, _) = s.post("/v1/chat/completions", &ask(&image(p), 16));
            assert_eq!(status, 200, "{v}");
            content(&v)
        })
        .collect();
    let steps_before = s.metric("clasp_batch_size_count{kind=\"chat\"}");
    let rows_before = s.metric("clasp_batch_size_sum{kind=\"chat\"}");
    let base = s.base.clone();
    let handles: Vec<_> = PHOTOS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let base = base.clone();
            let body = ask(&image(p), 16);
            std::thread::spawn(move || {
                // Staggered, so later ones arrive mid-decode.
                std::thread::sleep(Duration::from_millis(40 * i as u64));
                let v: Value = ureq::post(&format!("{base}/v1/chat/completions"))
                    .send_json(body)
                    .unwrap()
                    .into_json()
                    .unwrap();
                content(&v)
            })
        })
        .collect();
    let concurrent: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(concurrent, sequential);
    let steps = s.metric("clasp_batch_size_count{kind=\"chat\"}") - steps_before;
    let rows = s.metric("clasp_batch_size_sum{kind=\"chat\"}") - rows_before;
    eprintln!(
        "{steps} decode steps, {:.2} rows each on average",
        rows / steps
    );
    assert!(
        rows > steps * 1.5,
        "decode steps ran {:.2} rows on average; the requests did not share the batch",
        rows / steps
    );
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let s = vlm_server(dir.path(), &[]);
    {
        let mut body = ask(&image(PHOTOS[3]), 400);
        body["stream"] = json!(true);
        let body = body.to_string();
        let mut c = TcpStream::connect(&s.addr).unwrap();
        write!(
            c,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // Read until the first content chunk, then leave.
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\"content\":\"") {
            let n = c.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended before any content");
            seen.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&seen).into_owned();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/event-stream"), "{head}");
    }
    let t0 = Instant::now();
    loop {
        let h: Value = serde_json::from_str(&s.get("/health")).unwrap();
        if h["in_flight"] == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the disconnected stream still holds its slot: {h}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.metric("clasp_dropped_disconnected_total") >= 1.0);
    let (status, v, _) = s.post("/v1/chat/completions", &ask(&image(PHOTOS[0]), 4));
    assert_eq!(status, 200, "{v}");
}

/// The `path` of each object of a JSON array.
fn paths(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| h["path"].as_str().unwrap().to_string())
        .collect()
}

/// Multimodal RAG: `clasp ask` and the server's `clasp_retrieve` put the
/// photos that `clasp search` finds for the question into the prompt (the
/// same paths, in order), each as an image, and answer.
#[test]
fn ask_and_clasp_retrieve_answer_with_the_photos_search_finds() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    let dev = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/flickr8k/Flickr_8k.devImages.txt"),
    )
    .unwrap();
    for name in dev.split_whitespace().take(6) {
        std::fs::copy(image(name), photos.join(name)).unwrap();
    }
    let store = dir.path().join("store.sqlite");
    let (s_store, s_photos) = (store.to_str().unwrap(), photos.to_str().unwrap());
    let tiny = common::tiny();
    let clasp = |args: &[&str]| -> String {
        let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    clasp(&["index", s_photos, "-m", &tiny, "--store", s_store]);
    let question = "Where is the dog running?";
    let found: Vec<Value> = serde_json::from_str(&clasp(&[
        "search",
        question,
        "--store",
        s_store,
        "--no-index",
        "--dir",
        s_photos,
        "-k",
        "2",
        "--json",
    ]))
    .unwrap();
    let found = paths(&Value::from(found));
    assert_eq!(found.len(), 2);

    let vlm = common::assembled(dir.path());
    let ask: Value = serde_json::from_str(&clasp(&[
        "ask",
        question,
        "--vlm",
        &vlm,
        "--store",
        s_store,
        "-k",
        "2",
        "--json",
        "--max-tokens",
        "8",
    ]))
    .unwrap();
    assert_eq!(paths(&ask["sources"]), found);
    assert!(!ask["answer"].as_str().unwrap().is_empty());
    // Two photos of 16 image tokens each are in the prompt.
    assert!(ask["prompt_tokens"].as_u64().unwrap() > 32, "{ask}");

    let s = Server::start(&[
        "serve",
        "-m",
        &tiny,
        "--store",
        s_store,
        "--vlm",
        &vlm,
        "--addr",
        "127.0.0.1:0",
    ]);
    let plain = json!({"messages": [{"role": "user", "content": question}], "max_tokens": 4, "temperature": 0});
    let (status, p, _) = s.post("/v1/chat/completions", &plain);
    assert_eq!(status, 200, "{p}");
    let mut rag = plain.clone();
    rag["clasp_retrieve"] = json!({"k": 2});
    let (status, r, _) = s.post("/v1/chat/completions", &rag);
    assert_eq!(status, 200, "{r}");
    assert_eq!(paths(&r["clasp_sources"]), found);
    let tokens = |v: &Value| v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        tokens(&r) > tokens(&p) + 32,
        "the photos are in the prompt: {r}"
    );
    let mut bad = rag.clone();
    bad["clasp_retrieve"] = json!({"k": 0});
    let (status, v, _) = s.post("/v1/chat/completions", &bad);
    assert_eq!(status, 400);
    assert_eq!(v["error"]["param"], "clasp_retrieve.k");
    drop(s);
    // A server without a store says what retrieval needs.
    let s = Server::start(&["serve", "--vlm", &vlm, "--addr", "127.0.0.1:0"]);
    let (status, v, _) = s.post("/v1/chat/completions", &rag);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--store"));
}
