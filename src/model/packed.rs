//! Prepacked f32 GEMM for the towers' inference linears.
//!
//! The `gemm` crate repacks both operands on every call, and this build
//! leaves out its AVX-512 kernels (one global switch that slowed the language
//! model's batch-8 decoding on Zen 4, see `Cargo.toml`). Inference weights
//! never change, so an encoder packs them once when it loads, here, into
//! panels of 16 output channels, k-major (`[panel][k][16]`), the order the
//! microkernels read them. The kernels, chosen at run time:
//! - **AVX-512F**: 12 rows × 32 channels per tile (24 zmm accumulators);
//! - **AVX2 + FMA**: 6 rows × 16 channels (12 ymm accumulators).
//!
//! A CPU with neither keeps the `gemm` crate. The loops block over rows
//! (the output rows stay in L2) and over k (a panel pair's k-block stays in
//! L1), and accumulate into the output, which the caller pre-fills with the
//! bias and the residual.
//!
//! This costs memory: the packed copy sits beside the f32 weights, which
//! training and the other paths read.

use rayon::prelude::*;

const PANEL: usize = 16;
/// Rows per block whose outputs stay in L2.
const ROW_BLOCK: usize = 96;
/// Inputs per k-block: 2 panels × 256 × 16 floats = 32 KiB, in L1.
const KC: usize = 256;

/// Which f32 microkernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Kernel {
    Avx2,
    Avx512,
}

impl F32Kernel {
    /// The kernel to use on this CPU: AVX-512 where it runs. The AVX2 one
    /// measured no faster than the `gemm` crate (0.95× on ViT-B/32 images at
    /// batch 32), so AVX2-only CPUs keep `gemm` unless it is forced.
    pub fn detect() -> Option<Self> {
        Self::available().into_iter().find(|k| *k == Self::Avx512)
    }

    /// Every kernel this CPU runs (the tests force each); detected once.
    pub fn available() -> Vec<Self> {
        Self::runnable().to_vec()
    }

    fn runnable() -> &'static [Self] {
        static RUNNABLE: std::sync::OnceLock<Vec<F32Kernel>> = std::sync::OnceLock::new();
        RUNNABLE.get_or_init(|| {
            #[allow(unused_mut)]
            let mut v = Vec::new();
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    v.push(Self::Avx2);
                }
                if is_x86_feature_detected!("avx512f") {
                    v.push(Self::Avx512);
                }
            }
            v
        })
    }

    /// Whether this CPU runs the kernel (cheap: every tile asks).
    fn runs(self) -> bool {
        Self::runnable().contains(&self)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// The kernel encoders pack for: `CLASP_F32_KERNEL` (`avx2`, `avx512`, or
    /// `gemm` for none: the `gemm` crate) when set and runnable, else
    /// [`detect`](Self::detect).
    pub fn selected() -> Option<Self> {
        static SELECTED: std::sync::OnceLock<Option<F32Kernel>> = std::sync::OnceLock::new();
        *SELECTED.get_or_init(|| match std::env::var("CLASP_F32_KERNEL").ok().as_deref() {
            Some("gemm") => None,
            Some(name) => match Self::available().into_iter().find(|k| k.name() == name) {
                Some(k) => Some(k),
                None => {
                    tracing::warn!("CLASP_F32_KERNEL={name} is not a kernel this CPU runs");
                    Self::detect()
                }
            },
            None => Self::detect(),
        })
    }

    fn tile(self) -> (usize, usize) {
        match self {
            Self::Avx2 => (6, 1),
            Self::Avx512 => (12, 2),
        }
    }
}

/// A weight matrix [n, k] packed for the kernels.
#[derive(Debug, Clone)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    packed: Vec<f32>,
}

impl PackedF32 {
    /// Packs `w` [n, k] (row-major).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "pack: weight is not [{n}, {k}]");
        let panels = n.div_ceil(PANEL);
        let mut packed = vec![0f32; panels * k * PANEL];
        packed
            .par_chunks_mut((k * PANEL).max(1))
            .enumerate()
            .for_each(|(p, dst)| {
                for c in 0..PANEL.min(n - p * PANEL) {
                    let row = &w[(p * PANEL + c) * k..(p * PANEL + c + 1) * k];
                    for (kk, &v) in row.iter().enumerate() {
                        dst[kk * PANEL + c] = v;
                    }
                }
            });
        Self { n, k, packed }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }
}

/// `dst[m, n] += x[m, k] · W^T` on `kernel`, over rayon's threads.
///
/// Panics when a slice's length does not match the shapes, or when the CPU
/// does not run `kernel`.
pub fn matmul_acc(x: &[f32], m: usize, w: &PackedF32, dst: &mut [f32], kernel: F32Kernel) {
    assert_eq!(x.len(), m * w.k, "packed matmul: x is not [{m}, {}]", w.k);
    assert_eq!(
        dst.len(),
        m * w.n,
        "packed matmul: dst is not [{m}, {}]",
        w.n
    );
    assert!(
        kernel.runs(),
        "this CPU does not run the {} kernel",
        kernel.name()
    );
    let n = w.n;
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let (mr, _) = kernel.tile();
    if m >= 2 * mr * threads {
        let per = m.div_ceil(threads * 2).div_ceil(mr) * mr;
        dst.par_chunks_mut(per * n)
            .enumerate()
            .for_each(|(t, block)| {
                let r0 = t * per;
                let rows = block.len() / n;
                drive(
                    kernel,
                    &x[r0 * w.k..(r0 + rows) * w.k],
                    rows,
                    w,
                    0..w.panels(),
                    block,
                    n,
                    0,
                );
            });
    } else {
        // Few rows: split the channels; each task works on its own copy of
        // its columns, which is then written back.
        let panels = w.panels();
        let per = panels.div_ceil(threads * 2).max(1);
        let parts: Vec<(usize, usize, Vec<f32>)> = (0..panels.div_ceil(per))
            .into_par_iter()
            .map(|t| {
                let ps = t * per..((t + 1) * per).min(panels);
                let c0 = ps.start * PANEL;
                let cw = (ps.end * PANEL).min(n) - c0;
                let mut local: Vec<f32> = dst
                    .chunks(n)
                    .flat_map(|r| r[c0..c0 + cw].iter().copied())
                    .collect();
                drive(kernel, x, m, w, ps, &mut local, cw, c0);
                (c0, cw, local)
            })
            .collect();
        for (c0, cw, local) in parts {
            for (drow, lrow) in dst.chunks_mut(n).zip(local.chunks(cw)) {
                drow[c0..c0 + cw].copy_from_slice(lrow);
            }
        }
    }
}

/// Accumulates `x[rows, k] · W[panels]^T` into `out`, whose rows are `ldo`
/// wide and whose column 0 is channel `c_base`.
#[allow(clippy::too_many_arguments)]
fn drive(
    kernel: F32Kernel,
    x: &[f32],
    rows: usize,
    w: &PackedF32,
    panels: std::ops::Range<usize>,
    out: &mut [f32],
    ldo: usize,
    c_base: usize,
) {
    let k = w.k;
    assert_eq!(x.len(), rows * k);
    assert_eq!(out.len(), rows * ldo);
    assert!(panels.end <= w.panels() && w.packed.len() == w.panels() * k * PANEL);
    assert!(panels.start * PANEL >= c_base && (panels.end * PANEL).min(w.n) - c_base <= ldo);
    let (mr, np) = kernel.tile();
    let stride = k * PANEL;
    let mut tmp = [0f32; 12 * 2 * PANEL];
    let mut rb = 0;
    while rb < rows {
        let rb_end = (rb + ROW_BLOCK).min(rows);
        let mut kb = 0;
        while kb < k {
            let kc = KC.min(k - kb);
            let mut p = panels.start;
            while p < panels.end {
                let pn = np.min(panels.end - p);
                let c0 = p * PANEL - c_base;
                let cn = (pn * PANEL).min(w.n - p * PANEL);
                let full = cn == pn * PANEL;
                let b =
                    &w.packed[p * stride + kb * PANEL..(p + pn - 1) * stride + (kb + kc) * PANEL];
                let mut r = rb;
                while r < rb_end {
                    let rn = mr.min(rb_end - r);
                    let a = &x[r * k + kb..(r + rn - 1) * k + kb + kc];
                    if full {
                        let o = &mut out[r * ldo + c0..(r + rn - 1) * ldo + c0 + cn];
                        run_tile(kernel, a, k, b, stride, kc, rn, pn, o, ldo);
                    } else {
                        // The last, partial panel: through a full-width buffer
                        // so the kernel never writes past the real channels.
                        let width = pn * PANEL;
                        for i in 0..rn {
                            let src = &out[(r + i) * ldo + c0..(r + i) * ldo + c0 + cn];
                            tmp[i * width..i * width + cn].copy_from_slice(src);
                        }
                        let t = &mut tmp[..(rn - 1) * width + width];
                        run_tile(kernel, a, k, b, stride, kc, rn, pn, t, width);
                        for i in 0..rn {
                            out[(r + i) * ldo + c0..(r + i) * ldo + c0 + cn]
                                .copy_from_slice(&tmp[i * width..i * width + cn]);
                        }
                    }
                    r += rn;
                }
                p += pn;
            }
            kb += kc;
        }
        rb = rb_end;
    }
}

/// One tile: `rn` rows of `a` (row stride `lda`, `kc` values each) against
/// `pn` panels of `b` (`stride` apart, k-major, from the block's first k),
/// accumulated into `c` (`rn` rows of `pn * 16` values, row stride `ldc`).
#[allow(clippy::too_many_arguments)]
fn run_tile(
    kernel: F32Kernel,
    a: &[f32],
    lda: usize,
    b: &[f32],
    stride: usize,
    kc: usize,
    rn: usize,
    pn: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let (mr, np) = kernel.tile();
    // The bounds the kernels rely on, checked once per tile.
    assert!(rn >= 1 && rn <= mr && pn >= 1 && pn <= np && kc >= 1);
    assert!(a.len() > (rn - 1) * lda + kc - 1);
    assert!(b.len() >= (pn - 1) * stride + kc * PANEL);
    assert!(c.len() >= (rn - 1) * ldc + pn * PANEL);
    assert!(kernel.runs());
    #[cfg(target_arch = "x86_64")]
    {
        let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        match kernel {
            F32Kernel::Avx512 => {
                macro_rules! go {
                    ($($r:literal),*) => {
                        match (rn, pn) {
                            $(
                                ($r, 1) => x512::tile::<$r, 1>(ap, lda, bp, stride, kc, cp, ldc),
                                ($r, _) => x512::tile::<$r, 2>(ap, lda, bp, stride, kc, cp, ldc),
                            )*
                            _ => unreachable!("rn is 1..=12 (asserted)"),
                        }
                    };
                }
                // SAFETY: the CPU runs AVX-512F (asserted), and the asserts
                // above bound every read of a and b and every access to c.
                unsafe { go!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12) }
            }
            F32Kernel::Avx2 => {
                macro_rules! go {
                    ($($r:literal),*) => {
                        match rn {
                            $($r => x256::tile::<$r>(ap, lda, bp, kc, cp, ldc),)*
                            _ => unreachable!("rn is 1..=6 (asserted)"),
                        }
                    };
                }
                // SAFETY: as above, for AVX2 + FMA and one panel.
                unsafe { go!(1, 2, 3, 4, 5, 6) }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, lda, b, stride, kc, c, ldc);
        unreachable!("no f32 kernel is available off x86_64");
    }
}

#[cfg(target_arch = "x86_64")]
mod x512 {
    use super::PANEL;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512F; `a`: `R` rows `lda` apart of `kc` floats; `b`: `P` panels
    /// `stride` apart of `kc * 16` floats; `c`: `R` rows `ldc` apart of
    /// `P * 16` floats.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const R: usize, const P: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        stride: usize,
        kc: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for (r, accr) in acc.iter_mut().enumerate() {
            for (p, v) in accr.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(c.add(r * ldc + p * PANEL));
            }
        }
        for kk in 0..kc {
            let mut bv = [_mm512_setzero_ps(); P];
            for (p, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(b.add(p * stride + kk * PANEL));
            }
            for (r, accr) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * lda + kk));
                for (v, &bw) in accr.iter_mut().zip(&bv) {
                    *v = _mm512_fmadd_ps(av, bw, *v);
                }
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            for (p, v) in accr.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc + p * PANEL), *v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x256 {
    use super::PANEL;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2 + FMA; `a`: `R` rows `lda` apart of `kc` floats; `b`: one panel
    /// of `kc * 16` floats; `c`: `R` rows `ldc` apart of 16 floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize>(
        a: *const f32,
        lda: usize,
        b: *const f32,
        kc: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (r, accr) in acc.iter_mut().enumerate() {
            accr[0] = _mm256_loadu_ps(c.add(r * ldc));
            accr[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
        }
        for kk in 0..kc {
            let b0 = _mm256_loadu_ps(b.add(kk * PANEL));
            let b1 = _mm256_loadu_ps(b.add(kk * PANEL + 8));
            for (r, accr) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r * lda + kk));
                accr[0] = _mm256_fmadd_ps(av, b0, accr[0]);
                accr[1] = _mm256_fmadd_ps(av, b1, accr[1]);
            }
        }
        for (r, accr) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ldc), accr[0]);
            _mm256_storeu_ps(c.add(r * ldc + 8), accr[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_equals_a_plain_product_including_tails() {
        let mut s = 7u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        };
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
}
