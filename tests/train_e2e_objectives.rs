//! Training end to end, the alignment objectives and model kinds: EWC, adversarial alignment,
//! mined negatives, distillation, bf16, SigLIP's sigmoid loss, and open_clip checkpoints.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
mod train_e2e_util;

use train_e2e_util::*;

/// EWC end to end: the old task's run writes its Fisher with the checkpoint;
/// a new run from it with `ewc` ends nearer the old weights, in the Fisher's
/// metric Σ F (θ − θ*)², than the same run without it.
#[test]
fn ewc_keeps_the_weights_that_mattered_nearer_the_old_task() {
    use candle_core::{Device, Tensor};
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let old = d.path().join("old");
    run_ok(train_cmd(
        &data,
        &old,
        &["--steps", "3", "--fisher-batches", "2"],
    ));
    let fisher_file = old.join("checkpoint/fisher.safetensors");
    let fisher = candle_core::safetensors::load(&fisher_file, &Device::Cpu).unwrap();
    let keys: Vec<&String> = fisher.keys().filter(|k| k.starts_with("fisher.")).collect();
    assert!(keys.len() > 10, "{keys:?}");
    let total: f32 = keys
        .iter()
        .map(|k| {
            let t = &fisher[*k];
            assert!(
                t.min_all().unwrap().to_scalar::<f32>().unwrap() >= 0.0,
                "{k} negative"
            );
            t.sum_all().unwrap().to_scalar::<f32>().unwrap()
        })
        .sum();
    assert!(total > 0.0);
    let init = old.join("checkpoint").display().to_string();
    let new_run = |name: &str, objective: &str| {
        let out = d.path().join(name);
        let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
        c.args(["train", "--init", &init, "--dataset"])
            .arg(format!("flickr8k:{}", data.display()))
            .args([
                "--steps",
                "4",
                "--batch-size",
                "8",
                "--lr",
                "1e-3",
                "--warmup",
                "1",
                "--seed",
                "3",
            ])
            .args(["--objective", objective, "--output"])
            .arg(&out);
        run_ok(c);
        let end =
            candle_core::safetensors::load(out.join("checkpoint/model.safetensors"), &Device::Cpu)
                .unwrap();
        // Σ F (θ − θ*)² over the parameters the checkpoint stores by the same name.
        keys.iter()
            .filter_map(|k| {
                let name = k.strip_prefix("fisher.").unwrap();
                let now: &Tensor = end.get(name)?;
                let diff = (now - &fisher[&format!("theta.{name}")]).unwrap();
                Some(
                    (&fisher[*k] * diff.sqr().unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap() as f64,
                )
            })
            .sum::<f64>()
    };
    let (plain, held) = (
        new_run("plain", "infonce"),
        new_run("held", "infonce,ewc:1e7"),
    );
    assert!(
        plain > 0.0 && held < 0.5 * plain,
        "Fisher distance: plain {plain}, with EWC {held}"
    );
}

/// The adversarial objective's discriminator lives in the training state: a
/// run stopped half-way and resumed ends with the same weights, and the same
/// discriminator, as an uninterrupted one (WGAN-GP included, whose
/// interpolation weights are drawn from the batch itself).
#[test]
fn adversarial_runs_resume_to_the_same_weights_and_discriminator() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let args = [
        "--steps",
        "6",
        "--objective",
        "infonce,adversarial:0.5",
        "--adv-loss",
        "wgan",
        "--adv-gp",
        "10",
        "--adv-hidden",
        "16",
    ];
    run_ok(train_cmd(&data, &a, &args));
    let mut half = args.to_vec();
    half.extend(["--stop-after", "3"]);
    run_ok(train_cmd(&data, &b, &half));
    resume_ok(&b);
    assert!(
        weights(&a) == weights(&b),
        "resumed run ends with the same weights"
    );
    let disc = |o: &Path| {
        let s = candle_core::safetensors::load(
            o.join("state/optimizer.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let w = &s["adversary.fc1.weight"];
        assert_eq!(w.dims()[0], 16);
        w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(disc(&a), disc(&b));
    // ...and the discriminator does learn: after one step it differs from the end.
    let c = d.path().join("c");
    let mut one = args.to_vec();
    one.extend(["--stop-after", "1"]);
    run_ok(train_cmd(&data, &c, &one));
    assert_ne!(disc(&c), disc(&a));
    let l = losses(&a);
    assert!(l.len() == 6 && l.iter().all(|x| x.is_finite()), "{l:?}");
}

/// `clasp mine` writes negatives that `clasp train --negatives` uses with the
/// triplet objective; a file mined from other captions is refused by name.
#[test]
fn mined_negatives_feed_triplet_training() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let neg = d.path().join("neg.json");
    let mut mine = Command::new(env!("CARGO_BIN_EXE_clasp"));
    mine.args(["mine", "--model", &common::tiny(), "--dataset"])
        .arg(format!("flickr8k:{}", data.display()))
        .args(["--top-k", "5", "--window", "-1,1", "--output"])
        .arg(&neg);
    run_ok(mine);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&neg).unwrap()).unwrap();
    let caps = m["captions"].as_array().unwrap();
    let anchors = m["anchors"].as_array().unwrap();
    assert_eq!(caps.len(), anchors.len());
    // Every kept negative conflicts lexically with its anchor, as recorded.
    let mut kept = 0;
    for (a, negs) in anchors.iter().enumerate() {
        for n in negs.as_array().unwrap() {
            let b = n["caption"].as_u64().unwrap() as usize;
            let why =
                clasp::train::mine::conflict(caps[a].as_str().unwrap(), caps[b].as_str().unwrap());
            assert_eq!(why.as_deref(), n["conflict"].as_str());
            kept += 1;
        }
    }
    assert!(kept > 0, "no negatives mined from {} captions", caps.len());
    // A sentence-transformers model mines too; its cosines are its own.
    let sentence =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core/tiny-sentence-bert");
    let neg_st = d.path().join("neg-st.json");
    let mut mine = Command::new(env!("CARGO_BIN_EXE_clasp"));
    mine.args(["mine", "--model"])
        .arg(&sentence)
        .arg("--dataset")
        .arg(format!("flickr8k:{}", data.display()))
        .args(["--top-k", "5", "--window", "-1,1", "--output"])
        .arg(&neg_st);
    run_ok(mine);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&neg_st).unwrap()).unwrap();
    let caps: Vec<String> = m["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let enc = clasp::model::sentence::SentenceEncoder::load(&sentence, &candle_core::Device::Cpu)
        .unwrap();
    let emb = enc.embed(&caps).unwrap().to_vec2::<f32>().unwrap();
    let mut checked = 0;
    for (a, negs) in m["anchors"].as_array().unwrap().iter().enumerate() {
        for n in negs.as_array().unwrap() {
            let b = n["caption"].as_u64().unwrap() as usize;
            let cos: f32 = emb[a].iter().zip(&emb[b]).map(|(x, y)| x * y).sum();
            let got = n["cosine"].as_f64().unwrap() as f32;
            assert!((cos - got).abs() < 1e-4, "{a}->{b}: {got} vs {cos}");
            checked += 1;
        }
    }
    assert!(checked > 0, "the sentence encoder mined nothing");
    let out = d.path().join("run");
    run_ok(train_cmd(
        &data,
        &out,
        &[
            "--steps",
            "2",
            "--objective",
            "infonce,triplet:0.5",
            "--negatives",
            neg.to_str().unwrap(),
        ],
    ));
    assert_eq!(losses(&out).len(), 2);
    fails_with(
        train_cmd(
            &data,
            &d.path().join("dev"),
            &[
                "--steps",
                "1",
                "--split",
                "dev",
                "--negatives",
                neg.to_str().unwrap(),
            ],
        ),
        "mined from other captions",
    );
}

/// A student that starts as its own teacher has nothing to learn from it:
/// the first step's distillation loss is 0, the feature term's too (its
/// projection starts as the identity when the widths agree). Without a
/// teacher, `distill` is refused by name.
#[test]
fn distilling_from_itself_starts_at_zero_and_a_missing_teacher_is_named() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let own = d.path().join("own");
    let tiny = common::tiny();
    run_ok(train_cmd(
        &data,
        &own,
        &[
            "--steps",
            "2",
            "--objective",
            "distill",
            "--teacher",
            &tiny,
            "--distill-temp",
            "2",
            "--distill-feature",
            "0.5",
        ],
    ));
    let l = losses(&own);
    assert!(
        l.len() == 2 && l[0].abs() < 1e-6 && l[1].is_finite(),
        "{l:?}"
    );
    fails_with(
        train_cmd(
            &data,
            &d.path().join("noteacher"),
            &["--steps", "1", "--objective", "infonce,distill"],
        ),
        "needs a teacher",
    );
}

/// ALBEF's momentum distillation through the CLI: with α = 0 the targets are
/// InfoNCE's and the run is the plain run bit for bit; with α > 0 the losses
/// differ; stopped and resumed, the run ends with the same weights and the
/// same momentum towers (saved in the state); a locked image tower's cached
/// features work with it; `--teacher` beside it is refused by name.
#[test]
fn momentum_distillation_resumes_its_ema_and_at_alpha_zero_is_infonce() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let run = |name: &str, extra: &[&str]| {
        let out = d.path().join(name);
        let mut args = vec!["--steps", "4"];
        args.extend(extra);
        run_ok(train_cmd(&data, &out, &args));
        out
    };
    let plain = run("plain", &[]);
    let zero = run("zero", &["--momentum", "0.9", "--distill-alpha", "0"]);
    assert_eq!(losses(&plain), losses(&zero));
    assert!(weights(&plain) == weights(&zero));
    let md = ["--momentum", "0.9", "--distill-alpha", "0.4"];
    let full = run("md", &md);
    let l = losses(&full);
    assert!(l.len() == 4 && l.iter().all(|x| x.is_finite()), "{l:?}");
    assert_ne!(l, losses(&plain));
    let half = d.path().join("half");
    let mut args = vec!["--steps", "4", "--stop-after", "2"];
    args.extend(md);
    run_ok(train_cmd(&data, &half, &args));
    resume_ok(&half);
    assert!(
        weights(&full) == weights(&half),
        "resumed run ends with the same weights"
    );
    let ema = |o: &Path| {
        let s = candle_core::safetensors::load(
            o.join("state/optimizer.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut v: Vec<(String, Vec<f32>)> = s
            .iter()
            .filter(|(k, _)| k.starts_with("momentum."))
            .map(|(k, t)| (k.clone(), t.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let (a, b) = (ema(&full), ema(&half));
    assert!(!a.is_empty() && a == b, "the momentum towers resume");
    // LiT: the locked image tower's cached features pass through the EMA's
    // projection; α = 0 is the plain locked run, α > 0 is not.
    let lit = run("lit", &["--lock-image"]);
    let lit0 = run(
        "lit0",
        &["--lock-image", "--momentum", "0.9", "--distill-alpha", "0"],
    );
    assert_eq!(losses(&lit), losses(&lit0));
    let lit_md = run("lit_md", &["--lock-image", "--momentum", "0.9"]);
    let l = losses(&lit_md);
    assert!(
        l.iter().all(|x| x.is_finite()) && l != losses(&lit),
        "{l:?}"
    );
    fails_with(
        train_cmd(
            &data,
            &d.path().join("both"),
            &[
                "--steps",
                "1",
                "--momentum",
                "0.9",
                "--teacher",
                &common::tiny(),
            ],
        ),
        "--teacher",
    );
}

/// `--precision bf16` trains through the CLI: the f32 weights move, stay f32,
/// and the losses are finite.
#[test]
fn bf16_mixed_precision_trains_f32_weights() {
    use candle_core::{DType, Device};
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let out = d.path().join("bf16");
    run_ok(train_cmd(
        &data,
        &out,
        &["--steps", "2", "--precision", "bf16"],
    ));
    let init = candle_core::safetensors::load(
        Path::new(&common::tiny()).join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let end =
        candle_core::safetensors::load(out.join("checkpoint/model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut moved = 0;
    for (k, v) in &end {
        assert_eq!(v.dtype(), DType::F32, "{k}");
        let d = (v - &init[k])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap();
        if d.max(0).unwrap().to_scalar::<f32>().unwrap() > 0.0 {
            moved += 1;
        }
    }
    assert!(
        moved > end.len() / 2,
        "{moved} of {} tensors moved",
        end.len()
    );
    let l = losses(&out);
    assert!(l.len() == 2 && l.iter().all(|x| x.is_finite()), "{l:?}");
    fails_with(
        train_cmd(
            &data,
            &d.path().join("x"),
            &["--steps", "1", "--precision", "f8"],
        ),
        "unknown precision `f8`",
    );
}

/// SigLIP fine-tuning with its own sigmoid loss: the checkpoint's
/// `logit_bias` is trained and saved as a model parameter (not a state-only
/// one), a locked image tower (LiT) stays as it was, the text tower learns,
/// and the run resumes to the same weights as one without a stop.
#[test]
fn siglip_trains_its_own_bias_with_the_sigmoid_loss_and_lit_locking() {
    use candle_core::Device;
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/siglip/tiny-siglip");
    let run = |out: &Path, extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
        c.args(["train", "--init"])
            .arg(&init)
            .arg("--dataset")
            .arg(format!("flickr8k:{}", data.display()))
            .args(["--objective", "siglip", "--lock-image", "--batch-size", "8"])
            .args([
                "--lr",
                "1e-2",
                "--warmup",
                "1",
                "--seed",
                "3",
                "--save-every",
                "2",
            ])
            .args(["--steps", "4", "--output"])
            .arg(out)
            .args(extra);
        c
    };
    let whole = d.path().join("whole");
    run_ok(run(&whole, &[]));
    let load = |p: PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let (before, after) = (
        load(init.join("model.safetensors")),
        load(whole.join("checkpoint/model.safetensors")),
    );
    let max_diff = |k: &str| common::max_abs(&before[k], &after[k]);
    assert!(max_diff("logit_bias") > 1e-4, "the bias is trained");
    assert!(
        max_diff("text_model.head.weight") > 0.0,
        "the text tower learns"
    );
    for k in before.keys().filter(|k| k.starts_with("vision_model.")) {
        assert_eq!(max_diff(k), 0.0, "locked {k} changed");
    }
    // A stop after 2 steps and a resume give the same weights, bias included.
    let split = d.path().join("split");
    run_ok(run(&split, &["--stop-after", "2"]));
    resume_ok(&split);
    assert!(
        weights(&whole) == weights(&split),
        "resumed run ends with the same weights"
    );
    // The checkpoint is a SigLIP model that clasp embeds with.
    let o = run_ok({
        let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
        c.args(["embed", "--model"])
            .arg(whole.join("checkpoint"))
            .args(["--text", "a dog on the grass"]);
        c
    });
    assert!(o.contains("embedding"), "{o}");
}

/// Training starts from open_clip's own layout: its weights reach the
/// variables translated (a step at a negligible learning rate leaves
/// open_clip's embeddings), and the checkpoint is written as a CLIPModel
/// with the translated preprocessor_config.json and the tokenizer files.
#[test]
fn open_clip_checkpoints_train_into_the_hf_layout() {
    use candle_core::Device;
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let fix = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/open_clip");
    let out = d.path().join("run");
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(["train", "--init"])
        .arg(fix.join("tiny-gelu"))
        .arg("--dataset")
        .arg(format!("flickr8k:{}", data.display()))
        .args([
            "--steps",
            "1",
            "--batch-size",
            "8",
            "--lr",
            "1e-12",
            "--output",
        ])
        .arg(&out);
    run_ok(c);
    let ck = out.join("checkpoint");
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "vocab.json",
        "merges.txt",
    ] {
        assert!(ck.join(f).is_file(), "{f}");
    }
    let enc = clasp::Encoder::load(ck.to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(enc.config().model_type(), "clip");
    let exp =
        candle_core::safetensors::load(fix.join("expected.safetensors"), &Device::Cpu).unwrap();
    let img = enc.image_features(&exp["tiny-gelu.pixel_values"]).unwrap();
    let diff = common::max_abs(&img, &exp["tiny-gelu.image_features"]);
    assert!(
        diff < 1e-4,
        "translated weights: image features differ by {diff}"
    );
}
