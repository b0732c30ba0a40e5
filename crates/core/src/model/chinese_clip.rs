//! `ChineseCLIPModel`: the same ViT image tower as CLIP, a BERT/RoBERTa text
//! tower (post-norm blocks, padding mask) pooled at the [CLS] token, and the
//! two bias-free projections.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::{BertConfig, ChineseClipConfig};
use super::cpu_kernels::{self, F32View, Mask};
use super::layers::{
    forward_fused, Attention, AttnMask, FusedLayer, LayerNorm, LayerStack, Linear, Mlp, RowBuffers,
    Weights,
};
use super::two_tower::TwoTowerModel;
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct BertLayer {
    attn: Attention,
    attn_ln: LayerNorm,
    mlp: Mlp,
    out_ln: LayerNorm,
}

impl BertLayer {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let sa = vb.pp("attention.self");
        let l = |n: &str| Linear::load(sa.pp(n), h, h, true);
        Ok(Self {
            attn: Attention::new(
                l("query")?,
                l("key")?,
                l("value")?,
                Linear::load(vb.pp("attention.output.dense"), h, h, true)?,
                cfg.num_attention_heads,
            )?,
            attn_ln: LayerNorm::load(vb.pp("attention.output.LayerNorm"), h, eps)?,
            mlp: Mlp::new(
                Linear::load(vb.pp("intermediate.dense"), h, i, true)?,
                Linear::load(vb.pp("output.dense"), i, h, true)?,
                cfg.hidden_act,
            ),
            out_ln: LayerNorm::load(vb.pp("output.LayerNorm"), h, eps)?,
        })
    }

    /// Post-norm: x = LN(x + attn(x)); x = LN(x + mlp(x)).
    fn forward(&self, x: &Tensor, mask: &AttnMask) -> Result<Tensor> {
        let x = self.attn_ln.forward(&(x + self.attn.forward(x, mask)?)?)?;
        self.out_ln.forward(&(&x + self.mlp.forward(&x)?)?)
    }
}

impl super::layers::Int8Layer for BertLayer {
    fn attn_mlp(&mut self) -> (&mut Attention, &mut Mlp) {
        (&mut self.attn, &mut self.mlp)
    }
    fn attn_mlp_ref(&self) -> (&Attention, &Mlp) {
        (&self.attn, &self.mlp)
    }
}

impl FusedLayer for BertLayer {
    fn forward_rows(
        &self,
        xv: &mut [f32],
        segs: &[(usize, usize)],
        mask: Mask,
        bufs: &mut RowBuffers,
    ) -> Result<()> {
        let c = self.attn_ln.weight.dim(0)?;
        let n = xv.len() / c;
        let w = Weights::new(&self.attn, &self.mlp)?;
        let ln = |l: &LayerNorm, v: &mut [f32]| -> Result<()> {
            let (g, bb) = (F32View::new(&l.weight)?, F32View::new(&l.bias)?);
            cpu_kernels::layer_norm_inplace(v, c, g.as_slice(), bb.as_slice(), l.eps);
            Ok(())
        };
        let hidden = self.mlp.fc1.weight.dim(0)?;
        let [qkv, ctx, f] = bufs.three([n * 3 * c, n * c, n * hidden]);
        cpu_kernels::linear_into(xv, n, &w.qkv(), qkv, false);
        cpu_kernels::attention(qkv, ctx, segs, self.attn.heads, c, mask);
        cpu_kernels::linear_into(ctx, n, &w.out(), xv, true);
        ln(&self.attn_ln, xv)?;
        cpu_kernels::linear_into(xv, n, &w.fc1(), f, false);
        cpu_kernels::activate_inplace(f, self.mlp.act);
        // f no longer needs xv, so the residual sum goes straight into it.
        cpu_kernels::linear_into(f, n, &w.fc2(), xv, true);
        ln(&self.out_ln, xv)
    }
}

#[derive(Debug, Clone)]
pub struct BertTextModel {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    emb_ln: LayerNorm,
    layers: Vec<BertLayer>,
    cfg: BertConfig,
}

impl BertTextModel {
    /// The encoder layers (see [`LayerStack`]).
    pub(crate) fn layer_stack(&mut self) -> &mut dyn LayerStack {
        &mut self.layers
    }

    pub(crate) fn layer_stack_ref(&self) -> &dyn LayerStack {
        &self.layers
    }

    /// `vb` points at `text_model`.
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let enc = vb.pp("encoder.layer");
        Ok(Self {
            word_embeddings: e.get((cfg.vocab_size, h), "word_embeddings.weight")?,
            position_embeddings: e.get(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            token_type_embeddings: e
                .get((cfg.type_vocab_size, h), "token_type_embeddings.weight")?,
            emb_ln: LayerNorm::load(e.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| BertLayer::load(enc.pp(i), cfg))
                .collect::<Result<_>>()?,
            cfg: cfg.clone(),
        })
    }

    fn check_length(&self, input_ids: &Tensor) -> Result<()> {
        let t = input_ids.dim(1)?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Shape(format!(
                "text of {t} tokens exceeds the model's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// `input_ids`, `attention_mask`: [B, T]. Returns the [CLS] hidden state.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.check_length(input_ids)?;
        if cpu_kernels::applies(&self.word_embeddings) {
            if let Some(out) = self.forward_packed(input_ids, attention_mask)? {
                return Ok(out);
            }
        }
        let x = self.token_states(input_ids, attention_mask)?;
        Ok(x.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?)
    }

    /// The last layer's hidden states of every token [B, T, C] (padded
    /// positions included; pool with the mask).
    pub fn token_states(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.check_length(input_ids)?;
        let (b, t) = input_ids.dims2()?;
        let h = self.cfg.hidden_size;
        let words = self
            .word_embeddings
            .embedding(&input_ids.flatten_all()?)?
            .reshape((b, t, h))?;
        // token_type_ids are all zero, as Chinese-CLIP passes none.
        let bias = self
            .position_embeddings
            .narrow(0, 0, t)?
            .broadcast_add(&self.token_type_embeddings.get(0)?.unsqueeze(0)?)?;
        let x = words.broadcast_add(&bias.unsqueeze(0)?)?;
        let mut x = self.emb_ln.forward(&x)?;
        let mask = AttnMask::padding(attention_mask)?;
        if cpu_kernels::applies(&x) {
            x = forward_fused(&self.layers, &x, &mask)?;
        } else {
            for layer in &self.layers {
                x = layer.forward(&x, &mask)?;
            }
        }
        Ok(x)
    }
}

impl BertTextModel {
    /// CPU inference without padding: each text's real tokens are packed into
    /// one buffer and attention stays within each text. The [CLS] outputs are
    /// identical to the padded computation (masked keys get exactly zero
    /// weight there). Returns None when the mask is not right-padded.
    fn forward_packed(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Option<Tensor>> {
        let ids = input_ids
            .to_dtype(candle_core::DType::U32)?
            .to_vec2::<u32>()?;
        let mask = attention_mask
            .to_dtype(candle_core::DType::U32)?
            .to_vec2::<u32>()?;
        let mut segs = Vec::with_capacity(ids.len());
        let (mut flat, mut pos) = (Vec::new(), Vec::new());
        for (row, m) in ids.iter().zip(&mask) {
            let len = m.iter().take_while(|&&v| v != 0).count().max(1);
            if m[len..].iter().any(|&v| v != 0) {
                return Ok(None);
            }
            segs.push((flat.len(), len));
            flat.extend_from_slice(&row[..len]);
            pos.extend(0..len);
        }
        let c = self.cfg.hidden_size;
        let longest = segs.iter().map(|s| s.1).max().unwrap_or(1);
        let bias = self
            .position_embeddings
            .narrow(0, 0, longest)?
            .broadcast_add(&self.token_type_embeddings.get(0)?.unsqueeze(0)?)?;
        let (we, pe) = (F32View::new(&self.word_embeddings)?, F32View::new(&bias)?);
        let mut x = cpu_kernels::embed_rows(we.as_slice(), pe.as_slice(), &flat, &pos, c);
        drop((we, pe));
        let (g, b) = (
            F32View::new(&self.emb_ln.weight)?,
            F32View::new(&self.emb_ln.bias)?,
        );
        cpu_kernels::layer_norm_inplace(&mut x, c, g.as_slice(), b.as_slice(), self.emb_ln.eps);
        let mut bufs = RowBuffers::default();
        for layer in &self.layers {
            layer.forward_rows(&mut x, &segs, Mask::None, &mut bufs)?;
        }
        let cls: Vec<f32> = segs
            .iter()
            .flat_map(|&(s, _)| x[s * c..(s + 1) * c].to_vec())
            .collect();
        Ok(Some(Tensor::from_vec(
            cls,
            (segs.len(), c),
            input_ids.device(),
        )?))
    }
}

/// Chinese-CLIP: a ViT image tower and a BERT text tower.
pub type ChineseClipModel = TwoTowerModel<BertTextModel, ChineseClipConfig>;

impl ChineseClipModel {
    pub fn load(vb: VarBuilder, cfg: &ChineseClipConfig, towers: super::Towers) -> Result<Self> {
        let t = &cfg.text_config;
        Self::assemble(
            vb,
            &cfg.vision_config,
            None,
            t.hidden_size,
            cfg.projection_dim,
            cfg,
            towers,
            |vb| BertTextModel::load(vb, t),
        )
    }

    /// Projected, unnormalised text features [B, P].
    pub fn text_features(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.text_projection
            .forward(&self.text.forward(input_ids, attention_mask)?)
    }
}
