//! `clasp generate` and `clasp tokenize` as a user runs them: the greedy
//! answer equals transformers', `--json` carries ids and rates, and bad input
//! gets an error that names it.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn clasp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clasp"))
}

fn gguf() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/get-smollm2.sh"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn run(args: &[&str]) -> (i32, String, String) {
    let o = clasp().args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// transformers' prompts, logits and greedy answers
/// (scripts/gen_llm_fixtures.py).
fn logits_fixture() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llm/logits.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The acceptance prompt; transformers' greedy answer (48 tokens of
/// it) is in the fixture, made by scripts/gen_llm_fixtures.py.
#[test]
fn greedy_chat_answer_equals_transformers() {
    let fx = logits_fixture();
    let p = &fx["prompts"][0];
    assert_eq!(p["prompt"], "Describe a dog running on a beach.");
    let model = gguf();
    let (code, out, err) = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--prompt",
        "Describe a dog running on a beach.",
        "--temperature",
        "0",
        "--precision",
        "f32",
        "--max-tokens",
        "48",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ids"], p["greedy"]);
    assert_eq!(v["text"], p["greedy_text"]);
    assert!(["eos", "length"].contains(&v["stop_reason"].as_str().unwrap()));
    assert!(v["decode_tokens_per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(
        v["prompt_tokens"].as_u64().unwrap(),
        p["ids"].as_array().unwrap().len() as u64
    );

    // The command as written (default quantized weights), plain
    // output streamed: the same text.
    let (code, out, err) = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--prompt",
        "Describe a dog running on a beach.",
        "--temperature",
        "0",
        "--max-tokens",
        "48",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim_end_matches('\n'),
        p["greedy_text"].as_str().unwrap()
    );
}

/// `--stop` with a stop string of three tokens (" a", " gentle", " giant"
/// in SmolLM2's greedy answer): the streamed text is exactly the final text,
/// cut before the stop string. The single-prompt loop this replaced printed
/// " a gentle" before the stop string was complete, text the answer did not
/// keep; the one engine holds a possible start of a stop string back.
#[test]
fn generate_streams_exactly_its_final_text_when_a_stop_string_cuts_it() {
    let fx = logits_fixture();
    let greedy = fx["prompts"][0]["greedy_text"].as_str().unwrap();
    let stop = "a gentle giant";
    let cut = greedy
        .find(stop)
        .expect("the stop string is in the greedy text");
    let model = gguf();
    let args = |json: bool| {
        let mut a = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--chat",
            "--prompt",
            "Describe a dog running on a beach.",
            "--temperature",
            "0",
            "--precision",
            "f32",
            "--max-tokens",
            "48",
            "--stop",
            stop,
        ];
        if json {
            a.push("--json");
        }
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let a = args(true);
    let (code, out, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["stop_reason"], "stop");
    assert_eq!(v["text"].as_str().unwrap(), &greedy[..cut]);
    let a = args(false);
    let (code, streamed, err) = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert_eq!(streamed.trim_end_matches('\n'), &greedy[..cut]);
}

#[test]
fn tokenize_prints_one_array_per_text_for_llms_and_clip() {
    let model = gguf();
    let (code, out, err) = run(&[
        "tokenize",
        "-m",
        model.to_str().unwrap(),
        "Hello world",
        "你好",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "[19556,905]");
    assert_eq!(lines.len(), 2);
    // The real openai/clip-vit-base-patch32 tokenizer files (no weights needed).
    let clip = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/assets/clip-vit-base-patch32");
    let (code, out, err) = run(&["tokenize", "-m", clip.to_str().unwrap(), "a photo of a cat"]);
    assert_eq!(code, 0, "{err}");
    // CLIP's BPE: <|startoftext|> a photo of a cat <|endoftext|>, no padding.
    assert_eq!(out.trim(), "[49406,320,1125,539,320,2368,49407]");
}

fn write_gguf(path: &Path, arch: &str, with_tokenizer: bool) {
    let w = QTensor::quantize(
        &Tensor::zeros((32, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let mut meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(arch.into())),
        ("llama.block_count", Value::U32(1)),
        ("llama.embedding_length", Value::U32(32)),
        ("llama.feed_forward_length", Value::U32(32)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.context_length", Value::U32(64)),
        ("llama.vocab_size", Value::U32(32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
    ];
    if with_tokenizer {
        meta.push(("tokenizer.ggml.model", Value::String("gpt2".into())));
    }
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &refs, &[("token_embd.weight", &w)]).unwrap();
}

/// Runs clasp, expects exit code 2 and every needle in stderr.
fn fails_with(args: &[&str], needles: &[&str]) {
    let (code, _, err) = run(args);
    assert_eq!(code, 2, "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: no {n:?} in: {err}");
    }
}

#[test]
fn bad_inputs_get_errors_that_name_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let path = |name: &str| d.join(name).to_str().unwrap().to_string();
    let model = gguf();
    let model = model.to_str().unwrap();

    // Truncated GGUF.
    let full = std::fs::read(model).unwrap();
    std::fs::write(path("cut.gguf"), &full[..full.len() / 2]).unwrap();
    fails_with(
        &["generate", "-m", &path("cut.gguf"), "-p", "hi"],
        &["cut.gguf", "truncated: tensor `"],
    );

    // Wrong magic.
    std::fs::write(path("junk.gguf"), b"\x89PNG\r\n\x1a\nnot a model at all").unwrap();
    fails_with(
        &["generate", "-m", &path("junk.gguf"), "-p", "hi"],
        &["junk.gguf", "not a GGUF file"],
    );

    // Missing tokenizer metadata.
    write_gguf(&d.join("notok.gguf"), "llama", false);
    fails_with(
        &["generate", "-m", &path("notok.gguf"), "-p", "hi"],
        &["notok.gguf", "missing metadata key `tokenizer.ggml.model`"],
    );

    // Unsupported architecture (the tokenizer is there, the architecture is not).
    write_gguf(&d.join("mamba.gguf"), "mamba", true);
    fails_with(
        &["generate", "-m", &path("mamba.gguf"), "-p", "hi"],
        &["mamba.gguf", "unsupported architecture `mamba`"],
    );

    // Non-UTF-8 prompt file.
    std::fs::write(path("prompt.txt"), b"caf\xe9 au lait").unwrap();
    fails_with(
        &[
            "generate",
            "-m",
            model,
            "--prompt-file",
            &path("prompt.txt"),
        ],
        &["prompt.txt", "not UTF-8", "offset 3"],
    );

    // A prompt longer than the context (8192 for SmolLM2).
    std::fs::write(path("long.txt"), "dog ".repeat(9000)).unwrap();
    fails_with(
        &["generate", "-m", model, "--prompt-file", &path("long.txt")],
        &["the prompt is 9001 tokens", "context is 8192"],
    );
}
