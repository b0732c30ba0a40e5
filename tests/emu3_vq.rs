//! Emu3's VQ image tokenizer against transformers' `Emu3VQVAE` (fixtures
//! from scripts/gen_emu3_vq_fixtures.py: Emu3's real VQ config with the
//! channels cut from 256 to 32, `hashed` weights, and Emu3ImageProcessor's
//! pixels on held-out photos): the processor's resized pixels byte for byte,
//! the codes identical, and the decoded pixels within 1e-4 before clamping,
//! for two photos (one square, one not) and an 8-frame video.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clasp::model::emu3_vq::Emu3Vq;
use clasp::preprocess::image::{load_image, ImageProcessor, ImageProcessorConfig, ResizeTo};
use clasp::preprocess::resample::resize_pil;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/emu3/vq")
}

fn expected() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn dev_photo(i: usize) -> PathBuf {
    let flickr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/flickr8k");
    let names = std::fs::read_to_string(flickr.join("Flickr_8k.devImages.txt")).unwrap();
    flickr
        .join("images")
        .join(names.split_whitespace().nth(i).unwrap())
}

/// The processor's resize alone (HWC bytes), checked against the
/// reference's, then its normalised pixels as [C, H, W].
fn pixels(proc: &ImageProcessor, path: &Path, want_resized: &Tensor) -> Tensor {
    let img = load_image(path).unwrap();
    let (h, w) = proc.config().output_size((img.height(), img.width()));
    let resized = resize_pil(&img, w, h, proc.config().resample);
    let want: Vec<u8> = want_resized.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(
        want_resized.dims(),
        [h as usize, w as usize, 3],
        "{}: size",
        path.display()
    );
    assert_eq!(
        resized.as_raw(),
        &want,
        "{}: resized pixels",
        path.display()
    );
    let px = proc.process_path_pixels(path).unwrap();
    Tensor::from_vec(px.data, (3, px.height, px.width), &Device::Cpu).unwrap()
}

fn assert_close(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let d = common::max_abs(got, want);
    assert!(d <= tol, "{what}: max |clasp - transformers| = {d}");
}

fn codes(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn tokenizer_matches_transformers_on_photos_and_video() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = common::emu3_vq_folder(dir.path());
    let vq = Emu3Vq::from_dir(&model_dir, &Device::Cpu).unwrap();
    let want = expected();
    let proc = ImageProcessor::new(
        ImageProcessorConfig::from_file(&model_dir.join("preprocessor_config.json")).unwrap(),
    );
    let coco = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/coco-mini-train/train2017/000000000790.jpg");
    for (i, photo) in [dev_photo(0), coco].iter().enumerate() {
        let px = pixels(&proc, photo, &want[&format!("resized.{i}")]);
        let sums: Vec<f64> = px
            .to_dtype(DType::F64)
            .unwrap()
            .sum((1, 2))
            .unwrap()
            .to_vec1()
            .unwrap();
        let want_sums: Vec<f64> = want[&format!("pixels_sum.{i}")].to_vec1().unwrap();
        for (g, w) in sums.iter().zip(&want_sums) {
            common::close_to(*g, *w, 1e-6, &format!("photo {i}: channel sum"));
        }
        let px1 = px.unsqueeze(0).unwrap();
        let latents = vq.latents(&px1).unwrap().squeeze(0).unwrap();
        assert_close(
            &latents,
            &want[&format!("latents.{i}")],
            1e-5,
            &format!("photo {i}: latents"),
        );
        let got = vq.encode(&px1).unwrap().squeeze(0).unwrap();
        let want_codes = &want[&format!("codes.{i}")];
        assert_eq!(got.dims(), want_codes.dims(), "photo {i}: code grid");
        let margin: f32 = want[&format!("margin.{i}")]
            .min_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(
            codes(&got),
            codes(want_codes),
            "photo {i}: codes (nearest two at least {margin} apart)"
        );

        let decoded = vq
            .decode(&want_codes.unsqueeze(0).unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap();
        let (_, h, w) = decoded.dims3().unwrap();
        assert_eq!(
            (h, w),
            (px.dims()[1], px.dims()[2]),
            "photo {i}: decoded size"
        );
        let every4 = decoded
            .index_select(
                &Tensor::arange_step(0u32, h as u32, 4, &Device::Cpu).unwrap(),
                1,
            )
            .unwrap()
            .index_select(
                &Tensor::arange_step(0u32, w as u32, 4, &Device::Cpu).unwrap(),
                2,
            )
            .unwrap();
        assert_close(
            &every4,
            &want[&format!("decoded.{i}")],
            1e-4,
            &format!("photo {i}: decoded"),
        );
        let sums = decoded.to_dtype(DType::F64).unwrap().sum((1, 2)).unwrap();
        let want_sums = &want[&format!("decoded_sum.{i}")];
        let d = common::max_abs(
            &sums.to_dtype(DType::F32).unwrap(),
            &want_sums.to_dtype(DType::F32).unwrap(),
        );
        assert!(
            d < 1e-4 * (h * w) as f32,
            "photo {i}: decoded sums differ by {d}"
        );
    }

    // A video: 8 frames at a 64² budget give 2 x 8 x 8 codes.
    let mut small = proc.config().clone();
    small.resize = ResizeTo::PixelBudget {
        factor: 8,
        min_pixels: 32 * 32,
        max_pixels: 64 * 64,
    };
    let small = ImageProcessor::new(small);
    let resized = &want["video.resized"];
    let frames: Vec<Tensor> = (0..8)
        .map(|f| pixels(&small, &dev_photo(2 + f), &resized.get(f).unwrap()))
        .collect();
    let video = Tensor::stack(&frames, 0).unwrap().unsqueeze(0).unwrap();
    let got = vq.encode(&video).unwrap().squeeze(0).unwrap();
    assert_eq!(got.dims(), [2, 8, 8], "video: code grid");
    assert_eq!(codes(&got), codes(&want["video.codes"]), "video: codes");
    let decoded = vq
        .decode(&want["video.codes"].unsqueeze(0).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_eq!(decoded.dims(), [8, 3, 64, 64], "video: decoded frames");
    let idx = Tensor::arange_step(0u32, 64, 4, &Device::Cpu).unwrap();
    let every4 = decoded
        .index_select(&idx, 2)
        .unwrap()
        .index_select(&idx, 3)
        .unwrap();
    assert_close(&every4, &want["video.decoded"], 1e-4, "video: decoded");
}

#[test]
fn bad_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = common::emu3_vq_folder(dir.path());
    let vq = Emu3Vq::from_dir(&model_dir, &Device::Cpu).unwrap();
    let odd = Tensor::zeros((1, 3, 60, 64), DType::F32, &Device::Cpu).unwrap();
    let err = vq.encode(&odd).unwrap_err().to_string();
    assert!(
        err.contains("60x64") && err.contains("multiple of 8"),
        "{err}"
    );
    let three = Tensor::zeros((1, 3, 3, 64, 64), DType::F32, &Device::Cpu).unwrap();
    let err = vq.encode(&three).unwrap_err().to_string();
    assert!(
        err.contains("3 frames") && err.contains("multiple of 4"),
        "{err}"
    );
    let codes = Tensor::new(&[[[40000u32]]], &Device::Cpu).unwrap();
    let err = vq.decode(&codes).unwrap_err().to_string();
    assert!(err.contains("40000") && err.contains("32768"), "{err}");
    // Not an Emu3 folder: the config says what it is.
    std::fs::write(model_dir.join("config.json"), r#"{"model_type": "clip"}"#).unwrap();
    let err = Emu3Vq::from_dir(&model_dir, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json") && err.contains("clip"), "{err}");
}

/// `clasp tokenize-image` prints the codes transformers gives;
/// `clasp detokenize-image` writes them back as a PNG whose pixels are the
/// decoded ones unnormalised (Emu3ImageProcessor's postprocess); a bad line
/// is named.
#[test]
fn cli_tokenizes_and_draws_back() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = common::emu3_vq_folder(dir.path());
    let want = expected();
    let m = model_dir.to_str().unwrap();
    let photo = dev_photo(0);
    let out = common::clasp(&["tokenize-image", "-m", m, photo.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (line["height"].as_u64(), line["width"].as_u64()),
        (Some(128), Some(128))
    );
    let got: Vec<i64> = line["codes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|c| c.as_i64().unwrap()))
        .collect();
    assert_eq!(got, codes(&want["codes.0"]), "tokenize-image codes");

    let codes_file = dir.path().join("codes.jsonl");
    std::fs::write(&codes_file, &out.stdout).unwrap();
    let png = dir.path().join("back.png");
    let args = [
        "detokenize-image",
        "-m",
        m,
        "--codes",
        codes_file.to_str().unwrap(),
        "-o",
    ];
    let out = common::clasp(&[&args[..], &[png.to_str().unwrap()]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (128, 128));
    // Every 4th pixel against transformers' decoded values, unnormalised.
    let dec: Vec<Vec<Vec<f32>>> = want["decoded.0"].to_vec3().unwrap();
    for (y, row) in (0..128).step_by(4).enumerate() {
        for (x, col) in (0..128).step_by(4).enumerate() {
            for (c, plane) in dec.iter().enumerate() {
                let v = ((plane[y][x] * 0.5 + 0.5) * 255.0).clamp(0.0, 255.0);
                let p = img.get_pixel(col as u32, row as u32)[c] as f32;
                assert!(
                    (p - v.trunc()).abs() <= 1.0,
                    "pixel ({col}, {row}) channel {c}: {p} vs {v}"
                );
            }
        }
    }
    std::fs::write(&codes_file, "{\"codes\": [[1, 2], [3]]}\n").unwrap();
    let out = common::clasp(&[&args[..], &[png.to_str().unwrap()]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("line 1") && err.contains("equal rows"),
        "{err}"
    );
}
