//! `clasp serve --llm`: a language model alone behind the chat API, with
//! the same continuous batching as a vision-language model. Its answers
//! equal `clasp generate --chat`'s, alone and side by side; an image part is
//! refused by name.

mod common;

use std::process::Command;

use common::Server;
use serde_json::{json, Value};

const PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea.",
];

fn generate(gguf: &str, prompt: &str) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(["generate", "-m", gguf, "--chat", "-p", prompt])
        .args(["--max-tokens", "24", "--temperature", "0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim_end().to_string()
}

fn chat(s: &Server, prompt: &str) -> Value {
    let (status, v, _) = s.post(
        "/v1/chat/completions",
        &json!({"model": "smollm2", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]}),
    );
    assert_eq!(status, 200, "{v}");
    v
}

#[test]
fn a_language_model_alone_chats_as_clasp_generate_answers() {
    let gguf = common::smollm2().display().to_string();
    let s = Server::start(&["serve", "--llm", &gguf, "--addr", "127.0.0.1:0"]);
    let want: Vec<String> = PROMPTS.iter().map(|p| generate(&gguf, p)).collect();
    for (p, w) in PROMPTS.iter().zip(&want) {
        let v = chat(&s, p);
        assert_eq!(v["choices"][0]["message"]["content"], w.as_str(), "{p}");
    }
    // Side by side: the running batch gives each the answer it gets alone.
    let answers: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = PROMPTS
            .iter()
            .map(|p| {
                let s = &s;
                sc.spawn(move || {
                    chat(s, p)["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(answers, want);
    // An image part is named; the server goes on.
    let (status, v, _) = s.post(
        "/v1/chat/completions",
        &json!({"model": "smollm2", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}),
    );
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages[0].content[1].image_url");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("reads no images"));
    assert_eq!(
        chat(&s, PROMPTS[0])["choices"][0]["message"]["content"],
        want[0].as_str()
    );
}
