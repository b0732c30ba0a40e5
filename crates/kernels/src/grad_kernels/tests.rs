//! Unit tests of `grad_kernels` (kept beside it, in their own file).
use super::*;
use candle_core::{Device, Var, D};
use std::sync::Arc;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Values and input gradients of `fused` and `composed` under the same
/// random upstream gradient (a random linear functional of the output).
fn check(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Tensor,
    composed: impl Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (yf, yc) = (fused(&ts), composed(&ts));
    assert!(max_diff(&yf, &yc) < tol, "values differ");
    let probe = Tensor::randn(0f32, 1.0, yf.shape(), &Device::Cpu).unwrap();
    let gf = (&yf * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gc = (&yc * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, t) in ts.iter().enumerate() {
        let d = max_diff(gf.get(t).unwrap(), gc.get(t).unwrap());
        assert!(d < tol, "gradient of input {i} differs by {d}");
    }
}

fn randn(s: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, s, &Device::Cpu).unwrap()
}

/// x Wᵀ (+ b) over [B, S, in] inputs, composed of candle ops; t = [x, W, b?].
fn linear_composed(t: &[Tensor]) -> Tensor {
    let (b, s, i) = t[0].dims3().unwrap();
    let y = t[0]
        .reshape((b * s, i))
        .unwrap()
        .matmul(&t[1].t().unwrap())
        .unwrap();
    let y = match t.get(2) {
        Some(bias) => y.broadcast_add(bias).unwrap(),
        None => y,
    };
    y.reshape((b, s, t[1].dim(0).unwrap())).unwrap()
}

/// Layer norm over the last axis (eps 1e-5), composed of candle ops;
/// t = [x, weight, bias].
fn layer_norm_composed(t: &[Tensor]) -> Tensor {
    let x = &t[0];
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let xc = x.broadcast_sub(&mean).unwrap();
    let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&t[1])
        .unwrap()
        .broadcast_add(&t[2])
        .unwrap()
}

#[test]
fn linear_matches_composition() {
    let composed = linear_composed;
    check(
        &[randn(&[3, 7, 24]), randn(&[40, 24]), randn(&[40])],
        |t| linear(&t[0], &t[1], Some(&t[2])).unwrap(),
        composed,
        1e-4,
    );
    check(
        &[randn(&[2, 5, 24]), randn(&[9, 24])],
        |t| linear(&t[0], &t[1], None).unwrap(),
        composed,
        1e-4,
    );
    // A batch of one row.
    check(
        &[randn(&[1, 1, 24]), randn(&[8, 24]), randn(&[8])],
        |t| linear(&t[0], &t[1], Some(&t[2])).unwrap(),
        composed,
        1e-4,
    );
}

#[test]
fn layer_norm_matches_composition() {
    let w = ((randn(&[24]) * 0.5).unwrap() + 1.0).unwrap();
    check(
        &[
            ((randn(&[3, 5, 24]) * 3.0).unwrap() + 1.0).unwrap(),
            w,
            randn(&[24]),
        ],
        |t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        layer_norm_composed,
        1e-4,
    );
}

#[test]
fn activations_match_candle_ops() {
    for act in [
        Activation::QuickGelu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::Relu,
    ] {
        check(
            &[(randn(&[4, 33]) * 3.0).unwrap()],
            |t| activate(&t[0], act).unwrap(),
            |t| {
                let x = &t[0];
                match act {
                    Activation::QuickGelu => {
                        (x * candle_nn::ops::sigmoid(&(x * 1.702).unwrap()).unwrap()).unwrap()
                    }
                    Activation::Gelu => x.gelu_erf().unwrap(),
                    Activation::GeluTanh => x.gelu().unwrap(),
                    Activation::Relu => x.relu().unwrap(),
                }
            },
            1e-4,
        );
    }
}

#[test]
fn attention_matches_composition_under_each_mask() {
    let (b, h, t, d) = (2, 3, 5, 4);
    let c = h * d;
    let keys = vec![0.0, 0.0, 0.0, f32::MIN, f32::MIN, 0.0, 0.0, 0.0, 0.0, 0.0];
    let causal = {
        let m: Vec<f32> = (0..t * t)
            .map(|k| {
                if k % t > k / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(m, (t, t), &Device::Cpu).unwrap()
    };
    let key_t = Tensor::from_vec(keys.clone(), (b, 1, 1, t), &Device::Cpu).unwrap();
    for (mask, additive) in [
        (SoftmaxMask::None, None),
        (SoftmaxMask::Causal, Some(causal.clone())),
        (
            SoftmaxMask::Keys(Arc::new(keys.clone())),
            Some(key_t.clone()),
        ),
    ] {
        check(
            &[randn(&[b, t, 3 * c])],
            |x| attention(&x[0], h, mask.clone()).unwrap(),
            |x| attention_composed(&x[0], (b, t, h, d), additive.as_ref()),
            1e-5,
        );
    }
}

/// softmax(q kᵀ / √d + mask) v from packed qkv [B, T, 3·H·D], composed of
/// candle ops.
fn attention_composed(
    x: &Tensor,
    (b, t, h, d): (usize, usize, usize, usize),
    additive: Option<&Tensor>,
) -> Tensor {
    // [3, B, H, T, D]
    let qkv = x
        .reshape((b, t, 3, h, d))
        .unwrap()
        .permute((2, 0, 3, 1, 4))
        .unwrap();
    let (q, k, v) = (
        qkv.get(0).unwrap(),
        qkv.get(1).unwrap(),
        qkv.get(2).unwrap(),
    );
    let mut s = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    if let Some(m) = additive {
        s = s.broadcast_add(m).unwrap();
    }
    let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
    p.matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, h * d))
        .unwrap()
}

/// Every op at sizes past its parallel chunking (thousands of rows and
/// tens of thousands of elements, where the work splits across threads),
/// ReLU included, and attention over a packed batch of sequences of
/// different lengths (padding keys masked per row).
#[test]
fn kernels_hold_at_shapes_that_cross_the_parallel_chunking() {
    // Tolerances grow with the length of the sums (a weight gradient adds
    // 1,024-1,200 rows, in a different order than candle).
    let x = randn(&[4, 300, 64]); // 76,800 elements, 1,200 rows
    let (w, bias) = (randn(&[96, 64]), randn(&[96]));
    check(
        &[x.clone(), w.clone(), bias],
        |t| linear(&t[0], &t[1], Some(&t[2])).unwrap(),
        linear_composed,
        5e-3,
    );
    // The frozen-weight linear: the same values and input gradient; no
    // gradient for the weight. Then the same on the weight's packed copies,
    // where this CPU packs them (AVX-512); odd sizes so the panels and row
    // blocks have remainders.
    let frozen = |x: &Tensor, w: &Tensor, f: &dyn Fn(&Tensor, &Tensor) -> Tensor, tol: f32| {
        let xv = Var::from_tensor(x).unwrap();
        let y = f(xv.as_tensor(), w);
        let want = linear_composed(&[x.clone(), w.clone()]);
        assert!(max_diff(&y, &want) < tol);
        let probe = randn(y.dims());
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx_want = probe.broadcast_matmul(w).unwrap();
        assert!(max_diff(g.get(xv.as_tensor()).unwrap(), &dx_want) < tol);
        assert!(g.get(w).is_none());
    };
    frozen(&x, &w, &|x, w| frozen_linear(x, w).unwrap(), 2e-3);
    let (x2, w2) = (randn(&[3, 37, 70]), randn(&[45, 70]));
    if let Some(packs) = FrozenPacks::new(&w2).unwrap() {
        let packs = Arc::new(packs);
        frozen(
            &x2,
            &w2,
            &|x, w| frozen_linear_packed(x, w, &packs).unwrap(),
            1e-3,
        );
    }
    check(
        &[randn(&[8, 128, 96]), randn(&[96]), randn(&[96])],
        |t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        layer_norm_composed,
        2e-3,
    );
    for act in [Activation::Relu, Activation::QuickGelu] {
        check(
            &[(randn(&[64, 129]) * 3.0).unwrap()], // 8,256 elements
            |t| activate(&t[0], act).unwrap(),
            |t| match act {
                Activation::Relu => t[0].relu().unwrap(),
                _ => (&t[0] * candle_nn::ops::sigmoid(&(&t[0] * 1.702).unwrap()).unwrap()).unwrap(),
            },
            1e-4,
        );
    }
    // Three sequences of 48, 31 and 7 tokens packed into one padded batch.
    let (b, t, h, d) = (3, 48, 4, 16);
    let mut keys = vec![0f32; b * t];
    for (row, len) in [48usize, 31, 7].iter().enumerate() {
        for k in *len..t {
            keys[row * t + k] = f32::MIN;
        }
    }
    let additive = Tensor::from_vec(keys.clone(), (b, 1, 1, t), &Device::Cpu).unwrap();
    check(
        &[randn(&[b, t, 3 * h * d])],
        |x| attention(&x[0], h, SoftmaxMask::Keys(Arc::new(keys.clone()))).unwrap(),
        |x| attention_composed(&x[0], (b, t, h, d), Some(&additive)),
        5e-4,
    );
}

#[test]
fn rms_norm_matches_composition() {
    let (x, w) = (randn(&[3, 5, 64]), randn(&[64]));
    check(
        &[x, w],
        |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        |t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], 1e-5).unwrap(),
        1e-4,
    );
}

#[test]
fn swiglu_matches_composition() {
    let (g, u) = (randn(&[2, 7, 96]), randn(&[2, 7, 96]));
    check(
        &[g, u],
        |t| swiglu(&t[0], &t[1]).unwrap(),
        |t| (candle_nn::ops::silu(&t[0]).unwrap() * &t[1]).unwrap(),
        1e-4,
    );
}

/// Both layouts against candle's differentiable `rope_i_slow` / `rope_slow`,
/// which take [B, heads, T, d]; the tables are longer than the sequence.
#[test]
fn rope_matches_composition() {
    let (t, d) = (6, 16);
    let cos = Tensor::rand(-1f32, 1.0, (t + 3, d / 2), &Device::Cpu).unwrap();
    let sin = Tensor::rand(-1f32, 1.0, (t + 3, d / 2), &Device::Cpu).unwrap();
    for pairs in [RopePairs::Interleaved, RopePairs::Half] {
        let (c, s) = (cos.clone(), sin.clone());
        check(
            &[randn(&[2, t, 3, d])],
            |x| rope(&x[0], &c, &s, pairs).unwrap(),
            |x| {
                let xh = x[0].transpose(1, 2).unwrap().contiguous().unwrap();
                let (c, s) = (c.narrow(0, 0, t).unwrap(), s.narrow(0, 0, t).unwrap());
                let y = match pairs {
                    RopePairs::Interleaved => candle_nn::rotary_emb::rope_i_slow(&xh, &c, &s),
                    RopePairs::Half => candle_nn::rotary_emb::rope_slow(&xh, &c, &s),
                }
                .unwrap();
                y.transpose(1, 2).unwrap()
            },
            1e-5,
        );
    }
}
