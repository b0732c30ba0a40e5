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
//! `--precision bf16` packs the same way in bf16 pairs: each 32-bit element
//! holds inputs 2i (low half) and 2i+1 (high half) of one channel, and the
//! AVX-512 BF16 kernel (`vdpbf16ps`) multiplies pairs of activations, rounded
//! to bf16 as they come, by them, accumulating in f32. It needs
//! `avx512_bf16`.
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
}

/// A weight matrix [n, k] packed for the kernels, in f32 or bf16 pairs.
#[derive(Debug, Clone)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    data: Data,
}

#[derive(Debug, Clone)]
enum Data {
    /// `[panel][k][16]`.
    F32(Vec<f32>),
    /// `[panel][ceil(k / 2)][16]`, each u32 two bf16 (inputs 2i, 2i+1).
    Bf16(Vec<u32>),
}

/// Whether this CPU runs the bf16 kernel (`avx512_bf16`).
pub fn bf16_supported() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Two f32 as one u32 of bf16 (round to nearest even), `lo` in the low half.
fn bf16_pair(lo: f32, hi: f32) -> u32 {
    half::bf16::from_f32(lo).to_bits() as u32 | (half::bf16::from_f32(hi).to_bits() as u32) << 16
}

/// Packs `w` [n, k] into 16-channel panels whose k-major rows hold `ku`
/// elements made by `elem(row, unit)`.
fn pack_with<E: Copy + Default + Send>(
    n: usize,
    ku: usize,
    elem: impl Fn(usize, usize) -> E + Sync,
) -> Vec<E> {
    let panels = n.div_ceil(PANEL);
    let mut packed = vec![E::default(); panels * ku * PANEL];
    packed
        .par_chunks_mut((ku * PANEL).max(1))
        .enumerate()
        .for_each(|(p, dst)| {
            for c in 0..PANEL.min(n - p * PANEL) {
                for u in 0..ku {
                    dst[u * PANEL + c] = elem(p * PANEL + c, u);
                }
            }
        });
    packed
}

impl PackedF32 {
    /// Packs `w` [n, k] (row-major) in f32.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "pack: weight is not [{n}, {k}]");
        let data = Data::F32(pack_with(n, k, |r, u| w[r * k + u]));
        Self { n, k, data }
    }

    /// Packs `w` [n, k] (row-major) in bf16 pairs.
    pub fn pack_bf16(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "pack: weight is not [{n}, {k}]");
        let at = |r: usize, i: usize| if i < k { w[r * k + i] } else { 0.0 };
        let data = Data::Bf16(pack_with(n, k.div_ceil(2), |r, u| {
            bf16_pair(at(r, 2 * u), at(r, 2 * u + 1))
        }));
        Self { n, k, data }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    pub fn is_bf16(&self) -> bool {
        matches!(self.data, Data::Bf16(_))
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }

    /// `dst[m, n] += x[m, k] · W^T` on the kernel for this format: f32 on
    /// the selected f32 kernel, bf16 on the AVX-512 BF16 one.
    ///
    /// Panics when the shapes do not match, or when the CPU lacks the kernel.
    pub fn matmul_acc(&self, x: &[f32], m: usize, dst: &mut [f32]) {
        match &self.data {
            Data::F32(_) => {
                // Linear::pack packs f32 only where a kernel is selected.
                let kernel = F32Kernel::selected().expect("packed f32 needs an f32 kernel");
                matmul_acc(x, m, self, dst, kernel)
            }
            Data::Bf16(w) => {
                assert!(bf16_supported(), "this CPU does not run bf16 (avx512_bf16)");
                assert_eq!(
                    x.len(),
                    m * self.k,
                    "packed matmul: x is not [{m}, {}]",
                    self.k
                );
                assert_eq!(
                    dst.len(),
                    m * self.n,
                    "packed matmul: dst is not [{m}, {}]",
                    self.n
                );
                let (k, ku) = (self.k, self.k.div_ceil(2));
                let mut xb = vec![0u32; m * ku];
                xb.par_chunks_mut(ku.max(1))
                    .zip(x.par_chunks(k.max(1)))
                    .for_each(|(d, r)| {
                        for (u, v) in d.iter_mut().enumerate() {
                            let hi = if 2 * u + 1 < k { r[2 * u + 1] } else { 0.0 };
                            *v = bf16_pair(r[2 * u], hi);
                        }
                    });
                run(Kern::Bf16, &xb, m, ku, w, self.n, self.panels(), dst)
            }
        }
    }
}

/// `dst[m, n] += x[m, k] · W^T` on the f32 `kernel`, over rayon's threads.
///
/// Panics when a slice's length does not match the shapes, when `w` is not
/// f32, or when the CPU does not run `kernel`.
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
    let Data::F32(packed) = &w.data else {
        panic!("packed matmul: the weights are bf16, not f32");
    };
    let kern = match kernel {
        F32Kernel::Avx2 => Kern::Avx2,
        F32Kernel::Avx512 => Kern::Avx512,
    };
    run(kern, x, m, w.k, packed, w.n, w.panels(), dst)
}

/// The microkernels, by what they read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kern {
    Avx2,
    Avx512,
    Bf16,
}

impl Kern {
    fn tile(self) -> (usize, usize) {
        match self {
            Kern::Avx2 => (6, 1),
            Kern::Avx512 | Kern::Bf16 => (12, 2),
        }
    }

    fn runs(self) -> bool {
        match self {
            Kern::Avx2 => F32Kernel::Avx2.runs(),
            Kern::Avx512 => F32Kernel::Avx512.runs(),
            Kern::Bf16 => bf16_supported(),
        }
    }
}

/// An element the kernels read: f32, or a u32 of two bf16.
trait Elem: Copy + Send + Sync {
    /// One tile (see [`run_tile`]); panics if `kern` does not read `Self`.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        kern: Kern,
        a: &[Self],
        lda: usize,
        b: &[Self],
        stride: usize,
        kc: usize,
        rn: usize,
        pn: usize,
        c: &mut [f32],
        ldc: usize,
    );
}

/// Fewer rows than this split the channels among threads, not the rows.
const ROW_SPLIT_MIN: usize = 256;

/// The parallel split shared by the formats: `x` [m, ku] against packed
/// panels of `ku` units, accumulated into `dst` [m, n].
#[allow(clippy::too_many_arguments)]
fn run<E: Elem>(
    kern: Kern,
    x: &[E],
    m: usize,
    ku: usize,
    packed: &[E],
    n: usize,
    panels: usize,
    dst: &mut [f32],
) {
    assert_eq!(x.len(), m * ku);
    assert_eq!(dst.len(), m * n);
    assert_eq!(packed.len(), panels * ku * PANEL);
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let (mr, _) = kern.tile();
    // Row blocks only when there are rows enough: each block reads every
    // weight, so few rows (one image: 50) split the channels instead and
    // read the weights once, which is what bounds them.
    if m >= ROW_SPLIT_MIN.max(2 * mr * threads) {
        let per = m.div_ceil(threads * 2).div_ceil(mr) * mr;
        dst.par_chunks_mut(per * n)
            .enumerate()
            .for_each(|(t, block)| {
                let r0 = t * per;
                let rows = block.len() / n;
                let xs = &x[r0 * ku..(r0 + rows) * ku];
                drive(kern, xs, rows, ku, packed, n, 0..panels, block, n, 0);
            });
    } else {
        super::cpu_kernels::par_column_blocks(dst, n, PANEL, |ps, c0, cw, local| {
            drive(kern, x, m, ku, packed, n, ps, local, cw, c0)
        });
    }
}

/// Accumulates `x[rows, k] · W[panels]^T` into `out`, whose rows are `ldo`
/// wide and whose column 0 is channel `c_base` (`k` in the element's units).
#[allow(clippy::too_many_arguments)]
fn drive<E: Elem>(
    kern: Kern,
    x: &[E],
    rows: usize,
    k: usize,
    packed: &[E],
    n: usize,
    panels: std::ops::Range<usize>,
    out: &mut [f32],
    ldo: usize,
    c_base: usize,
) {
    assert_eq!(x.len(), rows * k);
    assert_eq!(out.len(), rows * ldo);
    assert!(panels.end <= n.div_ceil(PANEL) && packed.len() >= panels.end * k * PANEL);
    assert!(panels.start * PANEL >= c_base && (panels.end * PANEL).min(n) - c_base <= ldo);
    let (mr, np) = kern.tile();
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
                let cn = (pn * PANEL).min(n - p * PANEL);
                let full = cn == pn * PANEL;
                let b = &packed[p * stride + kb * PANEL..(p + pn - 1) * stride + (kb + kc) * PANEL];
                let mut r = rb;
                while r < rb_end {
                    let rn = mr.min(rb_end - r);
                    let a = &x[r * k + kb..(r + rn - 1) * k + kb + kc];
                    if full {
                        let o = &mut out[r * ldo + c0..(r + rn - 1) * ldo + c0 + cn];
                        E::tile(kern, a, k, b, stride, kc, rn, pn, o, ldo);
                    } else {
                        // The last, partial panel: through a full-width buffer
                        // so the kernel never writes past the real channels.
                        let width = pn * PANEL;
                        for i in 0..rn {
                            let src = &out[(r + i) * ldo + c0..(r + i) * ldo + c0 + cn];
                            tmp[i * width..i * width + cn].copy_from_slice(src);
                        }
                        let t = &mut tmp[..(rn - 1) * width + width];
                        E::tile(kern, a, k, b, stride, kc, rn, pn, t, width);
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

/// The bounds every kernel relies on, checked once per tile.
#[allow(clippy::too_many_arguments)]
fn check_tile<E>(
    kern: Kern,
    a: &[E],
    lda: usize,
    b: &[E],
    stride: usize,
    kc: usize,
    rn: usize,
    pn: usize,
    c: &[f32],
    ldc: usize,
) {
    let (mr, np) = kern.tile();
    assert!((1..=mr).contains(&rn) && (1..=np).contains(&pn) && kc >= 1);
    assert!(a.len() > (rn - 1) * lda + kc - 1);
    assert!(b.len() >= (pn - 1) * stride + kc * PANEL);
    assert!(c.len() >= (rn - 1) * ldc + pn * PANEL);
    assert!(kern.runs(), "this CPU does not run the kernel");
}

impl Elem for f32 {
    fn tile(
        kern: Kern,
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
        check_tile(kern, a, lda, b, stride, kc, rn, pn, c, ldc);
        run_tile(kern, a, lda, b, stride, kc, rn, pn, c, ldc)
    }
}

impl Elem for u32 {
    fn tile(
        kern: Kern,
        a: &[u32],
        lda: usize,
        b: &[u32],
        stride: usize,
        kc: usize,
        rn: usize,
        pn: usize,
        c: &mut [f32],
        ldc: usize,
    ) {
        assert!(kern == Kern::Bf16, "bf16 pairs run on the bf16 kernel only");
        check_tile(kern, a, lda, b, stride, kc, rn, pn, c, ldc);
        #[cfg(target_arch = "x86_64")]
        {
            let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
            macro_rules! go {
                ($($r:literal),*) => {
                    match (rn, pn) {
                        $(
                            ($r, 1) => xbf16::tile::<$r, 1>(ap, lda, bp, stride, kc, cp, ldc),
                            ($r, _) => xbf16::tile::<$r, 2>(ap, lda, bp, stride, kc, cp, ldc),
                        )*
                        _ => unreachable!("rn is 1..=12 (checked)"),
                    }
                };
            }
            // SAFETY: check_tile verified the CPU runs AVX-512 BF16 and that
            // every read of a and b and every access to c is in bounds.
            unsafe { go!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no bf16 kernel off x86_64");
    }
}

/// One f32 tile: `rn` rows of `a` (row stride `lda`, `kc` values each)
/// against `pn` panels of `b` (`stride` apart, k-major, from the block's
/// first k), accumulated into `c` (`rn` rows of `pn * 16` values, row stride
/// `ldc`). The caller has run [`check_tile`].
#[allow(clippy::too_many_arguments)]
fn run_tile(
    kern: Kern,
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
    #[cfg(target_arch = "x86_64")]
    {
        let (ap, bp, cp) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let _ = pn;
        match kern {
            Kern::Avx512 => {
                macro_rules! go {
                    ($($r:literal),*) => {
                        match (rn, pn) {
                            $(
                                ($r, 1) => x512::tile::<$r, 1>(ap, lda, bp, stride, kc, cp, ldc),
                                ($r, _) => x512::tile::<$r, 2>(ap, lda, bp, stride, kc, cp, ldc),
                            )*
                            _ => unreachable!("rn is 1..=12 (checked)"),
                        }
                    };
                }
                // SAFETY: check_tile verified that the CPU runs AVX-512F and
                // bounded every read of a and b and every access to c.
                unsafe { go!(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12) }
            }
            Kern::Avx2 => {
                macro_rules! go {
                    ($($r:literal),*) => {
                        match rn {
                            $($r => x256::tile::<$r>(ap, lda, bp, kc, cp, ldc),)*
                            _ => unreachable!("rn is 1..=6 (checked)"),
                        }
                    };
                }
                // SAFETY: as above, for AVX2 + FMA and one panel.
                unsafe { go!(1, 2, 3, 4, 5, 6) }
            }
            Kern::Bf16 => unreachable!("f32 elements never reach the bf16 kernel"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kern, a, lda, b, stride, kc, rn, pn, c, ldc);
        unreachable!("no f32 kernel is available off x86_64");
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "packed/x512.rs"]
mod x512;

#[cfg(target_arch = "x86_64")]
#[path = "packed/xbf16.rs"]
mod xbf16;

#[cfg(target_arch = "x86_64")]
#[path = "packed/x256.rs"]
mod x256;

#[cfg(test)]
#[path = "packed_tests.rs"]
mod tests;
