//! `clasp export onnx`: the graphs pass ONNX's checker in ONNX Runtime's
//! loader and reproduce clasp's embeddings to 1e-4 (scripts/onnx_check.py,
//! with `onnxruntime` from PyPI through scripts/get-py-clients.sh).

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use clasp::encoder::Encoder;

fn check(model: &Path) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("onnx");
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(["export", "onnx", "--model"])
        .arg(model)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["vision.onnx", "text.onnx", "preprocess.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("preprocess.json")).unwrap())
            .unwrap();
    assert_eq!(side["opset"], 17);
    assert!(side["image_processor"]["image_mean"].is_array());

    let enc = Encoder::load(model.to_str().unwrap(), &Device::Cpu).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let images = [
        root.join("tests/fixtures/core/images/rgb.png"),
        root.join("tests/fixtures/core/images/palette.png"),
        root.join("../shared/data/reference-images/coco-000000039769-two-cats.png"),
    ];
    let px: Vec<Vec<f32>> = images
        .iter()
        .map(|p| enc.image_processor().process_path(p).unwrap())
        .collect();
    let batch = enc.pixel_batch(&px).unwrap();
    let image_embeds = enc.embed_pixels(&batch).unwrap().to_vec2::<f32>().unwrap();
    let texts = [
        "a photo of a cat",
        "the dog",
        "an ant on the cat the dog the cat",
    ];
    let tb = enc.tokenizer().encode(&texts).unwrap();
    // Unpadded, so each text has its own length, except for SigLIP, whose
    // text tower reads the whole padded context.
    let full = enc.config().reads_full_context();
    let ids: Vec<Vec<u32>> = tb
        .ids
        .iter()
        .zip(&tb.mask)
        .map(|(i, m)| {
            i.iter()
                .zip(m)
                .filter(|(_, &m)| full || m == 1)
                .map(|(&i, _)| i)
                .collect()
        })
        .collect();
    let text_embeds = enc.embed_texts(&texts).unwrap().to_vec2::<f32>().unwrap();
    let inputs = serde_json::json!({
        "pixel_values": px.concat(),
        "pixel_shape": batch.dims(),
        "input_ids": ids,
        "image_embeds": image_embeds,
        "text_embeds": text_embeds,
    });
    let f = d.path().join("inputs.json");
    std::fs::write(&f, inputs.to_string()).unwrap();
    let r = common::python_client(
        "onnx_check.py",
        &[out.to_str().unwrap(), f.to_str().unwrap()],
    );
    let (di, dt) = (
        r["image_max_abs"].as_f64().unwrap(),
        r["text_max_abs"].as_f64().unwrap(),
    );
    assert!(di < 1e-4 && dt < 1e-4, "{}: {r}", model.display());
    assert_eq!(r["batch"], 3);
    if !full {
        assert!(
            r["sequences"].as_array().unwrap().len() > 1,
            "sequence lengths vary: {r}"
        );
    }
}

#[test]
fn clip_exports_to_onnx_that_onnx_runtime_runs_with_equal_embeddings() {
    check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/core/tiny-clip"));
}

#[test]
fn open_clip_checkpoints_export_to_onnx_with_equal_embeddings() {
    check(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/open_clip/tiny-quickgelu"));
}

#[test]
fn chinese_clip_dual_encoder_and_siglip_export_with_equal_embeddings() {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for m in [
        "core/tiny-chinese-clip",
        "core/tiny-dual-encoder",
        "siglip/tiny-siglip",
    ] {
        check(&f.join(m));
    }
}

#[test]
fn unsupported_architectures_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(["export", "onnx", "--model"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/siglip/tiny-siglip2"))
        .arg("--output")
        .arg(d.path().join("x"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("SigLIP 2"), "{err}");
    assert!(!d.path().join("x").exists(), "nothing written");
}
