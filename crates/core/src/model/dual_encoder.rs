//! `VisionTextDualEncoderModel` (transformers): any CLIP vision tower and any
//! BERT text tower joined by two new bias-free projections, the layout that
//! LiT-style training produces. The text side uses BERT's pooler output
//! (tanh of a dense layer over [CLS]) and the image side the ViT's pooled
//! [CLS], as transformers' `get_text_features`/`get_image_features` do.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::chinese_clip::BertTextModel;
use super::cnn_tower::CnnTower;
use super::config::{DualEncoderConfig, TextPooling};
use super::layers::{load_heads, masked_mean, Linear};
use super::vit::VisionTransformer;
use crate::Result;

#[derive(Debug, Clone)]
pub struct DualEncoderModel {
    /// `None` when loaded for text only ([`super::Towers::Text`]).
    pub vision: Option<VisionTransformer>,
    /// A pretrained CNN image tower in place of the ViT (`vision` is then
    /// `None`); `None` too when loaded for text only.
    pub cnn: Option<Box<CnnTower>>,
    pub text: BertTextModel,
    pub text_pooler: Linear,
    pub visual_projection: Linear,
    pub text_projection: Linear,
    pub logit_scale: Tensor,
    pub config: DualEncoderConfig,
}

impl DualEncoderModel {
    pub fn load(vb: VarBuilder, cfg: &DualEncoderConfig, towers: super::Towers) -> Result<Self> {
        let (v, t) = (&cfg.vision_config, &cfg.text_config);
        let (visual_projection, text_projection, logit_scale) =
            load_heads(&vb, v.hidden_size, t.hidden_size, cfg.projection_dim)?;
        let (vision, cnn) = towers.image(vb.pp("vision_model"), v, cfg.image_cnn.as_ref())?;
        Ok(Self {
            vision,
            cnn,
            text: BertTextModel::load(vb.pp("text_model"), t)?,
            text_pooler: Linear::load(
                vb.pp("text_model.pooler.dense"),
                t.hidden_size,
                t.hidden_size,
                true,
            )?,
            visual_projection,
            text_projection,
            logit_scale,
            config: cfg.clone(),
        })
    }

    /// The image tower's pooled output [B, C] before the projection: the
    /// ViT's pooled [CLS], or the CNN's average-pooled last feature map.
    pub fn image_pooled(&self, pixel_values: &Tensor) -> Result<Tensor> {
        super::image_pooled((&self.vision, &self.cnn), pixel_values)
    }

    /// The text tower's output [B, C]: BERT's pooler output tanh(dense([CLS])),
    /// or with `clasp_text_pooling: "mean"` the mean of the token states over
    /// the attention mask.
    pub fn text_pooled(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        if self.config.text_pooling == TextPooling::Mean {
            let states = self.text.token_states(input_ids, attention_mask)?;
            return masked_mean(&states, attention_mask);
        }
        let cls = self.text.forward(input_ids, attention_mask)?;
        Ok(self.text_pooler.forward(&cls)?.tanh()?)
    }
}
