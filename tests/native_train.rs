//! `clasp train --task native`: a native model (a VQ tokenizer of clasp's
//! own joined with SmolLM2 by `clasp assemble --native`) trained to draw and
//! to caption. On a one-photo dataset each step's batch is known, so the
//! logged loss can be recomputed independently: the mean negative
//! log-likelihood of the answer tokens under the model's inference path
//! (`NativeModel::logits`, the cached forward `clasp caption` and
//! `clasp draw` use) on the sequence those commands would build. At step 1
//! that is the assembled model; after a stop and a resume it is the saved
//! checkpoint (the adapter merged, the image tokens' rows in place), so the
//! checkpoint is the model the run trained.

mod common;
mod train_e2e_util;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use clasp::vlm::native::NativeModel;
use clasp::vlm::Vlm;
use train_e2e_util::{fails_with, resume_ok, run_ok};

const CAPTION: &str = "A black dog runs across the grass .";

fn clasp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clasp"))
}

/// One Flickr8k photo with one caption, as generic pairs.
fn one_photo(dir: &Path) -> (PathBuf, PathBuf) {
    let shared = train_e2e_util::shared();
    let list = std::fs::read_to_string(shared.join("Flickr_8k.trainImages.txt")).unwrap();
    let photo = shared
        .join("images")
        .join(list.lines().next().unwrap().trim());
    let spec = dir.join("one.jsonl");
    let line = serde_json::json!({"image": photo, "caption": CAPTION});
    std::fs::write(&spec, format!("{line}\n")).unwrap();
    (spec, photo)
}

/// A fresh VQ tokenizer (32 pixels a side, 16 codes) assembled with SmolLM2.
fn native_model(dir: &Path, spec: &Path) -> PathBuf {
    let vq = dir.join("vq");
    let mut c = clasp();
    c.args(["train", "--task", "vq", "--dataset"])
        .arg(format!("jsonl:{}", spec.display()))
        .args(["--steps", "1", "--batch-size", "1", "--output"])
        .arg(&vq)
        .args(["--set", "vq_image_size=32", "--set", "vq_codebook_size=16"]);
    run_ok(c);
    let native = dir.join("native");
    let mut c = clasp();
    c.args(["assemble", "--native"])
        .arg(vq.join("checkpoint"))
        .arg("--llm")
        .arg(common::smollm2())
        .arg("--output")
        .arg(&native);
    run_ok(c);
    native
}

fn native_cmd(init: &Path, spec: &Path, out: &Path, ratio: &str, steps: &str) -> Command {
    let mut c = clasp();
    c.args(["train", "--task", "native"]);
    native_args(&mut c, init, spec, out, ratio, steps);
    c
}

fn native_args(c: &mut Command, init: &Path, spec: &Path, out: &Path, ratio: &str, steps: &str) {
    c.arg("--init")
        .arg(init)
        .arg("--dataset")
        .arg(format!("jsonl:{}", spec.display()))
        .args(["--steps", steps, "--batch-size", "1", "--lr", "1e-2"])
        .args(["--warmup", "0", "--lora-rank", "4", "--set"])
        .arg(format!("draw_ratio={ratio}"))
        .arg("--output")
        .arg(out);
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The mean NLL of `answer` after `prompt` under the model's inference path.
fn answer_nll(m: &NativeModel, prompt: &[u32], answer: &[u32]) -> f64 {
    let ids = [prompt, answer].concat();
    let logits: Vec<Vec<f32>> = m.logits(&ids).unwrap().to_vec2().unwrap();
    let mut sum = 0f64;
    for (k, &target) in answer.iter().enumerate() {
        let row = &logits[prompt.len() - 1 + k];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        sum += lse - row[target as usize] as f64;
    }
    sum / answer.len() as f64
}

fn draw_nll(m: &NativeModel, photo: &Path) -> f64 {
    let codes = m.image_codes(photo).unwrap();
    let (h, w) = (codes.len(), codes[0].len());
    let prompt = m.draw_prompt_ids(CAPTION, h, w).unwrap();
    answer_nll(m, &prompt, &m.draw_answer_ids(&codes))
}

fn caption_nll(m: &NativeModel, photo: &Path) -> f64 {
    let codes = m.image_codes(photo).unwrap();
    let prompt = m
        .caption_prompt_ids(&Vlm::caption_turn("Describe the image."), &codes)
        .unwrap();
    let mut answer = m.tokenizer.encode(CAPTION, false).unwrap();
    answer.extend(m.tokenizer.eos_id());
    answer_nll(m, &prompt, &answer)
}

#[test]
fn native_training_losses_are_the_models_own_and_the_checkpoint_is_what_it_trained() {
    let d = tempfile::tempdir().unwrap();
    let (spec, photo) = one_photo(d.path());
    let init = native_model(d.path(), &spec);
    let m0 = NativeModel::load(&init, &Device::Cpu).unwrap();

    // Drawing only: 3 steps, stopped, then resumed for the 4th.
    let out = d.path().join("draw");
    let mut c = native_cmd(&init, &spec, &out, "1", "4");
    c.args(["--stop-after", "3"]);
    run_ok(c);
    let after3 = NativeModel::load(&out.join("checkpoint"), &Device::Cpu).unwrap();
    let expect4 = draw_nll(&after3, &photo);
    resume_ok(&out);
    let rows = metrics(&out);
    assert_eq!(rows.len(), 4);
    for r in &rows {
        let parts = r["losses"].as_object().unwrap();
        assert_eq!(parts.keys().collect::<Vec<_>>(), ["draw"], "{r}");
    }
    let loss = |i: usize| rows[i]["loss"].as_f64().unwrap();
    let expect1 = draw_nll(&m0, &photo);
    assert!(
        (loss(0) - expect1).abs() < 2e-3,
        "step 1: {} vs {expect1}",
        loss(0)
    );
    assert!(
        (loss(3) - expect4).abs() < 2e-3,
        "step 4: {} vs {expect4}",
        loss(3)
    );
    // One photo learned at a high rate: the codes become likely.
    assert!(loss(3) < loss(0) - 0.5, "{} then {}", loss(0), loss(3));
    // The checkpoint after 4 steps draws its photo's codes better than the start.
    let end = NativeModel::load(&out.join("checkpoint"), &Device::Cpu).unwrap();
    assert!(draw_nll(&end, &photo) < expect4);

    // Captioning only: one step, against the assembled model, on the
    // packed AVX-512 kernels where the CPU has them; a native --init makes
    // the run a native one without --task.
    let out = d.path().join("caption");
    let mut c = clasp();
    c.arg("train");
    native_args(&mut c, &init, &spec, &out, "0", "1");
    c.arg("--packed-llm");
    run_ok(c);
    let rows = metrics(&out);
    let parts = rows[0]["losses"].as_object().unwrap();
    assert_eq!(parts.keys().collect::<Vec<_>>(), ["caption"]);
    let expect = caption_nll(&m0, &photo);
    let got = rows[0]["loss"].as_f64().unwrap();
    assert!(
        (got - expect).abs() < 2e-3,
        "caption step 1: {got} vs {expect}"
    );

    // A model that is not native, a share out of range, another task's key.
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core/tiny-clip");
    fails_with(
        native_cmd(&tiny, &spec, &d.path().join("x"), "0.5", "1"),
        "not a native (Emu3) model",
    );
    fails_with(
        native_cmd(&init, &spec, &d.path().join("y"), "1.5", "1"),
        "draw_ratio: 1.5 is not a share in [0, 1]",
    );
    let mut c = native_cmd(&init, &spec, &d.path().join("z"), "0.5", "1");
    c.args(["--set", "vq_beta=0.5"]);
    fails_with(c, "vq_beta");
}
