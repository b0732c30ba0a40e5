//! The vision-language model against transformers' LlavaForConditionalGeneration
//! on the checkpoint clasp saves (fixtures: scripts/gen_vlm_fixtures.py, which
//! runs `clasp assemble` on the committed random-weight CLIP vision tower and
//! SmolLM2, then transformers on the saved folder).

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use clasp::vlm::Vlm;
use serde_json::Value;
mod vlm_util;

use vlm_util::*;

/// Prompts, pixels and logits equal transformers' on held-out photos, in
/// English and Chinese: ids exactly (the Llava processor's expansion of
/// `<image>` included), logits to 1e-3 at the last 24 positions (64 fixed
/// vocabulary ids and the top 16), and the argmax at every position.
#[test]
fn logits_equal_transformers_llava_on_the_saved_checkpoint() {
    let m = vlm();
    let mut worst = 0f32;
    let f = fixture();
    for c in f["cases"].as_array().unwrap() {
        let name = format!("{} {}", c["image"], c["lang"]);
        let ids = m.chat_prompt(c["user"].as_str().unwrap(), 1).unwrap();
        assert_eq!(ids, u32s(&c["input_ids"]), "{name}: input ids");
        let img = shared_image(c["image"].as_str().unwrap());
        let ours: Vec<f32> = m
            .pixels(&[img.as_path()])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let theirs = f32s(&f["pixel_values"][c["image"].as_str().unwrap()]);
        // The same preprocessing up to the JPEG decoders (zune-jpeg against
        // Pillow's libjpeg-turbo differ by IDCT rounding, see core_parity).
        let jpeg_bound = 3.0 / 255.0 / 0.261_302_6 + 1e-5;
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() <= jpeg_bound, "{name}: pixel {a} vs {b}");
        }
        // The model is compared on the processor's pixels.
        let px = candle_core::Tensor::from_vec(theirs, (1, 3, 32, 32), &Device::Cpu).unwrap();
        let logits: Vec<Vec<f32>> = m.logits(&ids, &px).unwrap().to_vec2().unwrap();
        worst = worst.max(check_logits(&name, &logits, c));
    }
    eprintln!("largest logit difference against transformers: {worst:.2e}");
}

/// What clasp saves, clasp loads back to the same logits, and the folder
/// holds what transformers' Llava classes read.
#[test]
fn a_saved_vlm_loads_back_to_the_same_logits_up_to_rounding() {
    let m = vlm();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("vlm");
    m.save(&dir).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "chat_template.jinja",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let back = Vlm::load(&dir, &Device::Cpu).unwrap();
    let img = shared_image("2090545563_a4e66ec76b.jpg");
    let ids = m
        .chat_prompt("<image>\nWhat is in the picture?", 1)
        .unwrap();
    assert_eq!(
        back.chat_prompt("<image>\nWhat is in the picture?", 1)
            .unwrap(),
        ids
    );
    let worst = saved_and_loaded_logit_gap(m, &back, &ids, &img);
    assert!(worst < 1e-3, "saved and loaded logits differ by {worst}");
}

/// Bad input gets an error that says what is wrong.
#[test]
fn bad_prompts_images_and_mismatched_towers_are_refused_by_name() {
    let m = vlm();
    let e = m
        .chat_prompt("<image><image> compare", 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 <image> placeholders for 1 image"), "{e}");
    let e = m.chat_prompt("no image here", 1).unwrap_err().to_string();
    assert!(e.contains("0 <image> placeholders"), "{e}");
    let d = tempfile::tempdir().unwrap();
    let not_image = d.path().join("notes.jpg");
    std::fs::write(&not_image, b"plain text, not a JPEG").unwrap();
    let e = m.pixels(&[not_image.as_path()]).unwrap_err().to_string();
    assert!(e.contains("notes.jpg"), "{e}");
    // A checkpoint whose vision tower is wider than its connector expects.
    let dir = d.path().join("vlm");
    m.save(&dir).unwrap();
    let cfg_path = dir.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["vision_config"]["hidden_size"] = 48.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = Vlm::load(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(
        e.contains("does the vision tower match the connector"),
        "{e}"
    );
}

/// Generation never emits the image placeholder and is reproducible under
/// greedy decoding; a batch of images equals the images one at a time.
#[test]
fn greedy_captions_are_reproducible_and_batched_equals_single() {
    let m = vlm();
    let imgs: Vec<PathBuf> = ["2090545563_a4e66ec76b.jpg", "3393035454_2d2370ffd4.jpg"]
        .iter()
        .map(|n| shared_image(n))
        .collect();
    let refs: Vec<&Path> = imgs.iter().map(|p| p.as_path()).collect();
    let opts = clasp::llm::GenerateOptions {
        max_new_tokens: 8,
        ..Default::default()
    };
    let turn = Vlm::caption_turn("Describe the image.");
    let both = m.generate(&m.pixels(&refs).unwrap(), &turn, &opts).unwrap();
    for (i, p) in refs.iter().enumerate() {
        let one = m.generate(&m.pixels(&[*p]).unwrap(), &turn, &opts).unwrap();
        assert_eq!(one[0].ids, both[i].ids, "image {i}");
        assert!(!one[0].ids.contains(&m.cfg.image_token_index));
    }
}
