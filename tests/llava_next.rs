//! LLaVA-NeXT (AnyRes) against transformers' LlavaNextForConditionalGeneration
//! and LlavaNextProcessor on the checkpoint clasp saves (fixtures:
//! scripts/gen_llava_next_fixtures.py, which runs `clasp assemble --anyres`
//! on the committed random-weight CLIP tower and SmolLM2, then transformers
//! on the saved folder), end to end on full-resolution lossless photos: the
//! grid, every tile's pixels, the image-token count, the prompt ids and the
//! logits.

mod common;
mod vlm_util;

use std::path::Path;
use std::sync::OnceLock;

use candle_core::Device;
use clasp::vlm::{ConnectorKind, Vlm};
use serde_json::Value;
use vlm_util::*;

const PINPOINTS: [(u32, u32); 5] = TINY_PINPOINTS;

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llava_next/logits.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The model the fixture generator assembled: same tower, LLM, seed and grid.
fn model() -> &'static Vlm {
    static M: OnceLock<Vlm> = OnceLock::new();
    M.get_or_init(|| tiny_next(false))
}

fn photo(name: &str) -> image::RgbImage {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/reference-images")
        .join(name);
    clasp::preprocess::load_image(&p).unwrap()
}

/// clasp's logits of a fixture case, from its own preprocessing.
fn logits_of(m: &Vlm, c: &Value) -> (Vec<u32>, Vec<Vec<f32>>) {
    let img = photo(c["photo"].as_str().unwrap());
    let px = m.anyres_pixels(&img).unwrap();
    let ids = m
        .chat_prompt_sized(fixture()["user"].as_str().unwrap(), &[px.image_size])
        .unwrap();
    let feats = m.anyres_features(&px).unwrap();
    (
        ids.clone(),
        m.logits_anyres(&ids, &[feats]).unwrap().to_vec2().unwrap(),
    )
}

#[test]
fn anyres_tiles_tokens_ids_and_logits_equal_transformers_llava_next() {
    let m = model();
    let f = fixture();
    let mut worst = 0f32;
    for c in f["cases"].as_array().unwrap() {
        let name = c["photo"].as_str().unwrap();
        let img = photo(name);
        let px = m.anyres_pixels(&img).unwrap();
        let size = u32s(&c["image_size"]);
        assert_eq!(px.image_size, (size[0], size[1]), "{name}");
        assert_eq!(
            px.tiles.len() as u64,
            c["tiles"].as_u64().unwrap(),
            "{name}"
        );
        // Lossless photos: each tile's channel means as the processor's.
        for (k, t) in px.tiles.iter().enumerate() {
            for ch in 0..3 {
                let plane = &t[ch * 1024..(ch + 1) * 1024];
                let mean = plane.iter().map(|&v| v as f64).sum::<f64>() / 1024.0;
                let want = c["tile_means"][k][ch].as_f64().unwrap();
                assert!(
                    (mean - want).abs() < 2e-5,
                    "{name} tile {k}: {mean} vs {want}"
                );
            }
        }
        let tokens = c["image_tokens"].as_u64().unwrap() as usize;
        assert_eq!(m.anyres_tokens(px.image_size).unwrap(), tokens, "{name}");
        let (ids, logits) = logits_of(m, c);
        assert_eq!(ids, u32s(&c["input_ids"]), "{name}: input ids");
        let w = check_logits(name, &logits, c);
        let peak = logits.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!("{name}: {w:.2e} (largest |logit| {peak:.1})");
        worst = worst.max(w);
    }
    // Logits reach 39 in magnitude: 1e-4 is 2.6e-6 of them, f32's floor
    // through 30 layers summed in another order (plain Llava's test sees
    // 1.04e-4 on the same language model).
    assert!(worst < 2e-4, "logits differ by {worst}");
    eprintln!("largest logit difference against transformers' LlavaNext: {worst:.2e}");
}

#[test]
fn a_saved_llava_next_loads_back_with_its_grid_and_newline() {
    let m = model();
    let d = tempfile::tempdir().unwrap();
    m.save(d.path()).unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "llava_next");
    assert_eq!(cfg["architectures"][0], "LlavaNextForConditionalGeneration");
    let back = Vlm::load(d.path(), &Device::Cpu).unwrap();
    assert_eq!(back.anyres(), Some(&PINPOINTS[..]));
    let gap = common::max_abs(back.image_newline().unwrap(), m.image_newline().unwrap());
    assert_eq!(gap, 0.0);
    let c = &fixture()["cases"][1];
    let (ids, a) = logits_of(m, c);
    let (ids_back, b) = logits_of(&back, c);
    assert_eq!(ids, ids_back);
    // The saved vocabulary holds the image token (one row more).
    let worst = max_gap(&a, &b);
    assert!(worst < 1e-4, "saved and loaded logits differ by {worst}");
}

#[test]
fn anyres_refuses_what_it_cannot_tile_by_name() {
    let m = model();
    // A prompt whose placeholders do not match the images.
    let err = m
        .chat_prompt_sized("<image>\n<image>\nDescribe.", &[(480, 640)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 <image> placeholders for 1 image"), "{err}");
    // The fixed-size prompt of a LLaVA-NeXT model is refused, not miscounted.
    let err = m
        .chat_prompt("<image>\nDescribe.", 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("AnyRes"), "{err}");
    // Pinpoints that are not multiples of the tower's 32 pixels.
    let mut other = assembled(ConnectorKind::Mlp2xGelu);
    let err = other
        .set_anyres(vec![(32, 50)], None, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("32") && err.contains("50"), "{err}");
    // A connector that does not keep one token per patch.
    let mut resampler = assembled(ConnectorKind::Resampler {
        queries: 4,
        layers: 1,
        heads: 2,
    });
    let err = resampler
        .set_anyres(PINPOINTS.to_vec(), None, 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mlp2x_gelu"), "{err}");
}

/// `clasp caption` (a photo and a file that is not one), `clasp chat` and
/// `clasp serve --vlm` take a saved LLaVA-NeXT folder and answer as the library's greedy
/// generation on the tiled images does.
#[test]
fn caption_and_chat_take_a_llava_next_folder() {
    let m = model();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("next");
    m.save(&dir).unwrap();
    let names = ["coco-000000039769-two-cats.png", "clip-diagram.png"];
    let refs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/reference-images");
    let opts = clasp::llm::GenerateOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let user = Vlm::caption_turn(clasp::vlm::model::DESCRIBE_EN);
    let tiled: Vec<_> = names
        .iter()
        .map(|n| m.anyres_pixels(&photo(n)).unwrap())
        .collect();
    let want: Vec<String> = m
        .generate_anyres(&tiled, &user, &opts)
        .unwrap()
        .into_iter()
        .map(|g| g.text)
        .collect();
    assert!(want.iter().all(|w| !w.trim().is_empty()), "{want:?}");
    let not_image = d.path().join("notes.png");
    std::fs::write(&not_image, b"not a picture").unwrap();
    let (a, b) = (refs.join(names[0]), refs.join(names[1]));
    let out = common::clasp(&[
        "caption",
        "-m",
        dir.to_str().unwrap(),
        a.to_str().unwrap(),
        not_image.to_str().unwrap(),
        b.to_str().unwrap(),
        "--max-tokens",
        "6",
        "--json",
    ]);
    // The bad file is named and the others captioned.
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("notes.png"));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let got: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["caption"].as_str().unwrap())
        .collect();
    assert_eq!(got, want);
    let chat = common::clasp(&[
        "chat",
        "-m",
        dir.to_str().unwrap(),
        "--image",
        b.to_str().unwrap(),
        "-p",
        &user,
        "--max-tokens",
        "6",
    ]);
    assert!(
        chat.status.success(),
        "{}",
        String::from_utf8_lossy(&chat.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&chat.stdout).trim_end(),
        want[1].trim_end()
    );
}

/// Stage 1 on AnyRes: the language-model loss of a batch of two tiled
/// photos (their prompts of different lengths, right-padded) and the
/// connector's gradient equal transformers' LlavaNext with labels.
#[test]
fn anyres_answer_loss_and_connector_gradients_equal_transformers() {
    use clasp::train::vlm::{answer_loss_each, Example};
    let m = model();
    let f = fixture();
    let case = &f["lm_loss"];
    let mut examples = Vec::new();
    let mut tiled = Vec::new();
    for (k, c) in f["cases"].as_array().unwrap().iter().enumerate() {
        let px = m
            .anyres_pixels(&photo(c["photo"].as_str().unwrap()))
            .unwrap();
        let caption = case["captions"][k].as_str().unwrap();
        let e = Example::caption_sized(m, clasp::data::Lang::En, caption, 48, Some(px.image_size))
            .unwrap();
        let ids: Vec<u32> = [e.prompt.clone(), e.answer.clone()].concat();
        assert_eq!(ids, u32s(&case["rows"][k]), "token ids of {caption}");
        // Flattened for the loader and read back as the step reads it.
        let back = m.tiles_from_flat(&Vlm::tiles_to_flat(&px)).unwrap();
        assert_eq!((back.grid, back.image_size), (px.grid, px.image_size));
        tiled.push(back);
        examples.push(e);
    }
    let loss = {
        let _g = clasp::model::grad_mode_guard(true);
        let each: Vec<_> = tiled
            .iter()
            .map(|t| m.anyres_features(t).unwrap())
            .collect();
        answer_loss_each(m, &examples, &each).unwrap()
    };
    let lv = loss.to_scalar::<f32>().unwrap() as f64;
    let want = case["loss"].as_f64().unwrap();
    assert!(
        (lv - want).abs() < 1e-4,
        "loss {lv} vs transformers' {want}"
    );
    let grads = loss.backward().unwrap();
    for (name, want) in case["grad_norms"].as_object().unwrap() {
        let v = &m
            .connector
            .vars()
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1;
        let g = grads.get(v.as_tensor()).expect("a gradient");
        let norm = (g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64)
            .sqrt();
        let w = want.as_f64().unwrap();
        assert!(
            (norm - w).abs() <= 1e-4 * w,
            "{name}: gradient norm {norm} vs {w}"
        );
    }
    eprintln!("AnyRes loss {lv} against transformers' {want}");
}

/// `clasp train --anyres` assembles a LLaVA-NeXT model and trains its
/// connector on full-size photos; the saved run loads as LLaVA-NeXT.
#[test]
fn train_with_anyres_saves_a_llava_next_model() {
    let d = tempfile::tempdir().unwrap();
    let refs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/reference-images");
    let mut tsv = String::from("image\tcaption\n");
    for (n, c) in [
        (
            "coco-000000039769-two-cats.png",
            "Two cats sleep on a pink blanket .",
        ),
        (
            "clip-diagram.png",
            "A diagram of contrastive pre-training .",
        ),
    ] {
        std::fs::copy(refs.join(n), d.path().join(n)).unwrap();
        tsv.push_str(&format!("{n}\t{c}\n"));
    }
    std::fs::write(d.path().join("pairs.tsv"), tsv).unwrap();
    let out = d.path().join("run");
    let o = common::clasp(&[
        "train",
        "--llm",
        common::smollm2().to_str().unwrap(),
        "--vision",
        fixtures().join("vision").to_str().unwrap(),
        "--anyres",
        "32x64,64x32,64x64,32x96,96x32",
        "--dataset",
        d.path().join("pairs.tsv").to_str().unwrap(),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let back = Vlm::load(&out.join("checkpoint"), &Device::Cpu).unwrap();
    assert_eq!(back.anyres(), Some(&PINPOINTS[..]));
    // The connector moved; image_newline stays as initialised (as LLaVA's
    // stage 1, only the projector learns).
    let moved = common::max_abs(
        back.connector.vars()[0].1.as_tensor(),
        model().connector.vars()[0].1.as_tensor(),
    );
    assert!(moved > 0.0, "the connector did not learn");
    let nl = common::max_abs(
        back.image_newline().unwrap(),
        model().image_newline().unwrap(),
    );
    assert_eq!(nl, 0.0);
}
