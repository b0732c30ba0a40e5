//! Quantized weights for CPU inference (Q4_1 and Q8_0 blocks), multiplied
//! with f32 activations.
//!
//! Hand-written because candle's Q4_1 dot product is its scalar reference
//! (`vec_dot_unopt`, no SIMD path), which made SmolLM2's Q4_1 decode 3x slower
//! than running the same model dequantized to f32. ggml's own scheme (rounding
//! activations to Q8_1 and summing in int8) was tried first: its next-token
//! distributions stayed close to f32 (mean KL 0.0036 nats) but greedy answers
//! of 48 tokens matched the f32 path on only 9 of 20 prompts. So activations
//! stay f32: a decode step (one row) unpacks each block's nibbles in
//! registers and accumulates `(d * q + m) * x` with FMA (AVX2, chosen at run
//! time; a scalar path elsewhere); a prefill (many rows) dequantizes the
//! matrix once and runs one f32 GEMM. Either way the result equals the
//! dequantized f32 product up to summation order. Q8_0 (SmolLM2's tied
//! embedding and output head) gets the same treatment: candle's Q8_0 matmul
//! rounds activations to int8 too, and on the output head that alone moved
//! greedy answers.
//!
//! Layout of one Q4_1 block (20 bytes, GGML): f16 `d`, f16 `m`, then 16 bytes
//! whose low nibbles are elements 0..16 and high nibbles elements 16..32;
//! value = q * d + m.

use half::f16;
use rayon::prelude::*;

pub const QK: usize = 32;

/// Which vector path the one-row product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Scalar,
    /// AVX2 + FMA, with F16C for the block scales.
    Avx2,
}

impl Kernel {
    /// The fastest path this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Scalar
    }

    /// Every path this CPU can run (for tests).
    pub fn available() -> Vec<Self> {
        let mut v = vec![Kernel::Scalar];
        if Self::detect() == Kernel::Avx2 {
            v.push(Kernel::Avx2);
        }
        v
    }

    fn checked(self) -> Self {
        if Self::available().contains(&self) {
            self
        } else {
            Kernel::Scalar
        }
    }
}

/// One Q4_1 block as GGML stores it (20 bytes): f16 scale `d`, f16 minimum
/// `m`, 16 bytes whose low nibbles are elements 0..16 and high nibbles
/// elements 16..32; value = q * d + m.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct BlockQ4_1 {
    dm: [u8; 4],
    qs: [u8; 16],
}

/// One Q8_0 block (34 bytes): f16 scale `d`, 32 signed bytes; value = q * d.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct BlockQ8_0 {
    d: [u8; 2],
    qs: [i8; QK],
}

fn half(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

fn check_len(
    what: &str,
    bytes: usize,
    rows: usize,
    cols: usize,
    block: usize,
) -> Result<usize, String> {
    if !cols.is_multiple_of(QK) {
        return Err(format!("{cols} columns is not a multiple of {QK}"));
    }
    let blocks = rows * cols / QK;
    if bytes != blocks * block {
        return Err(format!(
            "{bytes} bytes for a [{rows}, {cols}] {what} tensor, expected {}",
            blocks * block
        ));
    }
    Ok(blocks)
}

/// Rows per parallel task of a gemv: two tasks per thread, so a product of
/// a few hundred rows costs a handful of task hand-offs rather than dozens
/// (at batch 1 those hand-offs, not the arithmetic, were the decode's cost).
fn gemv_chunk(rows: usize) -> usize {
    rows.div_ceil(2 * rayon::current_num_threads().max(1))
        .max(16)
}

/// A Q4_1 weight matrix `[rows, cols]`, rows being output features, held in
/// the file's own block layout (no larger in memory than on disk).
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ4_1>,
}

impl Q4_1Matrix {
    /// From GGML's raw Q4_1 bytes of a `[rows, cols]` tensor.
    pub fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Result<Self, String> {
        let n = check_len(
            "Q4_1",
            bytes.len(),
            rows,
            cols,
            std::mem::size_of::<BlockQ4_1>(),
        )?;
        let mut blocks = Vec::with_capacity(n);
        for b in bytes.chunks_exact(std::mem::size_of::<BlockQ4_1>()) {
            let mut blk = BlockQ4_1 {
                dm: [0; 4],
                qs: [0; 16],
            };
            blk.dm.copy_from_slice(&b[..4]);
            blk.qs.copy_from_slice(&b[4..]);
            blocks.push(blk);
        }
        Ok(Self { rows, cols, blocks })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The rows of several matrices of one width stacked into one, so their
    /// products with the same input run as one (q, k and v; gate and up).
    pub fn stack(parts: &[&Self]) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        Some(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            blocks: parts
                .iter()
                .flat_map(|p| p.blocks.iter().copied())
                .collect(),
        })
    }

    /// The matrix as f32, `q * d + m` per element as GGML (and candle) compute it.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(QK)
            .zip(self.blocks.par_iter())
            .for_each(|(o, b)| {
                let (d, m) = (half([b.dm[0], b.dm[1]]), half([b.dm[2], b.dm[3]]));
                for j in 0..16 {
                    o[j] = (b.qs[j] & 0x0F) as f32 * d + m;
                    o[j + 16] = (b.qs[j] >> 4) as f32 * d + m;
                }
            });
        out
    }

    /// `y = x W^T` for `m` rows of `x` (a few: decode steps of a batch):
    /// `[m, rows]`. Each weight block is unpacked once for all m rows.
    pub fn matmul(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation length");
        assert!(m <= MAX_ROWS, "at most {MAX_ROWS} rows per call");
        let kernel = kernel.checked();
        let nb = self.cols / QK;
        // The minimum's share of a row is m * sum(x) per block; the block
        // sums of x are the same for every weight row, so they are taken
        // once, in lane 1 of a 4-lane group to meet [d, m, 0, 0] in the kernel.
        let xsum: Vec<[f32; 4]> = x
            .chunks_exact(QK)
            .map(|b| [0.0, b.iter().sum(), 0.0, 0.0])
            .collect();
        per_weight_row(self.rows, m, |r, o| {
            q4_1_rows(kernel, &self.blocks[r * nb..(r + 1) * nb], x, &xsum, o)
        })
    }
}

/// At most this many activation rows per quantized product call.
pub const MAX_ROWS: usize = 16;

/// How many x rows the next kernel call takes: 4 accumulators (plus the
/// unpacked block) fit AVX2's 16 vector registers.
fn row_group(left: usize) -> usize {
    match left {
        4.. => 4,
        2 | 3 => 2,
        _ => 1,
    }
}

/// Runs `row(r, out)` for every weight row in parallel chunks, `out` being
/// that row's outputs for the m rows of x, and returns them as `[m, rows]`.
fn per_weight_row(rows: usize, m: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut t = vec![0f32; rows * m];
    let chunk = gemv_chunk(rows);
    t.par_chunks_mut(chunk * m)
        .enumerate()
        .for_each(|(c, dst)| {
            for (i, o) in dst.chunks_exact_mut(m).enumerate() {
                row(c * chunk + i, o);
            }
        });
    transpose(&t, rows, m)
}

/// `[rows, m]` to `[m, rows]`.
fn transpose(t: &[f32], rows: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return t.to_vec();
    }
    let mut out = vec![0f32; rows * m];
    for r in 0..rows {
        for i in 0..m {
            out[i * rows + r] = t[r * m + i];
        }
    }
    out
}

/// One weight row against every row of `x`, into `out` (one per x row).
fn q4_1_rows(kernel: Kernel, blocks: &[BlockQ4_1], x: &[f32], xsum: &[[f32; 4]], out: &mut [f32]) {
    let m = out.len();
    assert!(m <= MAX_ROWS && x.len() == m * blocks.len() * QK && xsum.len() == m * blocks.len());
    match kernel {
        Kernel::Scalar => {
            let cols = blocks.len() * QK;
            for (i, o) in out.iter_mut().enumerate() {
                *o = q4_1_row_scalar(blocks, &x[i * cols..(i + 1) * cols]);
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul` passes Avx2 only when `Kernel::available()` found
        // AVX2, FMA and F16C on this CPU; the lengths are asserted above, and
        // each group of G rows hands the kernel exactly G rows of x and xsum.
        Kernel::Avx2 => {
            let (cols, nb) = (blocks.len() * QK, blocks.len());
            let mut i = 0;
            while i < m {
                let g = row_group(m - i);
                let (xg, sg, og) = (
                    &x[i * cols..(i + g) * cols],
                    &xsum[i * nb..(i + g) * nb],
                    &mut out[i..i + g],
                );
                unsafe {
                    match g {
                        4 => q4_1_rows_avx2::<4>(blocks, xg, sg, og),
                        2 => q4_1_rows_avx2::<2>(blocks, xg, sg, og),
                        _ => q4_1_rows_avx2::<1>(blocks, xg, sg, og),
                    }
                }
                i += g;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Kernel::Avx2 => {
            let cols = blocks.len() * QK;
            for (i, o) in out.iter_mut().enumerate() {
                *o = q4_1_row_scalar(blocks, &x[i * cols..(i + 1) * cols]);
            }
        }
    }
}

fn q4_1_row_scalar(blocks: &[BlockQ4_1], x: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in blocks.iter().zip(x.chunks_exact(QK)) {
        let (d, m) = (half([b.dm[0], b.dm[1]]), half([b.dm[2], b.dm[3]]));
        for j in 0..16 {
            acc += ((b.qs[j] & 0x0F) as f32 * d + m) * xb[j];
            acc += ((b.qs[j] >> 4) as f32 * d + m) * xb[j + 16];
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_rows_avx2<const G: usize>(
    blocks: &[BlockQ4_1],
    x: &[f32],
    xsum: &[[f32; 4]],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    // Per block: sum(q * x) in a vector, scaled by d; plus m * sum(x) from
    // the shared block sums. That is (q * d + m) * x summed, regrouped, in
    // fewer instructions than dequantizing each weight. G rows of x share
    // each unpacked block; G is a constant so the accumulators stay in
    // registers (indexed arrays of a run-time length were spilled to the
    // stack, which halved the single-row speed).
    let nb = blocks.len();
    debug_assert!(out.len() == G && x.len() == G * nb * QK && xsum.len() == G * nb);
    let mut acc = [_mm256_setzero_ps(); G];
    let mut msum = [_mm_setzero_ps(); G];
    let mask = _mm_set1_epi8(0x0F);
    for (b, blk) in blocks.iter().enumerate() {
        // [d, m, 0, 0] from the two f16s.
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(blk.dm)));
        let d = _mm256_broadcastss_ps(dm);
        // SAFETY: `qs` is 16 bytes.
        let v = unsafe { _mm_loadu_si128(blk.qs.as_ptr() as *const __m128i) };
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        // Elements 0..8, 8..16 (low nibbles), 16..24, 24..32 (high nibbles).
        let q = [
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
        ];
        for i in 0..G {
            // SAFETY: row i of x has nb blocks of 32 floats and nb xsum
            // groups (asserted by the caller); b < nb.
            let (xp, xs) = unsafe {
                (
                    x.as_ptr().add((i * nb + b) * QK),
                    _mm_loadu_ps(xsum.as_ptr().add(i * nb + b) as *const f32),
                )
            };
            // SAFETY: 32 floats of this block, 8 at a time.
            let qx = unsafe {
                let mut qx = _mm256_mul_ps(q[0], _mm256_loadu_ps(xp));
                qx = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xp.add(8)), qx);
                qx = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xp.add(16)), qx);
                _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xp.add(24)), qx)
            };
            acc[i] = _mm256_fmadd_ps(qx, d, acc[i]);
            msum[i] = _mm_fmadd_ps(dm, xs, msum[i]);
        }
    }
    for i in 0..G {
        // Lane 1 of msum holds sum(m * sum(x)).
        out[i] = hsum(acc[i]) + _mm_cvtss_f32(_mm_shuffle_ps(msum[i], msum[i], 1));
    }
}

/// A Q8_0 weight matrix `[rows, cols]` in the file's block layout.
#[derive(Debug, Clone)]
pub struct Q8_0Matrix {
    rows: usize,
    cols: usize,
    blocks: Vec<BlockQ8_0>,
}

impl Q8_0Matrix {
    /// From GGML's raw Q8_0 bytes of a `[rows, cols]` tensor.
    pub fn from_ggml(bytes: &[u8], rows: usize, cols: usize) -> Result<Self, String> {
        let n = check_len(
            "Q8_0",
            bytes.len(),
            rows,
            cols,
            std::mem::size_of::<BlockQ8_0>(),
        )?;
        let mut blocks = Vec::with_capacity(n);
        for b in bytes.chunks_exact(std::mem::size_of::<BlockQ8_0>()) {
            let mut blk = BlockQ8_0 {
                d: [b[0], b[1]],
                qs: [0; QK],
            };
            for (o, &v) in blk.qs.iter_mut().zip(&b[2..]) {
                *o = v as i8;
            }
            blocks.push(blk);
        }
        Ok(Self { rows, cols, blocks })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The matrix as f32, `q * d` per element as GGML computes it.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(QK)
            .zip(self.blocks.par_iter())
            .for_each(|(o, b)| {
                let d = half(b.d);
                for (o, &q) in o.iter_mut().zip(&b.qs) {
                    *o = q as f32 * d;
                }
            });
        out
    }

    /// Row `r` as f32 (embedding lookups).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let nb = self.cols / QK;
        let mut out = Vec::with_capacity(self.cols);
        for b in &self.blocks[r * nb..(r + 1) * nb] {
            let d = half(b.d);
            out.extend(b.qs.iter().map(|&q| q as f32 * d));
        }
        out
    }

    /// `y = x W^T` for `m` rows of `x`: `[m, rows]`, each block unpacked once.
    pub fn matmul(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "activation length");
        assert!(m <= MAX_ROWS, "at most {MAX_ROWS} rows per call");
        let kernel = kernel.checked();
        let nb = self.cols / QK;
        per_weight_row(self.rows, m, |r, o| {
            q8_0_rows(kernel, &self.blocks[r * nb..(r + 1) * nb], x, o)
        })
    }
}

fn q8_0_rows(kernel: Kernel, blocks: &[BlockQ8_0], x: &[f32], out: &mut [f32]) {
    let m = out.len();
    assert!(m <= MAX_ROWS && x.len() == m * blocks.len() * QK);
    let cols = blocks.len() * QK;
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `q4_1_rows`: the CPU features were checked by
        // `matmul` and the lengths asserted above; each group of G rows hands
        // the kernel exactly G rows of x.
        Kernel::Avx2 => {
            let mut i = 0;
            while i < m {
                let g = row_group(m - i);
                let (xg, og) = (&x[i * cols..(i + g) * cols], &mut out[i..i + g]);
                unsafe {
                    match g {
                        4 => q8_0_rows_avx2::<4>(blocks, xg, og),
                        2 => q8_0_rows_avx2::<2>(blocks, xg, og),
                        _ => q8_0_rows_avx2::<1>(blocks, xg, og),
                    }
                }
                i += g;
            }
        }
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = q8_0_row_scalar(blocks, &x[i * cols..(i + 1) * cols]);
            }
        }
    }
}

fn q8_0_row_scalar(blocks: &[BlockQ8_0], x: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, xb) in blocks.iter().zip(x.chunks_exact(QK)) {
        let d = half(b.d);
        for (&q, &xv) in b.qs.iter().zip(xb) {
            acc += (q as f32 * d) * xv;
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_rows_avx2<const G: usize>(blocks: &[BlockQ8_0], x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = blocks.len();
    debug_assert!(out.len() == G && x.len() == G * nb * QK);
    let mut acc = [_mm256_setzero_ps(); G];
    for (b, blk) in blocks.iter().enumerate() {
        let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(
            u16::from_le_bytes(blk.d) as i32
        )));
        // SAFETY: `qs` is 32 bytes.
        let v = unsafe { _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i) };
        let lo = _mm256_castsi256_si128(v);
        let hi = _mm256_extracti128_si256(v, 1);
        let q = [
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))),
        ];
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: row i of x has nb blocks of 32 floats (asserted by the
            // caller); b < nb; 8 floats at a time.
            let qx = unsafe {
                let xp = x.as_ptr().add((i * nb + b) * QK);
                let mut qx = _mm256_mul_ps(q[0], _mm256_loadu_ps(xp));
                qx = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xp.add(8)), qx);
                qx = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xp.add(16)), qx);
                _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xp.add(24)), qx)
            };
            *a = _mm256_fmadd_ps(qx, d, *a);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = hsum(a);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[cfg(test)]
#[path = "quant_tests.rs"]
mod tests;
