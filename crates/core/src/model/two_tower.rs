//! What CLIP and Chinese-CLIP share: a ViT image tower (absent when loaded
//! for text only), a text tower, one projection each and the logit scale,
//! under transformers' names. The two architectures differ only in their text
//! tower and config ([`super::ClipModel`], [`super::ChineseClipModel`]).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::cnn_tower::{CnnConfig, CnnTower};
use super::config::VisionConfig;
use super::layers::{load_heads, Linear};
use super::vit::VisionTransformer;
use super::Towers;
use crate::Result;

#[derive(Debug, Clone)]
pub struct TwoTowerModel<T, C> {
    /// `None` when loaded for text only ([`Towers::Text`]), or when the
    /// image tower is a CNN.
    pub vision: Option<VisionTransformer>,
    /// A CNN image tower (CLIP's ResNets) in place of the ViT; `None` too
    /// when loaded for text only.
    pub cnn: Option<Box<CnnTower>>,
    pub text: T,
    pub visual_projection: Linear,
    pub text_projection: Linear,
    pub logit_scale: Tensor,
    pub config: C,
}

impl<T, C: Clone> TwoTowerModel<T, C> {
    /// Loads the heads and the towers `towers` asks for; `text` loads the
    /// text tower (of width `text_hidden`) from `vb.pp("text_model")`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        vb: VarBuilder,
        vision: &VisionConfig,
        cnn: Option<&CnnConfig>,
        text_hidden: usize,
        projection_dim: usize,
        config: &C,
        towers: Towers,
        text: impl FnOnce(VarBuilder) -> Result<T>,
    ) -> Result<Self> {
        let (visual_projection, text_projection, logit_scale) =
            load_heads(&vb, vision.hidden_size, text_hidden, projection_dim)?;
        let (vision, cnn) = towers.image(vb.pp("vision_model"), vision, cnn)?;
        Ok(Self {
            vision,
            cnn,
            text: text(vb.pp("text_model"))?,
            visual_projection,
            text_projection,
            logit_scale,
            config: config.clone(),
        })
    }

    /// The image tower's pooled output [B, C], before the projection.
    pub fn image_pooled(&self, pixel_values: &Tensor) -> Result<Tensor> {
        super::image_pooled((&self.vision, &self.cnn), pixel_values)
    }

    /// Projected, unnormalised image features [B, P].
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.visual_projection
            .forward(&self.image_pooled(pixel_values)?)
    }
}
