//! The forwards training uses: whole sequences on the differentiable fused kernels (no cache), with the frozen weights packed.

use super::*;

impl Llama {
    /// The final normed hidden states `[b, t, hidden]` of a whole sequence
    /// (positions from 0, causal, no cache) through ops that all have a
    /// backward pass, so gradients reach `x` (the input embeddings) through
    /// the frozen weights. Rows may be right-padded: a real position never
    /// attends to a later one.
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Generate(format!(
                "{t} positions exceed the model's context of {}",
                self.cfg.max_position_embeddings
            )));
        }
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let mut m = vec![0f32; t * t];
        for i in 0..t {
            for j in i + 1..t {
                m[i * t + j] = -1e30;
            }
        }
        let mask = Tensor::from_vec(m, (1, 1, 1, t, t), &self.device)?;
        let mut x = x.clone();
        for block in &self.blocks {
            x = self.block(block, &x, None, &cos, &sin, Some(&mask), Ops::Autograd)?;
        }
        Ops::Autograd.rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)
    }

    /// The final normed hidden state `[b, hidden]` at each sequence's last
    /// position: `seqs[i]` its input embeddings `[t_i, hidden]`, run as one
    /// right-padded batch through [`Self::forward_train`] (a sequence
    /// classifier's pooling, as `LlamaForSequenceClassification` reads the
    /// last real token).
    pub fn last_hidden(&self, seqs: &[Tensor]) -> Result<Tensor> {
        let hidden = self.cfg.hidden_size;
        let lens: Vec<usize> = seqs
            .iter()
            .map(|s| s.dim(0))
            .collect::<candle_core::Result<_>>()?;
        if lens.contains(&0) {
            return Err(Error::Generate(
                "an empty sequence has no last token".into(),
            ));
        }
        let t = lens.iter().copied().max().unwrap_or(0);
        let rows = seqs
            .iter()
            .zip(&lens)
            .map(|(s, &n)| {
                if n == t {
                    return Ok(s.clone());
                }
                let pad = Tensor::zeros((t - n, hidden), candle_core::DType::F32, &self.device)?;
                Ok(Tensor::cat(&[s.clone(), pad], 0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let h = self.forward_train(&Tensor::stack(&rows, 0)?)?;
        let last: Vec<u32> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| (i * t + n - 1) as u32)
            .collect();
        Ok(h.reshape((seqs.len() * t, hidden))?
            .index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?)
    }

    /// Packs the frozen f32 projections (and the output head) for the
    /// AVX-512 f32 kernels, forward and input gradient, where the CPU has
    /// them: for training through the model with its weights fixed. Costs
    /// two packed copies of those weights.
    pub fn pack_frozen_for_training(&mut self) -> Result<()> {
        for b in self.blocks.iter_mut() {
            b.qkv.pack_frozen()?;
            b.o.pack_frozen()?;
            b.gate_up.pack_frozen()?;
            b.down.pack_frozen()?;
        }
        self.lm_head.pack_frozen()
    }

    /// [`Self::logits`] for training: the head's backward reaches `hidden`
    /// only.
    pub fn logits_train(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward_frozen(hidden)
    }

    /// Causal attention of a whole sequence for training, on the fused
    /// kernels: rotary on `[b, t, heads, d]` in place of the transposed
    /// layout, the key and value heads repeated for their query groups (a
    /// copy of a third of the width; its backward sums the groups), and one
    /// op for softmax(q kᵀ/√d + causal) v with its backward.
    pub(super) fn attention_train(
        &self,
        blk: &Block,
        qkv: &[Tensor],
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, t, _) = qkv[0].dims3()?;
        let hd = c.head_dim;
        let pairs = match c.rope_layout {
            RopeLayout::Interleaved => gk::RopePairs::Interleaved,
            RopeLayout::Half => gk::RopePairs::Half,
        };
        let q = gk::rope(&qkv[0].reshape((b, t, c.num_heads, hd))?, cos, sin, pairs)?;
        let k = gk::rope(
            &qkv[1].reshape((b, t, c.num_kv_heads, hd))?,
            cos,
            sin,
            pairs,
        )?;
        let n_rep = c.num_heads / c.num_kv_heads;
        let width = c.num_heads * hd;
        let groups = |y: &Tensor| -> Result<Tensor> {
            let y = y.reshape((b, t, c.num_kv_heads, 1, hd))?;
            Ok(y.broadcast_as((b, t, c.num_kv_heads, n_rep, hd))?
                .reshape((b, t, width))?)
        };
        let packed = Tensor::cat(
            &[q.reshape((b, t, width))?, groups(&k)?, groups(&qkv[2])?],
            2,
        )?;
        let y = gk::attention(&packed, c.num_heads, gk::SoftmaxMask::Causal)?;
        self.out_proj(blk, &y, Ops::Autograd)
    }
}
