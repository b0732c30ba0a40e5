//! DPO against TRL's `DPOTrainer` on one batch (`scripts/gen_dpo_fixtures.py`):
//! SmolLM2-135M-Instruct in f32 with a LoRA adapter (rank 2 on v_proj, drawn
//! by the script), the reference being the model with its adapter disabled.
//! The pairs' token ids equal TRL's; per loss type (sigmoid, hinge, ipo,
//! robust with label smoothing 0.1) the loss and the logged rewards and
//! log-probabilities equal TRL's, and so do the adapter's gradients; the
//! same for a clasp VLM, each pair's photo entering policy and reference.

mod common;

use common::{close_to as close, u32s as ids};

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use clasp::llm::lora::Lora;
use clasp::llm::{LanguageModel, Precision};
use clasp::train::dpo::{completion_logps, DpoLoss, PairLogps, PrefLoss};
use clasp::train::prefs::{load_prefs, tokenize_pair, PairIds};
use serde_json::Value;

const DIR: &str = "tests/fixtures/dpo";

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/trl.json")).unwrap()).unwrap()
}

#[test]
fn dpo_equals_trl_on_one_batch() {
    let f = fixture();
    let mut lm = LanguageModel::load(&common::smollm2(), Precision::F32, &Device::Cpu).unwrap();
    // Tokenized as TRL tokenizes the conversational pairs.
    let set = load_prefs(std::path::Path::new(&format!("{DIR}/prefs.jsonl"))).unwrap();
    assert!(set.issues.is_empty());
    let pairs: Vec<PairIds> = set
        .pairs
        .iter()
        .map(|p| tokenize_pair(&lm.tokenizer, p).unwrap())
        .collect();
    for (i, (p, w)) in pairs.iter().zip(f["ids"].as_array().unwrap()).enumerate() {
        assert_eq!(p.prompt, ids(&w["prompt"]), "pair {i} prompt");
        assert_eq!(p.chosen, ids(&w["chosen"]), "pair {i} chosen");
        assert_eq!(p.rejected, ids(&w["rejected"]), "pair {i} rejected");
    }

    let adapter = Lora::load_peft(
        std::path::Path::new(&format!("{DIR}/adapter")),
        lm.model.config(),
        &Device::Cpu,
    )
    .unwrap();
    let (adapter, vars) = adapter.into_vars().unwrap();
    let logps = |lm: &LanguageModel| -> PairLogps {
        let prefixes: Vec<Tensor> = pairs
            .iter()
            .map(|p| {
                let t = Tensor::new(p.prompt.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                lm.model.embed(&t).unwrap().squeeze(0).unwrap()
            })
            .collect();
        let c: Vec<&[u32]> = pairs.iter().map(|p| p.chosen.as_slice()).collect();
        let r: Vec<&[u32]> = pairs.iter().map(|p| p.rejected.as_slice()).collect();
        PairLogps {
            chosen: completion_logps(&lm.model, &prefixes, &c).unwrap(),
            rejected: completion_logps(&lm.model, &prefixes, &r).unwrap(),
            chosen_len: pairs.iter().map(|p| p.chosen.len()).collect(),
            rejected_len: pairs.iter().map(|p| p.rejected.len()).collect(),
        }
    };
    let reference = logps(&lm);
    lm.model.set_lora(Some(&adapter)).unwrap();
    let policy = logps(&lm);
    for (side, got) in [("policy", &policy), ("reference", &reference)] {
        for (key, t) in [("chosen", &got.chosen), ("rejected", &got.rejected)] {
            let g: Vec<f32> = t.to_vec1().unwrap();
            for (i, w) in f[side][key].as_array().unwrap().iter().enumerate() {
                close(
                    g[i] as f64,
                    w.as_f64().unwrap(),
                    1e-5,
                    &format!("{side} {key} {i}"),
                );
            }
        }
    }
    // The policy's adapter changes the log-probs (else this checks nothing).
    let moved: f32 = (&policy.chosen - &reference.chosen)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(moved > 0.1, "{moved}");

    check_losses(
        &f,
        DIR,
        &policy,
        &reference,
        &vars,
        "model.language_model.layers",
        "model.layers",
    );
}

/// Each loss of the fixture against clasp's on the same log-probs: the loss,
/// TRL's logged means, and the adapter's gradients (layers 0, 14, 29; the
/// fixture names with `theirs` where clasp's have `mine`).
fn check_losses(
    f: &Value,
    dir: &str,
    policy: &PairLogps,
    reference: &PairLogps,
    vars: &[(String, candle_core::Var)],
    mine: &str,
    theirs: &str,
) {
    let grads =
        candle_core::safetensors::load(format!("{dir}/grads.safetensors"), &Device::Cpu).unwrap();
    for (name, want) in f["losses"].as_object().unwrap() {
        let cfg = DpoLoss {
            beta: 0.1,
            loss: PrefLoss::parse(name).unwrap(),
            label_smoothing: want["label_smoothing"].as_f64().unwrap_or(0.0),
        };
        let (loss, stats) = cfg.loss(policy, reference).unwrap();
        close(
            stats.loss as f64,
            want["loss"].as_f64().unwrap(),
            1e-5,
            &format!("{name} loss"),
        );
        for (got, key) in [
            (stats.rewards_chosen, "rewards/chosen"),
            (stats.rewards_rejected, "rewards/rejected"),
            (stats.rewards_margin, "rewards/margins"),
            (stats.rewards_accuracy, "rewards/accuracies"),
            (stats.logps_chosen, "logps/chosen"),
            (stats.logps_rejected, "logps/rejected"),
        ] {
            close(
                got as f64,
                want[key].as_f64().unwrap(),
                1e-5,
                &format!("{name} {key}"),
            );
        }
        let g = loss.backward().unwrap();
        let by_name: HashMap<&str, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.as_str(), g.get(v.as_tensor()).unwrap().clone()))
            .collect();
        let sq: f64 = by_name
            .values()
            .map(|t| {
                t.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            })
            .sum();
        let norm = grads[&format!("{name}/norm")].to_vec1::<f64>().unwrap()[0];
        close(sq.sqrt(), norm, 1e-4, &format!("{name} gradient norm"));
        for layer in [0, 14, 29] {
            for ab in ["lora_A", "lora_B"] {
                let key = format!(
                    "base_model.model.model.language_model.layers.{layer}.self_attn.v_proj.{ab}.weight"
                );
                let m = &by_name[key.as_str()];
                let t = &grads[&format!("{name}/{}", key.replace(mine, theirs))];
                let diff: f32 = (m - t)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                let scale: f32 = t.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(
                    scale > 0.0 && diff <= 1e-4 * scale.max(1e-3),
                    "{name} layer {layer} {ab}: {diff} (max |g| {scale})"
                );
            }
        }
    }
}

/// The same on a clasp VLM (`scripts/gen_dpo_vlm_fixtures.py`): TRL's
/// DPOTrainer on the Llava that `clasp assemble` makes, each pair's photo in
/// policy and reference alike; the prompt ids (the image token expanded) and
/// completion ids equal the batch TRL's vision collator builds.
#[test]
fn dpo_on_a_vlm_equals_trl_on_one_batch() {
    const VDIR: &str = "tests/fixtures/dpo/vlm";
    let f: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{VDIR}/trl.json")).unwrap())
            .unwrap();
    let d = tempfile::tempdir().unwrap();
    let mut vlm =
        clasp::vlm::Vlm::load(Path::new(&common::assembled(d.path())), &Device::Cpu).unwrap();
    let set = load_prefs(&Path::new(VDIR).join("prefs.jsonl")).unwrap();
    assert!(set.issues.is_empty(), "{:?}", set.issues);
    let (mut prefixes, mut pairs) = (Vec::new(), Vec::new());
    let fx =
        candle_core::safetensors::load(format!("{VDIR}/grads.safetensors"), &Device::Cpu).unwrap();
    let pixels = fx["pixel_values"].clone();
    // The same photos as the file names (the processor's copy of each).
    let own = vlm.pixels(&[set.pairs[0].images[0].as_path()]).unwrap();
    let gap: f32 = (own - pixels.narrow(0, 0, 1).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        gap < 0.05,
        "pair 1's photo differs from the processor's by {gap}"
    );
    for (p, w) in set.pairs.iter().zip(f["ids"].as_array().unwrap()) {
        let mut t = tokenize_pair(&vlm.tokenizer, p).unwrap();
        t.prompt = vlm.expand_images(&t.prompt);
        assert_eq!(t.prompt, ids(&w["prompt"]), "line {} prompt", p.line);
        assert_eq!(t.chosen, ids(&w["chosen"]), "line {} chosen", p.line);
        assert_eq!(t.rejected, ids(&w["rejected"]), "line {} rejected", p.line);
        // The processor's pixels (decoding and resizing are bounded in
        // tests/vlm.rs; here the DPO itself is compared).
        let k = prefixes.len();
        let px = pixels.narrow(0, k, 1).unwrap();
        let feats = vlm.image_features(&px).unwrap();
        prefixes.push(vlm.input_embeds(&t.prompt, &feats).unwrap());
        pairs.push(t);
    }
    let dir = Path::new(VDIR).join("adapter");
    let (adapter, vars) = Lora::load_peft(&dir, vlm.llm.config(), &Device::Cpu)
        .unwrap()
        .into_vars()
        .unwrap();
    let logps = |llm: &clasp::llm::Llama| -> PairLogps {
        let c: Vec<&[u32]> = pairs.iter().map(|p| p.chosen.as_slice()).collect();
        let r: Vec<&[u32]> = pairs.iter().map(|p| p.rejected.as_slice()).collect();
        PairLogps {
            chosen: completion_logps(llm, &prefixes, &c).unwrap(),
            rejected: completion_logps(llm, &prefixes, &r).unwrap(),
            chosen_len: pairs.iter().map(|p| p.chosen.len()).collect(),
            rejected_len: pairs.iter().map(|p| p.rejected.len()).collect(),
        }
    };
    let reference = logps(&vlm.llm);
    vlm.llm.set_lora(Some(&adapter)).unwrap();
    let policy = logps(&vlm.llm);
    check_losses(&f, VDIR, &policy, &reference, &vars, "x", "x");
}
