//! `clasp train --task reward`, `clasp score` and `clasp caption --best-of`
//! as a user runs them. A VLM reward model trains through the one loop and
//! saves its head beside the checkpoint; `clasp score` rates a conversation
//! exactly as training rated it (the training tokenization and forward, run
//! here through the library); best-of-n keeps the candidate the reward model
//! rates highest, each candidate's reward being `clasp score`'s. A language
//! model's reward adapter is PEFT's SEQ_CLS layout with the head.
//! (tests/reward_parity.rs checks the model against TRL.)

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use serde_json::Value;

fn clasp(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn photo(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/flickr8k/images")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn a_vlm_reward_model_trains_scores_and_picks_the_best_of_n() {
    let d = tempfile::tempdir().unwrap();
    let model = common::assembled(d.path());
    let prefs = d.path().join("prefs.jsonl");
    let line = |img: &str, c: &str, r: &str| {
        serde_json::json!({
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
            "images": [img],
        })
        .to_string()
    };
    let (a, b) = (
        photo("2090545563_a4e66ec76b.jpg"),
        photo("3393035454_2d2370ffd4.jpg"),
    );
    let lines = [
        line(&a, "A dog runs on the grass.", "A cat sleeps on a couch."),
        line(&b, "Children play on a beach.", "Children play with a bus."),
        line(&a, "A brown dog.", "A brown horse."),
        line(&b, "Two kids in the sand.", "Two kids on skis."),
    ];
    std::fs::write(&prefs, lines.join("\n")).unwrap();
    let out = d.path().join("rm");
    let (ok, _, err) = clasp(&[
        "train",
        "--task",
        "reward",
        "--init",
        &model,
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
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let m: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(m.len(), 2);
    for key in ["accuracy", "margin", "mean_reward"] {
        assert!(m[1]["losses"][key].is_number(), "{key}: {}", m[1]);
    }
    let ckpt = out.join("checkpoint");
    assert!(ckpt.join("score.safetensors").is_file());

    // `clasp score` against the training path: the pair tokenized as training
    // tokenizes it, its embeddings as training builds them, the head applied
    // to the last token.
    let answers = ["A dog runs on the grass.", "A cat sleeps on a couch."];
    let (ok, stdout, err) = clasp(&[
        "score",
        "-m",
        ckpt.to_str().unwrap(),
        "--image",
        &a,
        "--answer",
        answers[0],
        "--answer",
        answers[1],
    ]);
    assert!(ok, "{err}");
    let scored: Vec<f64> = serde_json::from_str::<Value>(&stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reward"].as_f64().unwrap())
        .collect();
    let set = clasp::train::prefs::load_prefs(&prefs).unwrap();
    let vlm = clasp::vlm::Vlm::load(&ckpt, &Device::Cpu).unwrap();
    let head =
        clasp::train::reward::load_head_file(&ckpt.join("score.safetensors"), 576, &Device::Cpu)
            .unwrap();
    let t = clasp::train::prefs::tokenize_pair(&vlm.tokenizer, &set.pairs[0]).unwrap();
    let feats = vlm
        .image_features(&vlm.pixels(&[Path::new(&a)]).unwrap())
        .unwrap();
    let seqs: Vec<Tensor> = [&t.chosen, &t.rejected]
        .iter()
        .map(|c| {
            let prompt = vlm
                .input_embeds(&vlm.expand_images(&t.prompt), &feats)
                .unwrap();
            let ids = Tensor::new(c.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let tail = vlm.llm.embed(&ids).unwrap().squeeze(0).unwrap();
            Tensor::cat(&[prompt, tail], 0).unwrap()
        })
        .collect();
    let want: Vec<f32> = clasp::train::reward::sequence_rewards(&vlm.llm, &seqs, &head)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (g, w) in scored.iter().zip(&want) {
        assert!(
            (g - *w as f64).abs() < 1e-4,
            "score {g} against training's {w}"
        );
    }

    // Best of 3 sampled captions: the highest-rated candidate, rated as `clasp score` rates.
    let (ok, stdout, err) = clasp(&[
        "caption",
        "-m",
        &model,
        "--best-of",
        "3",
        "--reward-model",
        ckpt.to_str().unwrap(),
        "--temperature",
        "1.0",
        "--max-tokens",
        "8",
        "--json",
        &b,
    ]);
    assert!(ok, "{err}");
    let rows: Value = serde_json::from_str(&stdout).unwrap();
    let cands = rows[0]["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 3);
    let best = cands
        .iter()
        .max_by(|x, y| {
            x["reward"]
                .as_f64()
                .unwrap()
                .total_cmp(&y["reward"].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(rows[0]["caption"], best["caption"]);
    let texts: Vec<&str> = cands
        .iter()
        .map(|c| c["caption"].as_str().unwrap())
        .collect();
    let mut args = vec!["score", "-m", ckpt.to_str().unwrap(), "--image", &b];
    for t in &texts {
        args.extend(["--answer", t]);
    }
    let (ok, stdout, err) = clasp(&args);
    assert!(ok, "{err}");
    let again: Value = serde_json::from_str(&stdout).unwrap();
    for (c, s) in cands.iter().zip(again.as_array().unwrap()) {
        let (x, y) = (c["reward"].as_f64().unwrap(), s["reward"].as_f64().unwrap());
        assert!((x - y).abs() < 1e-4, "{x} against {y}");
    }
    // Greedy decoding cannot give n different captions: refused.
    let (ok, _, err) = clasp(&[
        "caption",
        "-m",
        &model,
        "--best-of",
        "3",
        "--reward-model",
        ckpt.to_str().unwrap(),
        &b,
    ]);
    assert!(!ok && err.contains("--temperature"), "{err}");
}

#[test]
fn a_language_model_reward_adapter_is_pefts_seq_cls_layout() {
    let d = tempfile::tempdir().unwrap();
    let gguf = common::smollm2();
    let prefs = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dpo/prefs.jsonl");
    let out = d.path().join("rm");
    let (ok, _, err) = clasp(&[
        "train",
        "--task",
        "reward",
        "--llm",
        gguf.to_str().unwrap(),
        "--prefs",
        prefs.to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--lora-targets",
        "v_proj",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let ckpt = out.join("checkpoint");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["score"]));
    let head = clasp::train::reward::load_head(&ckpt, 576, &Device::Cpu).unwrap();
    assert_eq!(head.dims(), [1, 576]);
    // Interrupted after one step and resumed: the same adapter and head.
    let split = d.path().join("split");
    let (ok, _, err) = clasp(&[
        "train",
        "--task",
        "reward",
        "--llm",
        gguf.to_str().unwrap(),
        "--prefs",
        prefs.to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--lora-targets",
        "v_proj",
        "--stop-after",
        "1",
        "--output",
        split.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = clasp(&["train", "--resume", split.to_str().unwrap()]);
    assert!(ok, "{err}");
    let bytes =
        |run: &Path| std::fs::read(run.join("checkpoint/adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&out), bytes(&split));
}
