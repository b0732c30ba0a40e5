//! Helpers the `train_parity` tests share (split into two files by size).
#![allow(dead_code, unused_imports)]

use candle_core::{Device, Tensor, Var};
use clasp::train::objectives::{Batch, InfoNce, Objective, SigLip};
use std::path::Path;

pub fn fixtures() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load("tests/fixtures/train/losses.safetensors", &Device::Cpu).unwrap()
}

/// `got` equals `want` (reshaped alike) within 1e-5 by [`max_abs`].
pub fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    let d = max_abs(got, &want.reshape(got.shape()).unwrap());
    assert!(d < 1e-5, "{what} differs by {d}");
}

/// The fixtures of scripts/gen_objective_fixtures.py.
pub fn objective_fixtures() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load("tests/fixtures/train/objectives.safetensors", &Device::Cpu)
        .unwrap()
}

/// A case's raw image and text features as variables, and the L2-normalised
/// features the objectives see (as the towers' projections feed them).
pub fn case_features(
    f: &std::collections::HashMap<String, Tensor>,
    case: &str,
) -> (Var, Var, Tensor, Tensor) {
    let img = Var::from_tensor(&f[&format!("{case}.image")]).unwrap();
    let txt = Var::from_tensor(&f[&format!("{case}.text")]).unwrap();
    let ni = clasp::model::l2_normalize(img.as_tensor()).unwrap();
    let nt = clasp::model::l2_normalize(txt.as_tensor()).unwrap();
    (img, txt, ni, nt)
}

/// max |a − b| / max(1, |b|): 1e-5 absolute for values up to 1, relative
/// above (a scalar gradient summed over 1024 logits at scale 100 is in the
/// hundreds, where f32 itself resolves only ~1e-5).
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}
