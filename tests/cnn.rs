//! The pretrained CNN image towers against torchvision, on fixtures that
//! torchvision made (scripts/gen_cnn_fixtures.py), with torchvision's own
//! ImageNet MobileNetV2 fetched from PyPI by scripts/get-model.sh; and
//! `torch.save` files in both formats.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clasp::model::layers::Linear;
use clasp::model::mobilenet_v2::{read_torchvision, MobileNetV2, MobileNetV2Config};
use clasp::model::torch_file::read_state_dict;
use clasp::preprocess::{ImageProcessor, ImageProcessorConfig};
use common::max_abs;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cnn")
}

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

#[test]
fn torch_save_zip_and_legacy_formats_read_as_their_tensors() {
    let want =
        candle_core::safetensors::load(fixtures().join("tiny.safetensors"), &Device::Cpu).unwrap();
    // The legacy file wraps the dict as {"state_dict": {"module.<k>": ...}}.
    for f in ["tiny_zip.pt", "tiny_legacy.pt"] {
        let got = read_state_dict(&fixtures().join(f)).unwrap();
        let mut names: Vec<&String> = got.keys().collect();
        names.sort();
        // The integer num_batches_tracked is left out; f16 is widened.
        assert_eq!(
            names,
            ["bn.running_mean", "conv.weight", "half", "proj.weight"],
            "{f}"
        );
        for (k, w) in &want {
            let g = &got[k];
            assert_eq!(g.dims(), w.dims(), "{f}: {k}");
            assert_eq!(max_abs(g, w), 0.0, "{f}: {k} differs");
        }
    }
}

fn imagenet_tower() -> (MobileNetV2, Linear) {
    let pth = common::pretrained("mobilenet_v2");
    let tensors: HashMap<String, Tensor> = read_torchvision(&pth).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let tower = MobileNetV2::load(vb.clone(), &MobileNetV2Config::torchvision()).unwrap();
    let head = Linear::load(vb.pp("classifier"), 1280, 1000, true).unwrap();
    (tower, head)
}

/// torchvision's ImageNet MobileNetV2, loaded from its published legacy
/// `.pth`, gives torchvision's pooled features, logits and feature map within
/// 1e-4 on held-out photos (lossless PNGs, and JPEGs, which clasp decodes to
/// Pillow's very pixels), through clasp's ImageNet preprocessing.
#[test]
fn mobilenet_v2_matches_torchvision_on_photos() {
    let exp =
        candle_core::safetensors::load(fixtures().join("mobilenet_v2.safetensors"), &Device::Cpu)
            .unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("mobilenet_v2.json")).unwrap(),
    )
    .unwrap();
    let photos: Vec<String> = meta["photos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let proc = ImageProcessor::new(ImageProcessorConfig::imagenet_default());
    let px: Vec<f32> = photos
        .iter()
        .flat_map(|p| proc.process_path(&shared().join(p)).unwrap())
        .collect();
    let px = Tensor::from_vec(px, (photos.len(), 3, 224, 224), &Device::Cpu).unwrap();
    let (tower, head) = imagenet_tower();
    let fmap = tower.feature_map(&px).unwrap();
    assert_eq!(fmap.dims(), [photos.len(), 1280, 7, 7]);
    let pooled = tower.forward(&px).unwrap();
    let logits = head.forward(&pooled).unwrap();
    for (i, p) in photos.iter().enumerate() {
        let row = |t: &Tensor| t.get(i).unwrap();
        let (dp, dl) = (
            max_abs(&row(&pooled), &row(&exp["pooled"])),
            max_abs(&row(&logits), &row(&exp["logits"])),
        );
        let cos = cosine(&row(&pooled), &row(&exp["pooled"]));
        let top = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        eprintln!("{p}: pooled max |diff| {dp:.2e}, logits {dl:.2e}, cosine {cos:.7}");
        assert!(dp < 1e-4 && dl < 1e-4, "{p}: pooled {dp}, logits {dl}");
        assert_eq!(
            top(&row(&logits)),
            top(&row(&exp["logits"])),
            "{p}: top class"
        );
    }
    // The feature map itself, at one position and averaged over positions.
    let d00 = max_abs(
        &fmap
            .narrow(2, 0, 1)
            .unwrap()
            .narrow(3, 0, 1)
            .unwrap()
            .flatten_from(1)
            .unwrap(),
        &exp["feature_map_00"],
    );
    let dmean = max_abs(&fmap.mean((2, 3)).unwrap(), &exp["feature_map_mean"]);
    assert!(
        d00 < 1e-4 && dmean < 1e-4,
        "feature map [0, 0]: {d00}, mean {dmean}"
    );
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.to_vec1().unwrap();
    let b: Vec<f32> = b.to_vec1().unwrap();
    let dot: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64) * (*y as f64))
        .sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(&a) * n(&b))
}

/// `clasp classify --imagenet` labels a folder with the model's own
/// ImageNet classes: torchvision's top class for each photo (the fixture's
/// top-5 lists), a bad file named with the rest labelled, and exit code 1.
#[test]
fn classify_imagenet_gives_torchvision_top_classes() {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("mobilenet_v2.json")).unwrap(),
    )
    .unwrap();
    let d = tempfile::tempdir().unwrap();
    let mut want = std::collections::BTreeMap::new();
    for (i, p) in meta["photos"].as_array().unwrap().iter().enumerate() {
        let p = p.as_str().unwrap();
        let name = format!(
            "{i}_{}",
            Path::new(p).file_name().unwrap().to_str().unwrap()
        );
        std::fs::copy(shared().join(p), d.path().join(&name)).unwrap();
        want.insert(name, meta["top5"][i][0].as_str().unwrap().to_string());
    }
    std::fs::write(d.path().join("zz_broken.jpg"), b"not an image").unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_clasp"))
        .args(["classify", "--json", "--imagenet"])
        .arg(common::pretrained("mobilenet_v2"))
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("zz_broken.jpg"));
    let got: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let got: std::collections::BTreeMap<String, String> = got
        .iter()
        .map(|l| {
            let p = l["path"].as_str().unwrap();
            (
                Path::new(p)
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string(),
                l["label"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, want);
}
