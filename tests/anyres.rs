//! LLaVA-NeXT's AnyRes preprocessing against transformers'
//! `LlavaNextImageProcessorPil` and `LlavaNextProcessor` (fixtures:
//! scripts/gen_anyres_fixtures.py) on full-resolution photos of several
//! aspect ratios: the grid, every tile's pixels (means, mean absolute value
//! and a corner; exact on the PNGs, within the JPEG decoders' difference on
//! the JPEGs) and the number of image tokens.

mod common;

use std::path::Path;

use clasp::preprocess::anyres::{feature_count, tiles};
use clasp::preprocess::{load_image, ImageProcessor, ImageProcessorConfig};
use serde_json::Value;

fn pairs(v: &Value) -> Vec<(u32, u32)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_u64().unwrap() as u32))
        .collect()
}

#[test]
fn anyres_tiles_and_token_counts_equal_llava_next_processors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/anyres/tiles.json")).unwrap(),
    )
    .unwrap();
    let (pinpoints, small) = (pairs(&f["pinpoints"]), pairs(&f["small_grid"]));
    let proc = ImageProcessor::new(ImageProcessorConfig::clip_default(336));
    let mut worst_png = 0f32;
    for c in f["cases"].as_array().unwrap() {
        let name = c["photo"].as_str().unwrap();
        let img = load_image(&root.join("../shared/data/reference-images").join(name)).unwrap();
        let a = tiles(&proc, &img, &pinpoints, 336).unwrap();
        let size = (
            c["image_size"][0].as_u64().unwrap() as u32,
            c["image_size"][1].as_u64().unwrap() as u32,
        );
        assert_eq!(a.image_size, size, "{name}");
        assert_eq!(a.tiles.len() as u64, c["tiles"].as_u64().unwrap(), "{name}");
        assert_eq!(1 + a.grid.0 * a.grid.1, a.tiles.len());
        // JPEG decoders differ by IDCT rounding (see core_parity): a level
        // here and there moves a tile's mean by far less than this.
        let lossless = name.ends_with(".png");
        let bound = if lossless { 1e-5 } else { 2e-3 };
        let plane = 336 * 336;
        for (k, t) in a.tiles.iter().enumerate() {
            for ch in 0..3 {
                let mean = (t[ch * plane..(ch + 1) * plane]
                    .iter()
                    .map(|&v| v as f64)
                    .sum::<f64>()
                    / plane as f64) as f32;
                let want = c["means"][k][ch].as_f64().unwrap() as f32;
                assert!(
                    (mean - want).abs() < bound,
                    "{name} tile {k} channel {ch}: {mean} vs {want}"
                );
                if lossless {
                    worst_png = worst_png.max((mean - want).abs());
                    for y in 0..4 {
                        for x in 0..4 {
                            let got = t[ch * plane + y * 336 + x];
                            let want = c["corners"][k][ch][y][x].as_f64().unwrap() as f32;
                            assert!((got - want).abs() < 1e-4, "{name} tile {k} ({ch},{y},{x})");
                        }
                    }
                }
            }
            let abs = (t.iter().map(|v| v.abs() as f64).sum::<f64>() / t.len() as f64) as f32;
            let want = c["abs_means"][k].as_f64().unwrap() as f32;
            assert!(
                (abs - want).abs() < bound,
                "{name} tile {k}: |x| {abs} vs {want}"
            );
        }
        assert_eq!(
            feature_count(size, &pinpoints, 336, 24, 0) as u64,
            c["tokens"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            feature_count(size, &small, 336, 24, 0) as u64,
            c["tokens_small_grid"].as_u64().unwrap(),
            "{name}: the small grid"
        );
    }
    eprintln!("PNG tiles' channel means within {worst_png:.1e} of transformers'");
}

/// The model side: the base picture's and tiles' features packed as
/// transformers' `LlavaNextModel.pack_image_features` packs them (the map
/// unpadded, a newline after each row), for six image sizes
/// (scripts/gen_anyres_pack_fixtures.py), and as many tokens as the
/// processor counts.
#[test]
fn anyres_features_pack_as_llava_next_packs_them() {
    use candle_core::{Device, Tensor};
    use clasp::preprocess::anyres::select_best_resolution;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/anyres/pack.json")).unwrap(),
    )
    .unwrap();
    let pinpoints = pairs(&f["pinpoints"]);
    let newline = Tensor::new(common::f32s(&f["newline"]), &Device::Cpu).unwrap();
    for c in f["cases"].as_array().unwrap() {
        let size = (
            c["image_size"][0].as_u64().unwrap() as u32,
            c["image_size"][1].as_u64().unwrap() as u32,
        );
        let n = c["tiles"].as_u64().unwrap() as usize;
        let feats =
            Tensor::from_vec(common::f32s(&c["features"]), (n, 16, 8), &Device::Cpu).unwrap();
        let best = select_best_resolution(size, &pinpoints);
        let grid = ((best.0 / 336) as usize, (best.1 / 336) as usize);
        let packed: Vec<Vec<f32>> = clasp::vlm::anyres::pack(&feats, grid, size, Some(&newline))
            .unwrap()
            .to_vec2()
            .unwrap();
        let want: Vec<Vec<f32>> = c["packed"]
            .as_array()
            .unwrap()
            .iter()
            .map(common::f32s)
            .collect();
        assert_eq!(packed.len(), want.len(), "{size:?}");
        assert_eq!(
            packed.len(),
            feature_count(size, &pinpoints, 336, 4, 0),
            "{size:?}"
        );
        for (a, b) in packed.iter().zip(&want) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-6, "{size:?}: {x} vs {y}");
            }
        }
    }
}
