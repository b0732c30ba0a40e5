//! Dynamic int8 inference for the towers' linear layers (`--precision int8`).
//!
//! - Weights: per-output-channel symmetric int8, `scale = max|w_row| / 127`,
//!   quantized once at load (or read back from `clasp quantize`'s output).
//! - Activations: per-row (per-token) symmetric int8, quantized at run time.
//! - The product accumulates exactly in i32; `y = acc * s_x[row] * s_w[col]`.
//!
//! Kernels, chosen at run time and each testable by forcing it:
//! - **AVX-512 VNNI**: `vpdpbusd` multiplies unsigned by signed bytes and adds
//!   four products into each 32-bit lane. Activations go in as `q + 128`
//!   (u8); the surplus `128 * sum(w_col)` is subtracted after the loop.
//! - **AVX2**: `vpmaddubsw` on `|a|` and `sign(a) * w`, then `vpmaddwd` by
//!   ones into i32. Both operands are within ±127, so the 16-bit pair sums
//!   (at most 2·127·127 = 32258) never saturate: the result is exact.
//! - **AMX** (Sapphire Rapids and later): `tdpbssd` multiplies a 16×64 tile
//!   of signed activation bytes by a 16×16×4 tile of signed weight bytes into
//!   a 16×16 tile of i32 sums: 16,384 products per instruction. Rust has no
//!   stable AMX intrinsics, so the kernel is inline assembly (stable); the
//!   process asks Linux for the tile state once (`arch_prctl`), and the
//!   kernel is only chosen when that succeeds.
//! - **Scalar**: the reference, and the path on other CPUs.
//!
//! The candle crates have no int8 GEMM for the CPU (their quantized matmul is
//! GGML's block formats for vector × matrix decoding), and `gemm` is float
//! only, hence this hand-written one.
//!
//! Weight layout: panels of [`PANEL`] = 16 output channels; within a panel,
//! for each group of 4 inputs, 16 channels × 4 bytes (64 bytes: one zmm or
//! two ymm register loads). Sixteen consecutive groups of a panel (64 inputs)
//! are exactly one AMX weight tile (16 rows of 64 bytes). The input dimension
//! is padded to a multiple of 64 with zeros (a whole AMX tile; the other
//! kernels just read zeros), and the last panel's missing channels are zero
//! rows.

use rayon::prelude::*;

#[path = "int8/tiles.rs"]
mod tiles;
use tiles::*;

/// Output channels per packed panel.
pub const PANEL: usize = 16;
/// Inputs per group: the bytes one 32-bit lane multiplies.
const GROUP: usize = 4;
/// The input dimension is padded to a multiple of this (one AMX tile row).
const KBLOCK: usize = 64;
/// The most rows one tile computes (AMX: two 16-row tiles).
const MAX_TILE_ROWS: usize = 32;

fn padded_k(k: usize) -> usize {
    k.div_ceil(KBLOCK) * KBLOCK
}

/// Which integer product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    Scalar,
    Avx2,
    Avx512Vnni,
    Amx,
}

impl Int8Kernel {
    /// The fastest path this CPU runs.
    pub fn detect() -> Self {
        *Self::available()
            .last()
            .expect("the scalar kernel is always available")
    }

    /// Every path this CPU can run, slowest first (the tests force each).
    pub fn available() -> Vec<Self> {
        let mut v = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                v.push(Self::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                v.push(Self::Avx512Vnni);
            }
            if amx::usable() {
                v.push(Self::Amx);
            }
        }
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512-vnni",
            Self::Amx => "amx",
        }
    }

    /// The kernel the models use: `CLASP_INT8_KERNEL` (`scalar`, `avx2` or
    /// `avx512-vnni`) when it is set and this CPU runs it, else [`detect`].
    ///
    /// [`detect`]: Self::detect
    pub fn selected() -> Self {
        static SELECTED: std::sync::OnceLock<Int8Kernel> = std::sync::OnceLock::new();
        *SELECTED.get_or_init(|| {
            let forced = std::env::var("CLASP_INT8_KERNEL").ok();
            match forced
                .as_deref()
                .and_then(|name| Self::available().into_iter().find(|k| k.name() == name))
            {
                Some(k) => k,
                None => {
                    if let Some(name) = forced {
                        tracing::warn!(
                            "CLASP_INT8_KERNEL={name} is not a kernel this CPU runs; using {}",
                            Self::detect().name()
                        );
                    }
                    Self::detect()
                }
            }
        })
    }

    /// This kernel if the CPU runs it, else the scalar one (so a forced
    /// kernel can never execute instructions the CPU lacks).
    fn checked(self) -> Self {
        static RUNNABLE: std::sync::OnceLock<Vec<Int8Kernel>> = std::sync::OnceLock::new();
        if RUNNABLE.get_or_init(Self::available).contains(&self) {
            self
        } else {
            Self::Scalar
        }
    }

    /// Whether activations are stored as `q + 128` (VNNI's unsigned operand).
    fn unsigned_activations(self) -> bool {
        self == Self::Avx512Vnni
    }

    /// Rows and panels per register tile.
    fn tile(self) -> (usize, usize) {
        match self {
            Self::Scalar => (4, 1),
            Self::Avx2 => (4, 1),
            Self::Avx512Vnni => (8, 2),
            Self::Amx => (MAX_TILE_ROWS, 2),
        }
    }
}

/// A weight matrix [n, k] in int8 with one scale per output channel, packed
/// for the kernels.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of [`KBLOCK`].
    kp: usize,
    packed: Vec<i8>,
    scales: Vec<f32>,
    /// Each channel's sum of its int8 weights (VNNI's correction).
    colsum: Vec<i32>,
}

impl QuantMatrix {
    /// Quantizes `w` [n, k] (row-major f32) per output channel.
    pub fn quantize(w: &[f32], n: usize, k: usize) -> Result<Self, String> {
        if w.len() != n * k {
            return Err(format!(
                "weight has {} values, not {n} x {k} = {}",
                w.len(),
                n * k
            ));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "weight [{}, {}] is not finite ({})",
                i / k.max(1),
                i % k.max(1),
                w[i]
            ));
        }
        let mut bytes = vec![0u8; n * k];
        let mut scales = vec![0f32; n];
        bytes
            .par_chunks_mut(k.max(1))
            .zip(scales.par_iter_mut())
            .zip(w.par_chunks(k.max(1)))
            .for_each(|((qr, s), wr)| {
                *s = quantize_into(wr, qr, 0);
            });
        let q: Vec<i8> = bytes.into_iter().map(|b| b as i8).collect();
        Self::from_int8(&q, scales, n, k)
    }

    /// From int8 weights [n, k] (row-major, each within ±127) and their
    /// per-channel scales, as `clasp quantize` saves them.
    pub fn from_int8(q: &[i8], scales: Vec<f32>, n: usize, k: usize) -> Result<Self, String> {
        if q.len() != n * k {
            return Err(format!(
                "int8 weight has {} values, not {n} x {k} = {}",
                q.len(),
                n * k
            ));
        }
        if scales.len() != n {
            return Err(format!("{} scales for {n} output channels", scales.len()));
        }
        if q.contains(&i8::MIN) {
            return Err("int8 weight holds -128 (the symmetric range is -127..=127)".into());
        }
        if let Some(s) = scales.iter().find(|s| !s.is_finite() || **s < 0.0) {
            return Err(format!(
                "int8 weight scale {s} is not a finite non-negative number"
            ));
        }
        let kp = padded_k(k);
        let panels = n.div_ceil(PANEL);
        let groups = kp / GROUP;
        let mut packed = vec![0i8; panels * kp * PANEL];
        for (row, wr) in q.chunks(k.max(1)).enumerate().take(n) {
            let (p, c) = (row / PANEL, row % PANEL);
            for (col, &v) in wr.iter().enumerate() {
                let (g, j) = (col / GROUP, col % GROUP);
                packed[((p * groups + g) * PANEL + c) * GROUP + j] = v;
            }
        }
        let colsum = q
            .chunks(k.max(1))
            .take(n)
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
        Ok(Self {
            n,
            k,
            kp,
            packed,
            scales,
            colsum,
        })
    }

    /// The matrices' rows stacked (output channels concatenated), as one
    /// GEMM computes fused projections.
    pub fn stack(parts: &[&Self]) -> Result<Self, String> {
        let k = parts.first().map_or(0, |p| p.k);
        if parts.iter().any(|p| p.k != k) {
            return Err("stacked int8 weights have different input widths".into());
        }
        let q: Vec<i8> = parts.iter().flat_map(|p| p.to_int8()).collect();
        let scales: Vec<f32> = parts.iter().flat_map(|p| p.scales.clone()).collect();
        let n = scales.len();
        Self::from_int8(&q, scales, n, k)
    }

    /// Output channels.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Inputs.
    pub fn cols(&self) -> usize {
        self.k
    }

    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// The int8 weights back in row-major [n, k] order.
    pub fn to_int8(&self) -> Vec<i8> {
        let groups = self.kp / GROUP;
        let mut q = vec![0i8; self.n * self.k];
        for row in 0..self.n {
            let (p, c) = (row / PANEL, row % PANEL);
            for col in 0..self.k {
                let (g, j) = (col / GROUP, col % GROUP);
                q[row * self.k + col] = self.packed[((p * groups + g) * PANEL + c) * GROUP + j];
            }
        }
        q
    }

    /// The weights as f32 (int8 times scale).
    pub fn dequantize(&self) -> Vec<f32> {
        self.to_int8()
            .chunks(self.k.max(1))
            .zip(&self.scales)
            .flat_map(|(r, &s)| r.iter().map(move |&v| v as f32 * s))
            .collect()
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }
}

/// The largest |x| and whether any x is NaN. Sixteen running maxima, one
/// per lane: a single running maximum is a chain of dependent compares that
/// does not vectorize (a float max reduction may not be reordered), while
/// sixteen independent ones are one vector operation per 16 values.
#[inline(always)]
fn abs_max(x: &[f32]) -> (f32, bool) {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let mut nan = false;
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, v) in lanes.iter_mut().zip(c) {
            // Not f32::max, whose NaN rule keeps this from vectorizing;
            // NaN is tracked separately.
            let a = v.abs();
            *m = if a > *m { a } else { *m };
            nan |= v.is_nan();
        }
    }
    for v in tail {
        let a = v.abs();
        lanes[0] = if a > lanes[0] { a } else { lanes[0] };
        nan |= v.is_nan();
    }
    let max = lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    (max, nan)
}

/// Symmetric int8 of one row into `out` (`out.len() == x.len()`), each
/// byte XORed with `xor` (0x80 stores `q + 128`); returns the scale (0 for
/// an all-zero row). Rounds half to even, and is written so that it
/// vectorizes: no libm call and no float-to-int conversion per value.
#[inline(always)]
fn quantize_into(x: &[f32], out: &mut [u8], xor: u8) -> f32 {
    let (max, nan) = abs_max(x);
    if max == 0.0 || !max.is_finite() || nan {
        out.iter_mut().for_each(|o| *o = xor);
        // A NaN or infinite input gives NaN outputs, as f32 would.
        return if max == 0.0 && !nan { 0.0 } else { f32::NAN };
    }
    let s = max / 127.0;
    let inv = 127.0 / max;
    // 1.5 * 2^23: adding it rounds |y| < 2^22 to the nearest integer, ties
    // to even (the FPU's default mode), and leaves that integer in the low
    // mantissa bits: for |y| <= 127 the low byte of the sum's bits is the
    // integer's two's-complement byte.
    const MAGIC: f32 = 12_582_912.0;
    for (o, &v) in out.iter_mut().zip(x) {
        let y = (v * inv).clamp(-127.0, 127.0);
        *o = ((y + MAGIC).to_bits() as u8) ^ xor;
    }
    s
}

/// Activations quantized per row, laid out as the kernel reads them: rows of
/// `kp` bytes (zero padded), as i8 bits or as `q + 128`.
struct QuantRows {
    m: usize,
    kp: usize,
    data: Vec<u8>,
    scales: Vec<f32>,
}

impl QuantRows {
    fn quantize(x: &[f32], m: usize, k: usize, kernel: Int8Kernel) -> Self {
        let kp = padded_k(k);
        let mut data = vec![0u8; m * kp];
        let mut scales = vec![0f32; m];
        let shift = kernel.unsigned_activations();
        let pad = encode(0, shift);
        data.par_chunks_mut(kp.max(1))
            .zip(scales.par_iter_mut())
            .zip(x.par_chunks(k.max(1)))
            .for_each(|((d, s), xr)| {
                let xor = encode(0, shift);
                *s = super::cpu_kernels::with_simd(|| quantize_into(xr, &mut d[..k], xor));
                d[k..].iter_mut().for_each(|b| *b = pad);
            });
        Self {
            m,
            kp,
            data,
            scales,
        }
    }

    fn from_int8(a: &[i8], m: usize, k: usize, kernel: Int8Kernel) -> Self {
        let kp = padded_k(k);
        let shift = kernel.unsigned_activations();
        let mut data = vec![encode(0, shift); m * kp];
        for (d, r) in data.chunks_mut(kp.max(1)).zip(a.chunks(k.max(1))) {
            for (b, &v) in d.iter_mut().zip(r) {
                *b = encode(v, shift);
            }
        }
        Self {
            m,
            kp,
            data,
            scales: vec![1.0; m],
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "int8/avx2.rs"]
mod avx2;

#[cfg(target_arch = "x86_64")]
#[path = "int8/vnni.rs"]
mod vnni;

#[cfg(target_arch = "x86_64")]
#[path = "int8/amx.rs"]
mod amx;

/// The exact integer product `a[m, k] · W^T` (i32, [m, n]) of int8
/// activations, through `kernel`: what the f32 path computes before scaling.
pub fn igemm(a: &[i8], m: usize, w: &QuantMatrix, kernel: Int8Kernel) -> Vec<i32> {
    assert_eq!(a.len(), m * w.k, "igemm: a is not [{m}, {}]", w.k);
    assert!(!a.contains(&i8::MIN), "igemm: activations are within ±127");
    let qa = QuantRows::from_int8(a, m, w.k, kernel);
    let n = w.n;
    let mut out = vec![0i32; m * n];
    drive(kernel, &qa, 0..m, w, 0..w.panels(), |r0, rn, c0, cn, t| {
        for (i, row) in t.iter().take(rn).enumerate() {
            out[(r0 + i) * n + c0..(r0 + i) * n + c0 + cn].copy_from_slice(&row[..cn]);
        }
    });
    out
}

/// `dst[m, n] += quantize(x[m, k]) · W^T`, dequantized, on `kernel`, over
/// rayon's threads.
///
/// Panics when a slice's length does not match the shapes.
pub fn matmul_acc(x: &[f32], m: usize, w: &QuantMatrix, dst: &mut [f32], kernel: Int8Kernel) {
    matmul_into(x, m, w, None, dst, true, kernel)
}

/// `dst[m, n] (+)= quantize(x[m, k]) · W^T + bias`, dequantized, on
/// `kernel`, over rayon's threads; with `accumulate` dst keeps its contents
/// (a residual), else they are overwritten. The bias is added as each tile
/// is scaled, not in a pass of its own.
///
/// Panics when a slice's length does not match the shapes.
pub fn matmul_into(
    x: &[f32],
    m: usize,
    w: &QuantMatrix,
    bias: Option<&[f32]>,
    dst: &mut [f32],
    accumulate: bool,
    kernel: Int8Kernel,
) {
    assert_eq!(x.len(), m * w.k, "int8 matmul: x is not [{m}, {}]", w.k);
    assert_eq!(dst.len(), m * w.n, "int8 matmul: dst is not [{m}, {}]", w.n);
    let n = w.n;
    let zeros;
    let bias = match bias {
        Some(b) => {
            assert_eq!(b.len(), n, "int8 matmul: bias is not [{n}]");
            b
        }
        None => {
            zeros = vec![0f32; n];
            &zeros[..]
        }
    };
    let kernel = kernel.checked();
    let qa = QuantRows::quantize(x, m, w.k, kernel);
    let threads = rayon::current_num_threads().max(1);
    let epilogue = |dst_row: &mut [f32], acc: &[i32], sx: f32, c0: usize| {
        super::cpu_kernels::with_simd(|| {
            let cols = w.scales[c0..].iter().zip(&bias[c0..]);
            for ((d, &v), (&sw, &b)) in dst_row.iter_mut().zip(acc).zip(cols) {
                // Overwriting never reads dst (a reused buffer may hold
                // anything, NaN included).
                let base = if accumulate { *d } else { 0.0 };
                *d = base + (v as f32 * sx * sw + b);
            }
        })
    };
    let (mr, _) = kernel.tile();
    if m >= 8 * threads {
        // Many rows: each task owns a block of rows of dst, all channels.
        let per = m.div_ceil(threads * 4).div_ceil(mr).max(1) * mr;
        dst.par_chunks_mut(per * n)
            .enumerate()
            .for_each(|(t, block)| {
                let r0 = t * per;
                let rows = r0..(r0 + per).min(m);
                drive(
                    kernel,
                    &qa,
                    rows,
                    w,
                    0..w.panels(),
                    |r, rn, c0, cn, tile| {
                        for (i, trow) in tile.iter().take(rn).enumerate() {
                            let off = (r + i - r0) * n + c0;
                            epilogue(&mut block[off..off + cn], &trow[..cn], qa.scales[r + i], c0);
                        }
                    },
                );
            });
    } else {
        // Few rows (batch 1 texts): split the channels.
        super::cpu_kernels::par_column_blocks(dst, n, PANEL, |ps, c0, cw, local| {
            drive(kernel, &qa, 0..m, w, ps, |r, rn, cc, cn, tile| {
                for (i, trow) in tile.iter().take(rn).enumerate() {
                    let off = (r + i) * cw + cc - c0;
                    epilogue(&mut local[off..off + cn], &trow[..cn], qa.scales[r + i], cc);
                }
            });
        });
    }
}

#[cfg(test)]
#[path = "int8_tests.rs"]
mod tests;
