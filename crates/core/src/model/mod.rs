//! Architectures and loading. One file per architecture (`clip`,
//! `chinese_clip`), the shared ViT tower (`vit`), building blocks (`layers`),
//! configs (`config`) and checkpoint resolution (`loader`).
//!
//! The architectures are clasp's own rather than candle-transformers': its CLIP
//! keeps `logit_scale` as a constant (so it cannot be trained), does not expose
//! the pieces that training and inspection need, and measured at 0.6x PyTorch's
//! CPU throughput on the 2-core development machine.

pub mod blip2;
pub mod chinese_clip;
pub mod clip;
pub mod cnn;
pub mod cnn_tower;
pub mod config;
pub mod convnext;
pub use clasp_kernels::{cpu_kernels, grad_kernels, int8, packed};
pub mod dual_encoder;
pub mod efficientnet_lite;
pub mod emu3_vq;
pub mod int8_checkpoint;
pub mod layers;
pub mod loader;
pub mod mobilenet_v2;
pub mod modified_resnet;
pub mod open_clip;
pub mod open_clip_cnn;
pub mod open_clip_openai;
pub mod qformer;
pub mod resnet;
pub mod sentence;
pub mod siglip;
pub mod torch_file;
pub mod two_tower;
pub mod vit;

use candle_core::Tensor;

pub use chinese_clip::ChineseClipModel;
pub use clip::ClipModel;
pub use config::{ModelConfig, SUPPORTED_MODEL_TYPES};
pub use dual_encoder::DualEncoderModel;
pub use loader::{resolve, ModelFiles};
pub use siglip::SiglipModel;
pub use vit::l2_normalize;

use crate::Result;

pub use clasp_kernels::{grad_mode, grad_mode_guard, GradModeGuard};

/// Which towers of a dual encoder to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Towers {
    Both,
    /// The text tower and both projections only.
    Text,
}

/// A dual encoder's image tower: a ViT, or a CNN in its place.
type ImageTower = (
    Option<vit::VisionTransformer>,
    Option<Box<cnn_tower::CnnTower>>,
);

impl Towers {
    /// The image tower under `vb` (`vision_model`): the CNN `cnn` names,
    /// else the ViT of `cfg`; neither when loading for text only.
    fn image(
        self,
        vb: candle_nn::VarBuilder,
        cfg: &config::VisionConfig,
        cnn: Option<&cnn_tower::CnnConfig>,
    ) -> Result<ImageTower> {
        Ok(match (self, cnn) {
            (Towers::Text, _) => (None, None),
            (Towers::Both, Some(c)) => (None, Some(Box::new(cnn_tower::CnnTower::load(vb, c)?))),
            (Towers::Both, None) => (Some(vit::VisionTransformer::load(vb, cfg)?), None),
        })
    }
}

/// The pooled output [B, C] of whichever image tower a model has.
fn image_pooled(
    tower: (
        &Option<vit::VisionTransformer>,
        &Option<Box<cnn_tower::CnnTower>>,
    ),
    pixel_values: &Tensor,
) -> Result<Tensor> {
    match tower.1 {
        Some(c) => c.forward(pixel_values),
        None => vision_tower(tower.0)?.forward(pixel_values),
    }
}

/// The image tower, or an error saying the model was loaded without it.
fn vision_tower(v: &Option<vit::VisionTransformer>) -> Result<&vit::VisionTransformer> {
    v.as_ref().ok_or_else(|| {
        crate::Error::Report(
            "this model was loaded for text only (Towers::Text); load it whole to embed images"
                .into(),
        )
    })
}

/// A loaded dual encoder of any supported architecture.
#[derive(Debug, Clone)]
pub enum Model {
    Clip(ClipModel),
    ChineseClip(ChineseClipModel),
    DualEncoder(DualEncoderModel),
    /// Boxed: it is several times the others' size.
    Siglip(Box<SiglipModel>),
}

impl Model {
    pub fn load(vb: candle_nn::VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Self::load_towers(vb, cfg, Towers::Both)
    }

    /// Loads `towers`: with [`Towers::Text`] the image tower's weights are
    /// never read (a text query's process needs the text tower only).
    pub fn load_towers(
        vb: candle_nn::VarBuilder,
        cfg: &ModelConfig,
        towers: Towers,
    ) -> Result<Self> {
        Ok(match cfg {
            ModelConfig::Clip(c) => Model::Clip(ClipModel::load(vb, c, towers)?),
            ModelConfig::ChineseClip(c) => {
                Model::ChineseClip(ChineseClipModel::load(vb, c, towers)?)
            }
            ModelConfig::DualEncoder(c) => {
                Model::DualEncoder(DualEncoderModel::load(vb, c, towers)?)
            }
            ModelConfig::Siglip(c) => Model::Siglip(Box::new(SiglipModel::load(vb, c, towers)?)),
        })
    }

    /// The image tower's pooled output [B, C], before the projection
    /// (SigLIP's is its pooling head's output, the embedding itself).
    pub fn image_pooled(&self, pixel_values: &Tensor) -> Result<Tensor> {
        match self {
            Model::Clip(m) => m.image_pooled(pixel_values),
            Model::ChineseClip(m) => m.image_pooled(pixel_values),
            Model::DualEncoder(m) => m.image_pooled(pixel_values),
            Model::Siglip(m) => m.vision_tower()?.forward(pixel_values),
        }
    }

    /// The text tower's pooled output [B, C] from token ids and the 0/1
    /// attention mask, both [B, T], before the projection.
    pub fn text_pooled(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        match self {
            Model::Clip(m) => m.text.forward(input_ids),
            Model::ChineseClip(m) => m.text.forward(input_ids, attention_mask),
            Model::DualEncoder(m) => m.text_pooled(input_ids, attention_mask),
            // No mask: SigLIP reads the padded context whole (see
            // `SiglipText::forward`).
            Model::Siglip(m) => m.text.forward(input_ids),
        }
    }

    /// The visual and text projections; `None` where the towers' pooled
    /// outputs are the embeddings already (SigLIP).
    pub fn projections(&self) -> Option<(&layers::Linear, &layers::Linear)> {
        match self {
            Model::Clip(m) => Some((&m.visual_projection, &m.text_projection)),
            Model::ChineseClip(m) => Some((&m.visual_projection, &m.text_projection)),
            Model::DualEncoder(m) => Some((&m.visual_projection, &m.text_projection)),
            Model::Siglip(_) => None,
        }
    }

    /// The dtype the towers' weights are in (bf16 under mixed precision).
    pub fn param_dtype(&self) -> Result<candle_core::DType> {
        Ok(match self.projections() {
            Some((v, _)) => v.weight().dtype(),
            None => match self {
                Model::Siglip(m) => m.text.dtype(),
                _ => unreachable!("only SigLIP has no projections"),
            },
        })
    }

    /// Pooled image outputs [B, C] to embeddings [B, P].
    pub fn project_image(&self, pooled: &Tensor) -> Result<Tensor> {
        match self.projections() {
            Some((v, _)) => v.forward(pooled),
            None => Ok(pooled.clone()),
        }
    }

    /// Pooled text outputs [B, C] to embeddings [B, P].
    pub fn project_text(&self, pooled: &Tensor) -> Result<Tensor> {
        match self.projections() {
            Some((_, t)) => t.forward(pooled),
            None => Ok(pooled.clone()),
        }
    }

    /// Projected, unnormalised image features [B, P] from pixel values [B, C, H, W].
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.project_image(&self.image_pooled(pixel_values)?)
    }

    /// Projected, unnormalised text features [B, P] from token ids and the 0/1
    /// attention mask, both [B, T].
    pub fn text_features(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.project_text(&self.text_pooled(input_ids, attention_mask)?)
    }

    /// SigLIP's learned logit bias: its logits are `exp(scale) * cos + bias`
    /// and each pair's probability their sigmoid. `None` for softmax models.
    pub fn logit_bias(&self) -> Option<&Tensor> {
        match self {
            Model::Siglip(m) => Some(&m.logit_bias),
            _ => None,
        }
    }

    /// The raw (log) logit scale parameter; logits use its exponential.
    pub fn logit_scale(&self) -> &Tensor {
        match self {
            Model::Clip(m) => &m.logit_scale,
            Model::ChineseClip(m) => &m.logit_scale,
            Model::DualEncoder(m) => &m.logit_scale,
            Model::Siglip(m) => &m.logit_scale,
        }
    }

    /// Runs the towers' transformer layers in int8 on the CPU: every
    /// attention and MLP linear (dynamic per-token activations, per-channel
    /// weights; see [`int8`]). What stays f32, and why:
    /// - the patch embedding (the first layer; about 1/37 of the image FLOPs);
    /// - the token and position embeddings (lookups, not products);
    /// - the attention products (activations times activations);
    /// - layer norms and the final projections (the pooled vector alone).
    ///
    /// `src` gives weights already quantized (a `clasp quantize` checkpoint)
    /// by name; the others are quantized here.
    pub fn quantize_int8(&mut self, src: layers::Int8Source) -> Result<()> {
        self.layer_stacks()
            .into_iter()
            .try_for_each(|s| s.quantize_int8(src))
    }

    /// The text tower's layers, and the image tower's when loaded.
    fn layer_stacks(&mut self) -> Vec<&mut dyn layers::LayerStack> {
        let (text, vision) = match self {
            Model::Clip(m) => (m.text.layer_stack(), m.vision.as_mut()),
            Model::ChineseClip(m) => (m.text.layer_stack(), m.vision.as_mut()),
            Model::DualEncoder(m) => (m.text.layer_stack(), m.vision.as_mut()),
            Model::Siglip(m) => {
                let mut v = vec![m.text.layer_stack()];
                v.extend(m.vision.as_mut().map(|t| t.layer_stack()));
                return v;
            }
        };
        let mut v = vec![text];
        v.extend(vision.map(|t| t.layer_stack()));
        v
    }

    /// Packs the towers' transformer linears for the prepacked f32 kernels
    /// (see [`packed`]) when this CPU has one; inference only: weights that
    /// change afterwards (training) would not be seen.
    pub fn pack_f32(&mut self) -> Result<()> {
        self.pack_towers(false)
    }

    /// Runs the towers' transformer linears in bf16 (AVX-512 BF16: weights
    /// and activations rounded to bf16, products summed in f32); what stays
    /// f32 is as for [`Self::quantize_int8`].
    pub fn pack_bf16(&mut self) -> Result<()> {
        if !packed::bf16_supported() {
            return Err(crate::Error::Report(
                "--precision bf16 needs a CPU with avx512_bf16 (Zen 4, Intel Cooper Lake and later); \
                 this one lacks it: use f32 or int8"
                    .into(),
            ));
        }
        self.pack_towers(true)
    }

    fn pack_towers(&mut self, bf16: bool) -> Result<()> {
        self.layer_stacks()
            .into_iter()
            .try_for_each(|s| s.pack(bf16))
    }

    /// Packs the image tower's patch embedding for the packed f32 kernel
    /// (inference only, as [`Self::pack_f32`]); it stays f32 at every
    /// precision.
    pub fn pack_patch_f32(&mut self) -> Result<()> {
        let vision = match self {
            Model::Clip(m) => m.vision.as_mut(),
            Model::ChineseClip(m) => m.vision.as_mut(),
            Model::DualEncoder(m) => m.vision.as_mut(),
            Model::Siglip(m) => return m.vision.as_mut().map_or(Ok(()), |v| v.pack_patch_f32()),
        };
        vision.map_or(Ok(()), |v| v.pack_patch_f32())
    }

    /// The linears that [`Self::quantize_int8`] quantizes.
    pub fn int8_linears(&self) -> Vec<&layers::Linear> {
        let (text, vision) = match self {
            Model::Clip(m) => (m.text.layer_stack_ref(), m.vision.as_ref()),
            Model::ChineseClip(m) => (m.text.layer_stack_ref(), m.vision.as_ref()),
            Model::DualEncoder(m) => (m.text.layer_stack_ref(), m.vision.as_ref()),
            Model::Siglip(m) => {
                let mut out = m.text.layer_stack_ref().int8_linears();
                if let Some(v) = &m.vision {
                    out.extend(v.layer_stack_ref().int8_linears());
                }
                return out;
            }
        };
        let mut out = text.int8_linears();
        if let Some(v) = vision {
            out.extend(v.layer_stack_ref().int8_linears());
        }
        out
    }

    /// Replaces the logit scale (mixed precision keeps the f32 one).
    pub fn set_logit_scale(&mut self, t: Tensor) {
        match self {
            Model::Clip(m) => m.logit_scale = t,
            Model::ChineseClip(m) => m.logit_scale = t,
            Model::DualEncoder(m) => m.logit_scale = t,
            Model::Siglip(m) => m.logit_scale = t,
        }
    }
}
