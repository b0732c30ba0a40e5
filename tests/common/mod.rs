//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;

pub fn core() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core")
}

pub fn tiny() -> String {
    core().join("tiny-clip").display().to_string()
}

/// Rows of a `clasp embed -o FILE.jsonl` output.
pub struct EmbedOutput {
    /// (input path, embedding) per image, in output order.
    pub images: Vec<(String, Vec<f32>)>,
    pub texts: Vec<Vec<f32>>,
}

impl EmbedOutput {
    pub fn image_vectors(&self) -> Vec<Vec<f32>> {
        self.images.iter().map(|x| x.1.clone()).collect()
    }
}

pub fn read_embed_jsonl(p: &Path) -> EmbedOutput {
    let mut out = EmbedOutput {
        images: Vec::new(),
        texts: Vec::new(),
    };
    for line in std::fs::read_to_string(p).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let e: Vec<f32> = v["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        if v["type"] == "image" {
            out.images
                .push((v["input"].as_str().unwrap().to_string(), e));
        } else {
            out.texts.push(e);
        }
    }
    out
}
