//! Fused CPU inference kernels for the transformer blocks.
//!
//! candle's CPU backend runs element-wise ops one at a time on one thread and
//! allocates a tensor for each, and attention needs permute copies around its
//! batched matmuls. On a 2-core machine that overhead cost as much as the
//! GEMMs themselves (stock candle CLIP ran at 0.6x PyTorch). Here, a block runs
//! on plain f32 buffers:
//! - bias and residual are folded into the GEMM (`dst = dst + x W^T`, with dst
//!   pre-filled with residual + bias);
//! - activations, layer norms and softmax run in place, rows in parallel;
//! - attention reads q, k, v straight out of the fused qkv buffer through
//!   strides and writes each head's output in place, heads in parallel.
//!
//! Used only for f32 CPU tensors outside grad mode; the candle-op path in
//! `layers.rs` stays the reference for autograd and CUDA, and unit tests keep
//! the two equal.

use candle_core::{Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::Activation;
use crate::Result;

#[path = "cpu_kernels/attention.rs"]
mod attention;
pub use attention::*;

/// Whether the fused path applies to this input.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && !super::grad_mode()
}

/// Borrowed f32 data of a contiguous CPU tensor (weights), without a copy.
pub struct F32View<'a> {
    guard: Box<dyn std::ops::Deref<Target = Storage> + 'a>,
    start: usize,
    len: usize,
}

impl<'a> F32View<'a> {
    pub fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        if !layout.is_contiguous() || !matches!(&*guard, Storage::Cpu(_)) {
            return Err(crate::Error::Shape(
                "fused kernels need contiguous CPU weights".into(),
            ));
        }
        Ok(Self {
            start: layout.start_offset(),
            len: layout.shape().elem_count(),
            guard: Box::new(guard),
        })
    }

    pub fn as_slice(&self) -> &[f32] {
        match &**self.guard {
            Storage::Cpu(cpu) => {
                &cpu.as_slice::<f32>().expect("f32 weights")[self.start..self.start + self.len]
            }
            _ => unreachable!("checked in new"),
        }
    }
}

/// A linear layer's weights as borrowed slices: `w` is [out, in] row-major.
pub struct LinearRef<'a> {
    pub w: &'a [f32],
    pub b: Option<&'a [f32]>,
    /// Int8 weights: when present the product runs on them, not on `w`.
    pub q: Option<&'a super::int8::QuantMatrix>,
    /// Prepacked f32 weights: when present (and no `q`), the product runs
    /// on the packed kernels.
    pub p: Option<&'a super::packed::PackedF32>,
    pub out: usize,
    pub inp: usize,
}

#[cfg(not(feature = "openblas"))]
fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `dst[n, out] (+)= x[n, in] W^T + b`. With `accumulate`, dst keeps its
/// contents (the residual) and the bias and product are added to it.
///
/// Panics when a slice's length does not match the shapes: the GEMM below
/// reads and writes through raw pointers sized from them.
pub fn linear_into(x: &[f32], n: usize, l: &LinearRef, dst: &mut [f32], accumulate: bool) {
    // Checked products: wrapped ones could match short slices.
    assert_eq!(
        Some(x.len()),
        n.checked_mul(l.inp),
        "linear_into: x is not [{n}, {}]",
        l.inp
    );
    assert_eq!(
        Some(dst.len()),
        n.checked_mul(l.out),
        "linear_into: dst is not [{n}, {}]",
        l.out
    );
    assert_eq!(
        Some(l.w.len()),
        l.out.checked_mul(l.inp),
        "linear_into: w is not [{}, {}]",
        l.out,
        l.inp
    );
    if let Some(b) = l.b {
        assert_eq!(b.len(), l.out, "linear_into: bias is not [{}]", l.out);
    }
    let out = l.out;
    if let Some(q) = l.q {
        assert_eq!(
            (q.rows(), q.cols()),
            (l.out, l.inp),
            "linear_into: int8 shape"
        );
        // The int8 product adds the bias in its own epilogue.
        let kernel = super::int8::Int8Kernel::selected();
        super::int8::matmul_into(x, n, q, l.b, dst, accumulate, kernel);
        return;
    }
    let read_dst = accumulate || l.b.is_some();
    if let Some(b) = l.b {
        dst.par_chunks_mut(out).for_each(|row| {
            if accumulate {
                row.iter_mut().zip(b).for_each(|(d, &bv)| *d += bv);
            } else {
                row.copy_from_slice(b);
            }
        });
    }
    // The packed f32/bf16 kernels accumulate into dst.
    if let Some(p) = l.p {
        if !read_dst {
            dst.fill(0.0);
        }
        assert_eq!(
            (p.rows(), p.cols()),
            (l.out, l.inp),
            "linear_into: packed shape"
        );
        p.matmul_acc(x, n, dst);
        return;
    }
    sgemm_xwt(x, n, l.w, out, l.inp, dst, read_dst);
}

/// `dst[n, out] = (read_dst ? dst : 0) + x[n, k] w[out, k]^T`, row-major.
#[cfg(not(feature = "openblas"))]
fn sgemm_xwt(
    x: &[f32],
    n: usize,
    w: &[f32],
    out: usize,
    k: usize,
    dst: &mut [f32],
    read_dst: bool,
) {
    assert!(x.len() >= n * k && w.len() >= out * k && dst.len() >= n * out);
    // SAFETY: the assert above: the pointers cover n*k, out*k and n*out
    // elements with the strides given (row-major x and dst; W read
    // transposed through strides).
    unsafe {
        gemm::gemm(
            n,
            out,
            k,
            dst.as_mut_ptr(),
            1,
            out as isize,
            read_dst,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            threads(),
        )
    }
}

/// A row-major view of a matrix operand for [`sgemm`]: the data and its
/// strides in elements, so transposes are read in place.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major [rows, cols] matrix.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major [rows, cols] matrix.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }
}

/// Whether every element a [rows, cols] view with `r`'s strides reads lies
/// inside `r.data`, in checked arithmetic (huge strides must not wrap past
/// the bound), with strides that `gemm`'s `isize` offsets can hold.
fn reaches_within(r: &MatRef, rows: usize, cols: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    let strides_fit = r.row_stride <= isize::MAX as usize && r.col_stride <= isize::MAX as usize;
    let last = (rows - 1)
        .checked_mul(r.row_stride)
        .and_then(|x| x.checked_add((cols - 1).checked_mul(r.col_stride)?));
    strides_fit && last.is_some_and(|l| l < r.data.len())
}

/// `a[m, k] b[k, n]` as a new row-major [m, n] buffer, on the `gemm` crate
/// over rayon's threads (the training backward's products).
pub fn sgemm(m: usize, n: usize, k: usize, a: MatRef, b: MatRef) -> Vec<f32> {
    assert!(
        reaches_within(&a, m, k),
        "sgemm: lhs [{m}, {k}] with strides ({}, {}) reaches past its {} elements",
        a.row_stride,
        a.col_stride,
        a.data.len()
    );
    assert!(
        reaches_within(&b, k, n),
        "sgemm: rhs [{k}, {n}] with strides ({}, {}) reaches past its {} elements",
        b.row_stride,
        b.col_stride,
        b.data.len()
    );
    let mut dst = vec![0f32; m.checked_mul(n).expect("sgemm: m * n overflows")];
    let par = match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        t => Parallelism::Rayon(t),
    };
    // SAFETY: the asserts above bound every element the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
    dst
}

/// With the `openblas` feature the large inference GEMMs go to OpenBLAS's
/// `cblas_sgemm` (the system library, `libopenblas-dev`): on this 2-core
/// AVX2 machine its Zen kernel ran 5–30% faster than the `gemm` crate on
/// ViT-B/32's shapes (1600 x 768 x 3072 and friends). candle has no OpenBLAS
/// backend, so the binding is these few lines; the small per-head attention
/// products stay on `gemm`.
///
/// OpenBLAS runs single-threaded here and the output columns are split over
/// rayon's threads instead: its own pool spun in `sched_yield` while rayon ran
/// the element-wise kernels between GEMMs, and two pools on two cores fought.
#[cfg(feature = "openblas")]
fn sgemm_xwt(
    x: &[f32],
    n: usize,
    w: &[f32],
    out: usize,
    k: usize,
    dst: &mut [f32],
    read_dst: bool,
) {
    #[link(name = "openblas")]
    extern "C" {
        fn openblas_set_num_threads(n: i32);
        fn cblas_sgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
    }
    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;
    static SINGLE_THREADED: std::sync::Once = std::sync::Once::new();
    // SAFETY: sets a global of the library before its first GEMM.
    SINGLE_THREADED.call_once(|| unsafe { openblas_set_num_threads(1) });
    assert!(x.len() >= n * k && w.len() >= out * k && dst.len() >= n * out);
    let dim = |v: usize| i32::try_from(v).expect("GEMM dimension fits in i32");
    // Column blocks of the output, a multiple of 16 wide, one per thread.
    let parts = rayon::current_num_threads().max(1);
    let width = out.div_ceil(parts).div_ceil(16) * 16;
    let dst_ptr = SendPtr(dst.as_mut_ptr());
    (0..out.div_ceil(width)).into_par_iter().for_each(|j| {
        let (c0, cols) = (j * width, width.min(out - j * width));
        // SAFETY: the assert above bounds x, w and dst; block j reads rows
        // c0..c0+cols of w and writes only columns c0..c0+cols of dst (row
        // stride `out`), so the blocks are disjoint.
        unsafe {
            cblas_sgemm(
                ROW_MAJOR,
                NO_TRANS,
                TRANS,
                dim(n),
                dim(cols),
                dim(k),
                1.0,
                x.as_ptr(),
                dim(k),
                w.as_ptr().add(c0 * k),
                dim(k),
                if read_dst { 1.0 } else { 0.0 },
                dst_ptr.get().add(c0),
                dim(out),
            )
        }
    });
}

/// In-place layer norm over rows of `dim`, rows in parallel.
pub fn layer_norm_inplace(x: &mut [f32], dim: usize, w: &[f32], b: &[f32], eps: f64) {
    x.par_chunks_mut(dim)
        .for_each(|row| layer_norm_row(row, w, b, eps));
}

/// Layer norm from `src` into `dst`.
pub fn layer_norm_into(src: &[f32], dst: &mut [f32], dim: usize, w: &[f32], b: &[f32], eps: f64) {
    dst.copy_from_slice(src);
    layer_norm_inplace(dst, dim, w, b, eps);
}

fn layer_norm_row(row: &mut [f32], w: &[f32], b: &[f32], eps: f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    let (mean, inv) = (mean as f32, inv as f32);
    for ((v, &g), &bb) in row.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * inv * g + bb;
    }
}

/// exp(x) for f32 without a library call, so that loops over it vectorise:
/// Cephes' expf (range reduction by ln 2, degree-6 polynomial), within 2
/// ulp of `f32::exp` over [-87, 88]; below that it flushes to 0.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// QuickGELU's sigmoid gate, 1 / (1 + exp(-1.702 x)).
#[inline(always)]
pub fn quick_gelu_gate(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-1.702 * x))
}

/// Runs `body` compiled for AVX2 and FMA where the CPU has them (the default
/// build targets baseline x86-64, where the vectorised exp gains little).
#[inline(always)]
pub fn with_simd<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(body: impl FnOnce() -> R) -> R {
            body()
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the features were detected at run time.
            return unsafe { avx2(body) };
        }
    }
    body()
}

pub fn activate_inplace(x: &mut [f32], act: Activation) {
    const CHUNK: usize = 4096;
    x.par_chunks_mut(CHUNK).for_each(|c| match act {
        Activation::QuickGelu => with_simd(|| c.iter_mut().for_each(|v| *v *= quick_gelu_gate(*v))),
        Activation::Gelu => c.iter_mut().for_each(|v| {
            *v = 0.5 * *v * (1.0 + libm::erf(*v as f64 / std::f64::consts::SQRT_2) as f32)
        }),
        Activation::GeluTanh => c.iter_mut().for_each(|v| {
            let x = *v;
            let inner = (2.0f32 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            *v = 0.5 * x * (1.0 + inner.tanh())
        }),
        Activation::Relu => c.iter_mut().for_each(|v| *v = v.max(0.0)),
    });
}

/// A raw output pointer shared by parallel tasks that each write their own
/// disjoint region (one sequence's one head).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: each task writes a disjoint region (one sequence's one head).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// For products with few rows, where splitting the rows leaves threads idle:
/// splits dst [m, n]'s `panel`-wide channel groups over rayon's threads.
/// Each task accumulates into its own copy of its columns (`work(panels,
/// first column, width, copy)`, the copy's rows `width` apart), which is then
/// written back.
pub(crate) fn par_column_blocks(
    dst: &mut [f32],
    n: usize,
    panel: usize,
    work: impl Fn(std::ops::Range<usize>, usize, usize, &mut [f32]) + Sync,
) {
    let panels = n.div_ceil(panel);
    let threads = rayon::current_num_threads().max(1);
    let per = panels.div_ceil(threads * 2).max(1);
    let src: &[f32] = dst;
    let parts: Vec<(usize, usize, Vec<f32>)> = (0..panels.div_ceil(per))
        .into_par_iter()
        .map(|t| {
            let ps = t * per..((t + 1) * per).min(panels);
            let c0 = ps.start * panel;
            let cw = (ps.end * panel).min(n) - c0;
            let mut local: Vec<f32> = src
                .chunks(n)
                .flat_map(|r| r[c0..c0 + cw].iter().copied())
                .collect();
            work(ps, c0, cw, &mut local);
            (c0, cw, local)
        })
        .collect();
    for (c0, cw, local) in parts {
        for (drow, lrow) in dst.chunks_mut(n).zip(local.chunks(cw)) {
            drow[c0..c0 + cw].copy_from_slice(lrow);
        }
    }
}

/// Gathers embedding rows: `out[r] = table[ids[r]] + pos[positions[r]]`.
pub fn embed_rows(
    table: &[f32],
    pos: &[f32],
    ids: &[u32],
    positions: &[usize],
    c: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; ids.len() * c];
    out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
        let t = &table[ids[r] as usize * c..][..c];
        let p = &pos[positions[r] * c..][..c];
        o.iter_mut()
            .zip(t.iter().zip(p))
            .for_each(|(o, (a, b))| *o = a + b);
    });
    out
}

#[cfg(test)]
#[path = "cpu_kernels_tests.rs"]
mod tests;
