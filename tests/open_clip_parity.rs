//! open_clip's checkpoint layout against open_clip_torch itself
//! (scripts/gen_open_clip_fixtures.py): its tokenizer's ids, its eval
//! transform's pixels, and `encode_image` / `encode_text`, for a
//! safetensors checkpoint with GELU and a pickled one with QuickGELU; and
//! `clasp convert --to hf`, whose CLIPModel checkpoint embeds the same.

mod common;

use common::max_abs;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use clasp::encoder::Encoder;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/open_clip")
}

fn check(enc: &Encoder, name: &str) {
    let (exp, meta) = common::expected_with_meta(&fixtures().join("expected.safetensors"));
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let ids = enc.tokenizer().encode(&texts).unwrap().ids;
    let want = exp["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    assert_eq!(ids, want.to_vec2::<u32>().unwrap(), "{name}: token ids");
    let img = enc
        .image_features(&exp[&format!("{name}.pixel_values")])
        .unwrap();
    let d = max_abs(&img, &exp[&format!("{name}.image_features")]);
    assert!(d < 1e-4, "{name}: image features differ by {d}");
    let txt = enc.text_features(&texts).unwrap();
    let d = max_abs(&txt, &exp[&format!("{name}.text_features")]);
    assert!(d < 1e-4, "{name}: text features differ by {d}");
}

#[test]
fn open_clip_checkpoints_embed_as_open_clip_does() {
    for name in ["tiny-gelu", "tiny-quickgelu"] {
        let enc = Encoder::load(fixtures().join(name).to_str().unwrap(), &Device::Cpu).unwrap();
        check(&enc, name);
    }
}

/// open_clip's own training output (`epoch_3.pt`: torch.save of a dict
/// whose `state_dict` has DDP's `module.` prefix, beside the epoch and the
/// optimizer) in a folder with its open_clip_config.json embeds as the same
/// weights published do (tiny-gelu's expectations), through the loader
/// every verb uses, and converts to a CLIPModel checkpoint.
#[test]
fn an_open_clip_training_checkpoint_loads_as_its_weights() {
    let dir = fixtures().join("tiny-epoch");
    let enc = Encoder::load(dir.to_str().unwrap(), &Device::Cpu).unwrap();
    check(&enc, "tiny-gelu");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("hf");
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(["convert", "--model"])
        .arg(&dir)
        .args(["--to", "hf", "--output"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // As a CLIPModel checkpoint (which pads as transformers does, so only
    // the image side is compared here; the conversion test covers text).
    let (exp, _) = common::expected_with_meta(&fixtures().join("expected.safetensors"));
    let hf = Encoder::load(out.to_str().unwrap(), &Device::Cpu).unwrap();
    let img = hf.image_features(&exp["tiny-gelu.pixel_values"]).unwrap();
    assert!(max_abs(&img, &exp["tiny-gelu.image_features"]) < 1e-4);
}

/// A folder in open_clip's layout without vocab.json/merges.txt tokenizes
/// with the BPE open_clip bundles, as open_clip's default tokenizer does
/// (context 77, HTML entities decoded, zero padding, truncated with the end
/// token kept).
#[test]
fn an_open_clip_folder_without_vocabulary_tokenizes_as_open_clip() {
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("bundled_tokens.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<String> = serde_json::from_value(want["texts"].clone()).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(want["input_ids"].clone()).unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("configs/ViT-B-32.json"),
        d.path().join("open_clip_config.json"),
    )
    .unwrap();
    let tok = clasp::preprocess::TextTokenizer::from_dir(d.path(), 77)
        .unwrap()
        .open_clip()
        .unwrap();
    assert_eq!(tok.encode(&texts).unwrap().ids, ids);
}

/// open_clip's eval transform (torchvision Resize of the shortest side,
/// bicubic, CenterCrop) against clasp's translation of preprocess_cfg, on
/// the full-size photos. Not on images with transparency: open_clip drops
/// the alpha channel (`convert("RGB")`) where clasp, as transformers,
/// composites onto white; the fixture's RGBA diagram is there to show it.
#[test]
fn open_clip_preprocessing_matches_its_eval_transform() {
    let (exp, meta) = common::expected_with_meta(&fixtures().join("expected.safetensors"));
    let photos: Vec<String> = serde_json::from_str(&meta["photos"]).unwrap();
    let enc = Encoder::load(fixtures().join("tiny-gelu").to_str().unwrap(), &Device::Cpu).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (i, p) in photos
        .iter()
        .enumerate()
        .filter(|(_, p)| p.ends_with(".jpg"))
    {
        let got = enc.image_processor().process_path(&root.join(p)).unwrap();
        let got = Tensor::from_vec(got, (3, 32, 32), &Device::Cpu).unwrap();
        let want = exp["tiny-gelu.pixel_values"].get(i).unwrap();
        // One 8-bit level over CLIP's smallest std (JPEG decoders differ).
        let d = max_abs(&got, &want);
        assert!(
            d <= 1.0 / 255.0 / 0.2613 + 1e-5,
            "{p}: pixels differ by {d}"
        );
    }
}

#[test]
fn convert_writes_a_clip_model_checkpoint_with_the_same_embeddings() {
    let d = tempfile::tempdir().unwrap();
    for name in ["tiny-gelu", "tiny-quickgelu"] {
        let out = d.path().join(name);
        let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
            .args(["convert", "--model"])
            .arg(fixtures().join(name))
            .args(["--to", "hf", "--output"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for f in [
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
            "vocab.json",
        ] {
            assert!(out.join(f).is_file(), "{name}: {f} written");
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], "clip");
        let enc = Encoder::load(out.to_str().unwrap(), &Device::Cpu).unwrap();
        // The HF checkpoint tokenizes as transformers' CLIP tokenizer does:
        // the same ids as open_clip's for plain text, but HTML entities stay
        // as they are (the last fixture text has one), so it is left out.
        let (exp, meta) = common::expected_with_meta(&fixtures().join("expected.safetensors"));
        let mut texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
        assert!(texts.pop().unwrap().contains("&amp;"));
        let img = enc
            .image_features(&exp[&format!("{name}.pixel_values")])
            .unwrap();
        assert!(max_abs(&img, &exp[&format!("{name}.image_features")]) < 1e-4);
        let txt = enc.text_features(&texts).unwrap();
        let want = exp[&format!("{name}.text_features")]
            .narrow(0, 0, texts.len())
            .unwrap();
        assert!(max_abs(&txt, &want) < 1e-4);
    }
}

/// A Hub repository with only open_clip's files (as most LAION and DataComp
/// models are) loads by its id: here from a hf-hub cache laid out as
/// hf-hub writes it (refs/main naming a snapshot), with HF_HUB_OFFLINE so
/// that nothing is fetched. Its vectors are open_clip's (the fixture's).
#[test]
fn an_open_clip_only_hub_repository_loads_by_its_id() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--laion--tiny-quickgelu");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in std::fs::read_dir(fixtures().join("tiny-quickgelu")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, snap.join(f.file_name().unwrap())).unwrap();
    }
    assert!(!snap.join("config.json").exists());
    let (exp, meta) = common::expected_with_meta(&fixtures().join("expected.safetensors"));
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args([
            "embed",
            "--model",
            "laion/tiny-quickgelu",
            "--text",
            &texts[0],
        ])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    let got: Vec<f32> = serde_json::from_value(line["embedding"].clone()).unwrap();
    let want = exp["tiny-quickgelu.text_features"].get(0).unwrap();
    let norm = want.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
    let want = (want / norm.to_scalar::<f32>().unwrap() as f64)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let d = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d < 1e-4, "max-abs {d} to open_clip's normalised vector");

    // A repository with neither config: the Hub error names the model.
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(["embed", "--model", "laion/absent", "--text", "x"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("laion/absent"), "{err}");
}

/// OpenAI's RN50 CLIP at its real config (open_clip's RN50.json: a
/// ModifiedResNet with attention pooling under the 12-layer text
/// transformer), with the formula's weights in open_clip's layout and no
/// vocabulary files: image embeddings of held-out photos through clasp's
/// preprocessing, and text embeddings of captions through the bundled BPE,
/// equal open_clip's within 1e-4 (and to a cosine of 1 - 1e-6), with the
/// same token ids.
#[test]
fn openai_rn50_embeds_as_open_clip_does() {
    formula_model_embeds_as_open_clip_does("rn50");
}

/// LAION's ConvNeXt-B CLIP at open_clip's real config (convnext_base.json:
/// timm's convnext_base trunk, its pooled LayerNorm, a linear projection),
/// the same way.
#[test]
fn laion_convnext_base_embeds_as_open_clip_does() {
    formula_model_embeds_as_open_clip_does("convnext_base");
}

fn formula_model_embeds_as_open_clip_does(name: &str) {
    let src = fixtures().join(name);
    let d = tempfile::tempdir().unwrap();
    common::formula_model(&src, d.path());
    let enc = Encoder::load(d.path().to_str().unwrap(), &Device::Cpu).unwrap();
    let (exp, meta) = common::expected_with_meta(&src.join("expected.safetensors"));
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let photos: Vec<String> = serde_json::from_str(&meta["photos"]).unwrap();
    let ids = enc.tokenizer().encode(&texts).unwrap().ids;
    let want = exp["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    assert_eq!(ids, want.to_vec2::<u32>().unwrap(), "token ids");
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    let paths: Vec<PathBuf> = photos.iter().map(|p| shared.join(p)).collect();
    let px: Vec<Vec<f32>> = paths
        .iter()
        .map(|p| enc.image_processor().process_path(p).unwrap())
        .collect();
    let px = enc.pixel_batch(&px).unwrap();
    // Within 1e-4 as every parity test here, and each row's direction (what
    // retrieval reads) to a cosine of 1 - 1e-6.
    let check = |what: &str, got: &Tensor, want: &Tensor| {
        let d = max_abs(got, want);
        let cos = clasp::model::l2_normalize(got)
            .unwrap()
            .mul(&clasp::model::l2_normalize(want).unwrap())
            .unwrap()
            .sum(1)
            .unwrap()
            .min(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("{name} {what}: max |diff| {d:.2e}, lowest cosine {cos:.8}");
        assert!(
            d < 1e-4 && cos > 1.0 - 1e-6,
            "{what}: max |diff| {d}, cosine {cos}"
        );
    };
    check(
        "image features",
        &enc.image_features(&px).unwrap(),
        &exp["image_features"],
    );
    check(
        "text features",
        &enc.text_features(&texts).unwrap(),
        &exp["text_features"],
    );
}

/// The narrow CNN towers every verb runs on (tests/every_architecture.rs)
/// give open_clip's image embeddings too: a ModifiedResNet of one block per
/// stage, and timm's convnext_atto (whose MLP is 1×1 convolutions).
#[test]
fn narrow_cnn_towers_embed_images_as_open_clip_does() {
    for name in ["tiny-rn", "tiny-convnext"] {
        let src = fixtures().join(name);
        let d = tempfile::tempdir().unwrap();
        common::formula_model(&src, d.path());
        let enc = Encoder::load(d.path().to_str().unwrap(), &Device::Cpu).unwrap();
        let (exp, meta) = common::expected_with_meta(&src.join("expected.safetensors"));
        let photos: Vec<String> = serde_json::from_str(&meta["photos"]).unwrap();
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
        let px: Vec<Vec<f32>> = photos
            .iter()
            .map(|p| enc.image_processor().process_path(&shared.join(p)).unwrap())
            .collect();
        let img = enc.image_features(&enc.pixel_batch(&px).unwrap()).unwrap();
        let d = max_abs(&img, &exp["image_features"]);
        eprintln!("{name}: image features max |diff| {d:.2e}");
        assert!(d < 1e-4, "{name}: image features differ by {d}");
    }
}

/// OpenAI published CLIP as TorchScript archives (`torch.jit.save`): such
/// an archive of tiny-quickgelu reads as exactly the tensors of its pickled
/// state dict, under the same names (the module's attribute paths), plus
/// the causal mask, a buffer the archive keeps and state dicts do not.
#[test]
fn a_torchscript_archive_reads_as_its_state_dict() {
    let jit = clasp::model::torch_file::read_state_dict(&fixtures().join("tiny_jit.pt")).unwrap();
    let sd = clasp::model::torch_file::read_state_dict(
        &fixtures().join("tiny-quickgelu/open_clip_pytorch_model.bin"),
    )
    .unwrap();
    let mut a: Vec<&String> = jit.keys().filter(|k| *k != "attn_mask").collect();
    let mut b: Vec<&String> = sd.keys().collect();
    assert!(jit.contains_key("attn_mask"));
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for (k, v) in &sd {
        assert_eq!(max_abs(&jit[k], v), 0.0, "{k}");
    }
}

/// The architecture of an OpenAI checkpoint read from its shapes, as
/// open_clip's build_model_from_openai_state_dict does: RN50's and
/// ViT-B-32's state dicts give open_clip's RN50 and ViT-B-32-quickgelu
/// configs.
#[test]
fn openai_checkpoints_tell_their_architecture_by_shapes() {
    use clasp::model::open_clip_openai::model_cfg;
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let rn50_shapes: std::collections::HashMap<String, Vec<usize>> =
        serde_json::from_value(read(fixtures().join("rn50/manifest.json"))["shapes"].clone())
            .unwrap();
    let got = model_cfg(&rn50_shapes).unwrap();
    let want = read(fixtures().join("rn50/open_clip_config.json"))["model_cfg"].clone();
    assert_eq!(got["embed_dim"], want["embed_dim"]);
    assert_eq!(got["vision_cfg"]["layers"], want["vision_cfg"]["layers"]);
    assert_eq!(got["vision_cfg"]["width"], want["vision_cfg"]["width"]);
    assert_eq!(
        got["vision_cfg"]["image_size"],
        want["vision_cfg"]["image_size"]
    );
    for k in ["context_length", "vocab_size", "width", "heads", "layers"] {
        assert_eq!(got["text_cfg"][k], want["text_cfg"][k], "RN50 text_cfg.{k}");
    }
    let vit_shapes: std::collections::HashMap<String, Vec<usize>> =
        serde_json::from_value(read(fixtures().join("vit_b_32_shapes.json"))).unwrap();
    let got = model_cfg(&vit_shapes).unwrap();
    let want = read(fixtures().join("configs/ViT-B-32-quickgelu.json"));
    assert_eq!(got["quick_gelu"], true);
    assert_eq!(got["embed_dim"], want["embed_dim"]);
    for k in ["layers", "width", "patch_size", "image_size"] {
        assert_eq!(
            got["vision_cfg"][k], want["vision_cfg"][k],
            "ViT-B-32 vision_cfg.{k}"
        );
    }
    for k in ["context_length", "vocab_size", "width", "heads", "layers"] {
        assert_eq!(
            got["text_cfg"][k], want["text_cfg"][k],
            "ViT-B-32 text_cfg.{k}"
        );
    }
}
