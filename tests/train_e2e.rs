//! `clasp train` end to end on a small Flickr8k-layout set from ../shared:
//! an interrupted run (by --stop-after, or by Ctrl-C) resumed to the end
//! gives bit-identical weights to an uninterrupted run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/flickr8k")
}

/// 40 train and 16 dev photos with their English captions.
fn small_flickr(dir: &Path) {
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

fn train_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    c.args(["train", "--init", &common::tiny(), "--dataset"])
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
fn fails_with(mut c: Command, needle: &str) {
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(needle), "{err}");
}

fn run_ok(mut c: Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `clasp train --resume DIR`, which must succeed.
fn resume_ok(dir: &Path) {
    let mut resume = Command::new(env!("CARGO_BIN_EXE_clasp"));
    resume.args(["train", "--resume"]).arg(dir);
    run_ok(resume);
}

fn weights(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("checkpoint/model.safetensors")).unwrap()
}

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
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core/tiny-dual-encoder");
    let bert = d.path().join("bert");
    std::fs::create_dir_all(&bert).unwrap();
    let dual =
        candle_core::safetensors::load(fixture.join("model.safetensors"), &Device::Cpu).unwrap();
    let text: HashMap<String, Tensor> = dual
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("text_model.")?.to_string(), v.clone())))
        .collect();
    candle_core::safetensors::save(&text, bert.join("model.safetensors")).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    std::fs::write(bert.join("config.json"), cfg["text_config"].to_string()).unwrap();
    for f in ["vocab.txt", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(f), bert.join(f)).unwrap();
    }
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

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
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
