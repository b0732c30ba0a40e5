//! Data parallelism's exactness (issue 38, item 4): `mpirun -np 2 clasp
//! train --batch-size 4` must train exactly as one process at
//! `--batch-size 8`: the same loss and gradient norms every step and the
//! same weights after 5 steps (1e-5), for InfoNCE and SigLIP, global and
//! local loss, and with gradient accumulation. And the test must be able to
//! fail: without gather-with-grad the gradient is not the global batch's.
//!
//! Needs clasp built with `--features mpi` and Open MPI's `mpirun`
//! (`scripts/test.sh` installs both and runs this file).
#![cfg(feature = "mpi")]

mod common;
#[path = "train_e2e_util/mod.rs"]
mod util;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};

/// Every flag but the batch size, shared by both sides of a comparison.
fn args(data: &Path, out: &Path, batch: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--init",
        &common::tiny(),
        "--dataset",
        &format!("flickr8k:{}", data.display()),
        "--batch-size",
        &batch.to_string(),
        "--steps",
        "5",
        "--lr",
        "1e-3",
        "--warmup",
        "2",
        "--seed",
        "7",
        "--save-every",
        "0",
        // Huge per-group clips: never clip, but log each group's gradient norm.
        "--grad-clip-vision",
        "1e9",
        "--grad-clip-text",
        "1e9",
        "--grad-clip-proj",
        "1e9",
        "--output",
        &out.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// `mpirun -np 2 clasp` (oversubscribed and allowed as root, as CI needs;
/// one thread a rank).
fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", "2", "--oversubscribe", "--allow-run-as-root"])
        .args(["-x", "RAYON_NUM_THREADS=1"]);
    c
}

/// Each run gets a cache of its own (`OUT.cache`), so that a locked tower's
/// features are computed by the run, not read from another's.
fn cache_of(out: &Path) -> String {
    format!("{}.cache", out.display())
}

fn one_process(data: &Path, out: &Path, extra: &[&str]) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(args(data, out, 8, extra))
        .env("RAYON_NUM_THREADS", "2")
        .env("CLASP_CACHE_DIR", cache_of(out));
    util::run_ok(c);
}

fn two_ranks(data: &Path, out: &Path, extra: &[&str]) {
    let mut c = mpirun();
    c.args(["-x", &format!("CLASP_CACHE_DIR={}", cache_of(out))])
        .arg(env!("CARGO_BIN_EXE_clasp"))
        .args(args(data, out, 4, extra));
    util::run_ok(c);
}

/// (loss, group gradient norms) per step, from metrics.jsonl.
fn curve(out: &Path) -> Vec<(f64, Vec<f64>)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let norms = v["group_grad_norms"]
                .as_object()
                .expect("group norms logged")
                .values()
                .map(|x| x.as_f64().unwrap())
                .collect();
            (v["loss"].as_f64().unwrap(), norms)
        })
        .collect()
}

fn weights(out: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(out.join("checkpoint/model.safetensors"), &Device::Cpu).unwrap()
}

/// The largest weight difference between two runs' checkpoints.
fn weight_gap(a: &Path, b: &Path) -> f32 {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    wa.iter()
        .map(|(k, x)| common::max_abs(x, &wb[k]))
        .fold(0.0, f32::max)
}

/// Steps' losses and gradient norms, and the final weights, agree.
fn assert_same(one: &Path, two: &Path, what: &str) {
    let (a, b) = (curve(one), curve(two));
    assert_eq!(a.len(), 5, "{what}: five steps logged");
    assert_eq!(a.len(), b.len(), "{what}");
    for (s, ((la, na), (lb, nb))) in a.iter().zip(&b).enumerate() {
        assert!(
            (la - lb).abs() < 1e-5,
            "{what}: step {} loss {la} vs {lb}",
            s + 1
        );
        assert_eq!(na.len(), nb.len());
        for (x, y) in na.iter().zip(nb) {
            assert!(
                (x - y).abs() < 1e-5 * x.abs().max(1.0),
                "{what}: step {} gradient norm {x} vs {y}",
                s + 1
            );
        }
    }
    let gap = weight_gap(one, two);
    assert!(gap < 1e-5, "{what}: weights differ by {gap}");
}

#[test]
fn two_ranks_train_exactly_as_one_process_at_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    util::small_flickr(&data);
    let cases: &[(&str, &[&str])] = &[
        ("infonce", &[]),
        ("infonce, local loss", &["--local-loss"]),
        ("siglip", &["--objective", "siglip"]),
        (
            "siglip, local loss",
            &["--objective", "siglip", "--local-loss"],
        ),
        ("infonce, accum_freq 2", &["--accum-freq", "2"]),
        // A locked tower's features, cached once, filled by the ranks together.
        (
            "infonce, locked image tower",
            &["--lock-image", "--crop-scale", "1"],
        ),
    ];
    for (i, (what, extra)) in cases.iter().enumerate() {
        let one = tmp.path().join(format!("one{i}"));
        let two = tmp.path().join(format!("two{i}"));
        one_process(&data, &one, extra);
        two_ranks(&data, &two, extra);
        assert_same(&one, &two, what);
    }
    // The shared fill stored the same features one process computes.
    let stored = |out: &Path| {
        let dir = Path::new(&cache_of(out)).join("train-features");
        let f = std::fs::read_dir(&dir)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        candle_core::safetensors::load(f, &Device::Cpu).unwrap()
    };
    let last = cases.len() - 1;
    let (a, b) = (
        stored(&tmp.path().join(format!("one{last}"))),
        stored(&tmp.path().join(format!("two{last}"))),
    );
    let gap = common::max_abs(&a["features"], &b["features"]);
    assert!(gap < 1e-5, "cached features differ by {gap}");
    assert_eq!(
        a["valid"].to_vec1::<u8>().unwrap(),
        b["valid"].to_vec1::<u8>().unwrap()
    );
}

#[test]
fn without_gather_with_grad_the_gradient_is_not_the_global_batchs() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    util::small_flickr(&data);
    for (what, extra) in [
        ("infonce", &["--gather-with-grad", "false"][..]),
        (
            "infonce, local loss",
            &["--gather-with-grad", "false", "--local-loss"][..],
        ),
    ] {
        let one = tmp.path().join(format!("one-{}", what.len()));
        let two = tmp.path().join(format!("two-{}", what.len()));
        one_process(&data, &one, &[]);
        two_ranks(&data, &two, extra);
        // The first step's tower gradients miss the other rank's loss: the
        // global loss's are halved (open_clip's known scaling), the local
        // loss's miss the cross terms.
        let (a, b) = (curve(&one), curve(&two));
        let gap = a[0]
            .1
            .iter()
            .zip(&b[0].1)
            .map(|(x, y)| (x - y).abs() / x.abs().max(1e-12))
            .fold(0.0, f64::max);
        assert!(gap > 1e-2, "{what}: gradient norms agree to {gap}");
    }
}

#[test]
fn a_rank_that_fails_stops_the_job_and_names_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    util::small_flickr(&data);
    // SigLIP's pairwise loss has a local form; a triplet loss does not.
    let out = tmp.path().join("bad");
    let mut c = mpirun();
    c.arg(env!("CARGO_BIN_EXE_clasp")).args(args(
        &data,
        &out,
        4,
        &["--objective", "triplet", "--local-loss"],
    ));
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("rank 0 of 2") || err.contains("rank 1 of 2"),
        "{err}"
    );
    assert!(err.contains("no local form"), "{err}");
}

#[test]
fn a_two_rank_run_stopped_and_resumed_ends_as_the_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    util::small_flickr(&data);
    let whole = tmp.path().join("whole");
    two_ranks(&data, &whole, &[]);
    let split = tmp.path().join("split");
    two_ranks(&data, &split, &["--stop-after", "3"]);
    assert_eq!(curve(&split).len(), 3);
    let mut c = mpirun();
    c.arg(env!("CARGO_BIN_EXE_clasp"))
        .args(["train", "--resume", split.to_str().unwrap()]);
    util::run_ok(c);
    assert_same(&whole, &split, "resumed");
    // Another world size resumes too: one process at the saved per-rank batch.
    let more = tmp.path().join("more");
    two_ranks(&data, &more, &["--stop-after", "3"]);
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(["train", "--resume", more.to_str().unwrap()]);
    util::run_ok(c);
    assert_eq!(curve(&more).len(), 5);
}

/// The language-model loss is a mean over the global batch's answer tokens
/// under data parallelism too: 2 ranks at batch 1 train a VLM's connector as
/// 1 process at batch 2 does, and rank 0 alone writes.
#[test]
fn a_vision_language_run_across_two_ranks_equals_one_process_and_rank_0_writes_once() {
    let tmp = tempfile::tempdir().unwrap();
    let vlm = common::assembled(tmp.path());
    let data = format!("flickr8k:{}", util::shared().display());
    let vlm_args = |out: &Path, batch: &str| -> Vec<String> {
        let mut a: Vec<String> = ["train", "--init", &vlm, "--dataset", &data]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for x in [
            "--steps",
            "2",
            "--lr",
            "1e-3",
            "--seed",
            "0",
            "--batch-size",
            batch,
        ] {
            a.push(x.into());
        }
        a.extend(["--output".into(), out.display().to_string()]);
        a
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(vlm_args(&one, "2")).env("RAYON_NUM_THREADS", "2");
    util::run_ok(c);
    let mut c = mpirun();
    c.arg(env!("CARGO_BIN_EXE_clasp")).args(vlm_args(&two, "1"));
    util::run_ok(c);
    let lines = |out: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (lines(&one), lines(&two));
    assert_eq!(b.len(), 2, "one line per step, from rank 0 only: {b:?}");
    for (x, y) in a.iter().zip(&b) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((lx - ly).abs() < 1e-5, "loss {lx} vs {ly}");
        let norm = |v: &serde_json::Value| v["group_grad_norms"]["projector"].as_f64().unwrap();
        let (nx, ny) = (norm(x), norm(y));
        // f32 through SmolLM2's 30 layers, one batch of 2 padded against two
        // of 1: the gradient agrees to about 1e-5 relative, not better.
        assert!((nx - ny).abs() < 1e-4 * nx, "gradient norm {nx} vs {ny}");
        assert!(y["comm_s"].as_f64().unwrap() >= 0.0, "{y}");
    }
    let gap = weight_gap(&one, &two);
    // Adam's first steps normalise each element's gradient, so elements whose
    // gradient is near zero carry that 1e-5 into the weights (5e-5 seen).
    assert!(gap < 1e-4, "weights differ by {gap}");
}

#[test]
fn sigusr1_to_mpirun_stops_every_rank_after_the_same_step_and_rank_0_saves() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    util::small_flickr(&data);
    let out = tmp.path().join("run");
    let mut a = args(&data, &out, 4, &[]);
    let steps = a.iter().position(|x| x == "--steps").unwrap() + 1;
    a[steps] = "5000".into();
    let mut child = mpirun()
        .arg(env!("CARGO_BIN_EXE_clasp"))
        .args(&a)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Once a few steps are logged, ask the launcher to stop the job.
    let logged = || {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let t0 = std::time::Instant::now();
    while logged() < 3 {
        assert!(t0.elapsed().as_secs() < 120, "no steps logged");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-USR1", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("state/trainer.json")).unwrap())
            .unwrap();
    let step = st["step"].as_u64().unwrap() as usize;
    assert!(step < 5000, "stopped early");
    assert_eq!(step, logged(), "the saved state is at the last logged step");
    assert!(out.join("checkpoint/model.safetensors").is_file());
}
