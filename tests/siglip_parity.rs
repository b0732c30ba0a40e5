//! SigLIP parity with transformers on fixtures it produced
//! (scripts/gen_siglip_fixtures.py): SiglipTokenizer's ids over a
//! SentencePiece model, SiglipImageProcessor's pixels on real photos, and
//! SiglipModel's embeddings and sigmoid logits.

mod common;

use common::max_abs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clasp::encoder::Encoder;
use clasp::preprocess::TextTokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/siglip")
}

#[derive(serde::Deserialize)]
struct Tokens {
    strings: Vec<String>,
    input_ids: Vec<Vec<u32>>,
}

#[test]
fn siglip_tokenizer_matches_transformers_on_214_strings() {
    let t: Tokens =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokens.json")).unwrap())
            .unwrap();
    assert_eq!(t.strings.len(), 214);
    let tok = TextTokenizer::from_dir(&fixtures().join("tiny-siglip"), 64).unwrap();
    let got = tok.encode(&t.strings).unwrap();
    let mut bad = Vec::new();
    for (i, s) in t.strings.iter().enumerate() {
        if got.ids[i] != t.input_ids[i] {
            bad.push(format!(
                "{s:?}\n  want {:?}\n  got  {:?}",
                t.input_ids[i], got.ids[i]
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {} differ:\n{}",
        bad.len(),
        t.strings.len(),
        bad.join("\n")
    );
}

fn encoder() -> Encoder {
    Encoder::load(
        fixtures().join("tiny-siglip").to_str().unwrap(),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn siglip_embeddings_and_sigmoid_logits_match_transformers() {
    let (exp, meta) = common::expected_with_meta(&fixtures().join("expected.safetensors"));
    let enc = encoder();
    let img = enc.image_features(&exp["pixel_values"]).unwrap();
    let d = max_abs(&img, &exp["image_features"]);
    assert!(d < 1e-4, "image features differ by {d}");

    // Token ids from clasp's tokenizer, then the text tower.
    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let txt = enc.text_features(&texts).unwrap();
    let d = max_abs(&txt, &exp["text_features"]);
    assert!(d < 1e-4, "text features differ by {d}");
    let batch = enc.tokenizer().encode(&texts).unwrap();
    let want_ids = exp["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    assert_eq!(batch.ids, want_ids.to_vec2::<u32>().unwrap());

    let n = |t: &Tensor| clasp::model::l2_normalize(t).unwrap();
    let logits = enc.similarity(&n(&img), &n(&txt)).unwrap();
    let d = max_abs(&logits, &exp["logits_per_image"]);
    assert!(d < 1e-4, "logits differ by {d}");
    assert!(enc.sigmoid_scores());
    let p = enc.probabilities(&[0.0, 2.0]);
    assert!((p[0] - 0.5).abs() < 1e-12 && (p[1] - 0.880797).abs() < 1e-6);
}

/// SiglipImageProcessor (PIL) against clasp's on non-square real photos,
/// an RGBA image and an EXIF-rotated JPEG: both resize straight to 32x32
/// with PIL's bicubic filter. One 8-bit level is 2/255 after the 0.5/0.5
/// normalization. PNGs must match to float rounding (clasp reproduces
/// Pillow's fixed-point resampler); one level is allowed on the full-size
/// JPEG photos, three on the 60x45 test JPEG, whose decoders (libjpeg-turbo's and the `image`
/// crate's) round the inverse DCT differently (as in core_parity).
#[test]
fn siglip_pixels_match_transformers_processor() {
    let (exp, meta) = common::expected_with_meta(&fixtures().join("expected.safetensors"));
    let enc = encoder();
    let files: Vec<String> = serde_json::from_str(&meta["files"]).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert_eq!(exp["pixel_values"].dims(), &[files.len(), 3, 32, 32]);
    for (i, f) in files.iter().enumerate() {
        let path = root.join(f);
        if !path.exists() {
            panic!("{} is missing: the test reads ../shared", path.display());
        }
        let got = enc.image_processor().process_path(&path).unwrap();
        let got = Tensor::from_vec(got, (3, 32, 32), &Device::Cpu).unwrap();
        let want = exp["pixel_values"].get(i).unwrap();
        let d = max_abs(&got, &want);
        let levels = if !f.ends_with(".jpg") {
            0.0
        } else if f.contains("fixtures/core/images/") {
            3.0
        } else {
            1.0
        };
        assert!(
            d <= levels * 2.0 / 255.0 + 1e-5,
            "{f}: pixels differ by {d} (allowed {levels} levels)"
        );
    }
}

/// A reference patch row set [gh*gw, p*p*C] (channels last) back to a
/// [1, C, gh*p, gw*p] image.
fn unpatchify(patches: &Tensor, (gh, gw): (usize, usize), p: usize) -> Tensor {
    let c = patches.dim(1).unwrap() / (p * p);
    patches
        .narrow(0, 0, gh * gw)
        .unwrap()
        .reshape((gh, gw, p, p, c))
        .unwrap()
        .permute((4, 0, 2, 1, 3))
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((1, c, gh * p, gw * p))
        .unwrap()
}

/// SigLIP 2 (NaFlex) against transformers on six photos of four aspect
/// ratios: each image's embedding from its own patch grid (positions
/// resized per image) equals Siglip2Model's on the padded, masked batch;
/// the Gemma tokenizer.json gives the same ids; text embeddings and sigmoid
/// logits agree.
#[test]
fn siglip2_naflex_embeddings_and_logits_match_transformers() {
    let (exp, meta) = common::expected_with_meta(&fixtures().join("expected2.safetensors"));
    let enc = Encoder::load(
        fixtures().join("tiny-siglip2").to_str().unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(enc.config().model_type(), "siglip2");
    let shapes = exp["spatial_shapes"].to_vec2::<i32>().unwrap();
    let n = shapes.len();
    let mut rows = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        let img = unpatchify(
            &exp["pixel_values"].get(i).unwrap(),
            (s[0] as usize, s[1] as usize),
            8,
        );
        rows.push(enc.image_features(&img).unwrap().squeeze(0).unwrap());
    }
    let img = Tensor::stack(&rows, 0).unwrap();
    let d = max_abs(&img, &exp["image_features"]);
    assert!(d < 1e-4, "image features differ by {d}");
    assert!(
        shapes.iter().any(|s| s[0] != s[1]),
        "non-square grids tested"
    );

    let texts: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let batch = enc.tokenizer().encode(&texts).unwrap();
    let want = exp["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    assert_eq!(batch.ids, want.to_vec2::<u32>().unwrap());
    let txt = enc.text_features(&texts).unwrap();
    let d = max_abs(&txt, &exp["text_features"]);
    assert!(d < 1e-4, "text features differ by {d}");
    let nrm = |t: &Tensor| clasp::model::l2_normalize(t).unwrap();
    let logits = enc.similarity(&nrm(&img), &nrm(&txt)).unwrap();
    assert_eq!(logits.dims(), &[n, texts.len()]);
    let d = max_abs(&logits, &exp["logits_per_image"]);
    assert!(d < 1e-4, "logits differ by {d}");
}

/// Siglip2ImageProcessor (PIL, bilinear, max_num_patches 16) against clasp
/// on non-square photos: the patch grids and masks are identical, and the
/// patch values agree to one 8-bit level on PNGs and the full-size JPEGs,
/// three on the 60x45 test JPEG (decoders differ; see core_parity).
#[test]
fn siglip2_patch_grids_masks_and_pixels_match_transformers() {
    let (exp, meta) = common::expected_with_meta(&fixtures().join("expected2.safetensors"));
    let enc = Encoder::load(
        fixtures().join("tiny-siglip2").to_str().unwrap(),
        &Device::Cpu,
    )
    .unwrap();
    let files: Vec<String> = serde_json::from_str(&meta["files"]).unwrap();
    let shapes = exp["spatial_shapes"].to_vec2::<i32>().unwrap();
    let masks = exp["pixel_attention_mask"].to_vec2::<i32>().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (i, f) in files.iter().enumerate() {
        let px = enc
            .image_processor()
            .process_path_pixels(&root.join(f))
            .unwrap();
        let clasp::preprocess::image::NaflexInputs {
            patches,
            mask,
            grid,
        } = clasp::preprocess::image::naflex_patches(&px, 8, 16).unwrap();
        assert_eq!(
            grid,
            (shapes[i][0] as usize, shapes[i][1] as usize),
            "{f}: grid"
        );
        let want_mask: Vec<u8> = masks[i].iter().map(|&m| m as u8).collect();
        assert_eq!(mask, want_mask, "{f}: mask");
        let got = Tensor::from_vec(patches, (16, 192), &Device::Cpu).unwrap();
        let d = max_abs(&got, &exp["pixel_values"].get(i).unwrap());
        let levels = if f.contains("fixtures/core/images/") && f.ends_with(".jpg") {
            3.0
        } else {
            1.0
        };
        assert!(
            d <= levels * 2.0 / 255.0 + 1e-5,
            "{f}: patches differ by {d}"
        );
    }
}
