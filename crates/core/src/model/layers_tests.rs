//! Unit tests of `layers` (kept beside it, in their own file).
use super::*;
use candle_core::Device;

#[test]
fn linear_matches_manual_product_on_3d_input() {
    let dev = Device::Cpu;
    let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
    let b = Tensor::new(&[0.5f32, -1., 2.], &dev).unwrap();
    let l = Linear::new(w, Some(b));
    let x = Tensor::new(&[[[1f32, 1.], [2., 0.]]], &dev).unwrap();
    let y = l.forward(&x).unwrap().to_vec3::<f32>().unwrap();
    assert_eq!(y, vec![vec![vec![3.5, 6., 13.], vec![2.5, 5., 12.]]]);
}

fn random_block(hidden: usize, inter: usize, heads: usize, act: Activation) -> PreNormBlock {
    let dev = Device::Cpu;
    let r = |s: &[usize]| Tensor::randn(0f32, 0.3, s, &dev).unwrap();
    let lin = |o: usize, i: usize| Linear::new(r(&[o, i]), Some(r(&[o])));
    let ln = || LayerNorm {
        weight: (r(&[hidden]) + 1.0).unwrap(),
        bias: r(&[hidden]),
        eps: 1e-5,
    };
    PreNormBlock {
        ln1: ln(),
        attn: Attention::new(
            lin(hidden, hidden),
            lin(hidden, hidden),
            lin(hidden, hidden),
            lin(hidden, hidden),
            heads,
        )
        .unwrap(),
        ln2: ln(),
        mlp: Mlp::new(lin(inter, hidden), lin(hidden, inter), act),
    }
}

#[test]
fn fused_cpu_block_equals_candle_ops() {
    let dev = Device::Cpu;
    for (act, mask) in [
        (Activation::QuickGelu, AttnMask::None),
        (Activation::QuickGelu, AttnMask::Causal),
        (
            Activation::Gelu,
            AttnMask::padding(&Tensor::new(&[[1u32, 1, 1, 0, 0], [1, 1, 1, 1, 1]], &dev).unwrap())
                .unwrap(),
        ),
        (Activation::GeluTanh, AttnMask::None),
    ] {
        let block = random_block(16, 24, 4, act);
        let x = Tensor::randn(0f32, 1.0, (2, 5, 16), &dev).unwrap();
        let fused = forward_fused(std::slice::from_ref(&block), &x, &mask).unwrap();
        let reference = block.forward(&x, &mask).unwrap();
        let d = (fused - reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{act:?}: fused and candle paths differ by {d}");
    }
}

#[test]
fn causal_mask_blocks_future_positions() {
    let m = causal_mask(3, &Device::Cpu)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(m[0][0], 0.0);
    assert!(m[0][1].is_infinite() && m[0][2].is_infinite());
    assert_eq!(m[2], vec![0.0, 0.0, 0.0]);
}
