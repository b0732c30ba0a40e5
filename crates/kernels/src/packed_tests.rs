//! Unit tests of `packed` (kept beside it, in their own file).
use super::*;

#[test]
fn every_kernel_equals_a_plain_product_including_tails() {
    let mut rng = crate::rng::Rng(7);
    let mut next = move || rng.symmetric(1, 1.0)[0];
    // Rows, channels and inputs that do not fill a tile, a panel or a
    // k-block, next to whole ones, and both parallel splits.
    for &(m, n, k) in &[
        (1, 1, 1),
        (5, 17, 3),
        (12, 32, 256),
        (13, 33, 257),
        (7, 70, 600),
        (100, 48, 300),
        (250, 45, 40),
    ] {
        let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
        let init: Vec<f32> = (0..m * n).map(|_| next()).collect();
        let packed = PackedF32::pack(&w, n, k);
        if bf16_supported() {
            // bf16: against the product of the bf16-rounded values.
            let r = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
            let pb = PackedF32::pack_bf16(&w, n, k);
            let mut dst = init.clone();
            pb.matmul_acc(&x, m, &mut dst);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = init[i * n + j] as f64
                        + (0..k)
                            .map(|t| r(x[i * k + t]) * r(w[j * k + t]))
                            .sum::<f64>();
                    let got = dst[i * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "bf16 at m={m} n={n} k={k} [{i},{j}]: {got} vs {want}"
                    );
                }
            }
        }
        for kernel in F32Kernel::available() {
            let mut dst = init.clone();
            matmul_acc(&x, m, &packed, &mut dst, kernel);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = init[i * n + j] as f64
                        + (0..k)
                            .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                            .sum::<f64>();
                    let got = dst[i * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{} at m={m} n={n} k={k} [{i},{j}]: {got} vs {want}",
                        kernel.name()
                    );
                }
            }
        }
    }
}
