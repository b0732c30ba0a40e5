//! The vision-language model's training and checkpoint layout against transformers and PEFT:
//! the answer loss and connector gradients, the resampler, stage 2's LoRA adapter with BCIF,
//! and the processor's chat template on a saved folder.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use clasp::vlm::{ConnectorKind, Vlm};
use serde_json::Value;
mod vlm_util;

use vlm_util::*;

/// Stage 1's loss and the connector's gradient equal transformers' (the
/// same batch of two, right-padded, English and Chinese captions): the LM
/// loss counts the answer tokens only, and the gradient reaches the
/// connector through the frozen f32 language model.
#[test]
fn answer_loss_and_connector_gradients_equal_transformers() {
    use clasp::train::vlm::{answer_loss, Example};
    let m = vlm();
    let f = fixture();
    let case = &f["lm_loss"];
    let mut examples = Vec::new();
    let mut pixels = Vec::new();
    for r in case["rows"].as_array().unwrap() {
        let lang = clasp::data::Lang::parse(r["lang"].as_str().unwrap()).unwrap();
        let e = Example::caption(m, lang, r["caption"].as_str().unwrap(), 48).unwrap();
        let ids: Vec<u32> = [e.prompt.clone(), e.answer.clone()].concat();
        assert_eq!(ids, u32s(&r["ids"]), "token ids of {}", r["caption"]);
        assert_eq!(e.answer.len() as u64, r["answer_len"].as_u64().unwrap());
        pixels.extend(f32s(&f["pixel_values"][r["image"].as_str().unwrap()]));
        examples.push(e);
    }
    let px = candle_core::Tensor::from_vec(pixels, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let loss = {
        let _g = clasp::model::grad_mode_guard(true);
        answer_loss(m, &examples, &m.image_features(&px).unwrap()).unwrap()
    };
    let lv = loss.to_scalar::<f32>().unwrap() as f64;
    let want = case["loss"].as_f64().unwrap();
    assert!(
        (lv - want).abs() < 1e-4,
        "loss {lv} vs transformers' {want}"
    );
    let grads = loss.backward().unwrap();
    let grad = |name: &str| -> Vec<Vec<f32>> {
        let v = m
            .connector
            .vars()
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .clone();
        let g = grads.get(v.as_tensor()).expect("a gradient").clone();
        match g.rank() {
            1 => vec![g.to_vec1().unwrap()],
            _ => g.to_vec2().unwrap(),
        }
    };
    let close = |got: &[f32], want: &Value, what: &str| {
        let want = f32s(want);
        let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * scale.max(1e-3) + 1e-6,
                "{what}[{i}]: {a} vs transformers' {b}"
            );
        }
    };
    close(
        &grad("linear_1.bias")[0],
        &case["grad_linear_1_bias"],
        "linear_1.bias",
    );
    close(
        &grad("linear_2.bias")[0],
        &case["grad_linear_2_bias"],
        "linear_2.bias",
    );
    let w1 = grad("linear_1.weight");
    for r in 0..4 {
        close(
            &w1[r],
            &case["grad_linear_1_weight_rows"][r],
            "linear_1.weight",
        );
    }
    let w2 = grad("linear_2.weight");
    for r in 0..4 {
        close(
            &w2[r][..64],
            &case["grad_linear_2_weight_block"][r],
            "linear_2.weight",
        );
    }
    for (name, want) in case["grad_norms"].as_object().unwrap() {
        let g = grad(name);
        let norm = g
            .iter()
            .flatten()
            .map(|x| (*x as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let w = want.as_f64().unwrap();
        assert!(
            (norm - w).abs() <= 1e-4 * w,
            "{name}: gradient norm {norm} vs {w}"
        );
    }
}

/// The resampler variant: N image tokens whatever the patch count, saved in
/// the same layout with its sizes in `clasp_connector`, loaded back to the
/// same logits, and trainable (the LM loss's gradient reaches its queries
/// through the frozen language model).
#[test]
fn the_resampler_round_trips_and_its_queries_get_a_gradient() {
    let kind = ConnectorKind::Resampler {
        queries: 4,
        layers: 1,
        heads: 4,
    };
    round_trip_and_gradient(kind, "resampler", "resampler.queries");
}

/// The same for BLIP-2's Q-Former as the connector: its query tokens and
/// every layer learn through the frozen language model.
#[test]
fn the_qformer_connector_round_trips_and_its_queries_get_a_gradient() {
    let kind = ConnectorKind::qformer(4, 1, 2);
    round_trip_and_gradient(kind, "qformer", "query_tokens");
}

fn round_trip_and_gradient(kind: ConnectorKind, type_name: &str, queries: &str) {
    let m = Vlm::assemble(
        &fixtures().join("vision"),
        &common::smollm2(),
        kind,
        -2,
        7,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(m.image_tokens(), 4);
    let ids = m.chat_prompt("<image>\nDescribe the image.", 1).unwrap();
    assert_eq!(
        ids.iter()
            .filter(|&&i| i == m.cfg.image_token_index)
            .count(),
        4
    );
    let img = shared_image("2090545563_a4e66ec76b.jpg");
    let px = m.pixels(&[img.as_path()]).unwrap();
    let d = tempfile::tempdir().unwrap();
    m.save(d.path()).unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["clasp_connector"]["type"], type_name);
    assert_eq!(cfg["clasp_connector"]["queries"], 4);
    let back = Vlm::load(d.path(), &Device::Cpu).unwrap();
    assert_eq!(back.cfg.connector, kind);
    let a: Vec<Vec<f32>> = m.logits(&ids, &px).unwrap().to_vec2().unwrap();
    let b: Vec<Vec<f32>> = back.logits(&ids, &px).unwrap().to_vec2().unwrap();
    // Equal up to float rounding: the loaded language model runs the
    // rotary halves where the GGUF ran its interleaved layout (logits of
    // about 20 differ by ~1e-4 = 5e-6 relative).
    for (ra, rb) in a.iter().zip(&b) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() < 1e-3, "{x} vs {y}");
        }
    }
    let e = clasp::train::vlm::Example::caption(&m, clasp::data::Lang::En, "A dog .", 8).unwrap();
    let loss = {
        let _g = clasp::model::grad_mode_guard(true);
        clasp::train::vlm::answer_loss(&m, &[e], &m.image_features(&px).unwrap()).unwrap()
    };
    let grads = loss.backward().unwrap();
    let q = &m
        .connector
        .vars()
        .iter()
        .find(|(n, _)| n == queries)
        .unwrap()
        .1;
    let g: Vec<f32> = grads
        .get(q.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(g.iter().any(|x| *x != 0.0));
    // Every parameter of the connector is reached.
    for (name, v) in m.connector.vars() {
        assert!(grads.get(v.as_tensor()).is_some(), "{name}: no gradient");
    }
}

/// A stage-2 BCIF run (LoRA, lm + infonce + geometric under the bcif
/// schedule, the probe every step): it logs each part, λ and the gradient
/// cosine; stopped and resumed it ends bit-identical; its adapter, saved in
/// PEFT's layout beside the weights, gives the logits transformers + PEFT
/// give (fixture: scripts/gen_lora_fixtures.py, which runs the same seeded
/// `clasp train`); merged into the weights it gives them again, and the
/// merged model saves without an adapter.
#[test]
fn stage2_bcif_run_resumes_exactly_and_its_lora_adapter_equals_peft_merged_or_not() {
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("lora_logits.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vlm = common::assembled(dir.path());
    let run = dir.path().join("run");
    let dataset = format!(
        "flickr8k:{}",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/flickr8k")
            .display()
    );
    let train: Vec<String> = f["train_args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(["train", "--init", &vlm, "--dataset", &dataset])
        .args(&train)
        .args(["--output", run.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = run.join("checkpoint");
    // The run was BCIF's: each step logs its parts, λ and the probe.
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    for line in log.lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        for k in ["lm", "infonce", "geometric", "lambda"] {
            assert!(r["losses"][k].is_number(), "{k} in {r}");
        }
        let cos = r["grad_conflict"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&cos));
    }
    assert!(run.join("grad_conflict.png").is_file());
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "contrastive_heads.safetensors",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} beside the weights");
    }
    // Stopped after one step and resumed, the run ends with the same adapter
    // and connector, bit for bit.
    let split = dir.path().join("split");
    let clasp = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_clasp"))
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let mut first = vec!["train", "--init", &vlm, "--dataset", &dataset];
    first.extend(train.iter().map(String::as_str));
    first.extend(["--output", split.to_str().unwrap(), "--stop-after", "1"]);
    clasp(&first);
    clasp(&["train", "--resume", split.to_str().unwrap()]);
    let tensors = |d: &Path, f: &str| {
        candle_core::safetensors::load(d.join("checkpoint").join(f), &Device::Cpu).unwrap()
    };
    for f in [
        "adapter_model.safetensors",
        "model.safetensors",
        "contrastive_heads.safetensors",
    ] {
        let (a, b) = (tensors(&run, f), tensors(&split, f));
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            let same = t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == b[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(same, "{f}: {k} differs after resuming");
        }
    }
    // `clasp eval caption` measures the trained heads' retrieval: with 4
    // photos every caption's photo is within the top 10, and R@1 is a rate.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args([
            "eval",
            "caption",
            "-m",
            ckpt.to_str().unwrap(),
            "-d",
            &dataset,
        ])
        .args([
            "--split",
            "dev",
            "--limit",
            "4",
            "--max-tokens",
            "4",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ev: Value = serde_json::from_slice(&o.stdout).unwrap();
    let h = &ev["heads_retrieval"];
    assert_eq!(h["image_retrieval_recall@10"], 1.0, "{h}");
    assert_eq!(h["text_retrieval_recall@10"], 1.0, "{h}");
    let r1 = h["image_retrieval_recall@1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&r1));
    let mut m = Vlm::load(&ckpt, &Device::Cpu).unwrap();
    let lora = m.llm.lora().expect("the adapter is loaded");
    assert_eq!(lora.cfg.rank, 4);
    assert_eq!(lora.cfg.targets.len(), 7);
    let ids = m.chat_prompt(f["user"].as_str().unwrap(), 1).unwrap();
    assert_eq!(ids, u32s(&f["input_ids"]));
    let px = candle_core::Tensor::from_vec(f32s(&f["pixel_values"]), (1, 3, 32, 32), &Device::Cpu)
        .unwrap();
    let adapted: Vec<Vec<f32>> = m.logits(&ids, &px).unwrap().to_vec2().unwrap();
    let worst = check_logits("with the adapter", &adapted, &f);
    eprintln!(
        "LoRA logits against PEFT: largest difference {worst:.2e} (the adapter moves them by up to {:.2})",
        f["adapter_effect"]
    );
    assert!(f["adapter_effect"].as_f64().unwrap() > 0.1);

    m.llm.merge_lora().unwrap();
    assert!(m.llm.lora().is_none());
    let merged: Vec<Vec<f32>> = m.logits(&ids, &px).unwrap().to_vec2().unwrap();
    check_logits("merged", &merged, &f);
    let out = dir.path().join("merged");
    m.save(&out).unwrap();
    assert!(!out.join("adapter_config.json").exists());
    let back = Vlm::load(&out, &Device::Cpu).unwrap();
    assert!(back.llm.lora().is_none());
    let reloaded: Vec<Vec<f32>> = back.logits(&ids, &px).unwrap().to_vec2().unwrap();
    check_logits("merged, saved and loaded", &reloaded, &f);
}

/// BCIF's branch on the real generative loss: the step's gradient, mixed
/// from the two losses' separate gradients with λ and 1 − λ, equals the
/// gradient of λ·contrastive + (1 − λ)·LM taken at once; the schedule's λ
/// is BCIF's; the text side reaches only its head when the language model
/// is frozen.
#[test]
fn bcif_mixes_the_contrastive_and_lm_gradients_as_one_weighted_loss() {
    use clasp::train::bcif::{mix_grads, Branch};
    use clasp::train::config::TrainConfig;
    use clasp::train::vlm::{answer_loss, Example};
    let m = vlm();
    let cfg = TrainConfig {
        objective: "lm,infonce:1,geometric:0.5".into(),
        schedule: Some("bcif".into()),
        contrastive_dim: 32,
        ..Default::default()
    };
    let b = Branch::from_config(&cfg, m.llm.config().hidden_size, &Device::Cpu)
        .unwrap()
        .unwrap();
    // λ: 1 through the warm-up, 0.6 at 30%, 0.2 from half-way.
    for (p, lambda) in [(0.05, 1.0), (0.3, 0.6), (0.8, 0.2)] {
        let (wl, wc) = b.weights(p);
        assert!((wc - lambda).abs() < 1e-12 && (wl - (1.0 - lambda)).abs() < 1e-12);
    }
    let imgs: Vec<PathBuf> = ["2090545563_a4e66ec76b.jpg", "3393035454_2d2370ffd4.jpg"]
        .iter()
        .map(|n| shared_image(n))
        .collect();
    let refs: Vec<&Path> = imgs.iter().map(PathBuf::as_path).collect();
    let px = m.pixels(&refs).unwrap();
    let caps = [
        "A dog runs across the grass .",
        "Two children play on a beach .",
    ];
    let ex: Vec<Example> = caps
        .iter()
        .map(|c| Example::caption(m, clasp::data::Lang::En, c, 48).unwrap())
        .collect();
    let captions: Vec<Vec<u32>> = ex
        .iter()
        .map(|e| e.answer[..e.answer.len() - 1].to_vec())
        .collect();
    let _g = clasp::model::grad_mode_guard(true);
    let images = m.image_features(&px).unwrap();
    let lm = answer_loss(m, &ex, &images).unwrap();
    let (fi, ft) = (
        b.image_features(&images).unwrap(),
        b.text_features(m, &captions, false).unwrap(),
    );
    let c = b.losses(&fi, &ft, 0.3).unwrap().contrastive;
    let (wl, wc) = b.weights(0.3);
    let mut vars: Vec<(String, candle_core::Var)> = m
        .connector
        .vars()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    vars.extend(b.vars());
    let mut mixed = lm.backward().unwrap();
    let gc = c.backward().unwrap();
    mix_grads(&vars, &mut mixed, wl, &gc, wc).unwrap();
    let total = ((&lm * wl).unwrap() + (&c * wc).unwrap()).unwrap();
    let direct = total.backward().unwrap();
    for (name, v) in &vars {
        let flat = |g: &candle_core::backprop::GradStore| -> Vec<f32> {
            g.get(v.as_tensor())
                .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
                .unwrap_or_default()
        };
        let (a, d) = (flat(&mixed), flat(&direct));
        assert_eq!(a.len(), d.len(), "{name}");
        let scale = d.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        for (x, y) in a.iter().zip(&d) {
            assert!((x - y).abs() <= 1e-4 * scale, "{name}: {x} vs {y}");
        }
    }
    // The text head gets a gradient from the contrastive loss; the frozen
    // language model's text pass adds nothing else (no LoRA here).
    let text_head = &b.vars()[1].1;
    assert!(gc.get(text_head.as_tensor()).is_some());
    assert!(direct.get(text_head.as_tensor()).is_some());
}

/// A folder clasp saves carries a processor chat template that renders the
/// standard multimodal message form (`"content": [{"type": "image"},
/// {"type": "text", ...}]`). transformers' LlavaProcessor, on a folder clasp
/// saved, rendered three conversations in that form and expanded the image
/// (scripts/gen_processor_chat_fixture.py): the template this build saves
/// renders the same text (minijinja, set up as transformers sets up jinja2),
/// and clasp's own prompt for the same turns has the processor's ids.
#[test]
fn the_saved_processor_template_renders_multimodal_messages_to_clasps_prompt_ids() {
    use clasp::vlm::{Part, Turn};
    let m = vlm();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("vlm");
    m.save(&dir).unwrap();
    let template = std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap();
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_template("chat", &template).unwrap();
    // The tokenizer keeps the language model's own, text-only template.
    let tok_cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        tok_cfg["chat_template"].as_str(),
        m.tokenizer.chat_template()
    );
    let fx: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("processor_chat.json")).unwrap(),
    )
    .unwrap();
    let img = clasp::preprocess::load_image(&shared_image("2090545563_a4e66ec76b.jpg")).unwrap();
    let pixels = m.image_processor().process_pixels(&img).unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        let rendered = env
            .get_template("chat")
            .unwrap()
            .render(minijinja::context! {
                messages => &c["conversation"],
                add_generation_prompt => true,
            })
            .unwrap();
        assert_eq!(rendered, c["text"].as_str().unwrap(), "{}", c["name"]);
        let turns: Vec<Turn> = c["conversation"]
            .as_array()
            .unwrap()
            .iter()
            .map(|msg| Turn {
                role: msg["role"].as_str().unwrap().into(),
                parts: msg["content"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| match p["type"].as_str().unwrap() {
                        "image" => Part::Image(pixels.clone()),
                        _ => Part::Text(p["text"].as_str().unwrap().into()),
                    })
                    .collect(),
            })
            .collect();
        let prompt = m.conversation_prompt(&turns).unwrap();
        let want: Vec<u32> = c["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(prompt.ids, want, "{}", c["name"]);
    }
}
