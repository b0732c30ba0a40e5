//! `ChineseCLIPModel`: the same ViT image tower as CLIP, a BERT/RoBERTa text
//! tower (post-norm blocks, padding mask) pooled at the [CLS] token, and the
//! two bias-free projections.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::{BertConfig, ChineseClipConfig};
use super::layers::{activate, padding_mask, Attention, LayerNorm, Linear};
use super::vit::VisionTransformer;
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct BertLayer {
    attn: Attention,
    attn_ln: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_ln: LayerNorm,
    cfg: BertConfig,
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
            intermediate: Linear::load(vb.pp("intermediate.dense"), h, i, true)?,
            output: Linear::load(vb.pp("output.dense"), i, h, true)?,
            out_ln: LayerNorm::load(vb.pp("output.LayerNorm"), h, eps)?,
            cfg: cfg.clone(),
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let a = self.attn.forward(x, Some(mask))?;
        let x = self.attn_ln.forward(&(x + a)?)?;
        let f = activate(&self.intermediate.forward(&x)?, self.cfg.hidden_act)?;
        let f = self.output.forward(&f)?;
        self.out_ln.forward(&(x + f)?)
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

    /// `input_ids`, `attention_mask`: [B, T]. Returns the [CLS] hidden state.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Shape(format!(
                "text of {t} tokens exceeds the model's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
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
        let mask = padding_mask(attention_mask)?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        Ok(x.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?)
    }
}

#[derive(Debug, Clone)]
pub struct ChineseClipModel {
    pub vision: VisionTransformer,
    pub text: BertTextModel,
    pub visual_projection: Linear,
    pub text_projection: Linear,
    pub logit_scale: Tensor,
    pub config: ChineseClipConfig,
}

impl ChineseClipModel {
    pub fn load(vb: VarBuilder, cfg: &ChineseClipConfig) -> Result<Self> {
        let v = &cfg.vision_config;
        let t = &cfg.text_config;
        Ok(Self {
            vision: VisionTransformer::load(vb.pp("vision_model"), v)?,
            text: BertTextModel::load(vb.pp("text_model"), t)?,
            visual_projection: Linear::load(
                vb.pp("visual_projection"),
                v.hidden_size,
                cfg.projection_dim,
                false,
            )?,
            text_projection: Linear::load(
                vb.pp("text_projection"),
                t.hidden_size,
                cfg.projection_dim,
                false,
            )?,
            logit_scale: vb.get((), "logit_scale")?,
            config: cfg.clone(),
        })
    }

    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.visual_projection
            .forward(&self.vision.forward(pixel_values)?)
    }

    pub fn text_features(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.text_projection
            .forward(&self.text.forward(input_ids, attention_mask)?)
    }
}
