//! `CLIPModel`: the ViT image tower, the causal text transformer pooled at the
//! end-of-text token, the two bias-free projections and `logit_scale`.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::{ClipConfig, ClipTextConfig};
use super::cpu_kernels::{self, F32View, Mask};
use super::layers::{AttnMask, FusedLayer, LayerNorm, LayerStack, PreNormBlock, RowBuffers};
use super::two_tower::TwoTowerModel;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<PreNormBlock>,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
}

impl ClipTextTransformer {
    /// The encoder layers (see [`LayerStack`]).
    pub(crate) fn layer_stack(&mut self) -> &mut dyn LayerStack {
        &mut self.layers
    }

    pub(crate) fn layer_stack_ref(&self) -> &dyn LayerStack {
        &self.layers
    }

    /// `vb` points at `text_model`.
    pub fn load(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let enc = vb.pp("encoder.layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                PreNormBlock::load(
                    enc.pp(i),
                    h,
                    cfg.intermediate_size,
                    cfg.num_attention_heads,
                    cfg.layer_norm_eps,
                    cfg.hidden_act,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embedding: emb.get((cfg.vocab_size, h), "token_embedding.weight")?,
            position_embedding: emb.get(
                (cfg.max_position_embeddings, h),
                "position_embedding.weight",
            )?,
            layers,
            final_layer_norm: LayerNorm::load(vb.pp("final_layer_norm"), h, cfg.layer_norm_eps)?,
            cfg: cfg.clone(),
        })
    }

    /// Positions at which to pool: transformers' rule. With the legacy
    /// `eos_token_id == 2` it is the first position of the largest id (the
    /// end-of-text token has the largest id in CLIP's vocabulary); otherwise the
    /// first position holding `eos_token_id`.
    fn pool_positions(&self, ids: &[Vec<u32>]) -> Vec<u32> {
        ids.iter()
            .map(|row| {
                let pos = if self.cfg.eos_token_id == 2 {
                    // first index of the maximum, as torch.argmax returns
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max)
                } else {
                    row.iter().position(|&t| t == self.cfg.eos_token_id)
                };
                pos.unwrap_or(row.len().saturating_sub(1)) as u32
            })
            .collect()
    }

    /// `input_ids`: [B, T] (u32). The causal mask makes padding after the
    /// end-of-text token irrelevant to the pooled output, so no padding mask is
    /// needed and callers may trim padding to the longest sequence.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Shape(format!(
                "text of {t} tokens exceeds the model's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let dev = input_ids.device();
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let positions = self.pool_positions(&ids);
        if cpu_kernels::applies(&self.token_embedding) {
            return self.forward_packed(&ids, &positions, dev);
        }
        let tok = self.token_embedding.embedding(&input_ids.flatten_all()?)?;
        let tok = tok.reshape((b, t, self.cfg.hidden_size))?;
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let mut x = tok.broadcast_add(&pos.unsqueeze(0)?)?;
        for layer in &self.layers {
            x = layer.forward(&x, &AttnMask::Causal)?;
        }
        // Pool before the final LN: LN is per-token, so this is the same result.
        let flat = x.reshape((b * t, self.cfg.hidden_size))?;
        let index: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(i, &p)| i as u32 * t as u32 + p)
            .collect();
        let index = Tensor::from_vec(index, b, dev)?;
        let pooled = flat.index_select(&index, 0)?;
        self.final_layer_norm.forward(&pooled)
    }
}

impl ClipTextTransformer {
    /// CPU inference without padding: each text is cut just after its pooling
    /// (end-of-text) position, since under the causal mask later tokens cannot
    /// affect it, and the texts are packed into one buffer with attention kept
    /// within each. The pooled outputs equal the padded computation's.
    fn forward_packed(
        &self,
        ids: &[Vec<u32>],
        positions: &[u32],
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        let c = self.cfg.hidden_size;
        let mut segs = Vec::with_capacity(ids.len());
        let (mut flat, mut pos) = (Vec::new(), Vec::new());
        for (row, &p) in ids.iter().zip(positions) {
            let len = p as usize + 1;
            segs.push((flat.len(), len));
            flat.extend_from_slice(&row[..len]);
            pos.extend(0..len);
        }
        let (te, pe) = (
            F32View::new(&self.token_embedding)?,
            F32View::new(&self.position_embedding)?,
        );
        let mut x = cpu_kernels::embed_rows(te.as_slice(), pe.as_slice(), &flat, &pos, c);
        drop((te, pe));
        let mut bufs = RowBuffers::default();
        for layer in &self.layers {
            layer.forward_rows(&mut x, &segs, Mask::Causal, &mut bufs)?;
        }
        let last: Vec<f32> = segs
            .iter()
            .flat_map(|&(s, l)| x[(s + l - 1) * c..(s + l) * c].to_vec())
            .collect();
        self.final_layer_norm
            .forward(&Tensor::from_vec(last, (segs.len(), c), dev)?)
    }
}

/// CLIP: a ViT image tower and CLIP's causal text transformer.
pub type ClipModel = TwoTowerModel<ClipTextTransformer, ClipConfig>;

impl ClipModel {
    pub fn load(vb: VarBuilder, cfg: &ClipConfig, towers: super::Towers) -> Result<Self> {
        let t = &cfg.text_config;
        Self::assemble(
            vb,
            &cfg.vision_config,
            cfg.image_cnn.as_ref(),
            t.hidden_size,
            cfg.projection_dim,
            cfg,
            towers,
            |vb| ClipTextTransformer::load(vb, t),
        )
    }

    /// Projected, unnormalised text features [B, P].
    pub fn text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.text_projection.forward(&self.text.forward(input_ids)?)
    }
}
