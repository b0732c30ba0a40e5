//! Unit tests of `cpu_kernels` (kept beside it, in their own file).
#[test]
fn fast_exp_is_within_two_ulp_of_exp() {
    let mut worst = 0f32;
    let mut x = -87.0f32;
    while x < 88.0 {
        let (a, b) = (super::fast_exp(x), x.exp());
        worst = worst.max(((a - b) / b).abs());
        x += 0.0137;
    }
    assert!(worst < 2.5e-7, "relative error {worst}");
    assert_eq!(super::fast_exp(-200.0), super::fast_exp(-87.0));
}

/// `linear_into` against a plain triple loop in f64, on widths that do
/// not split evenly into the GEMM's column blocks, with and without bias
/// and residual (whichever GEMM backend the build uses).
#[test]
fn linear_into_equals_the_plain_product() {
    let val = |i: usize, m: usize| ((i * 7919 % m) as f32 / m as f32) - 0.5;
    for &(n, out, inp) in &[(1, 1, 1), (3, 37, 5), (50, 96, 64), (7, 130, 33)] {
        let x: Vec<f32> = (0..n * inp).map(|i| val(i, 97)).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| val(i, 89)).collect();
        let b: Vec<f32> = (0..out).map(|i| val(i, 13)).collect();
        let residual: Vec<f32> = (0..n * out).map(|i| val(i, 31)).collect();
        for (bias, accumulate) in [(false, false), (true, false), (true, true), (false, true)] {
            let l = super::LinearRef {
                w: &w,
                b: bias.then_some(&b[..]),
                q: None,
                p: None,
                out,
                inp,
            };
            let mut dst = if accumulate {
                residual.clone()
            } else {
                vec![f32::NAN; n * out]
            };
            super::linear_into(&x, n, &l, &mut dst, accumulate);
            for r in 0..n {
                for o in 0..out {
                    let mut want: f64 = (0..inp)
                        .map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64)
                        .sum();
                    if bias {
                        want += b[o] as f64;
                    }
                    if accumulate {
                        want += residual[r * out + o] as f64;
                    }
                    let got = dst[r * out + o] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "{n}x{out}x{inp} bias {bias} acc {accumulate}: [{r},{o}] {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// Strides whose products wrap in unchecked arithmetic are refused: over 5
/// rows, a row stride of 2^62 reaches element 4 * 2^62, which wraps to 0
/// unchecked and so passed the old bound on a 4-element buffer.
#[test]
fn sgemm_refuses_strides_that_wrap() {
    let data = [1.0f32; 4];
    let ok = super::MatRef::rows(&data, 2);
    assert_eq!(super::sgemm(2, 2, 2, ok, ok), vec![2.0; 4]);
    for row_stride in [1usize << 62, usize::MAX, (1usize << 63) + 1] {
        let bad = super::MatRef {
            data: &data,
            row_stride,
            col_stride: 1,
        };
        let r =
            std::panic::catch_unwind(|| super::sgemm(5, 1, 1, bad, super::MatRef::rows(&data, 1)));
        assert!(r.is_err(), "row stride {row_stride} was accepted");
    }
}
