//! Helpers the `serve` tests share (split into two files by size).
#![allow(dead_code, unused_imports)]

use base64::Engine;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub fn core() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core")
}
pub fn tiny() -> String {
    core().join("tiny-clip").display().to_string()
}

use crate::common::Server;

/// `clasp serve` of the tiny CLIP with `extra` flags.
pub fn server(extra: &[&str]) -> Server {
    let tiny = tiny();
    let mut args = vec!["serve", "-m", tiny.as_str(), "--addr", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

pub fn b64(file: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(std::fs::read(core().join("images").join(file)).unwrap())
}

pub fn vecs(v: &Value) -> Vec<Vec<f32>> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

pub fn max_abs(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Reference vectors from `clasp embed` (itself checked against transformers).
pub fn clasp_embed(texts: &[&str], images: &[&str]) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("e.jsonl");
    let mut args: Vec<String> = vec![
        "embed".into(),
        "-m".into(),
        tiny(),
        "-o".into(),
        out.display().to_string(),
    ];
    for t in texts {
        args.extend(["--text".into(), t.to_string()]);
    }
    for i in images {
        args.extend([
            "--image".into(),
            core().join("images").join(i).display().to_string(),
        ]);
    }
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = crate::common::read_embed_jsonl(&out);
    let images = e.image_vectors();
    (e.texts, images)
}
