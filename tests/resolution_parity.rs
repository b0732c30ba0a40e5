//! Image towers at resolutions other than the trained one, against
//! transformers' `interpolate_pos_encoding=True` (bicubic position
//! resizing), and the aspect-keeping patch budget against
//! Siglip2ImageProcessor's rule (scripts/gen_resolution_fixtures.py).

mod common;

use common::max_abs;
use std::path::{Path, PathBuf};

use candle_core::Device;
use clasp::encoder::Encoder;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn clip_chinese_clip_and_siglip_match_interpolated_positions_at_four_sizes() {
    let exp = candle_core::safetensors::load(
        fixtures().join("resolution/expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (name, dir) in [
        ("clip", "core/tiny-clip"),
        ("cn", "core/tiny-chinese-clip"),
        ("siglip", "siglip/tiny-siglip"),
    ] {
        let enc = Encoder::load(fixtures().join(dir).to_str().unwrap(), &Device::Cpu).unwrap();
        for size in ["48x32", "40x40", "24x40", "16x8"] {
            let px = &exp[&format!("{size}.pixel_values")];
            let got = enc.image_features(px).unwrap();
            let d = max_abs(&got, &exp[&format!("{name}.{size}.image_features")]);
            assert!(d < 1e-4, "{name} at {size}: differs by {d}");
        }
    }
}

#[test]
fn patch_budget_sizes_match_siglip2_processor_on_305_cases() {
    let cases: Vec<[u32; 6]> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("resolution/budget.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cases.len(), 305);
    for [h, w, p, n, th, tw] in cases {
        let got = clasp::preprocess::image::patch_budget_size(h, w, p, n);
        assert_eq!(got, (th, tw), "{h}x{w}, patch {p}, {n} patches");
        assert!((got.0 / p) * (got.1 / p) <= n.max(1));
    }
}

/// `set_resolution` end to end: at --image-size 48 a photo is processed to
/// 48x48 and embeds as the tower does on those pixels; with --keep-aspect a
/// wide photo keeps its shape within the budget, and a batch of mixed shapes
/// embeds each image as it embeds alone.
#[test]
fn image_size_and_keep_aspect_process_and_embed_mixed_shapes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let spec = fixtures().join("core/tiny-clip");
    let mut enc = Encoder::load(spec.to_str().unwrap(), &Device::Cpu).unwrap();
    let hash0 = enc.content_hash().unwrap();
    enc.set_resolution(Some(48), false).unwrap();
    assert_ne!(enc.content_hash().unwrap(), hash0, "other sizes key apart");
    let wide = root.join("../shared/data/reference-images/clip-diagram.png");
    let tall =
        root.join("../shared/data/reference-images/flickr8k-fullres/1000268201_693b08cb0e.jpg");
    let px = enc.image_processor().process_path_pixels(&wide).unwrap();
    assert_eq!((px.height, px.width), (48, 48));

    enc.set_resolution(None, true).unwrap();
    let a = enc.image_processor().process_path_pixels(&wide).unwrap();
    let b = enc.image_processor().process_path_pixels(&tall).unwrap();
    assert!(a.width > a.height && b.height > b.width, "aspect kept");
    for p in [&a, &b] {
        assert_eq!((p.height % 8, p.width % 8), (0, 0));
        assert!(
            (p.height / 8) * (p.width / 8) <= 16,
            "within (32/8)^2 patches"
        );
    }
    let both = enc.embed_pixel_items(&[a.clone(), b.clone()]).unwrap();
    let alone_b = enc.embed_pixel_items(&[b]).unwrap();
    let alone_a = enc.embed_pixel_items(&[a]).unwrap();
    assert!(max_abs(&both.get(0).unwrap(), &alone_a.get(0).unwrap()) < 1e-6);
    assert!(max_abs(&both.get(1).unwrap(), &alone_b.get(0).unwrap()) < 1e-6);
    assert!(
        enc.set_resolution(Some(30), false).is_err(),
        "not a multiple of 8"
    );
}
