//! The llama block's element-wise ops for training through a frozen
//! language model, fused with their backward: RMS norm, SwiGLU and the
//! rotary embedding (both layouts).
//!
//! Written here for the reason `grad_kernels` exists: candle's fused
//! `rms_norm` and `rope` have no backward, and the compositions that do
//! (`rms_norm_slow`, `rope_i_slow`, `silu` then `mul`) make a tensor and a
//! pass over memory per step, twice as many backward. In a stage-1 VLM step
//! through SmolLM2's 30 layers those passes cost about as much as the
//! projections' GEMMs. The tests check each op's values and gradients
//! against that composition.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_view, rows_per_task, slice, vec_tensor, CResult};

// ------------------------------------------------------------------ RMS norm

struct RmsNormOp {
    eps: f32,
}

/// 1 / sqrt(mean(x²) + eps) of one row.
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "clasp-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let c = w.len();
        if c == 0 || l1.shape().dims().last() != Some(&c) {
            candle_core::bail!("rms_norm: input {:?} against a weight of {c}", l1.shape());
        }
        let mut y = vec![0f32; x.len()];
        let rows = rows_per_task(c) * c;
        y.par_chunks_mut(rows)
            .zip(x.par_chunks(rows))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_exact_mut(c).zip(xc.chunks_exact(c)) {
                    let r = rms_scale(xr, self.eps);
                    for i in 0..c {
                        yr[i] = xr[i] * r * w[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// With r = 1/rms(x) and n the row width:
    /// dx = r (g w) − x r³ / n · Σ (g w x), dw = Σ_rows g x r.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (xt, gt, wt) = (x.contiguous()?, grad.contiguous()?, w.contiguous()?);
        let (xv, gv, wv) = (f32_view(&xt)?, f32_view(&gt)?, f32_view(&wt)?);
        let (xs, gs, ws) = (xv.as_slice(), gv.as_slice(), wv.as_slice());
        let c = ws.len();
        let rows = rows_per_task(c) * c;
        let mut dx = vec![0f32; xs.len()];
        let partial: Vec<Vec<f32>> = dx
            .par_chunks_mut(rows)
            .zip(xs.par_chunks(rows).zip(gs.par_chunks(rows)))
            .map(|(dxc, (xc, gc))| {
                let mut dw = vec![0f32; c];
                for ((dxr, xr), gr) in dxc
                    .chunks_exact_mut(c)
                    .zip(xc.chunks_exact(c))
                    .zip(gc.chunks_exact(c))
                {
                    let r = rms_scale(xr, self.eps);
                    let mut dot = 0f32;
                    for i in 0..c {
                        dot += gr[i] * ws[i] * xr[i];
                        dw[i] += gr[i] * xr[i] * r;
                    }
                    let k = dot * r * r * r / c as f32;
                    for i in 0..c {
                        dxr[i] = r * gr[i] * ws[i] - xr[i] * k;
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f32; c];
        for p in partial {
            dw.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
        }
        Ok((
            Some(vec_tensor(dx, x.shape(), x)?),
            Some(vec_tensor(dw, w.shape(), w)?),
        ))
    }
}

/// `x / sqrt(mean(x²) + eps) * w` over the last dimension, differentiable in
/// x and w (f32, CPU).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> CResult<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNormOp { eps })
}

// -------------------------------------------------------------------- SwiGLU

struct SwiGluOp;

/// silu(g) and its derivative at g.
#[inline(always)]
fn silu_and_grad(g: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + (-g).exp());
    (g * s, s * (1.0 + g * (1.0 - s)))
}

impl CustomOp2 for SwiGluOp {
    fn name(&self) -> &'static str {
        "clasp-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?}", l1.shape(), l2.shape());
        }
        let (g, u) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(16384)
            .zip(g.par_chunks(16384).zip(u.par_chunks(16384)))
            .for_each(|(yc, (gc, uc))| {
                for ((y, &g), &u) in yc.iter_mut().zip(gc).zip(uc) {
                    *y = silu_and_grad(g).0 * u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let (gt, ut, ot) = (g.contiguous()?, u.contiguous()?, grad.contiguous()?);
        let (gv, uv, ov) = (f32_view(&gt)?, f32_view(&ut)?, f32_view(&ot)?);
        let (gs, us, os) = (gv.as_slice(), uv.as_slice(), ov.as_slice());
        let (mut dg, mut du) = (vec![0f32; gs.len()], vec![0f32; gs.len()]);
        dg.par_chunks_mut(16384)
            .zip(du.par_chunks_mut(16384))
            .zip(gs.par_chunks(16384).zip(us.par_chunks(16384)))
            .zip(os.par_chunks(16384))
            .for_each(|(((dgc, duc), (gc, uc)), oc)| {
                for i in 0..gc.len() {
                    let (a, da) = silu_and_grad(gc[i]);
                    dgc[i] = oc[i] * uc[i] * da;
                    duc[i] = oc[i] * a;
                }
            });
        Ok((
            Some(vec_tensor(dg, g.shape(), g)?),
            Some(vec_tensor(du, u.shape(), u)?),
        ))
    }
}

/// `silu(gate) * up`, differentiable in both (f32, CPU, same shapes).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> CResult<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGluOp)
}

// -------------------------------------------------------------------- rotary

/// Which elements of a head rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairs {
    /// (2i, 2i + 1): GGUF's order, candle's `rope_i`.
    Interleaved,
    /// (i, i + d/2): transformers' rotate-half, candle's `rope`.
    Half,
}

struct RopeOp {
    pairs: RopePairs,
    /// cos and sin tables, [positions, d/2] each, row p for position p.
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    heads: usize,
}

impl RopeOp {
    /// Rotates every head of `x` ([B, T, heads, d], position = the T index)
    /// by +angle (`sign` 1) or −angle (`sign` −1, the backward).
    fn apply(&self, x: &[f32], shape: &Shape, sign: f32) -> CResult<Vec<f32>> {
        let (_, t, heads, d) = shape.dims4()?;
        let half = d / 2;
        if heads != self.heads || d % 2 != 0 || self.cos.len() < t * half {
            candle_core::bail!(
                "rope: input {shape:?} against {} heads and tables for {} positions of {half}",
                self.heads,
                self.cos.len() / half.max(1)
            );
        }
        let row = heads * d;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(row)
            .zip(x.par_chunks(row))
            .enumerate()
            .for_each(|(r, (yr, xr))| {
                let p = r % t;
                let (cos, sin) = (
                    &self.cos[p * half..(p + 1) * half],
                    &self.sin[p * half..(p + 1) * half],
                );
                for (yh, xh) in yr.chunks_exact_mut(d).zip(xr.chunks_exact(d)) {
                    for i in 0..half {
                        let (a, b) = match self.pairs {
                            RopePairs::Interleaved => (2 * i, 2 * i + 1),
                            RopePairs::Half => (i, i + half),
                        };
                        let (c, s) = (cos[i], sign * sin[i]);
                        yh[a] = xh[a] * c - xh[b] * s;
                        yh[b] = xh[a] * s + xh[b] * c;
                    }
                }
            });
        Ok(y)
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "clasp-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let y = self.apply(slice(s, l)?, l.shape(), 1.0)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    /// A rotation's transpose is the rotation by the opposite angle.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let gt = grad.contiguous()?;
        let gv = f32_view(&gt)?;
        let dx = self.apply(gv.as_slice(), gt.shape(), -1.0)?;
        Ok(Some(vec_tensor(dx, x.shape(), x)?))
    }
}

/// Rotary embedding of `x` [B, T, heads, d] at positions 0..T, from cos and
/// sin tables [≥ T, d/2]; differentiable in x (f32, CPU).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, pairs: RopePairs) -> CResult<Tensor> {
    let (_, _, heads, _) = x.dims4()?;
    let table =
        |t: &Tensor| -> CResult<Arc<Vec<f32>>> { Ok(Arc::new(t.flatten_all()?.to_vec1::<f32>()?)) };
    x.contiguous()?.apply_op1(RopeOp {
        pairs,
        cos: table(cos)?,
        sin: table(sin)?,
        heads,
    })
}
