//! Training steps against their references: one AdamW step equals torch's, checkpoints keep
//! transformers' layout, the tiny preset is CLIP's initialisation, gradient accumulation, colour
//! jitter (torchvision), locked towers, bf16 mixed precision and LiT's mean pooling.

use std::path::Path;

use candle_core::{Device, Tensor, Var};
use clasp::train::objectives::{Batch, InfoNce, Objective};
mod common;
mod train_parity_util;

use train_parity_util::*;

/// The fixture's training step on the tiny CLIP: features → InfoNCE →
/// backward; returns the model, its variables, the loss and the gradients.
fn tiny_step_grads(
    f: &std::collections::HashMap<String, Tensor>,
) -> (
    clasp::train::model::Trainable,
    Vec<(String, Var)>,
    Tensor,
    candle_core::backprop::GradStore,
) {
    let t = clasp::train::model::Trainable::from_checkpoint(
        "tests/fixtures/core/tiny-clip",
        &Device::Cpu,
    )
    .unwrap();
    let vars = t.vars();
    let mode = clasp::model::grad_mode_guard(true);
    let ids = f["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    let mask = f["attention_mask"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let img =
        clasp::model::l2_normalize(&t.model.image_features(&f["pixel_values"]).unwrap()).unwrap();
    let txt = clasp::model::l2_normalize(&t.model.text_features(&ids, &mask).unwrap()).unwrap();
    let b = Batch {
        image: &img,
        text: &txt,
        log_scale: t.model.logit_scale(),
        bias: None,
        teacher: None,
    };
    let loss = InfoNce.loss(&b).unwrap();
    let grads = loss.backward().unwrap();
    drop(mode);
    (t, vars, loss, grads)
}

const STEP_CFG: clasp::train::optim::AdamWConfig = clasp::train::optim::AdamWConfig {
    lr: 1e-3,
    beta1: 0.9,
    beta2: 0.98,
    eps: 1e-6,
    weight_decay: 0.2,
};

/// One training step of the tiny CLIP (features → InfoNCE → backward →
/// clip_grad_norm 1.0 → grouped AdamW → temperature clamp) against
/// transformers + open_clip + torch.optim.AdamW from the same weights and
/// batch (scripts/gen_train_fixtures.py).
#[test]
fn one_adamw_step_equals_torch() {
    use clasp::train::optim;
    let f =
        candle_core::safetensors::load("tests/fixtures/train/adamw_step.safetensors", &Device::Cpu)
            .unwrap();
    let (_t, vars, loss, mut grads) = tiny_step_grads(&f);
    assert_eq!(
        vars.len(),
        78,
        "every parameter of the checkpoint is a variable"
    );
    let d = max_abs(&loss, &f["loss"].squeeze(0).unwrap());
    assert!(d < 1e-5, "loss differs by {d}");
    // Every gradient before clipping.
    for (name, v) in &vars {
        let key = format!("grad.{name}");
        match (grads.get(v.as_tensor()), f.get(&key)) {
            (Some(g), Some(w)) => {
                let d = max_abs(g, w);
                assert!(d < 1e-5, "gradient of {name} differs by {d}");
            }
            (None, None) => {}
            (g, w) => panic!(
                "gradient of {name}: clasp has {}, torch has {}",
                g.is_some(),
                w.is_some()
            ),
        }
    }
    let norm = optim::clip_grad_norm(&vars, &mut grads, 1.0).unwrap();
    let want_norm = f["grad_norm"]
        .squeeze(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(
        (norm - want_norm).abs() / want_norm < 1e-5,
        "grad norm {norm} vs {want_norm}"
    );
    let cfg = STEP_CFG;
    let mut opt = optim::GroupedAdamW::new(&vars, cfg).unwrap();
    opt.step(&grads).unwrap();
    let mut worst = (0f32, String::new());
    for (name, v) in &vars {
        let want = &f[&format!("param.{name}")];
        let d = max_abs(v.as_tensor(), want);
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    assert!(
        worst.0 < 1e-5,
        "after one step, {} differs by {}",
        worst.1,
        worst.0
    );
}

/// A clasp checkpoint is in transformers' layout: the saved file has exactly
/// the original checkpoint's tensor names, shapes and dtypes, its values are
/// the trained ones (here: torch's weights after the same step), config and
/// tokenizer files come along, and clasp loads it back to the same
/// embeddings. `scripts/checkpoint_roundtrip.py` loads one in transformers.
#[test]
fn checkpoint_round_trip_keeps_transformers_layout() {
    use clasp::train::optim;
    let f =
        candle_core::safetensors::load("tests/fixtures/train/adamw_step.safetensors", &Device::Cpu)
            .unwrap();
    let (t, vars, _loss, mut grads) = tiny_step_grads(&f);
    optim::clip_grad_norm(&vars, &mut grads, 1.0).unwrap();
    let cfg = STEP_CFG;
    optim::GroupedAdamW::new(&vars, cfg)
        .unwrap()
        .step(&grads)
        .unwrap();

    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("ckpt");
    t.save(&out).unwrap();
    t.save(&out).unwrap(); // overwriting an existing checkpoint works too
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "preprocessor_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "no temporary directories left: {leftovers:?}"
    );
    let orig = safetensors_meta("tests/fixtures/core/tiny-clip/model.safetensors");
    let saved = safetensors_meta(out.join("model.safetensors").to_str().unwrap());
    assert_eq!(
        saved, orig,
        "same names, shapes and dtypes as transformers' file"
    );
    let w = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    for (name, v) in &w {
        let d = max_abs(v, &f[&format!("param.{name}")]);
        assert!(
            d < 1e-5,
            "{name}: saved value differs from torch's trained weight by {d}"
        );
    }
    // clasp reads it back: same features as the trained model in memory.
    let enc = clasp::Encoder::load(out.to_str().unwrap(), &Device::Cpu).unwrap();
    let live = t.snapshot().unwrap();
    let a = enc.image_features(&f["pixel_values"]).unwrap();
    let b = live.image_features(&f["pixel_values"]).unwrap();
    assert!(max_abs(&a, &b) < 1e-5, "image features");
    let ids = f["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    let mask = f["attention_mask"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let a = enc.model().text_features(&ids, &mask).unwrap();
    let b = live.text_features(&ids, &mask).unwrap();
    assert!(max_abs(&a, &b) < 1e-5, "text features");
}

fn safetensors_meta(path: &str) -> Vec<(String, Vec<usize>, String)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.shape().to_vec(), format!("{:?}", t.dtype())))
        .collect();
    v.sort();
    v
}

/// A preset is a real CLIP checkpoint with CLIP's initialisation: norms at
/// 1 and 0, biases 0, weights at transformers' standard deviations.
#[test]
fn tiny_preset_is_a_clip_checkpoint_with_clip_init() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("init");
    let tok = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/assets/clip-vit-base-patch32");
    clasp::train::presets::init_preset("tiny", Some(&tok), &dir, 3, &Device::Cpu).unwrap();
    let enc = clasp::Encoder::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    assert_eq!(enc.embedding_dim(), 256);
    let w = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let stats = |k: &str| {
        let v = w[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = v.len() as f64;
        let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
        let std = (v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        (mean, std)
    };
    assert_eq!(stats("vision_model.post_layernorm.weight"), (1.0, 0.0));
    assert_eq!(stats("text_model.final_layer_norm.bias"), (0.0, 0.0));
    assert_eq!(
        stats("text_model.encoder.layers.0.self_attn.q_proj.bias"),
        (0.0, 0.0)
    );
    // q_proj: width^-0.5 * (2 * layers)^-0.5 = 256^-0.5 * 8^-0.5.
    let (m, s) = stats("text_model.encoder.layers.0.self_attn.q_proj.weight");
    let want = (1.0 / 16.0) * (1.0 / 8f64.sqrt());
    assert!(
        m.abs() < 1e-3 && (s - want).abs() / want < 0.02,
        "q_proj mean {m} std {s} (want {want})"
    );
    let (_, s) = stats("text_model.embeddings.token_embedding.weight");
    assert!((s - 0.02).abs() < 0.0005, "token embedding std {s}");
    let ls = w["logit_scale"].to_scalar::<f32>().unwrap();
    assert!((ls - 2.6592).abs() < 1e-6);
    for f in ["config.json", "preprocessor_config.json", "tokenizer.json"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
}

/// The tiny CLIP fixture as variables, and the AdamW fixture's batch:
/// (model, pixels, token ids, attention mask).
fn tiny_model_and_batch() -> (clasp::train::model::Trainable, Tensor, Tensor, Tensor) {
    let f =
        candle_core::safetensors::load("tests/fixtures/train/adamw_step.safetensors", &Device::Cpu)
            .unwrap();
    let t = clasp::train::model::Trainable::from_checkpoint(
        "tests/fixtures/core/tiny-clip",
        &Device::Cpu,
    )
    .unwrap();
    let u32 = |k: &str| f[k].to_dtype(candle_core::DType::U32).unwrap();
    let (ids, mask) = (u32("input_ids"), u32("attention_mask"));
    (t, f["pixel_values"].clone(), ids, mask)
}

/// Accumulation over micro-batches with cached features gives the
/// full-batch gradient, for every parameter (and the SigLIP bias).
#[test]
fn accumulated_gradients_equal_the_full_batch_gradient() {
    use clasp::train::objectives::SigLip;
    use clasp::train::step::{contrastive_grads, Images, Inputs};
    let (t, pixels, ids, mask) = tiny_model_and_batch();
    let bias = Var::from_tensor(&Tensor::new(-2f32, &Device::Cpu).unwrap()).unwrap();
    let mut vars = t.vars();
    vars.push(("logit_bias".into(), bias.clone()));
    let x = Inputs {
        images: &Images::Pixels(pixels.clone()),
        ids: &ids,
        mask: &mask,
        locked: Default::default(),
        teacher: None,
    };
    for (name, obj) in [("infonce", &InfoNce as &dyn Objective), ("siglip", &SigLip)] {
        let (l1, g1) = contrastive_grads(&t.model, obj, &x, Some(&bias), &vars, 1).unwrap();
        for accum in [2, 4] {
            let (lk, gk) = contrastive_grads(&t.model, obj, &x, Some(&bias), &vars, accum).unwrap();
            assert!(
                (l1 - lk).abs() < 1e-5,
                "{name} accum {accum}: loss {lk} vs {l1}"
            );
            let mut compared = 0;
            for (n, v) in &vars {
                match (g1.get(v.as_tensor()), gk.get(v.as_tensor())) {
                    (Some(a), Some(b)) => {
                        let d = max_abs(b, a);
                        assert!(
                            d < 1e-5,
                            "{name} accum {accum}: gradient of {n} differs by {d}"
                        );
                        compared += 1;
                    }
                    (None, None) => {}
                    _ => panic!("{name} accum {accum}: {n} has a gradient in one run only"),
                }
            }
            assert!(compared >= 78, "{name}: compared {compared} gradients");
        }
    }
}

/// Each colour-jitter op, and a chain of all four, equals torchvision's PIL
/// path exactly on crops of real photos and on pure and grey colours.
#[test]
fn color_jitter_ops_equal_torchvision() {
    use clasp::preprocess::augment::{
        adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation,
    };
    type Op = fn(&mut image::RgbImage, f32);
    let f = candle_core::safetensors::load(
        "tests/fixtures/train/color_jitter.safetensors",
        &Device::Cpu,
    )
    .unwrap();
    let to_image = |t: &Tensor| {
        let (h, w, _) = t.dims3().unwrap();
        let data = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        image::RgbImage::from_raw(w as u32, h as u32, data).unwrap()
    };
    let ops: [(&str, Op); 4] = [
        ("brightness", adjust_brightness),
        ("contrast", adjust_contrast),
        ("saturation", adjust_saturation),
        ("hue", adjust_hue),
    ];
    let mut checked = 0;
    for name in ["photo0", "photo1", "synthetic"] {
        let input = to_image(&f[&format!("{name}/input")]);
        for (op, apply) in ops {
            for k in 0.. {
                let Some(expected) = f.get(&format!("{name}/{op}/{k}")) else {
                    break;
                };
                let factor = f[&format!("{name}/{op}/{k}/factor")]
                    .to_vec1::<f64>()
                    .unwrap()[0] as f32;
                let mut got = input.clone();
                apply(&mut got, factor);
                let expected = to_image(expected);
                let wrong = got
                    .iter()
                    .zip(expected.iter())
                    .filter(|(a, b)| a != b)
                    .count();
                assert_eq!(wrong, 0, "{name} {op}({factor}): {wrong} values differ");
                checked += 1;
            }
        }
        let mut got = input.clone();
        adjust_hue(&mut got, 0.08);
        adjust_saturation(&mut got, 1.3);
        adjust_brightness(&mut got, 0.8);
        adjust_contrast(&mut got, 1.2);
        assert_eq!(got, to_image(&f[&format!("{name}/chain")]), "{name} chain");
    }
    assert_eq!(checked, 3 * 11);
}

/// Locking a tower (LiT) changes what learns, not what is computed: on the
/// transformers-made tiny dual encoder, the loss and every gradient outside
/// the locked tower equal the unlocked ones, and the locked tower gets none.
#[test]
fn locking_a_tower_keeps_the_loss_and_the_other_gradients() {
    use clasp::train::step::{contrastive_grads, Images, Inputs, Locked};
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/core/tiny-dual-encoder"
    );
    let t = clasp::train::model::Trainable::from_checkpoint(dir, &Device::Cpu).unwrap();
    let frozen = t.snapshot().unwrap();
    let exp = candle_core::safetensors::load(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/core/dual_expected.safetensors"
        ),
        &Device::Cpu,
    )
    .unwrap();
    let px = Tensor::cat(&[&exp["dual.pixel_values"], &exp["dual.pixel_values"]], 0).unwrap();
    let ids = exp["dual.input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let mask = exp["dual.attention_mask"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let vars = t.vars();
    let run = |locked: Locked| {
        let x = Inputs {
            images: &Images::Pixels(px.clone()),
            ids: &ids,
            mask: &mask,
            locked,
            teacher: None,
        };
        contrastive_grads(&t.model, &InfoNce, &x, None, &vars, 1).unwrap()
    };
    let (l0, g0) = run(Locked::default());
    for (image, text) in [(false, true), (true, false)] {
        let (l, g) = run(Locked {
            image: image.then_some(&frozen),
            text: text.then_some(&frozen),
        });
        assert!(
            (l - l0).abs() < 1e-6,
            "lock image={image} text={text}: loss {l} vs {l0}"
        );
        for (name, v) in &vars {
            let in_locked = image && name.starts_with("vision_model.")
                || text && name.starts_with("text_model.");
            match (in_locked, g.get(v.as_tensor()), g0.get(v.as_tensor())) {
                (true, None, _) => {}
                (true, Some(_), _) => panic!("{name}: a locked tower got a gradient"),
                (false, Some(a), Some(b)) => {
                    let d = max_abs(a, b);
                    assert!(d < 1e-5, "{name}: gradient differs by {d} when locked");
                }
                (false, a, b) => panic!(
                    "{name}: gradient present {} vs {}",
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
    }
}

/// Mixed precision (`--precision bf16`): the towers run in bf16 and the
/// gradients land on the f32 variables, close to the f32 step's. bf16 keeps 8
/// bits of mantissa, so "close" is a cosine, not 1e-5.
#[test]
fn bf16_mixed_precision_tracks_the_f32_gradient() {
    use candle_core::DType;
    use clasp::train::step::{contrastive_grads, Images, Inputs};
    let (t, pixels, ids, mask) = tiny_model_and_batch();
    let half = t.compute_model(DType::BF16).unwrap();
    assert_eq!(half.projections().unwrap().0.weight().dtype(), DType::BF16);
    assert_eq!(half.logit_scale().dtype(), DType::F32);
    let vars = t.vars();
    let x = Inputs {
        images: &Images::Pixels(pixels.clone()),
        ids: &ids,
        mask: &mask,
        locked: Default::default(),
        teacher: None,
    };
    let (l32, g32) = contrastive_grads(&t.model, &InfoNce, &x, None, &vars, 1).unwrap();
    let (l16, g16) = contrastive_grads(&half, &InfoNce, &x, None, &vars, 1).unwrap();
    assert!((l16 - l32).abs() < 1e-2 * l32.abs(), "loss {l16} vs {l32}");
    let (mut dot, mut n32, mut n16, mut max_diff) = (0f64, 0f64, 0f64, 0f32);
    for (n, v) in &vars {
        let (a, b) = match (g32.get(v.as_tensor()), g16.get(v.as_tensor())) {
            (Some(a), Some(b)) => (a, b),
            (None, None) => continue,
            _ => panic!("{n} has a gradient under one precision only"),
        };
        assert_eq!(
            b.dtype(),
            DType::F32,
            "{n}: the gradient reaches the f32 variable"
        );
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (x, y) in a.iter().zip(&b) {
            dot += (*x as f64) * (*y as f64);
            n32 += (*x as f64).powi(2);
            n16 += (*y as f64).powi(2);
            max_diff = max_diff.max((x - y).abs());
        }
    }
    let cos = dot / (n32.sqrt() * n16.sqrt());
    eprintln!("bf16 vs f32: loss {l16} vs {l32}, gradient cosine {cos}, max difference {max_diff}");
    assert!(
        cos > 0.99,
        "cosine between the bf16 and f32 gradients: {cos}"
    );
    // The bf16 pass really ran in bf16: its gradient is not the f32 one.
    assert!(
        max_diff > 1e-6,
        "bf16 gradients equal the f32 ones ({max_diff})"
    );
    // The logit scale's gradient (f32 throughout) agrees closely.
    let ls = t.model.logit_scale();
    let d = max_abs(g16.get(ls).unwrap(), g32.get(ls).unwrap());
    assert!(d < 1e-2, "logit scale gradient differs by {d}");
}

/// LiT with `--text-pooling mean` pools the text tower as sentence-transformers
/// does: from a sentence-transformers checkpoint, the dual encoder's text
/// features before the projection are that model's sentence embeddings
/// (fixture: scripts/gen_sentence_fixture.py).
#[test]
fn lit_mean_pooling_matches_sentence_transformers() {
    use clasp::model::config::TextPooling;
    let st = Path::new("tests/fixtures/core/tiny-sentence-bert");
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(st.join("expected.json")).unwrap()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let pooled = |pooling: TextPooling| {
        let dir = d.path().join(format!("{pooling:?}"));
        let t = clasp::train::presets::init_lit(
            &clasp::train::presets::LitImage::Preset("tiny".into()),
            st,
            &dir,
            0,
            pooling,
            &Device::Cpu,
        )
        .unwrap();
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
        assert_eq!(
            cfg.contains("clasp_text_pooling"),
            pooling == TextPooling::Mean
        );
        let tok = clasp::preprocess::TextTokenizer::from_dir(&dir, 32).unwrap();
        // Texts 0 and 2 (text 1 is longer than the fixture's 32 tokens).
        let texts = [
            want["texts"][0].as_str().unwrap(),
            want["texts"][2].as_str().unwrap(),
        ];
        let (ids, mask) = tok
            .encode(&texts)
            .unwrap()
            .to_tensors(true, &Device::Cpu)
            .unwrap();
        let x = t.snapshot().unwrap().text_pooled(&ids, &mask).unwrap();
        clasp::model::l2_normalize(&x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let mean = pooled(TextPooling::Mean);
    let mut worst = 0f32;
    for (got, i) in mean.iter().zip([0, 2]) {
        for (g, w) in got.iter().zip(want["embeddings"][i].as_array().unwrap()) {
            worst = worst.max((g - w.as_f64().unwrap() as f32).abs());
        }
    }
    assert!(
        worst < 1e-5,
        "mean pooling vs sentence-transformers: {worst}"
    );
    let pooler = pooled(TextPooling::Pooler);
    assert!(
        (pooler[0][0] - mean[0][0]).abs() > 1e-4,
        "the pooler gives other features"
    );
}
