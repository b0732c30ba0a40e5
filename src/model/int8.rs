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
//! - **Scalar**: the reference, and the path on other CPUs.
//!
//! The candle crates have no int8 GEMM for the CPU (their quantized matmul is
//! GGML's block formats for vector × matrix decoding), and `gemm` is float
//! only, hence this hand-written one.
//!
//! Weight layout: panels of [`PANEL`] = 16 output channels; within a panel,
//! for each group of 4 inputs, 16 channels × 4 bytes (64 bytes: one zmm or
//! two ymm register loads). The input dimension is padded to a multiple of 4
//! with zeros, and the last panel's missing channels are zero rows.

use rayon::prelude::*;

/// Output channels per packed panel.
pub const PANEL: usize = 16;
/// Inputs per group: the bytes one 32-bit lane multiplies.
const GROUP: usize = 4;

/// Which integer product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Int8Kernel {
    /// The fastest path this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Self::Avx512Vnni;
            }
            if is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// Every path this CPU can run (the tests force each).
    pub fn available() -> Vec<Self> {
        let mut v = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                v.push(Self::Avx2);
            }
            if Self::detect() == Self::Avx512Vnni {
                v.push(Self::Avx512Vnni);
            }
        }
        v
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512Vnni => "avx512-vnni",
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
        }
    }
}

/// A weight matrix [n, k] in int8 with one scale per output channel, packed
/// for the kernels.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of 4.
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
        let mut q = vec![0i8; n * k];
        let mut scales = vec![0f32; n];
        q.par_chunks_mut(k.max(1))
            .zip(scales.par_iter_mut())
            .zip(w.par_chunks(k.max(1)))
            .for_each(|((qr, s), wr)| {
                *s = quantize_row(wr, qr);
            });
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
        let kp = k.div_ceil(GROUP) * GROUP;
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

/// Symmetric int8 of one row, each value passed to `store` with its index;
/// returns the scale (0 for an all-zero row). Rounds half to even, and is
/// written so that it vectorizes (no libm call per value).
#[inline(always)]
fn quantize_with(x: &[f32], mut store: impl FnMut(usize, i8)) -> f32 {
    // Not f32::max, whose NaN rule keeps this from vectorizing; NaN and
    // infinity are caught below.
    let max = x
        .iter()
        .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
    let nan = x.iter().fold(false, |b, v| b | v.is_nan());
    if max == 0.0 || !max.is_finite() || nan {
        (0..x.len()).for_each(|i| store(i, 0));
        // A NaN or infinite input gives NaN outputs, as f32 would.
        return if max == 0.0 && !nan { 0.0 } else { f32::NAN };
    }
    let s = max / 127.0;
    let inv = 127.0 / max;
    // 1.5 * 2^23: adding and subtracting it rounds |y| < 2^22 to the nearest
    // integer, ties to even (the FPU's default mode), in plain SSE2 that
    // vectorizes; `round_ties_even` would call libm's rintf per value here.
    const MAGIC: f32 = 12_582_912.0;
    for (i, &v) in x.iter().enumerate() {
        let y = (v * inv).clamp(-127.0, 127.0);
        store(i, ((y + MAGIC) - MAGIC) as i8);
    }
    s
}

fn quantize_row(x: &[f32], q: &mut [i8]) -> f32 {
    quantize_with(x, |i, v| q[i] = v)
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
        let kp = k.div_ceil(GROUP) * GROUP;
        let mut data = vec![0u8; m * kp];
        let mut scales = vec![0f32; m];
        let shift = kernel.unsigned_activations();
        let pad = encode(0, shift);
        data.par_chunks_mut(kp.max(1))
            .zip(scales.par_iter_mut())
            .zip(x.par_chunks(k.max(1)))
            .for_each(|((d, s), xr)| {
                *s = quantize_with(xr, |i, v| d[i] = encode(v, shift));
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
        let kp = k.div_ceil(GROUP) * GROUP;
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

#[inline(always)]
fn encode(v: i8, shift: bool) -> u8 {
    if shift {
        (v as u8) ^ 0x80
    } else {
        v as u8
    }
}

/// One register tile's exact products: up to 8 rows × 2 panels.
type Tile = [[i32; 2 * PANEL]; 8];

/// Runs the tiles of rows `rows` × panels `panels`, handing each finished
/// tile (first row, row count, first channel, channel count) to `sink`.
fn drive(
    kernel: Int8Kernel,
    a: &QuantRows,
    rows: std::ops::Range<usize>,
    w: &QuantMatrix,
    panels: std::ops::Range<usize>,
    mut sink: impl FnMut(usize, usize, usize, usize, &Tile),
) {
    // The checks that make every kernel read in bounds: whole panels of
    // kp/4 groups, whole activation rows of kp bytes.
    assert_eq!(a.kp, w.kp, "activation and weight widths differ");
    assert!(rows.end <= a.m && a.data.len() == a.m * a.kp);
    assert!(panels.end <= w.panels() && w.packed.len() == w.panels() * w.kp * PANEL);
    let kernel = kernel.checked();
    let (mr, np) = kernel.tile();
    let groups = w.kp / GROUP;
    let panel_stride = w.kp * PANEL;
    let mut tile: Tile = [[0; 2 * PANEL]; 8];
    // Rows in blocks of ROW_BLOCK, all panels for each block: the block's
    // output rows stay in L2 while each panel (kp * 16 bytes) is read from
    // L1 for all of the block's tiles.
    const ROW_BLOCK: usize = 64;
    let mut rb = rows.start;
    while rb < rows.end {
        let rb_end = (rb + ROW_BLOCK).min(rows.end);
        let mut p = panels.start;
        while p < panels.end {
            let pn = np.min(panels.end - p);
            let c0 = p * PANEL;
            let cn = (pn * PANEL).min(w.n - c0);
            let bpanel = &w.packed[p * panel_stride..(p + pn) * panel_stride];
            let mut r = rb;
            while r < rb_end {
                let rn = mr.min(rb_end - r);
                let arows = &a.data[r * a.kp..(r + rn) * a.kp];
                run_tile(kernel, arows, rn, a.kp, bpanel, pn, groups, &mut tile);
                if kernel.unsigned_activations() {
                    for row in tile.iter_mut().take(rn) {
                        for (c, v) in row.iter_mut().take(cn).enumerate() {
                            *v -= 128 * w.colsum[c0 + c];
                        }
                    }
                }
                sink(r, rn, c0, cn, &tile);
                r += rn;
            }
            p += pn;
        }
        rb = rb_end;
    }
}

/// One tile: `rn` activation rows (`arows`, rows of `kp` bytes) against `pn`
/// panels (`b`, each `kp * 16` bytes), into `out[..rn][..pn * 16]`.
#[allow(clippy::too_many_arguments)]
fn run_tile(
    kernel: Int8Kernel,
    arows: &[u8],
    rn: usize,
    kp: usize,
    b: &[i8],
    pn: usize,
    groups: usize,
    out: &mut Tile,
) {
    // The bounds every kernel relies on, checked here, once per tile.
    assert!((1..=8).contains(&rn) && (1..=2).contains(&pn));
    assert_eq!(arows.len(), rn * kp);
    assert_eq!(b.len(), pn * kp * PANEL);
    assert_eq!(kp, groups * GROUP);
    match kernel {
        Int8Kernel::Scalar => tile_scalar(arows, rn, kp, b, pn, groups, out),
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx2 => {
            assert_eq!(pn, 1, "the AVX2 tile is one panel wide");
            // SAFETY: `drive` only passes kernels this CPU runs (`checked`),
            // and the asserts above give the kernel rn rows of kp bytes and
            // one panel of groups * 64 bytes, which is all it reads.
            unsafe {
                match rn {
                    1 => avx2::tile::<1>(arows.as_ptr(), kp, b.as_ptr(), groups, out),
                    2 => avx2::tile::<2>(arows.as_ptr(), kp, b.as_ptr(), groups, out),
                    3 => avx2::tile::<3>(arows.as_ptr(), kp, b.as_ptr(), groups, out),
                    _ => {
                        assert_eq!(rn, 4, "the AVX2 tile has at most 4 rows");
                        avx2::tile::<4>(arows.as_ptr(), kp, b.as_ptr(), groups, out)
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx512Vnni => {
            let (a, bp, stride) = (arows.as_ptr(), b.as_ptr(), kp * PANEL);
            macro_rules! go {
                ($($r:literal),*) => {
                    match (rn, pn) {
                        $(
                            ($r, 1) => vnni::tile::<$r, 1>(a, kp, bp, stride, groups, out),
                            ($r, _) => vnni::tile::<$r, 2>(a, kp, bp, stride, groups, out),
                        )*
                        _ => unreachable!("rn is 1..=8 (asserted)"),
                    }
                };
            }
            // SAFETY: as for AVX2: a runnable kernel, rn rows of kp bytes and
            // pn panels of `stride` bytes, checked by the asserts above.
            unsafe { go!(1, 2, 3, 4, 5, 6, 7, 8) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => tile_scalar(arows, rn, kp, b, pn, groups, out),
    }
}

fn tile_scalar(
    arows: &[u8],
    rn: usize,
    kp: usize,
    b: &[i8],
    pn: usize,
    groups: usize,
    out: &mut Tile,
) {
    for r in 0..rn {
        let a = &arows[r * kp..(r + 1) * kp];
        for p in 0..pn {
            let panel = &b[p * kp * PANEL..(p + 1) * kp * PANEL];
            for c in 0..PANEL {
                let mut acc = 0i32;
                for g in 0..groups {
                    for j in 0..GROUP {
                        let w = panel[(g * PANEL + c) * GROUP + j] as i32;
                        acc += (a[g * GROUP + j] as i8) as i32 * w;
                    }
                }
                out[r][p * PANEL + c] = acc;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Tile, GROUP, PANEL};
    use std::arch::x86_64::*;

    /// `R` rows × one panel.
    ///
    /// # Safety
    /// The CPU has AVX2; `a` points to `R` rows of `lda >= groups * 4`
    /// bytes; `b` to `groups * 64` bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn tile<const R: usize>(
        a: *const u8,
        lda: usize,
        b: *const i8,
        groups: usize,
        out: &mut Tile,
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for g in 0..groups {
            // SAFETY (all reads): inside the ranges the caller guarantees.
            let bg = b.add(g * GROUP * PANEL);
            let b0 = _mm256_loadu_si256(bg as *const __m256i);
            let b1 = _mm256_loadu_si256(bg.add(32) as *const __m256i);
            for (r, accr) in acc.iter_mut().enumerate() {
                let av =
                    _mm256_set1_epi32((a.add(r * lda + g * GROUP) as *const i32).read_unaligned());
                let aa = _mm256_sign_epi8(av, av);
                let p0 = _mm256_maddubs_epi16(aa, _mm256_sign_epi8(b0, av));
                let p1 = _mm256_maddubs_epi16(aa, _mm256_sign_epi8(b1, av));
                accr[0] = _mm256_add_epi32(accr[0], _mm256_madd_epi16(p0, ones));
                accr[1] = _mm256_add_epi32(accr[1], _mm256_madd_epi16(p1, ones));
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            _mm256_storeu_si256(out[r].as_mut_ptr() as *mut __m256i, accr[0]);
            _mm256_storeu_si256(out[r][8..].as_mut_ptr() as *mut __m256i, accr[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Tile, GROUP, PANEL};
    use std::arch::x86_64::*;

    /// `R` rows × `P` panels.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VNNI; `a` points to `R` rows of
    /// `lda >= groups * 4` bytes; `b` to `P` panels `stride` bytes apart, each
    /// of `groups * 64` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile<const R: usize, const P: usize>(
        a: *const u8,
        lda: usize,
        b: *const i8,
        stride: usize,
        groups: usize,
        out: &mut Tile,
    ) {
        let mut acc = [[_mm512_setzero_si512(); P]; R];
        for g in 0..groups {
            let mut bv = [_mm512_setzero_si512(); P];
            for (p, v) in bv.iter_mut().enumerate() {
                // SAFETY: inside panel p, as the caller guarantees.
                *v = _mm512_loadu_si512(b.add(p * stride + g * GROUP * PANEL) as *const _);
            }
            for (r, accr) in acc.iter_mut().enumerate() {
                let av =
                    _mm512_set1_epi32((a.add(r * lda + g * GROUP) as *const i32).read_unaligned());
                for (acc, &bw) in accr.iter_mut().zip(&bv) {
                    *acc = _mm512_dpbusd_epi32(*acc, av, bw);
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            for (p, v) in accr.iter().enumerate() {
                _mm512_storeu_si512(out[r][p * PANEL..].as_mut_ptr() as *mut _, *v);
            }
        }
    }
}

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
    assert_eq!(x.len(), m * w.k, "int8 matmul: x is not [{m}, {}]", w.k);
    assert_eq!(dst.len(), m * w.n, "int8 matmul: dst is not [{m}, {}]", w.n);
    let kernel = kernel.checked();
    let qa = QuantRows::quantize(x, m, w.k, kernel);
    let n = w.n;
    let threads = rayon::current_num_threads().max(1);
    let epilogue = |dst_row: &mut [f32], acc: &[i32], sx: f32, c0: usize| {
        for ((d, &v), &sw) in dst_row.iter_mut().zip(acc).zip(&w.scales[c0..]) {
            *d += v as f32 * sx * sw;
        }
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
