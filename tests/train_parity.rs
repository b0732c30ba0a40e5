//! Training objectives and their gradients against open_clip's ClipLoss and
//! SigLipLoss (fixtures from scripts/gen_train_fixtures.py).

use candle_core::{Device, Tensor, Var};
use clasp::train::loss::{Batch, InfoNce, Objective, SigLip};

fn fixtures() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load("tests/fixtures/train/losses.safetensors", &Device::Cpu).unwrap()
}

/// max |a − b| / max(1, |b|): 1e-5 absolute for values up to 1, relative
/// above (a scalar gradient summed over 1024 logits at scale 100 is in the
/// hundreds, where f32 itself resolves only ~1e-5).
fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

#[test]
fn losses_and_gradients_equal_open_clip() {
    let f = fixtures();
    let mut checked = 0;
    for case in ["b8_d16", "b32_d64", "b1_d8"] {
        for (name, obj) in [("infonce", &InfoNce as &dyn Objective), ("siglip", &SigLip)] {
            let img = Var::from_tensor(&f[&format!("{case}.image")]).unwrap();
            let txt = Var::from_tensor(&f[&format!("{case}.text")]).unwrap();
            let s = Var::from_tensor(&f[&format!("{case}.log_scale")].squeeze(0).unwrap()).unwrap();
            let bias = Var::from_tensor(&f[&format!("{case}.bias")].squeeze(0).unwrap()).unwrap();
            let ni = clasp::model::l2_normalize(img.as_tensor()).unwrap();
            let nt = clasp::model::l2_normalize(txt.as_tensor()).unwrap();
            let b = Batch {
                image: &ni,
                text: &nt,
                log_scale: s.as_tensor(),
                bias: Some(bias.as_tensor()),
            };
            let loss = obj.loss(&b).unwrap();
            let p = format!("{case}.{name}.");
            let want = f[&format!("{p}loss")].squeeze(0).unwrap();
            let d = max_abs(&loss, &want);
            assert!(d < 1e-5, "{p}loss differs by {d}");
            let g = loss.backward().unwrap();
            for (var, key) in [
                (img.as_tensor(), "grad_image"),
                (txt.as_tensor(), "grad_text"),
                (s.as_tensor(), "grad_log_scale"),
            ] {
                let got = g
                    .get(var)
                    .unwrap_or_else(|| panic!("{p}{key}: no gradient"));
                let want = f[&format!("{p}{key}")].reshape(got.shape()).unwrap();
                let d = max_abs(got, &want);
                assert!(d < 1e-5, "{p}{key} differs by {d}");
            }
            if name == "siglip" {
                let got = g.get(bias.as_tensor()).expect("bias gradient");
                let want = f[&format!("{p}grad_bias")].squeeze(0).unwrap();
                assert!(max_abs(got, &want) < 1e-5, "{p}grad_bias");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}
