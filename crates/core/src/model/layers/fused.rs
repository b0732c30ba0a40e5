//! The layers on the fused CPU kernels: a block's forward over a flat buffer of packed sequences, the buffers every layer reuses, and borrowed views of the weights.

use super::*;

/// A layer that also runs on the fused CPU kernels (see `cpu_kernels`), over
/// a flat [rows, C] buffer holding the given sequences back to back.
pub(crate) trait FusedLayer {
    fn forward_rows(
        &self,
        xv: &mut [f32],
        segs: &[(usize, usize)],
        mask: Mask,
        bufs: &mut RowBuffers,
    ) -> Result<()>;
}

/// A stack's working buffers, allocated once per forward and reused by every
/// layer: a fresh 20 MB buffer per layer cost a zero fill and page faults
/// that took about a tenth of an int8 image batch. Every layer overwrites
/// what it reads of them (the segments cover every row), so no zeroing is
/// needed between layers.
#[derive(Default)]
pub(crate) struct RowBuffers {
    pub(super) bufs: [Vec<f32>; 3],
}

impl RowBuffers {
    /// The three buffers with the given lengths; contents unspecified.
    pub(crate) fn three(&mut self, lens: [usize; 3]) -> [&mut [f32]; 3] {
        for (v, &len) in self.bufs.iter_mut().zip(&lens) {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        }
        let [a, b, c] = &mut self.bufs;
        [&mut a[..lens[0]], &mut b[..lens[1]], &mut c[..lens[2]]]
    }
}

/// Runs a stack of layers on the fused CPU kernels over x [B, T, C]: one copy
/// in and one out for the whole stack, not per layer.
pub(crate) fn forward_fused<L: FusedLayer>(
    layers: &[L],
    x: &Tensor,
    mask: &AttnMask,
) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    let mut xv = x.flatten_all()?.to_vec1::<f32>()?;
    let keys = match mask {
        AttnMask::Padding(add) => Some(add.flatten_all()?.to_vec1::<f32>()?),
        _ => None,
    };
    let m = match (&keys, mask) {
        (Some(k), _) => Mask::Keys(k),
        (None, AttnMask::Causal) => Mask::Causal,
        (None, _) => Mask::None,
    };
    let segs = uniform_segments(b, t);
    let mut bufs = RowBuffers::default();
    for layer in layers {
        layer.forward_rows(&mut xv, &segs, m, &mut bufs)?;
    }
    Ok(Tensor::from_vec(xv, (b, t, c), x.device())?)
}

impl FusedLayer for PreNormBlock {
    fn forward_rows(
        &self,
        xv: &mut [f32],
        segs: &[(usize, usize)],
        mask: Mask,
        bufs: &mut RowBuffers,
    ) -> Result<()> {
        let c = self.ln1.weight.dim(0)?;
        let n = xv.len() / c;
        let w = Weights::new(&self.attn, &self.mlp)?;
        let (ln1w, ln1b) = (
            F32View::new(&self.ln1.weight)?,
            F32View::new(&self.ln1.bias)?,
        );
        let (ln2w, ln2b) = (
            F32View::new(&self.ln2.weight)?,
            F32View::new(&self.ln2.bias)?,
        );
        let hidden = self.mlp.fc1.weight.dim(0)?;
        let [h, qkv, f] = bufs.three([n * c, n * 3 * c, n * hidden]);
        cpu_kernels::layer_norm_into(xv, h, c, ln1w.as_slice(), ln1b.as_slice(), self.ln1.eps);
        cpu_kernels::linear_into(h, n, &w.qkv(), qkv, false);
        cpu_kernels::attention(qkv, h, segs, self.attn.heads, c, mask);
        cpu_kernels::linear_into(h, n, &w.out(), xv, true);
        cpu_kernels::layer_norm_into(xv, h, c, ln2w.as_slice(), ln2b.as_slice(), self.ln2.eps);
        cpu_kernels::linear_into(h, n, &w.fc1(), f, false);
        cpu_kernels::activate_inplace(f, self.mlp.act);
        cpu_kernels::linear_into(f, n, &w.fc2(), xv, true);
        Ok(())
    }
}

/// Borrowed weights of one linear: f32 slices, and the int8 ones if any.
pub(crate) struct LinearWeights<'a> {
    pub(super) w: F32View<'a>,
    pub(super) b: Option<F32View<'a>>,
    pub(super) q: Option<&'a QuantMatrix>,
    pub(super) p: Option<&'a PackedF32>,
    pub(super) out: usize,
    pub(super) inp: usize,
}

impl<'a> LinearWeights<'a> {
    pub(crate) fn new(l: &'a Linear) -> Result<Self> {
        Ok(Self {
            w: F32View::new(&l.weight)?,
            b: l.bias.as_ref().map(F32View::new).transpose()?,
            q: l.int8.as_deref(),
            p: l.packed.as_deref(),
            out: l.weight.dim(0)?,
            inp: l.weight.dim(1)?,
        })
    }

    pub(crate) fn get(&self) -> LinearRef<'_> {
        LinearRef {
            w: self.w.as_slice(),
            b: self.b.as_ref().map(F32View::as_slice),
            q: self.q,
            p: self.p,
            out: self.out,
            inp: self.inp,
        }
    }
}

/// Borrowed weights of one block's attention and MLP.
pub(crate) struct Weights<'a> {
    pub(super) v: [LinearWeights<'a>; 4],
}

impl<'a> Weights<'a> {
    pub(crate) fn new(attn: &'a Attention, mlp: &'a Mlp) -> Result<Self> {
        Ok(Self {
            v: [
                LinearWeights::new(&attn.qkv)?,
                LinearWeights::new(&attn.out)?,
                LinearWeights::new(&mlp.fc1)?,
                LinearWeights::new(&mlp.fc2)?,
            ],
        })
    }
    pub(super) fn get(&self, i: usize) -> LinearRef<'_> {
        self.v[i].get()
    }
    pub(crate) fn qkv(&self) -> LinearRef<'_> {
        self.get(0)
    }
    pub(crate) fn out(&self) -> LinearRef<'_> {
        self.get(1)
    }
    pub(crate) fn fc1(&self) -> LinearRef<'_> {
        self.get(2)
    }
    pub(crate) fn fc2(&self) -> LinearRef<'_> {
        self.get(3)
    }
}
