//! Unit tests of `quant` (kept beside it, in their own file).
use super::*;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

fn matrix(rows: usize, cols: usize, seed: u64) -> (Q4_1Matrix, Vec<f32>) {
    let mut r = crate::rng::Rng(seed);
    let w: Vec<f32> = (0..rows * cols).map(|_| r.uniform() * 2.0 - 1.0).collect();
    let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
    let deq = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (
        Q4_1Matrix::from_ggml(&q.data().unwrap(), rows, cols).unwrap(),
        deq,
    )
}

#[test]
fn dequantizes_bit_for_bit_as_candle() {
    let (m, deq) = matrix(5, 64, 1);
    assert_eq!(m.dequantize(), deq);
}

/// Every path equals the f32 product with the dequantized matrix, to
/// summation-order rounding, for one and for several rows of x; the
/// weight rows cross the parallel chunk with a tail.
#[test]
fn every_kernel_matches_the_dequantized_f32_product() {
    let (rows, cols) = (75, 96);
    let (w, deq) = matrix(rows, cols, 2);
    let mut r = crate::rng::Rng(3);
    for m in [1, 3, MAX_ROWS] {
        let x: Vec<f32> = (0..m * cols).map(|_| r.uniform() * 4.0 - 2.0).collect();
        for k in Kernel::available() {
            let got = w.matmul(&x, m, k);
            for i in 0..m {
                for o in 0..rows {
                    let xr = &x[i * cols..(i + 1) * cols];
                    let wr = &deq[o * cols..(o + 1) * cols];
                    let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let scale: f64 = xr.iter().zip(wr).map(|(a, b)| (a * b).abs() as f64).sum();
                    let g = got[i * rows + o] as f64;
                    assert!(
                        (g - exact).abs() <= 1e-6 * scale + 1e-7,
                        "{k:?} m={m} [{i},{o}]: {g} vs {exact}"
                    );
                }
            }
        }
    }
}

#[test]
fn q8_0_dequantizes_as_candle_and_every_kernel_matches_f32() {
    let (rows, cols) = (70, 64);
    let mut r = crate::rng::Rng(5);
    let w: Vec<f32> = (0..rows * cols).map(|_| r.uniform() * 2.0 - 1.0).collect();
    let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
    let deq: Vec<f32> = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let m = Q8_0Matrix::from_ggml(&q.data().unwrap(), rows, cols).unwrap();
    assert_eq!(m.dequantize(), deq);
    assert_eq!(m.dequantize_row(3), deq[3 * cols..4 * cols]);
    let n = 5;
    let x: Vec<f32> = (0..n * cols).map(|_| r.uniform() * 4.0 - 2.0).collect();
    for k in Kernel::available() {
        let got = m.matmul(&x, n, k);
        for i in 0..n {
            for o in 0..rows {
                let xr = &x[i * cols..(i + 1) * cols];
                let wr = &deq[o * cols..(o + 1) * cols];
                let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                let scale: f64 = xr.iter().zip(wr).map(|(a, b)| (a * b).abs() as f64).sum();
                let g = got[i * rows + o] as f64;
                assert!((g - exact).abs() <= 1e-6 * scale + 1e-7, "{k:?} [{i},{o}]");
            }
        }
    }
}

#[test]
fn wrong_sizes_are_refused() {
    assert!(Q8_0Matrix::from_ggml(&[0u8; 34], 1, 31).is_err());
    assert!(Q8_0Matrix::from_ggml(&[0u8; 33], 1, 32).is_err());
    assert!(Q4_1Matrix::from_ggml(&[0u8; 20], 1, 31).is_err());
    assert!(Q4_1Matrix::from_ggml(&[0u8; 19], 1, 32).is_err());
}
