//! Differentiable fused CPU ops for training: layer norm, linear layers,
//! the activations and attention's scaled, masked softmax, each with its backward.
//!
//! Written here because candle cannot serve: its fused `layer_norm` and
//! `softmax_last_dim` have no backward, so training had to compose them from
//! element-wise ops. On the CPU each of those allocates a tensor and makes a
//! pass over memory, and their backward doubles that. For the tiny preset at
//! batch 32 the composed ops cost more than all the GEMMs together. Here one
//! op makes one pass forward and one backward, rows in parallel.
//!
//! Used for contiguous f32 CPU tensors in grad mode; the composed candle ops in
//! `layers.rs` stay the path for other devices and dtypes, and the unit tests
//! below check values and gradients of each op against that composition.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_kernels::{self, F32View};
use crate::Activation;

type CResult<T> = candle_core::Result<T>;

/// Whether the fused training ops apply to this tensor.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op needs a contiguous input"),
    }
}

fn vec_tensor(v: Vec<f32>, shape: &Shape, like: &Tensor) -> CResult<Tensor> {
    Tensor::from_vec(v, shape.clone(), like.device())
}

fn f32_view(t: &Tensor) -> CResult<F32View<'_>> {
    F32View::new(t).map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// Rows per parallel task: enough work per task to amortise scheduling.
fn rows_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// Column sums of a row-major [rows, cols] buffer, rows in parallel.
fn column_sums(g: &[f32], cols: usize) -> Vec<f32> {
    let chunk = rows_per_task(cols) * cols;
    g.par_chunks(chunk)
        .map(|c| {
            let mut acc = vec![0f32; cols];
            for row in c.chunks_exact(cols) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .reduce(
            || vec![0f32; cols],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        )
}

// ---------------------------------------------------------------- layer norm

struct LayerNormOp {
    eps: f32,
}

/// Mean and 1/std of one row, with the biased variance as torch uses.
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "clasp-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let c = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c)
            .zip(x.par_chunks(c))
            .for_each(|(yr, xr)| {
                let (mean, rstd) = row_stats(xr, self.eps);
                for i in 0..c {
                    yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xt, gt) = (x.contiguous()?, grad.contiguous()?);
        let (xv, gv, wv) = (f32_view(&xt)?, f32_view(&gt)?, f32_view(w)?);
        let (xs, gs, ws) = (xv.as_slice(), gv.as_slice(), wv.as_slice());
        let c = ws.len();
        let rows = rows_per_task(c);
        let mut dx = vec![0f32; xs.len()];
        // dx per row; dw and db as per-task partial sums, added up after.
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(rows * c)
            .zip(xs.par_chunks(rows * c).zip(gs.par_chunks(rows * c)))
            .map(|(dxc, (xc, gc))| {
                let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
                let mut xhat = vec![0f32; c];
                for ((dxr, xr), gr) in dxc
                    .chunks_exact_mut(c)
                    .zip(xc.chunks_exact(c))
                    .zip(gc.chunks_exact(c))
                {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    let (mut sum_gw, mut sum_gwx) = (0f32, 0f32);
                    for i in 0..c {
                        xhat[i] = (xr[i] - mean) * rstd;
                        let gw = gr[i] * ws[i];
                        sum_gw += gw;
                        sum_gwx += gw * xhat[i];
                        dw[i] += gr[i] * xhat[i];
                        db[i] += gr[i];
                    }
                    let (m1, m2) = (sum_gw / c as f32, sum_gwx / c as f32);
                    for i in 0..c {
                        dxr[i] = rstd * (gr[i] * ws[i] - m1 - xhat[i] * m2);
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0f32; c], vec![0f32; c]);
        for (pw, pb) in partial {
            for i in 0..c {
                dw[i] += pw[i];
                db[i] += pb[i];
            }
        }
        Ok((
            Some(vec_tensor(dx, x.shape(), x)?),
            Some(vec_tensor(dw, w.shape(), w)?),
            Some(vec_tensor(db, w.shape(), w)?),
        ))
    }
}

/// torch's layer_norm over the last dimension, differentiable in x, w and b.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> CResult<Tensor> {
    x.contiguous()?
        .apply_op3(w, b, LayerNormOp { eps: eps as f32 })
}

// -------------------------------------------------------------------- linear

/// `y = x W^T (+ b)` over the last dimension of x, as one op: the GEMM writes
/// onto the bias, and the backward makes the three products directly
/// (dx = g W, dW = g^T x, db = column sums of g). Composed from candle ops the
/// same layer is a reshape, a matmul against the transposed weight, a bias add
/// and a reshape back, and candle's backprop gives each of those a zeroed
/// gradient buffer and an add pass over the activations, plus a strided add
/// for the transposed weight's gradient.
struct LinearOp;

/// The shapes of a linear op: rows, in, out and the output's shape.
fn linear_dims(x: &Shape, w: &Shape) -> CResult<(usize, usize, usize, Shape)> {
    let (out, inp) = w.dims2()?;
    let dims = x.dims();
    match dims.last() {
        Some(&d) if d == inp => {}
        _ => candle_core::bail!("linear: input {x:?} does not end in {inp} (weight {w:?})"),
    }
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = out;
    Ok((x.elem_count() / inp, inp, out, Shape::from(out_dims)))
}

fn linear_fwd(
    x: (&CpuStorage, &Layout),
    w: (&CpuStorage, &Layout),
    b: Option<(&CpuStorage, &Layout)>,
    p: Option<&super::packed::PackedF32>,
) -> CResult<(CpuStorage, Shape)> {
    let (n, inp, out, shape) = linear_dims(x.1.shape(), w.1.shape())?;
    let b = match b {
        Some((s, l)) => Some(slice(s, l)?),
        None => None,
    };
    let mut y = vec![0f32; n * out];
    let l = cpu_kernels::LinearRef {
        w: slice(w.0, w.1)?,
        b,
        q: None,
        p,
        out,
        inp,
    };
    cpu_kernels::linear_into(slice(x.0, x.1)?, n, &l, &mut y, false);
    Ok((CpuStorage::F32(y), shape))
}

/// dx = g W of a linear op; with `wt`, W^T [in, out] packed, on the packed
/// kernel (a linear of g through W^T).
fn linear_dx(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    wt: Option<&super::packed::PackedF32>,
) -> CResult<Tensor> {
    let (n, inp, out, _) = linear_dims(x.shape(), w.shape())?;
    let (wc, gc) = (w.contiguous()?, grad.contiguous()?);
    let (wv, gv) = (f32_view(&wc)?, f32_view(&gc)?);
    let dx = match wt {
        Some(p) => {
            let mut dx = vec![0f32; n * inp];
            // The packed path reads only `p`; `w` is there for the shape checks.
            let l = cpu_kernels::LinearRef {
                w: wv.as_slice(),
                b: None,
                q: None,
                p: Some(p),
                out: inp,
                inp: out,
            };
            cpu_kernels::linear_into(gv.as_slice(), n, &l, &mut dx, false);
            dx
        }
        None => cpu_kernels::sgemm(
            n,
            inp,
            out,
            cpu_kernels::MatRef::rows(gv.as_slice(), out),
            cpu_kernels::MatRef::rows(wv.as_slice(), inp),
        ),
    };
    vec_tensor(dx, x.shape(), x)
}

/// dx and dW of a linear op (db is the column sums of the same gradient).
fn linear_bwd(x: &Tensor, w: &Tensor, grad: &Tensor) -> CResult<(Tensor, Tensor, Tensor)> {
    let (n, inp, out, _) = linear_dims(x.shape(), w.shape())?;
    let (xc, gc) = (x.contiguous()?, grad.contiguous()?);
    let (xv, gv) = (f32_view(&xc)?, f32_view(&gc)?);
    let g = gv.as_slice();
    use cpu_kernels::{sgemm, MatRef};
    let dx = linear_dx(x, w, grad, None)?;
    let dw = sgemm(
        out,
        inp,
        n,
        MatRef::transposed(g, out),
        MatRef::rows(xv.as_slice(), inp),
    );
    let db = column_sums(g, out);
    Ok((
        dx,
        vec_tensor(dw, w.shape(), w)?,
        Tensor::from_vec(db, out, w.device())?,
    ))
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "clasp-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        linear_fwd((s1, l1), (s2, l2), Some((s3, l3)), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = linear_bwd(x, w, grad)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// [`LinearOp`] without a bias. With a frozen weight the backward gives dx
/// only: candle's matmul backward always forms the weight's gradient too (a
/// full [out, in] GEMM and buffer per layer per step), which for a frozen
/// language model is most of the backward's work and memory traffic.
enum LinearNoBiasOp {
    Trained,
    Frozen,
    /// Frozen, on the weight's packed copies (forward and dx).
    FrozenPacked(std::sync::Arc<FrozenPacks>),
}

impl CustomOp2 for LinearNoBiasOp {
    fn name(&self) -> &'static str {
        "clasp-linear-no-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let p = match self {
            LinearNoBiasOp::FrozenPacked(packs) => Some(&packs.fwd),
            _ => None,
        };
        linear_fwd((s1, l1), (s2, l2), None, p)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        Ok(match self {
            LinearNoBiasOp::Trained => {
                let (dx, dw, _) = linear_bwd(x, w, grad)?;
                (Some(dx), Some(dw))
            }
            LinearNoBiasOp::Frozen => (Some(linear_dx(x, w, grad, None)?), None),
            LinearNoBiasOp::FrozenPacked(packs) => {
                (Some(linear_dx(x, w, grad, Some(&packs.bwd))?), None)
            }
        })
    }
}

/// `x W^T` with W [out, in] held fixed: gradients reach x, never W.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, LinearNoBiasOp::Frozen)
}

/// A frozen weight W [out, in] packed twice for the prepacked f32 kernels
/// (AVX-512; see `model::packed`): W for the forward `x W^T`, and W^T for
/// the backward `dx = g W`. A frozen language model's projections are most
/// of a bridge training step, and the `gemm` crate (built without its
/// AVX-512 kernels, see Cargo.toml) runs them at AVX2 width.
pub struct FrozenPacks {
    fwd: super::packed::PackedF32,
    bwd: super::packed::PackedF32,
}

impl std::fmt::Debug for FrozenPacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrozenPacks({}x{})", self.fwd.rows(), self.fwd.cols())
    }
}

impl FrozenPacks {
    /// Packs `w` [out, in] when this CPU has the packed f32 kernel (else
    /// None: the `gemm` crate stays the faster path).
    pub fn new(w: &Tensor) -> CResult<Option<Self>> {
        if super::packed::F32Kernel::selected().is_none() {
            return Ok(None);
        }
        let (out, inp) = w.dims2()?;
        let (wc, wtc) = (w.contiguous()?, w.t()?.contiguous()?);
        let (wv, wtv) = (f32_view(&wc)?, f32_view(&wtc)?);
        Ok(Some(Self {
            fwd: super::packed::PackedF32::pack(wv.as_slice(), out, inp),
            bwd: super::packed::PackedF32::pack(wtv.as_slice(), inp, out),
        }))
    }
}

/// [`frozen_linear`] on the weight's packed copies (`packs` from
/// [`FrozenPacks::new`] of this `w`).
pub fn frozen_linear_packed(
    x: &Tensor,
    w: &Tensor,
    packs: &std::sync::Arc<FrozenPacks>,
) -> CResult<Tensor> {
    x.contiguous()?.apply_op2(
        &w.contiguous()?,
        LinearNoBiasOp::FrozenPacked(packs.clone()),
    )
}

/// `x W^T + b` over the last dimension of x [.., in], with W [out, in].
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp),
        None => x.apply_op2(&w, LinearNoBiasOp::Trained),
    }
}

// --------------------------------------------------------------- activations

struct ActivationOp(Activation);

/// The activation and its derivative at x.
#[inline(always)]
fn act_and_grad(act: Activation, x: f32) -> (f32, f32) {
    match act {
        Activation::QuickGelu => {
            let s = cpu_kernels::quick_gelu_gate(x);
            (x * s, s + 1.702 * x * s * (1.0 - s))
        }
        Activation::Relu => {
            if x > 0.0 {
                (x, 1.0)
            } else {
                (0.0, 0.0)
            }
        }
        Activation::Gelu => {
            // x Φ(x); Φ' = φ.
            let cdf = 0.5 * (1.0 + erf(x / std::f32::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt();
            (x * cdf, cdf + x * pdf)
        }
        Activation::GeluTanh => {
            let k = (2.0 / std::f32::consts::PI).sqrt();
            let u = k * (x + 0.044715 * x * x * x);
            let t = u.tanh();
            let du = k * (1.0 + 3.0 * 0.044715 * x * x);
            (
                0.5 * x * (1.0 + t),
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du,
            )
        }
    }
}

fn erf(x: f32) -> f32 {
    libm::erf(x as f64) as f32
}

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "clasp-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(16384)
            .zip(x.par_chunks(16384))
            .for_each(|(yc, xc)| match self.0 {
                // Its own loop, so that it vectorises (a match inside the loop
                // kept it scalar: 14% of a training step went to the two loops).
                Activation::QuickGelu => cpu_kernels::with_simd(|| {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        *o = v * cpu_kernels::quick_gelu_gate(v);
                    }
                }),
                act => {
                    for (o, &v) in yc.iter_mut().zip(xc) {
                        *o = act_and_grad(act, v).0;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let (xt, gt) = (x.contiguous()?, grad.contiguous()?);
        let (xv, gv) = (f32_view(&xt)?, f32_view(&gt)?);
        let mut dx = vec![0f32; xt.elem_count()];
        dx.par_chunks_mut(16384)
            .zip(xv.as_slice().par_chunks(16384))
            .zip(gv.as_slice().par_chunks(16384))
            .for_each(|((dc, xc), gc)| match self.0 {
                Activation::QuickGelu => cpu_kernels::with_simd(|| {
                    for ((d, &v), &g) in dc.iter_mut().zip(xc).zip(gc) {
                        *d = g * act_and_grad(Activation::QuickGelu, v).1;
                    }
                }),
                act => {
                    for ((d, &v), &g) in dc.iter_mut().zip(xc).zip(gc) {
                        *d = g * act_and_grad(act, v).1;
                    }
                }
            });
        Ok(Some(vec_tensor(dx, x.shape(), x)?))
    }
}

/// An activation, element-wise, differentiable.
pub fn activate(x: &Tensor, act: Activation) -> CResult<Tensor> {
    x.contiguous()?.apply_op1(ActivationOp(act))
}

mod attention;
pub use attention::{attention, SoftmaxMask};
mod llama;
pub use llama::{rms_norm, rope, swiglu, RopePairs};

#[cfg(test)]
mod tests;
