//! `clasp train` end to end on a small Flickr8k-layout set from ../shared:
//! an interrupted run (by --stop-after, or by Ctrl-C) resumed to the end
//! gives bit-identical weights to an uninterrupted run.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
mod train_e2e_util;

use train_e2e_util::*;

#[test]
fn stop_and_resume_gives_the_same_weights_and_the_run_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let dev = format!("flickr8k:{}", data.display());
    let stdout = run_ok(train_cmd(
        &data,
        &a,
        &["--steps", "10", "--eval-dataset", &dev],
    ));
    let dev_metrics: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        dev_metrics["mean_recall"].as_f64().is_some(),
        "dev retrieval reported: {stdout}"
    );
    run_ok(train_cmd(
        &data,
        &b,
        &["--steps", "10", "--eval-dataset", &dev, "--stop-after", "5"],
    ));
    // A new run into the stopped run's directory is refused, pointing to --resume.
    fails_with(train_cmd(&data, &b, &["--steps", "10"]), "--resume");
    resume_ok(&b);
    assert!(
        weights(&a) == weights(&b),
        "resumed run ends with the same weights"
    );
    // metrics.jsonl has one line per step across both invocations, and plots exist.
    let lines = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=10).collect::<Vec<_>>());
    for f in [
        "loss.png",
        "dev_recall.png",
        "state/trainer.json",
        "state/optimizer.safetensors",
        "checkpoint/config.json",
    ] {
        assert!(a.join(f).is_file(), "{f}");
    }
    // The checkpoint is a model clasp can use.
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args([
            "embed",
            "-m",
            a.join("checkpoint").to_str().unwrap(),
            "--text",
            "a dog",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn ctrl_c_saves_and_exits_cleanly_then_resumes_to_the_same_weights() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    run_ok(train_cmd(&data, &a, &["--steps", "40"]));
    let mut child = train_cmd(&data, &b, &["--steps", "40"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let n = std::fs::read_to_string(b.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    common::signal(&child, common::SIGINT);
    let status = child.wait().unwrap();
    assert!(status.success(), "Ctrl-C exits cleanly: {status:?}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("state/trainer.json")).unwrap())
            .unwrap();
    let stopped_at = state["step"].as_u64().unwrap();
    assert!(
        (3..40).contains(&stopped_at),
        "stopped mid-run at step {stopped_at}"
    );
    resume_ok(&b);
    assert!(
        weights(&a) == weights(&b),
        "interrupted at {stopped_at}, resumed: same final weights"
    );
}

/// LiT: a pretrained BERT text tower (here the text tower of the tiny
/// transformers-made dual encoder, saved as a plain BERT checkpoint) joined to
/// a from-scratch image tower. Locked, the text tower's weights come out
/// exactly as they went in, while the projections and image tower learn; the
/// result is a vision-text-dual-encoder checkpoint that clasp embeds with.
#[test]
fn lit_with_a_locked_text_tower_keeps_it_and_trains_the_rest() {
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let bert = tiny_bert(d.path());
    let text: HashMap<String, Tensor> =
        candle_core::safetensors::load(bert.join("model.safetensors"), &Device::Cpu).unwrap();
    let out = d.path().join("lit");
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(["train", "--preset", "tiny", "--text-init"])
        .arg(&bert)
        .args([
            "--lock-text",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--output",
        ])
        .arg(&out)
        .arg("--dataset")
        .arg(format!("flickr8k:{}", data.display()));
    run_ok(c);
    let load = |p: PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let (init, end) = (
        load(out.join("init/model.safetensors")),
        load(out.join("checkpoint/model.safetensors")),
    );
    let differs = |k: &str| {
        let diff = (&init[k] - &end[k]).unwrap().abs().unwrap();
        diff.flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    };
    for (k, v) in &text {
        let got = &end[&format!("text_model.{k}")];
        let same = (got - v)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0, "locked {k} changed");
    }
    assert!(
        differs("text_projection.weight"),
        "the text projection learns"
    );
    assert!(
        differs("visual_projection.weight"),
        "the visual projection learns"
    );
    assert!(
        differs("vision_model.encoder.layers.0.mlp.fc1.weight"),
        "the image tower learns"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "vision-text-dual-encoder");
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(["embed", "--model"])
        .arg(out.join("checkpoint"))
        .args(["--text", "a dog on the grass"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `--schedule bcif` gives the first objective the weight λ(p) and the rest
/// 1 − λ(p): with InfoNCE on both sides the sum is InfoNCE at every step,
/// so the run must follow a plain InfoNCE run (λ steps through 1, 0.8, 0.2,
/// 0.2 over these 4 steps; a wrong split would scale the loss). The new
/// objectives run end to end, and an unknown one is named in the error.
#[test]
fn objective_lists_and_the_bcif_schedule_run_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let (plain, traded, mixed) = (
        d.path().join("plain"),
        d.path().join("traded"),
        d.path().join("mixed"),
    );
    run_ok(train_cmd(
        &data,
        &plain,
        &["--steps", "4", "--objective", "infonce"],
    ));
    run_ok(train_cmd(
        &data,
        &traded,
        &[
            "--steps",
            "4",
            "--objective",
            "infonce,infonce",
            "--schedule",
            "bcif",
        ],
    ));
    let (a, b) = (losses(&plain), losses(&traded));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs(),
            "plain {a:?} vs traded {b:?}"
        );
    }
    run_ok(train_cmd(
        &data,
        &mixed,
        &[
            "--steps",
            "3",
            "--objective",
            "infonce,daa:0.5,triplet:0.5,geometric:linear(0,1)",
            "--triplet-mode",
            "sum",
            "--geometric-k",
            "2",
            "--conflict-every",
            "2",
            "--conflict-group",
            "vision",
            "--grad-clip-vision",
            "0.3",
            "--grad-clip-text",
            "0.8",
        ],
    ));
    let m = losses(&mixed);
    assert!(m.len() == 3 && m.iter().all(|l| l.is_finite()), "{m:?}");
    // Step 1 is computed before any update, from the same init and batch as
    // the plain run's step 1, so its InfoNCE term is the same: the added
    // DAA and triplet terms (geometric's weight is 0 at step 0) must show.
    // An objective list that was parsed but ignored fails here.
    assert!(
        (m[0] - a[0]).abs() > 1e-3 * a[0].abs(),
        "mixed step-1 loss {} equals plain InfoNCE {}: the extra objectives did nothing",
        m[0],
        a[0]
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(mixed.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The probe runs at steps 0 and 2 (logged as steps 1 and 3).
    let probes: Vec<Option<f64>> = rows.iter().map(|r| r["grad_conflict"].as_f64()).collect();
    assert!(
        probes[0].is_some() && probes[1].is_none() && probes[2].is_some(),
        "{probes:?}"
    );
    assert!(
        probes.iter().flatten().all(|c| c.abs() <= 1.0 + 1e-9),
        "{probes:?}"
    );
    for r in &rows {
        let g = &r["group_grad_norms"];
        assert!(
            g["vision"].as_f64().unwrap() > 0.0 && g["text"].as_f64().unwrap() > 0.0,
            "{r}"
        );
        assert!(g.get("proj").is_none(), "proj clipping is off: {r}");
    }
    fails_with(
        train_cmd(
            &data,
            &d.path().join("bad"),
            &["--steps", "1", "--objective", "infonce,bogus:0.5"],
        ),
        "unknown objective `bogus`",
    );
}

/// `clasp train --preset` without `--tokenizer` uses CLIP's BPE as
/// open_clip bundles it: the checkpoint's vocab.json and merges.txt are
/// transformers' files for openai/clip-vit-base-patch32 (../shared/assets),
/// so the run tokenizes as CLIP does.
#[test]
fn a_preset_without_tokenizer_files_gets_clips_bundled_bpe() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let out = d.path().join("run");
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args([
        "train",
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--output",
    ])
    .arg(&out)
    .arg("--dataset")
    .arg(format!("flickr8k:{}", data.display()));
    run_ok(c);
    let clip =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/assets/clip-vit-base-patch32");
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(
        json(out.join("checkpoint/vocab.json")),
        json(clip.join("vocab.json"))
    );
    assert_eq!(
        std::fs::read_to_string(out.join("checkpoint/merges.txt"))
            .unwrap()
            .lines()
            .collect::<Vec<_>>(),
        std::fs::read_to_string(clip.join("merges.txt"))
            .unwrap()
            .lines()
            .collect::<Vec<_>>()
    );
}
