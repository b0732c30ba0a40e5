//! BLIP-2 as a vision-language model against transformers'
//! `Blip2ForConditionalGeneration` on the folder clasp saves (fixtures:
//! scripts/gen_blip2_vlm_fixtures.py, which runs `clasp assemble` on the
//! scaled-down BLIP-2 of tests/fixtures/blip2/small and SmolLM2, then
//! transformers on the saved folder).

mod common;
mod vlm_util;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use clasp::vlm::{ConnectorKind, Vlm};
use common::max_abs;
use serde_json::Value;
use vlm_util::{check_logits, u32s};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blip2")
}

fn photo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(rel)
}

/// The model the fixture generator assembled: the small BLIP-2's ViT and
/// Q-Former, SmolLM2, a fresh projection from seed 0.
fn vlm() -> &'static Vlm {
    static M: OnceLock<Vlm> = OnceLock::new();
    M.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        common::blip2_small_folder(d.path());
        // The folder gives the Q-Former's sizes; the kind only asks for one.
        Vlm::assemble(
            d.path(),
            &common::smollm2(),
            ConnectorKind::qformer(32, 1, 12),
            -2,
            0,
            &Device::Cpu,
        )
        .unwrap()
    })
}

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("generation.json")).unwrap())
        .unwrap()
}

/// Prompt ids equal `Blip2Processor`'s (the 8 image tokens before the
/// chat-rendered text), query outputs and projected image features equal
/// the Q-Former's within 1e-4 on a lossless photo, and the language model's
/// logits equal transformers' to 1e-3 (every position's argmax, 64 fixed
/// and the top 16 ids at the last 16 positions).
#[test]
fn prompts_queries_and_logits_equal_transformers_blip2_on_the_saved_folder() {
    let m = vlm();
    let f = fixture();
    assert!(m.blip2_vision().is_some());
    assert_eq!(
        m.image_tokens() as u64,
        f["num_query_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        m.cfg.image_token_index as u64,
        f["image_token_index"].as_u64().unwrap()
    );
    let (exp, _) = common::expected_with_meta(&fixtures().join("generation.safetensors"));
    let mut worst = 0f32;
    for (i, c) in f["cases"].as_array().unwrap().iter().enumerate() {
        let rel = c["photo"].as_str().unwrap();
        let name = format!("{rel} / {}", c["user"]);
        let user = Vlm::caption_turn(c["user"].as_str().unwrap());
        let ids = m.chat_prompt(&user, 1).unwrap();
        assert_eq!(ids, u32s(&c["input_ids"]), "{name}: input ids");
        let pixels = m.pixels(&[photo(rel).as_path()]).unwrap();
        let means: Vec<f32> = pixels
            .mean((2, 3))
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let lossless = rel.ends_with(".png");
        for (a, b) in means.iter().zip(vlm_util::f32s(&c["pixel_means"])) {
            // JPEG decoders differ by IDCT rounding (see core_parity).
            let bound = if lossless { 1e-5 } else { 2e-3 };
            assert!((a - b).abs() <= bound, "{name}: pixel mean {a} vs {b}");
        }
        if i % 2 == 0 {
            let k = i / 2;
            let patches = m.patch_features(&pixels).unwrap();
            let q = m
                .connector
                .query_outputs(&patches)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let feats = m.image_features(&pixels).unwrap().squeeze(0).unwrap();
            let dq = max_abs(&q, &exp[&format!("query_output.{k}")]);
            let df = max_abs(&feats, &exp[&format!("image_features.{k}")]);
            eprintln!("{name}: query outputs within {dq:.2e}, image features within {df:.2e}");
            if lossless {
                assert!(dq < 1e-4 && df < 1e-4, "{name}: {dq} {df}");
            } else {
                assert!(dq < 2e-2 && df < 2e-2, "{name}: {dq} {df}");
            }
        }
        if lossless {
            let logits: Vec<Vec<f32>> = m.logits(&ids, &pixels).unwrap().to_vec2().unwrap();
            worst = worst.max(check_logits(&name, &logits, c));
        }
    }
    eprintln!("largest logit difference against transformers: {worst:.2e}");
}

/// What clasp saves is a `Blip2ForConditionalGeneration` folder (BLIP-2's
/// names, `Blip2Processor`'s files), which clasp loads back to the same
/// prompts and logits; a retrieval folder is not taken for one.
#[test]
fn a_saved_blip2_vlm_is_blip2s_layout_and_loads_back_to_the_same_logits() {
    let m = vlm();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("blip2-smollm2");
    m.save(&dir).unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "blip-2");
    assert_eq!(cfg["architectures"][0], "Blip2ForConditionalGeneration");
    assert_eq!(cfg["qformer_config"]["cross_attention_frequency"], 2);
    assert_eq!(cfg["text_config"]["model_type"], "llama");
    let proc: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("processor_config.json")).unwrap())
            .unwrap();
    assert_eq!(proc["processor_class"], "Blip2Processor");
    assert_eq!(proc["num_query_tokens"], 8);
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    for k in [
        "query_tokens",
        "vision_model.post_layernorm.weight",
        "qformer.layernorm.weight",
        "language_projection.weight",
        "language_model.lm_head.weight",
    ] {
        assert!(st.contains_key(k), "{k} missing");
    }
    assert!(!st.keys().any(|k| k.starts_with("multi_modal_projector.")));
    assert!(clasp::vlm::checkpoint::is_vlm(&dir));
    let small = tempfile::tempdir().unwrap();
    common::blip2_small_folder(small.path());
    assert!(!clasp::vlm::checkpoint::is_vlm(small.path()));

    let back = Vlm::load(&dir, &Device::Cpu).unwrap();
    assert!(back.blip2_vision().is_some());
    let user = "<image>\nWhat is in the picture?";
    let ids = m.chat_prompt(user, 1).unwrap();
    assert_eq!(back.chat_prompt(user, 1).unwrap(), ids);
    let img = photo("reference-images/coco-000000039769-two-cats.png");
    let worst = vlm_util::saved_and_loaded_logit_gap(m, &back, &ids, &img);
    assert!(worst < 1e-3, "saved and loaded logits differ by {worst}");
}

/// Bad input is refused by name: a prompt with the wrong number of image
/// placeholders, a BLIP-2 whose language model clasp cannot run, and one
/// without the image token's id.
#[test]
fn bad_blip2_prompts_and_configs_are_refused_by_name() {
    let m = vlm();
    let e = m.chat_prompt("no image here", 1).unwrap_err().to_string();
    assert!(e.contains("0 <image> placeholders for 1 image"), "{e}");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("vlm");
    m.save(&dir).unwrap();
    let path = dir.join("config.json");
    let good: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut opt = good.clone();
    opt["text_config"]["model_type"] = "opt".into();
    std::fs::write(&path, opt.to_string()).unwrap();
    let e = Vlm::load(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("opt") && e.contains("llama"), "{e}");
    let mut no_token = good.clone();
    no_token
        .as_object_mut()
        .unwrap()
        .remove("image_token_index");
    std::fs::write(&path, no_token.to_string()).unwrap();
    let e = Vlm::load(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("image_token_index"), "{e}");
}
