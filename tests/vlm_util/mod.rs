//! Helpers the `vlm` tests share (split into two files by size).
#![allow(dead_code, unused_imports)]

use candle_core::Device;
use clasp::vlm::{ConnectorKind, Vlm};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm")
}

pub fn shared_image(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/flickr8k/images")
        .join(name)
}

/// A fresh model on the fixtures' tower and SmolLM2 with `kind` (seed 0,
/// features from the penultimate layer), as the fixture generators
/// assemble it.
pub fn assembled(kind: ConnectorKind) -> Vlm {
    Vlm::assemble(
        &fixtures().join("vision"),
        &crate::common::smollm2(),
        kind,
        -2,
        0,
        &Device::Cpu,
    )
    .unwrap()
}

/// The LLaVA-NeXT fixtures' grid: five pinpoints of the tower's 32 pixels.
pub const TINY_PINPOINTS: [(u32, u32); 5] = [(32, 64), (64, 32), (64, 64), (32, 96), (96, 32)];

/// The LLaVA-NeXT model the fixture generators assemble (`--anyres` with
/// [`TINY_PINPOINTS`], and `--video` when `video`), seed 0.
pub fn tiny_next(video: bool) -> Vlm {
    let mut m = assembled(ConnectorKind::Mlp2xGelu);
    m.set_anyres(TINY_PINPOINTS.to_vec(), None, 0).unwrap();
    if video {
        m.enable_video().unwrap();
    }
    m
}

/// The largest absolute difference between two logit tables.
pub fn max_gap(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max)
}

/// The model the fixture generator assembled: same tower, LLM and seed.
pub fn vlm() -> &'static Vlm {
    static M: OnceLock<Vlm> = OnceLock::new();
    M.get_or_init(|| assembled(ConnectorKind::Mlp2xGelu))
}

pub fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("llava_logits.json")).unwrap())
        .unwrap()
}

pub use crate::common::{f32s, u32s};

pub fn f32s2(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(f32s).collect()
}

/// Checks clasp's logits `[t, vocab]` against a fixture case: every
/// position's argmax (up to a near-tie), and at the last 24 positions the
/// fixed and top ids' values to 1e-3 (the last positions the fixture
/// holds: 24 for Llava's). Returns the largest difference.
pub fn check_logits(name: &str, logits: &[Vec<f32>], c: &Value) -> f32 {
    let mut worst = 0f32;
    let t = logits.len();
    let argmax: Vec<u32> = logits
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32
        })
        .collect();
    let want_argmax = u32s(&c["argmax"]);
    for (p, (a, w)) in argmax.iter().zip(&want_argmax).enumerate() {
        if a != w {
            // Only a near-tie may differ.
            let r = &logits[p];
            assert!(
                (r[*a as usize] - r[*w as usize]).abs() < 1e-3,
                "{name}: argmax at {p}: {a} vs transformers' {w}"
            );
        }
    }
    let n = c["fixed"].as_array().unwrap().len();
    let last = &logits[t - n..];
    for (key, ids_key) in [("fixed", "fixed_ids"), ("top", "top_ids")] {
        let want = f32s2(&c[key]);
        let ids: Vec<Vec<u32>> = match &c[ids_key] {
            Value::Array(a) if a.first().is_some_and(|x| x.is_array()) => {
                a.iter().map(u32s).collect()
            }
            v => vec![u32s(v); n],
        };
        for (p, (row, wrow)) in last.iter().zip(&want).enumerate() {
            for (&id, w) in ids[p].iter().zip(wrow) {
                let d = (row[id as usize] - w).abs();
                worst = worst.max(d);
                assert!(
                    d <= 1e-3,
                    "{name}: {key} logit of {id} at {p}: {} vs {w}",
                    row[id as usize]
                );
            }
        }
    }
    worst
}

/// The largest difference between the logits of `m` (assembled) and `back`
/// (loaded from what `m` saved) on one prompt and image. The loaded head
/// has one more column (the image token's, all zero), checked here; the
/// loaded language model runs transformers' rotary layout where the GGUF
/// ran its interleaved one, so they agree up to float rounding.
pub fn saved_and_loaded_logit_gap(m: &Vlm, back: &Vlm, ids: &[u32], img: &Path) -> f32 {
    let logits = |v: &Vlm| -> Vec<Vec<f32>> {
        v.logits(ids, &v.pixels(&[img]).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap()
    };
    let (a, b) = (logits(m), logits(back));
    let mut worst = 0f32;
    for (ra, rb) in a.iter().zip(&b) {
        assert_eq!(rb.len(), ra.len() + 1);
        assert_eq!(rb[ra.len()], 0.0);
        for (x, y) in ra.iter().zip(rb) {
            worst = worst.max((x - y).abs());
        }
    }
    worst
}
