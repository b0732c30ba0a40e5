//! The projections of the llama architecture: candle's f32 (or quantized)
//! matmuls, or Q4_1/Q8_0 blocks on clasp's own kernels (`quant`), and the
//! stacking of projections that read the same input.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Tensor};

use super::gguf::GgufFile;
use super::llama::Precision;
use super::quant::{Kernel, Q4_1Matrix, Q8_0Matrix};
use crate::{Error, Result};

/// A projection: candle's (f32, or a quantized type candle runs well), or
/// Q4_1/Q8_0 blocks on clasp's own f32-activation kernels (see `quant`).
#[derive(Debug, Clone)]
pub(super) enum Linear {
    Candle(QMatMul),
    /// An f32 weight held frozen for training, with its copies packed for
    /// the AVX-512 f32 kernels (forward and input gradient).
    Packed(Tensor, Arc<clasp_kernels::grad_kernels::FrozenPacks>),
    Q4_1(Arc<Q4_1Matrix>, Kernel),
    Q8_0(Arc<Q8_0Matrix>, Kernel),
}

/// A quantized product over `m` rows of a flat input.
type BlockMatmul<'a> = dyn Fn(&[f32], usize) -> Vec<f32> + 'a;

/// Up to this many rows (a batch's decode step), a quantized product runs on
/// the block kernels; above it (a prefill) the matrix is dequantized once
/// for one f32 GEMM.
const GEMV_ROWS: usize = super::quant::MAX_ROWS;

impl Linear {
    /// The product with an f32 weight held fixed: its backward gives the
    /// input's gradient only. Quantized weights are dequantized first.
    pub(super) fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        if let Linear::Packed(w, packs) = self {
            return Ok(clasp_kernels::grad_kernels::frozen_linear_packed(
                x, w, packs,
            )?);
        }
        let w = match self {
            Linear::Candle(QMatMul::Tensor(w)) => w.clone(),
            other => other.dense(x.device())?,
        };
        Ok(clasp_kernels::grad_kernels::frozen_linear(x, &w)?)
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, cols, matmul): (usize, usize, &BlockMatmul) = match self {
            Linear::Candle(m) => return Ok(m.forward(x)?),
            Linear::Packed(w, _) => return Ok(QMatMul::Tensor(w.clone()).forward(x)?),
            Linear::Q4_1(w, k) => (w.rows(), w.cols(), &|xs, m| w.matmul(xs, m, *k)),
            Linear::Q8_0(w, k) => (w.rows(), w.cols(), &|xs, m| w.matmul(xs, m, *k)),
        };
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != cols {
            return Err(Error::Shape(format!(
                "input of width {k} into a quantized projection of {cols} columns"
            )));
        }
        let m = x.elem_count() / k.max(1);
        if m > GEMV_ROWS {
            // Prefill: dequantize once (a few % of the GEMM's time), then f32.
            return Ok(QMatMul::Tensor(self.dense(x.device())?).forward(x)?);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let y = matmul(&xs, m);
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = rows;
        }
        Ok(Tensor::from_vec(y, out_dims, x.device())?)
    }

    /// Packs an f32 weight for training through it frozen (see
    /// [`Linear::Packed`]), where this CPU has the packed kernel.
    pub(super) fn pack_frozen(&mut self) -> Result<()> {
        if let Linear::Candle(QMatMul::Tensor(w)) = self {
            if let Some(p) = clasp_kernels::grad_kernels::FrozenPacks::new(w)? {
                *self = Linear::Packed(w.clone(), Arc::new(p));
            }
        }
        Ok(())
    }

    pub(super) fn dense(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Linear::Candle(QMatMul::QTensor(q)) => q.dequantize(device)?,
            Linear::Candle(QMatMul::Tensor(t)) | Linear::Packed(t, _) => t.clone(),
            Linear::Candle(QMatMul::TensorF16(t)) => t.to_dtype(DType::F32)?,
            Linear::Q4_1(w, _) => Tensor::from_vec(w.dequantize(), (w.rows(), w.cols()), device)?,
            Linear::Q8_0(w, _) => Tensor::from_vec(w.dequantize(), (w.rows(), w.cols()), device)?,
        })
    }
}

/// Projections that read the same input (q, k, v; gate, up): separate, or
/// stacked into one Q4_1 matrix so a decode step runs one product instead
/// of three, each output row computed exactly as it would be alone.
#[derive(Debug, Clone)]
pub(super) enum Group {
    Split(Vec<Linear>),
    Stacked(Linear, Vec<usize>),
}

impl Group {
    pub(super) fn new(parts: Vec<Linear>) -> Self {
        let q41: Vec<&Q4_1Matrix> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Q4_1(w, _) => Some(w.as_ref()),
                _ => None,
            })
            .collect();
        if q41.len() == parts.len() {
            if let Some(w) = Q4_1Matrix::stack(&q41) {
                let rows = q41.iter().map(|p| p.rows()).collect();
                return Group::Stacked(Linear::Q4_1(Arc::new(w), Kernel::detect()), rows);
            }
        }
        Group::Split(parts)
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Group::Split(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Group::Stacked(w, rows) => split_last(&w.forward(x)?, rows),
        }
    }

    /// [`Self::forward`] with frozen f32 weights whose backward reaches the
    /// input only (training through a frozen model).
    pub(super) fn forward_frozen(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Group::Split(parts) => parts.iter().map(|p| p.forward_frozen(x)).collect(),
            Group::Stacked(w, rows) => split_last(&w.forward_frozen(x)?, rows),
        }
    }

    /// Packs each f32 projection for frozen training.
    pub(super) fn pack_frozen(&mut self) -> Result<()> {
        match self {
            Group::Split(parts) => parts.iter_mut().try_for_each(Linear::pack_frozen),
            Group::Stacked(w, _) => w.pack_frozen(),
        }
    }

    /// Each projection as f32, in order.
    pub(super) fn dense(&self, device: &Device) -> Result<Vec<Tensor>> {
        match self {
            Group::Split(parts) => parts.iter().map(|p| p.dense(device)).collect(),
            Group::Stacked(w, rows) => {
                let all = w.dense(device)?;
                let mut start = 0;
                let mut out = Vec::with_capacity(rows.len());
                for &r in rows {
                    out.push(all.narrow(0, start, r)?.contiguous()?);
                    start += r;
                }
                Ok(out)
            }
        }
    }
}

/// A stacked projection's output cut back into its parts' widths.
fn split_last(y: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let mut start = 0;
    let mut out = Vec::with_capacity(widths.len());
    for &r in widths {
        out.push(y.narrow(candle_core::D::Minus1, start, r)?);
        start += r;
    }
    Ok(out)
}

/// One projection from the file: Q4_1 and Q8_0 straight from their bytes
/// onto clasp's kernels (CPU, quantized), anything else through candle.
pub(super) fn linear(
    g: &mut GgufFile,
    name: &str,
    shape: &[usize],
    precision: Precision,
    device: &Device,
) -> Result<Linear> {
    let Some(dtype) = g.tensor_type(name) else {
        return Err(g.error(format!("missing tensor `{name}`")));
    };
    let own_kernel = matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0);
    if precision == Precision::Quantized && device.is_cpu() && own_kernel {
        let (_, dims, bytes) = g.raw(name)?;
        check_shape(g, name, &dims, shape)?;
        let bad = |e: String| g.error(format!("tensor `{name}`: {e}"));
        return Ok(match dtype {
            GgmlDType::Q4_1 => Linear::Q4_1(
                Arc::new(Q4_1Matrix::from_ggml(&bytes, shape[0], shape[1]).map_err(bad)?),
                Kernel::detect(),
            ),
            _ => Linear::Q8_0(
                Arc::new(Q8_0Matrix::from_ggml(&bytes, shape[0], shape[1]).map_err(bad)?),
                Kernel::detect(),
            ),
        });
    }
    let t = g.tensor(name, device)?;
    check_shape(g, name, t.shape().dims(), shape)?;
    Ok(match precision {
        Precision::Quantized => Linear::Candle(QMatMul::from_qtensor(t)?),
        Precision::F32 => Linear::Candle(QMatMul::Tensor(t.dequantize(device)?)),
    })
}

pub(super) fn check_shape(g: &GgufFile, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(g.error(format!(
            "tensor `{name}` has shape {got:?}, the config implies {want:?}"
        )));
    }
    Ok(())
}
