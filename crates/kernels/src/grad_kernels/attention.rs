//! The fused attention op for training: softmax(q kᵀ / √d + mask) v over
//! packed qkv, with its backward.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_view, slice, vec_tensor, CResult};
use crate::cpu_kernels::{self, uniform_segments, Mask, SendPtr};

/// What attention is masked with.
#[derive(Clone)]
pub enum SoftmaxMask {
    None,
    /// Keys after the query are excluded.
    Causal,
    /// An additive mask over keys, one value per row of [B, T] (0 or a very
    /// negative value).
    Keys(Arc<Vec<f32>>),
}

impl SoftmaxMask {
    fn kernel_mask(&self) -> Mask<'_> {
        match self {
            SoftmaxMask::None => Mask::None,
            SoftmaxMask::Causal => Mask::Causal,
            SoftmaxMask::Keys(k) => Mask::Keys(k),
        }
    }
}

/// Multi-head self-attention from a fused qkv [B, T, 3C] to the context
/// [B, T, C], heads in parallel. The forward is the inference kernel; the
/// backward recomputes each head's probabilities rather than storing them.
struct AttentionOp {
    heads: usize,
    mask: SoftmaxMask,
}

/// `dst (t x n, strides rs/cs) = beta * lhs (t x k) * rhs (k x n)`, one thread.
///
/// # Safety
/// Each pointer with its (row stride, column stride) must address valid,
/// initialised f32s for every element of its matrix: m x n for `dst`, m x k
/// for `lhs`, k x n for `rhs`; `dst` must not overlap the operands and no
/// other thread may touch its elements during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm1(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        dst.2,
        dst.1,
        false,
        lhs.0,
        lhs.2,
        lhs.1,
        rhs.0,
        rhs.2,
        rhs.1,
        0.0,
        beta,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "clasp-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let qkv = slice(s, l)?;
        let (b, t, c3) = l.shape().dims3()?;
        let c = c3 / 3;
        let mut ctx = vec![0f32; b * t * c];
        cpu_kernels::attention(
            qkv,
            &mut ctx,
            &uniform_segments(b, t),
            self.heads,
            c,
            self.mask.kernel_mask(),
        );
        Ok((CpuStorage::F32(ctx), Shape::from((b, t, c))))
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let (qt, gt) = (qkv.contiguous()?, grad.contiguous()?);
        let (qv, gv) = (f32_view(&qt)?, f32_view(&gt)?);
        let (qkv_s, g_s) = (qv.as_slice(), gv.as_slice());
        let (b, t, c3) = qkv.dims3()?;
        let (c, heads) = (c3 / 3, self.heads);
        let d = c / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mask = self.mask.kernel_mask();
        let mut dqkv = vec![0f32; qt.elem_count()];
        let out = SendPtr(dqkv.as_mut_ptr());
        let (row, grow) = (c3 as isize, c as isize);
        (0..b * heads).into_par_iter().for_each_init(
            || (vec![0f32; t * t], vec![0f32; t * t]),
            |(p, dp), job| {
                let (seq, h) = (job / heads, job % heads);
                let start = seq * t;
                let base = start * c3 + h * d;
                let (q, k, v) = (
                    qkv_s[base..].as_ptr(),
                    qkv_s[base + c..].as_ptr(),
                    qkv_s[base + 2 * c..].as_ptr(),
                );
                let go = g_s[start * c + h * d..].as_ptr();
                // SAFETY: every operand is t rows of d values at the strides
                // given, inside its buffer; p and dp are t x t; this task
                // alone writes the d columns of head h of sequence seq.
                unsafe {
                    let (dq, dk, dv) = (
                        out.get().add(base),
                        out.get().add(base + c),
                        out.get().add(base + 2 * c),
                    );
                    // P = softmax(scale Q K^T + mask), as the forward.
                    gemm1(
                        (t, t, d),
                        (p.as_mut_ptr(), t as isize, 1),
                        (q, row, 1),
                        (k, 1, row),
                        scale,
                    );
                    cpu_kernels::softmax_rows(p, t, start, mask);
                    // dV = P^T dO; dP = dO V^T.
                    gemm1(
                        (t, d, t),
                        (dv, row, 1),
                        (p.as_ptr(), 1, t as isize),
                        (go, grow, 1),
                        1.0,
                    );
                    gemm1(
                        (t, t, d),
                        (dp.as_mut_ptr(), t as isize, 1),
                        (go, grow, 1),
                        (v, 1, row),
                        1.0,
                    );
                    // dS = P * (dP - rowsum(dP * P)).
                    for (pr, dr) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
                        let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                        for (dv_, pv) in dr.iter_mut().zip(pr) {
                            *dv_ = pv * (*dv_ - dot);
                        }
                    }
                    // dQ = scale dS K; dK = scale dS^T Q.
                    gemm1(
                        (t, d, t),
                        (dq, row, 1),
                        (dp.as_ptr(), t as isize, 1),
                        (k, row, 1),
                        scale,
                    );
                    gemm1(
                        (t, d, t),
                        (dk, row, 1),
                        (dp.as_ptr(), 1, t as isize),
                        (q, row, 1),
                        scale,
                    );
                }
            },
        );
        Ok(Some(vec_tensor(dqkv, qkv.shape(), qkv)?))
    }
}

/// Multi-head self-attention of a fused qkv [B, T, 3C] (q | k | v, heads
/// contiguous within each) into the context [B, T, C], differentiable.
pub fn attention(qkv: &Tensor, heads: usize, mask: SoftmaxMask) -> CResult<Tensor> {
    qkv.contiguous()?.apply_op1(AttentionOp { heads, mask })
}
