//! `clasp train --task dpo` as a user runs it: on a vision-language model
//! (pairs with photos) and on SmolLM2 alone. The first step's loss is ln 2
//! (a new adapter: policy and reference agree), metrics.jsonl carries TRL's
//! reward statistics, bad lines and an unreadable photo are named by their
//! line while the rest trains, the saved adapter is the trained one, and a
//! resumed run ends bit-identical to an uninterrupted one.
//! (tests/dpo_parity.rs checks the loss and gradients against TRL.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn clasp(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn photo(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/flickr8k/images")
        .join(name)
}

fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Six pairs about four photos, one of which does not decode, and two bad lines.
fn vlm_prefs(dir: &Path) -> PathBuf {
    let broken = dir.join("broken.jpg");
    std::fs::write(&broken, b"not a jpeg").unwrap();
    let photos = [
        photo("2090545563_a4e66ec76b.jpg"),
        photo("3393035454_2d2370ffd4.jpg"),
        photo("1000268201_693b08cb0e.jpg"),
        broken,
    ];
    let line = |img: &Path, c: &str, r: &str| {
        serde_json::json!({
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
            "images": [img.display().to_string()],
        })
        .to_string()
    };
    let mut lines = vec![
        line(
            &photos[0],
            "A dog runs on the grass.",
            "A cat sleeps on a couch.",
        ),
        line(
            &photos[1],
            "Children play on a beach.",
            "Children play with a bus.",
        ),
        r#"{"prompt": "Q", "chosen": "same", "rejected": "same"}"#.to_string(),
        line(
            &photos[2],
            "A girl climbs the stairs.",
            "A girl climbs into a car.",
        ),
        line(&photos[3], "A man.", "A man with a dog."),
        r#"{"prompt": "no chosen"}"#.to_string(),
        line(&photos[0], "A brown dog.", "A brown horse."),
        line(&photos[1], "Two kids in the sand.", "Two kids on skis."),
    ];
    lines.push(String::new());
    let p = dir.join("prefs.jsonl");
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}

#[test]
fn dpo_on_a_vision_language_model_trains_past_bad_lines_and_resumes_identically() {
    let d = tempfile::tempdir().unwrap();
    let model = common::assembled(d.path());
    let prefs = vlm_prefs(d.path());
    let run = |out: &Path, stop: Option<&str>| {
        let mut args = vec![
            "train",
            "--task",
            "dpo",
            "--init",
            &model,
            "--prefs",
            prefs.to_str().unwrap(),
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--lr",
            "1e-3",
            "--lora-rank",
            "4",
            "--save-every",
            "2",
            "--output",
            out.to_str().unwrap(),
        ];
        if let Some(s) = stop {
            args.extend(["--stop-after", s]);
        }
        clasp(&args)
    };
    let whole = d.path().join("whole");
    let (ok, err) = run(&whole, None);
    assert!(ok, "{err}");
    // Both bad lines are named; the rest trained.
    assert!(
        err.contains("prefs.jsonl:3") && err.contains("`chosen` equals `rejected`"),
        "{err}"
    );
    assert!(
        err.contains("prefs.jsonl:6") && err.contains("no `chosen`"),
        "{err}"
    );
    let m = metrics(&whole);
    assert_eq!(m.len(), 4);
    assert!(
        (m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        m[0]
    );
    for key in [
        "rewards/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "logps/rejected",
    ] {
        assert!(m[3]["losses"][key].is_number(), "{key}: {}", m[3]);
    }
    assert!(m[3]["losses"]["rewards/margins"].as_f64().unwrap() != 0.0);
    // The photo that does not decode is skipped where it falls, named by its line.
    let skipped: Vec<&str> = m
        .iter()
        .flat_map(|r| r["skipped"].as_array().into_iter().flatten())
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(
        skipped.iter().all(|s| s.contains("prefs.jsonl:5")),
        "{skipped:?}"
    );

    // Interrupted after 2 steps and resumed: the same adapter as the whole run.
    let split = d.path().join("split");
    assert!(run(&split, Some("2")).0);
    let (ok, err) = clasp(&["train", "--resume", split.to_str().unwrap()]);
    assert!(ok, "{err}");
    let adapter =
        |run: &Path| std::fs::read(run.join("checkpoint/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&whole), adapter(&split));
    // The saved model is a VLM with the trained adapter on its language model.
    let vlm = clasp::vlm::Vlm::load(&whole.join("checkpoint"), &candle_core::Device::Cpu).unwrap();
    let lora = vlm.llm.lora().expect("an adapter");
    let b = lora
        .peft_tensors()
        .into_iter()
        .find(|(n, _)| n.contains("lora_B"))
        .unwrap()
        .1;
    let moved: f32 = b.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(moved > 0.0, "the adapter's B is still zero");
}

#[test]
fn dpo_on_a_language_model_saves_a_peft_adapter_for_llamaforcausallm() {
    let d = tempfile::tempdir().unwrap();
    let gguf = common::smollm2();
    let prefs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dpo/prefs.jsonl");
    let out = d.path().join("run");
    let (ok, err) = clasp(&[
        "train",
        "--task",
        "dpo",
        "--llm",
        gguf.to_str().unwrap(),
        "--prefs",
        prefs.to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--lora-rank",
        "4",
        "--lora-targets",
        "v_proj,o_proj",
        "--pref-loss",
        "ipo",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let m = metrics(&out);
    // IPO with a new adapter: (0 − 1/(2β))² = 25 at β 0.1.
    assert!(
        (m[0]["loss"].as_f64().unwrap() - 25.0).abs() < 1e-4,
        "{}",
        m[0]
    );
    let ckpt = out.join("checkpoint");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    let t = candle_core::safetensors::load(
        ckpt.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(
        t.keys()
            .all(|k| k.starts_with("base_model.model.model.layers.")),
        "{:?}",
        t.keys()
    );
    assert_eq!(t.len(), 30 * 2 * 2);
    // A bare language model is refused a pair with an image, by line.
    let bad = d.path().join("bad.jsonl");
    let img = photo("2090545563_a4e66ec76b.jpg");
    let lines: Vec<String> = (0..3)
        .map(|i| {
            serde_json::json!({"prompt": format!("Q{i}"), "chosen": "yes", "rejected": "no",
                               "images": if i == 1 { vec![img.display().to_string()] } else { vec![] }})
            .to_string()
        })
        .collect();
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let (ok, err) = clasp(&[
        "train",
        "--task",
        "dpo",
        "--llm",
        gguf.to_str().unwrap(),
        "--prefs",
        bad.to_str().unwrap(),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--output",
        d.path().join("run2").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("bad.jsonl:2") && err.contains("1 image(s) for a language model"),
        "{err}"
    );
}
