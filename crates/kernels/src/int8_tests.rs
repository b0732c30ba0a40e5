use super::*;

/// The crate's seedable generator, so failures reproduce.
struct Gen(crate::rng::Rng);

impl Gen {
    fn i8s(&mut self, n: usize) -> Vec<i8> {
        (0..n)
            .map(|_| (self.0.below(255) as i32 - 127) as i8)
            .collect()
    }
    fn f32s(&mut self, n: usize, scale: f32) -> Vec<f32> {
        self.0.symmetric(n, scale as f64)
    }
}

fn exact(a: &[i8], m: usize, w: &[i8], n: usize, k: usize) -> Vec<i32> {
    let mut out = vec![0i32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: i64 = (0..k)
                .map(|t| a[i * k + t] as i64 * w[j * k + t] as i64)
                .sum();
            out[i * n + j] = s as i32;
        }
    }
    out
}

#[test]
fn every_kernel_equals_the_exact_integer_product_including_tails() {
    let mut g = Gen(crate::rng::Rng(0x9e3779b97f4a7c15));
    // Shapes whose rows, channels and inputs do not fill a tile, a panel
    // or a 4-byte group, next to whole ones; and the extreme values ±127.
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (8, 16, 4),
        (9, 33, 13),
        (17, 48, 64),
        (5, 31, 130),
        (20, 70, 771),
        // AMX: a 32-row block plus one row, an odd panel count, a k tail.
        (33, 48, 200),
        (70, 80, 64),
        (16, 16, 128),
    ];
    let kernels = Int8Kernel::available();
    assert!(kernels.contains(&Int8Kernel::Scalar));
    for &(m, n, k) in &shapes {
        let mut a = g.i8s(m * k);
        let mut w = g.i8s(n * k);
        a[0] = -127;
        w[0] = -127;
        if a.len() > 1 {
            a[1] = 127;
            w[1] = -127;
        }
        let want = exact(&a, m, &w, n, k);
        let qm = QuantMatrix::from_int8(&w, vec![1.0; n], n, k).unwrap();
        assert_eq!(qm.to_int8(), w, "packing round trip at {m}x{n}x{k}");
        for &kern in &kernels {
            let got = igemm(&a, m, &qm, kern);
            assert_eq!(got, want, "{} at m={m} n={n} k={k}", kern.name());
        }
    }
}

#[test]
fn the_saturation_worst_case_is_exact() {
    // All activations and weights at the extremes: every 16-bit pair sum of
    // the AVX2 path is ±2·127·127, and VNNI's +128 shift is at its largest.
    let (m, n, k) = (9, 17, 3072);
    for (av, wv) in [(127i8, 127i8), (-127, 127), (127, -127), (-127, -127)] {
        let a = vec![av; m * k];
        let w = vec![wv; n * k];
        let qm = QuantMatrix::from_int8(&w, vec![1.0; n], n, k).unwrap();
        let want = av as i32 * wv as i32 * k as i32;
        for kern in Int8Kernel::available() {
            let got = igemm(&a, m, &qm, kern);
            assert!(
                got.iter().all(|&v| v == want),
                "{} at {av}*{wv}",
                kern.name()
            );
        }
    }
}

#[test]
fn the_f32_product_is_the_dequantized_product_and_close_to_f32() {
    let mut g = Gen(crate::rng::Rng(42));
    for &(m, n, k) in &[(1, 40, 96), (7, 33, 50), (70, 64, 200)] {
        let x = g.f32s(m * k, 2.0);
        let w = g.f32s(n * k, 0.1);
        let qm = QuantMatrix::quantize(&w, n, k).unwrap();
        let wd = qm.dequantize();
        // Independent expectation: quantize x per row by hand, multiply the
        // dequantized values in f64.
        let mut want = vec![0f64; m * n];
        let mut full = vec![0f64; m * n];
        for i in 0..m {
            let row = &x[i * k..(i + 1) * k];
            let s = row.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            let xq: Vec<f64> = row
                .iter()
                .map(|v| ((v / s).round_ties_even().clamp(-127.0, 127.0) * s) as f64)
                .collect();
            for j in 0..n {
                for t in 0..k {
                    want[i * n + j] += xq[t] * wd[j * k + t] as f64;
                    full[i * n + j] += row[t] as f64 * w[j * k + t] as f64;
                }
            }
        }
        for kern in Int8Kernel::available() {
            let mut dst = vec![1.0f32; m * n]; // accumulates onto what is there
            matmul_acc(&x, m, &qm, &mut dst, kern);
            for idx in 0..m * n {
                let got = dst[idx] as f64 - 1.0;
                assert!(
                    (got - want[idx]).abs() < 1e-4 * (1.0 + want[idx].abs()),
                    "{} [{m}x{n}x{k}] {idx}: {got} vs {}",
                    kern.name(),
                    want[idx]
                );
            }
            // With a bias: overwriting (never reading what dst held, NaN
            // here) and accumulating onto a residual.
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 1.0).collect();
            for accumulate in [false, true] {
                let mut out = vec![if accumulate { 2.0 } else { f32::NAN }; m * n];
                matmul_into(&x, m, &qm, Some(&bias), &mut out, accumulate, kern);
                for idx in 0..m * n {
                    let base = if accumulate { 2.0 } else { 0.0 };
                    let expect = want[idx] + bias[idx % n] as f64 + base;
                    let got = out[idx] as f64;
                    assert!(
                        (got - expect).abs() < 1e-4 * (1.0 + expect.abs()),
                        "{} bias acc={accumulate} [{m}x{n}x{k}] {idx}: {got} vs {expect}",
                        kern.name()
                    );
                }
            }
            // And int8 is a close approximation of the f32 product.
            let (mut num, mut den) = (0f64, 0f64);
            for idx in 0..m * n {
                num += (dst[idx] as f64 - 1.0 - full[idx]).powi(2);
                den += full[idx].powi(2);
            }
            assert!(
                (num / den).sqrt() < 0.02,
                "relative error {}",
                (num / den).sqrt()
            );
        }
    }
}

#[test]
fn bad_weights_are_refused() {
    assert!(QuantMatrix::quantize(&[1.0, f32::NAN], 1, 2).is_err());
    assert!(QuantMatrix::quantize(&[1.0; 5], 2, 3).is_err());
    assert!(QuantMatrix::from_int8(&[-128, 0], vec![1.0], 1, 2).is_err());
    assert!(QuantMatrix::from_int8(&[1, 0], vec![1.0, 2.0], 1, 2).is_err());
    let zero = QuantMatrix::quantize(&[0.0; 6], 2, 3).unwrap();
    assert_eq!(zero.scales(), &[0.0, 0.0]);
}

#[test]
fn a_nan_activation_gives_nan_outputs_not_zeros() {
    let w = QuantMatrix::quantize(&[0.5, -0.25, 1.0, 2.0], 2, 2).unwrap();
    let mut dst = vec![0f32; 4];
    matmul_acc(
        &[1.0, f32::NAN, 3.0, 4.0],
        2,
        &w,
        &mut dst,
        Int8Kernel::Scalar,
    );
    assert!(dst[0].is_nan() && dst[1].is_nan(), "{dst:?}");
    assert!(dst[2].is_finite() && dst[3].is_finite(), "{dst:?}");
}

#[test]
fn the_detected_kernel_is_one_the_tests_force() {
    // Every test above runs each of `available()`; the kernel the models use
    // by default must be among them, or it would go untested. (`detect`
    // takes the last of `available()` today; this guards that link.)
    let all = Int8Kernel::available();
    assert!(all.contains(&Int8Kernel::detect()), "{all:?}");
}
