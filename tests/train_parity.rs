//! Training objectives and their gradients against open_clip's ClipLoss and
//! SigLipLoss (fixtures from scripts/gen_train_fixtures.py).

use candle_core::{Device, Tensor, Var};
use clasp::train::objectives::{Batch, InfoNce, Objective, SigLip};
mod common;
mod train_parity_util;

use train_parity_util::*;

#[test]
fn losses_and_gradients_equal_open_clip() {
    let f = fixtures();
    let mut checked = 0;
    for case in ["b8_d16", "b32_d64", "b1_d8"] {
        for (name, obj) in [("infonce", &InfoNce as &dyn Objective), ("siglip", &SigLip)] {
            let (img, txt, ni, nt) = case_features(&f, case);
            let s = Var::from_tensor(&f[&format!("{case}.log_scale")].squeeze(0).unwrap()).unwrap();
            let bias = Var::from_tensor(&f[&format!("{case}.bias")].squeeze(0).unwrap()).unwrap();
            let b = Batch {
                image: &ni,
                text: &nt,
                log_scale: s.as_tensor(),
                bias: Some(bias.as_tensor()),
                teacher: None,
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

/// The seed documents' objectives (DAA, VSE++ triplet, geometric consistency,
/// in-batch distillation at two temperatures, ALBEF's momentum-distilled
/// InfoNCE)
/// against their torch transcriptions (scripts/gen_objective_fixtures.py),
/// degenerate batches included: one pair, identical features, uniform DAA
/// weights.
#[test]
fn alignment_objectives_and_gradients_equal_their_torch_reference() {
    use clasp::train::objectives::Teacher;
    use clasp::train::objectives::{
        Daa, Distill, DistilledInfoNce, Geometric, ObjectiveParams, Triplet, TripletMode,
    };
    let f = objective_fixtures();
    let p = ObjectiveParams::default();
    let mut objectives: Vec<(&str, Box<dyn Objective>)> = vec![
        ("distill_t1", Box::new(Distill::new(1.0))),
        ("distill_t2", Box::new(Distill::new(2.0))),
        ("albef", Box::new(DistilledInfoNce { alpha: 0.4 })),
        (
            "daa",
            Box::new(Daa {
                temp: p.daa.daa_temp,
            }),
        ),
        (
            "triplet_max",
            Box::new(Triplet {
                margin: p.triplet.triplet_margin,
                mode: TripletMode::Max,
            }),
        ),
        (
            "triplet_sum",
            Box::new(Triplet {
                margin: p.triplet.triplet_margin,
                mode: TripletMode::Sum,
            }),
        ),
        (
            "geometric",
            Box::new(Geometric {
                margin: p.geometric.geometric_margin,
                k: p.geometric.geometric_k,
            }),
        ),
    ];
    // The feature term's projection W (its width depends on the case) is
    // set from the fixture below.
    objectives.push(("distill_feature", Box::new(Distill::new(1.0))));
    let mut checked = 0;
    for case in [
        "b8_d16",
        "b16_d32",
        "b3_d8",
        "b1_d8",
        "identical_b4_d8",
        "uniform_b4_d4",
    ] {
        for (name, obj) in objectives.iter_mut() {
            let (img, txt, ni, nt) = case_features(&f, case);
            let mut projection = None;
            if *name == "distill_feature" {
                let w = f[&format!("{case}.distill_projection")].clone();
                let d = w.dim(0).unwrap();
                let feat = Distill::with_feature(1.0, 0.7, d, d, 0, &Device::Cpu).unwrap();
                let v = feat.vars().remove(0).1;
                v.set(&w).unwrap();
                projection = Some(v);
                *obj = Box::new(feat);
            }
            let s = Var::from_tensor(&f[&format!("{case}.log_scale")].squeeze(0).unwrap()).unwrap();
            let te = |k: &str| f[&format!("{case}.teacher_{k}")].clone();
            let (ti, tt, tl) = (te("image"), te("text"), te("log_scale").squeeze(0).unwrap());
            let b = Batch {
                image: &ni,
                text: &nt,
                log_scale: s.as_tensor(),
                bias: None,
                teacher: Some(Teacher {
                    image: &ti,
                    text: &tt,
                    log_scale: &tl,
                }),
            };
            let loss = obj.loss(&b).unwrap();
            let p = format!("{case}.{name}.");
            assert_close(&loss, &f[&format!("{p}loss")], &format!("{p}loss"));
            let g = loss.backward().unwrap();
            for (var, key) in [
                (img.as_tensor(), "grad_image"),
                (txt.as_tensor(), "grad_text"),
                (s.as_tensor(), "grad_log_scale"),
            ] {
                let want = &f[&format!("{p}{key}")];
                // An objective that does not use a tensor leaves no gradient: zero.
                let got = match g.get(var) {
                    Some(t) => t.clone(),
                    None => want.zeros_like().unwrap(),
                };
                assert_close(&got, want, &format!("{p}{key}"));
            }
            if let Some(w) = &projection {
                let got = g.get(w.as_tensor()).expect("projection gradient");
                assert_close(
                    got,
                    &f[&format!("{p}grad_projection")],
                    &format!("{p}grad_projection"),
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 48);
}

/// The adversarial objective against torch (scripts/gen_objective_fixtures.py):
/// BCE and WGAN losses, WGAN-GP's penalty (torch by double backward, clasp by
/// its closed form) and spectral norm; gradients reach the features reversed
/// and the discriminator as is.
#[test]
fn adversarial_objective_and_gradients_equal_torch() {
    use clasp::train::objectives::{AdvLoss, AdvParams, Adversarial};
    let f = objective_fixtures();
    let mut checked = 0;
    for case in ["b8_d16", "b1_d8"] {
        let g = |k: &str| f[&format!("{case}.adv.{k}")].clone();
        for (setting, loss, gp, spectral) in [
            ("bce", AdvLoss::Bce, 0.0, false),
            ("wgan", AdvLoss::Wgan, 0.0, false),
            ("wgan_gp", AdvLoss::Wgan, 10.0, false),
            ("bce_sn", AdvLoss::Bce, 0.0, true),
            ("wgan_gp_sn", AdvLoss::Wgan, 10.0, true),
        ] {
            let params = AdvParams {
                adv_hidden: g("w1").dim(0).unwrap(),
                adv_loss: loss,
                adv_reverse: 0.7,
                adv_gp: gp,
                adv_spectral: spectral,
            };
            let dim = g("w1").dim(1).unwrap();
            let adv = Adversarial::new(dim, params, 0, &Device::Cpu).unwrap();
            adv.set(&g("w1"), &g("b1"), &g("w2"), &g("b2"), (g("u1"), g("u2")))
                .unwrap();
            let (img, txt, ni, nt) = case_features(&f, case);
            let s = Tensor::new(0f32, &Device::Cpu).unwrap();
            let b = Batch {
                image: &ni,
                text: &nt,
                log_scale: &s,
                bias: None,
                teacher: None,
            };
            let l = adv.loss_with_eps(&b, &g("eps")).unwrap();
            let p = format!("{case}.adv_{setting}.");
            assert_close(&l, &f[&format!("{p}loss")], &format!("{p}loss"));
            let grads = l.backward().unwrap();
            let mut targets = vec![
                (img.as_tensor().clone(), "grad_image".to_string()),
                (txt.as_tensor().clone(), "grad_text".to_string()),
            ];
            for (name, v) in adv.vars() {
                let key = match name.as_str() {
                    "adversary.fc1.weight" => "grad_w1",
                    "adversary.fc1.bias" => "grad_b1",
                    "adversary.fc2.weight" => "grad_w2",
                    _ => "grad_b2",
                };
                targets.push((v.as_tensor().clone(), key.to_string()));
            }
            for (t, key) in targets {
                let got = grads
                    .get(&t)
                    .unwrap_or_else(|| panic!("{p}{key}: no gradient"));
                assert_close(got, &f[&format!("{p}{key}")], &format!("{p}{key}"));
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 10);
}

/// EWC's penalty and the gradient it adds, against torch autograd on the
/// same formula (scripts/gen_objective_fixtures.py), read back through a
/// fisher.safetensors as `clasp train --fisher-batches` writes it.
#[test]
fn ewc_penalty_and_gradient_equal_torch() {
    let f = objective_fixtures();
    let names = ["a.weight", "b.bias"];
    let vars: Vec<(String, Var)> = names
        .iter()
        .map(|n| {
            (
                n.to_string(),
                Var::from_tensor(&f[&format!("ewc.param.{n}")]).unwrap(),
            )
        })
        .collect();
    let d = tempfile::tempdir().unwrap();
    let file: std::collections::HashMap<String, Tensor> = names
        .iter()
        .flat_map(|n| {
            ["fisher", "theta"].map(|k| (format!("{k}.{n}"), f[&format!("ewc.{k}.{n}")].clone()))
        })
        .collect();
    candle_core::safetensors::save(&file, d.path().join("fisher.safetensors")).unwrap();
    let ewc = clasp::train::ewc::Ewc::load(d.path(), &vars).unwrap();
    // A gradient store holding zeros for both parameters.
    let zero = vars
        .iter()
        .map(|(_, v)| (v.as_tensor() * 0.0).unwrap().sum_all().unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let mut grads = zero.backward().unwrap();
    let lambda = f["ewc.lambda"].to_vec1::<f32>().unwrap()[0] as f64;
    let penalty = ewc.apply(lambda, &mut grads).unwrap();
    let want = f["ewc.loss"].to_vec1::<f32>().unwrap()[0] as f64;
    assert!(
        (penalty - want).abs() <= 1e-5 * want.abs().max(1.0),
        "{penalty} vs {want}"
    );
    for (n, v) in &vars {
        assert_close(
            grads.get(v.as_tensor()).unwrap(),
            &f[&format!("ewc.grad.{n}")],
            &format!("ewc gradient of {n}"),
        );
    }
}
