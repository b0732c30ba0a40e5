//! The reward model against TRL's `RewardTrainer` on one batch
//! (`scripts/gen_reward_fixtures.py`): SmolLM2-135M-Instruct in f32 as a
//! sequence classifier, with a LoRA adapter on v_proj and the score head
//! drawn by the script. The whole conversations' ids equal TRL's; the
//! rewards, the Bradley–Terry loss, the metrics TRL logs and the gradients
//! of the head and the adapter equal TRL's.

mod common;

use common::{close_to as close, u32s as ids};

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use clasp::llm::lora::Lora;
use clasp::llm::{LanguageModel, Precision};
use clasp::train::prefs::{load_prefs, tokenize_pair};
use clasp::train::reward::{bradley_terry, load_head, sequence_rewards};
use serde_json::Value;

const DIR: &str = "tests/fixtures/reward";

#[test]
fn reward_model_equals_trl_on_one_batch() {
    let f: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{DIR}/trl.json")).unwrap()).unwrap();
    let mut lm = LanguageModel::load(&common::smollm2(), Precision::F32, &Device::Cpu).unwrap();
    let set = load_prefs(Path::new("tests/fixtures/dpo/prefs.jsonl")).unwrap();
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for (p, w) in set.pairs.iter().zip(f["ids"].as_array().unwrap()) {
        let t = tokenize_pair(&lm.tokenizer, p).unwrap();
        chosen.push([t.prompt.clone(), t.chosen].concat());
        rejected.push([t.prompt, t.rejected].concat());
        assert_eq!(
            chosen.last().unwrap(),
            &ids(&w["chosen"]),
            "line {}",
            p.line
        );
        assert_eq!(
            rejected.last().unwrap(),
            &ids(&w["rejected"]),
            "line {}",
            p.line
        );
    }
    let dir = Path::new(DIR).join("adapter");
    let (adapter, mut vars) = Lora::load_peft(&dir, lm.model.config(), &Device::Cpu)
        .unwrap()
        .into_vars()
        .unwrap();
    lm.model.set_lora(Some(&adapter)).unwrap();
    let head = Var::from_tensor(&load_head(&dir, 576, &Device::Cpu).unwrap()).unwrap();
    vars.push(("score".into(), head.clone()));
    let embeds = |seqs: &[Vec<u32>]| -> Vec<Tensor> {
        seqs.iter()
            .map(|s| {
                let t = Tensor::new(s.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                lm.model.embed(&t).unwrap().squeeze(0).unwrap()
            })
            .collect()
    };
    let all = sequence_rewards(
        &lm.model,
        &[embeds(&chosen), embeds(&rejected)].concat(),
        head.as_tensor(),
    )
    .unwrap();
    let n = chosen.len();
    let (rc, rr) = (all.narrow(0, 0, n).unwrap(), all.narrow(0, n, n).unwrap());
    for (key, t) in [("chosen", &rc), ("rejected", &rr)] {
        let got: Vec<f32> = t.to_vec1().unwrap();
        for (i, w) in f["rewards"][key].as_array().unwrap().iter().enumerate() {
            close(
                got[i] as f64,
                w.as_f64().unwrap(),
                1e-5,
                &format!("reward {key} {i}"),
            );
        }
    }
    let (loss, s) = bradley_terry(&rc, &rr).unwrap();
    close(s.loss as f64, f["loss"].as_f64().unwrap(), 1e-5, "loss");
    let m = &f["metrics"];
    for (got, key) in [
        (s.accuracy, "accuracy"),
        (s.margin, "margin"),
        (s.min_reward, "min_reward"),
        (s.mean_reward, "mean_reward"),
        (s.max_reward, "max_reward"),
    ] {
        close(got as f64, m[key].as_f64().unwrap(), 1e-5, key);
    }
    let g = loss.backward().unwrap();
    let grads: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), g.get(v.as_tensor()).unwrap().clone()))
        .collect();
    let want =
        candle_core::safetensors::load(format!("{DIR}/grads.safetensors"), &Device::Cpu).unwrap();
    let sq: f64 = grads
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
    close(
        sq.sqrt(),
        want["norm"].to_vec1::<f64>().unwrap()[0],
        1e-4,
        "gradient norm",
    );
    let mut pairs = vec![(
        "score".to_string(),
        "base_model.model.score.weight".to_string(),
    )];
    for layer in [0, 14, 29] {
        for ab in ["lora_A", "lora_B"] {
            pairs.push((
                format!("base_model.model.model.language_model.layers.{layer}.self_attn.v_proj.{ab}.weight"),
                format!("base_model.model.model.layers.{layer}.self_attn.v_proj.{ab}.weight"),
            ));
        }
    }
    for (mine, theirs) in pairs {
        let (a, b) = (&grads[&mine], &want[&theirs]);
        let diff: f32 = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let scale: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(
            scale > 0.0 && diff <= 1e-4 * scale.max(1e-3),
            "{theirs}: {diff} (max |g| {scale})"
        );
    }
}
