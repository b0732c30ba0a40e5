//! Helpers the `train_e2e` tests share (split into two files by size).
#![allow(dead_code, unused_imports)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/flickr8k")
}

/// 40 train and 16 dev photos with their English captions.
pub fn small_flickr(dir: &Path) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let list = |name: &str, n: usize| -> Vec<String> {
        std::fs::read_to_string(shared().join(name))
            .unwrap()
            .lines()
            .take(n)
            .map(String::from)
            .collect()
    };
    let train = list("Flickr_8k.trainImages.txt", 40);
    let dev = list("Flickr_8k.devImages.txt", 16);
    std::fs::write(dir.join("Flickr_8k.trainImages.txt"), train.join("\n")).unwrap();
    std::fs::write(dir.join("Flickr_8k.devImages.txt"), dev.join("\n")).unwrap();
    let wanted: std::collections::HashSet<&String> = train.iter().chain(&dev).collect();
    for f in &wanted {
        std::fs::copy(shared().join("images").join(f), dir.join("images").join(f)).unwrap();
    }
    let mut tok = std::fs::File::create(dir.join("Flickr8k.token.txt")).unwrap();
    for line in std::fs::read_to_string(shared().join("Flickr8k.token.txt"))
        .unwrap()
        .lines()
    {
        let img = line.split('#').next().unwrap().to_string();
        if wanted.contains(&img) {
            writeln!(tok, "{line}").unwrap();
        }
    }
}

pub fn train_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(["train", "--init", &crate::common::tiny(), "--dataset"])
        .arg(format!("flickr8k:{}", data.display()))
        .args([
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--warmup",
            "2",
            "--seed",
            "7",
            "--save-every",
            "4",
            "--output",
        ])
        .arg(out)
        .args(extra);
    c
}

/// Runs `c`, which must fail with `needle` in its error output.
pub fn fails_with(mut c: Command, needle: &str) {
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(needle), "{err}");
}

pub fn run_ok(mut c: Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `clasp train --resume DIR`, which must succeed.
pub fn resume_ok(dir: &Path) {
    let mut resume = Command::new(env!("CARGO_BIN_EXE_clasp"));
    resume.args(["train", "--resume"]).arg(dir);
    run_ok(resume);
}

pub fn weights(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("checkpoint/model.safetensors")).unwrap()
}

pub fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

/// The tiny BERT of the tiny dual-encoder fixture as a text checkpoint.
pub fn tiny_bert(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core/tiny-dual-encoder");
    let bert = dir.join("bert");
    std::fs::create_dir_all(&bert).unwrap();
    let dual =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let text: std::collections::HashMap<String, candle_core::Tensor> = dual
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("text_model.")?.to_string(), v.clone())))
        .collect();
    candle_core::safetensors::save(&text, bert.join("model.safetensors")).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    std::fs::write(bert.join("config.json"), cfg["text_config"].to_string()).unwrap();
    for f in ["vocab.txt", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), bert.join(f)).unwrap();
    }
    bert
}
