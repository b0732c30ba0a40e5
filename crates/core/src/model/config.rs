//! Model configs as transformers writes them in config.json. Every field has the
//! default that transformers' config class uses, because published configs
//! (Chinese-CLIP's in particular) omit whatever equals the default.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The `model_type` values clasp can build.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "clip",
    "chinese_clip",
    "vision-text-dual-encoder",
    "siglip",
    "siglip2",
];

pub use clasp_kernels::Activation;

macro_rules! default_fns {
    ($($name:ident: $ty:ty = $val:expr;)*) => { $(fn $name() -> $ty { $val })* };
}

default_fns! {
    d_vocab_clip: usize = 49408;
    d_512: usize = 512;
    d_768: usize = 768;
    d_2048: usize = 2048;
    d_3072: usize = 3072;
    d_12: usize = 12;
    d_8: usize = 8;
    d_77: usize = 77;
    d_3: usize = 3;
    d_224: usize = 224;
    d_32: usize = 32;
    d_2: usize = 2;
    d_quick_gelu: Activation = Activation::QuickGelu;
    d_gelu: Activation = Activation::Gelu;
    d_eps_clip: f64 = 1e-5;
    d_eps_bert: f64 = 1e-12;
    d_eos_clip: u32 = 49407;
    d_pad_clip: u32 = 1;
    d_bos_clip: u32 = 49406;
    d_zero: u32 = 0;
    d_vocab_bert: usize = 30522;
    d_logit_scale: f64 = 2.6592;
    d_32000: usize = 32000;
    d_64: usize = 64;
    d_16: usize = 16;
    d_gelu_tanh: Activation = Activation::GeluTanh;
    d_eps_siglip: f64 = 1e-6;
    d_pad_siglip: u32 = 1;
    d_true: bool = true;
}

/// SigLIP's text transformer (`SiglipTextConfig`): learned positions over a
/// fixed 64-token context, no causal mask, pooled at the last position.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiglipTextConfig {
    #[serde(default = "d_32000")]
    pub vocab_size: usize,
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_64")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_gelu_tanh")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps_siglip")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_pad_siglip")]
    pub pad_token_id: u32,
    /// The head's output size; transformers' default is `hidden_size`.
    #[serde(default)]
    pub projection_size: Option<usize>,
}

impl SiglipTextConfig {
    pub fn projection_size(&self) -> usize {
        self.projection_size.unwrap_or(self.hidden_size)
    }
}

/// `SiglipVisionConfig`, with SigLIP's defaults (they differ from CLIP's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiglipVisionConfig {
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_3")]
    pub num_channels: usize,
    #[serde(default = "d_224")]
    pub image_size: usize,
    #[serde(default = "d_16")]
    pub patch_size: usize,
    #[serde(default = "d_gelu_tanh")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps_siglip")]
    pub layer_norm_eps: f64,
    /// The multi-head attention pooling head; without it there is no
    /// pooled output (such towers serve VLMs, not retrieval).
    #[serde(default = "d_true")]
    pub vision_use_head: bool,
    /// SigLIP 2 (NaFlex) only: the position table's size, a square grid.
    /// SigLIP 2 has no `image_size`; its grid is sqrt(num_patches) patches
    /// a side.
    #[serde(default)]
    pub num_patches: Option<usize>,
}

impl SiglipVisionConfig {
    /// The fields the shared ViT code reads, in CLIP's struct.
    pub fn as_vit(&self) -> VisionConfig {
        let image_size = match self.num_patches {
            Some(n) => (n as f64).sqrt().round() as usize * self.patch_size,
            None => self.image_size,
        };
        VisionConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_channels: self.num_channels,
            image_size,
            patch_size: self.patch_size,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
            projection_dim: self.hidden_size,
        }
    }
}

/// `SiglipConfig` and `Siglip2Config` (NaFlex: `num_patches` set, a linear
/// patch embedding over channel-last patches, positions resized per image).
/// There are no projections: each tower's head gives the embedding, so both
/// heads must have one size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiglipConfig {
    pub text_config: SiglipTextConfig,
    pub vision_config: SiglipVisionConfig,
    /// The vision config as the shared ViT code reads it.
    #[serde(skip)]
    pub vit: Option<VisionConfig>,
    /// SigLIP 2 (`model_type: siglip2`).
    #[serde(skip)]
    pub naflex: bool,
}

/// CLIP's causal text transformer (`CLIPTextConfig`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab_clip")]
    pub vocab_size: usize,
    #[serde(default = "d_512")]
    pub hidden_size: usize,
    #[serde(default = "d_2048")]
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_8")]
    pub num_attention_heads: usize,
    #[serde(default = "d_77")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps_clip")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_pad_clip")]
    pub pad_token_id: u32,
    #[serde(default = "d_bos_clip")]
    pub bos_token_id: u32,
    /// `2` is the legacy value of the original OpenAI configs; transformers then
    /// pools at the position of the largest token id (the end-of-text token).
    #[serde(default = "d_eos_clip")]
    pub eos_token_id: u32,
    #[serde(default = "d_512")]
    pub projection_dim: usize,
}

/// The ViT image tower shared by CLIP and Chinese-CLIP (`CLIPVisionConfig`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_3")]
    pub num_channels: usize,
    #[serde(default = "d_224")]
    pub image_size: usize,
    #[serde(default = "d_32")]
    pub patch_size: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps_clip")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_512")]
    pub projection_dim: usize,
}

/// Chinese-CLIP's BERT/RoBERTa text tower (`ChineseCLIPTextConfig`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertConfig {
    #[serde(default = "d_vocab_bert")]
    pub vocab_size: usize,
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "d_gelu")]
    pub hidden_act: Activation,
    #[serde(default = "d_512")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_2")]
    pub type_vocab_size: usize,
    #[serde(default = "d_eps_bert")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_zero")]
    pub pad_token_id: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: VisionConfig,
    #[serde(default = "d_512")]
    pub projection_dim: usize,
    #[serde(default = "d_logit_scale")]
    pub logit_scale_init_value: f64,
    /// OpenAI CLIP's ResNet image towers (open_clip's RN50 family; a
    /// `vision_config` of model_type `open_clip_modified_resnet`, which only
    /// clasp reads) in place of the ViT; `vision_config` then holds the
    /// embedding width as `hidden_size`.
    #[serde(skip)]
    pub image_cnn: Option<super::cnn_tower::CnnConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChineseClipConfig {
    pub text_config: BertConfig,
    pub vision_config: VisionConfig,
    #[serde(default = "d_512")]
    pub projection_dim: usize,
    #[serde(default = "d_logit_scale")]
    pub logit_scale_init_value: f64,
    /// Dual encoders only, a clasp key: `"mean"` pools the text tower's
    /// token states over the real tokens (as sentence-transformers models
    /// were trained) instead of BERT's pooler. transformers ignores the key
    /// and pools with the pooler, so such a checkpoint's text embeddings
    /// differ there.
    #[serde(default, rename = "clasp_text_pooling")]
    pub text_pooling: TextPooling,
    /// Dual encoders only: a pretrained CNN image tower (`vision_config`
    /// of model_type `mobilenet_v2`, `resnet` or `efficientnet_lite`) in
    /// place of the ViT; then
    /// `vision_config` holds only its image size, channels and feature
    /// width (`hidden_size`).
    #[serde(skip)]
    pub image_cnn: Option<super::cnn_tower::CnnConfig>,
}

/// How a dual encoder pools its BERT text tower.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextPooling {
    /// tanh(dense([CLS])), transformers' `pooler_output`.
    #[default]
    Pooler,
    /// The mean of the last hidden states over the attention mask.
    Mean,
}

impl std::str::FromStr for TextPooling {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pooler" => Ok(Self::Pooler),
            "mean" => Ok(Self::Mean),
            other => Err(format!("unknown text pooling `{other}` (pooler or mean)")),
        }
    }
}

/// A parsed config.json, one variant per supported architecture.
/// transformers' `VisionTextDualEncoderConfig`, with the towers clasp builds
/// (a CLIP vision tower and a BERT text tower): the same fields as
/// Chinese-CLIP's config.
pub type DualEncoderConfig = ChineseClipConfig;

#[derive(Debug, Clone)]
pub enum ModelConfig {
    Clip(ClipConfig),
    ChineseClip(ChineseClipConfig),
    DualEncoder(DualEncoderConfig),
    Siglip(SiglipConfig),
}

/// The sub-model types of each tower, which `vision-text-dual-encoder`
/// configs name and clasp checks.
#[derive(Deserialize)]
struct DualHead {
    vision_config: TowerHead,
    text_config: TowerHead,
}

#[derive(Deserialize)]
struct TowerHead {
    model_type: Option<String>,
}

#[derive(Deserialize)]
struct Head {
    model_type: Option<String>,
}

/// A CNN image tower named by `raw`'s `vision_config`: its own config,
/// with `vision_config` replaced by only what the rest of clasp reads of an
/// image tower. `None` (and `raw` untouched) for a ViT.
fn take_cnn(
    raw: &mut serde_json::Value,
    path: &Path,
) -> Result<Option<super::cnn_tower::CnnConfig>> {
    let Some(parsed) = super::cnn_tower::parse_vision_config(&raw["vision_config"]) else {
        return Ok(None);
    };
    let (cnn, vit) = parsed.map_err(|reason| Error::Config {
        path: path.to_path_buf(),
        reason: format!("vision_config: {reason}"),
    })?;
    raw["vision_config"] = serde_json::to_value(&vit).expect("a config serialises");
    Ok(Some(cnn))
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses config.json text; `path` is only used to name the input in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |e: serde_json::Error| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let head: Head = serde_json::from_str(text).map_err(bad)?;
        let model_type = head.model_type.unwrap_or_default();
        match model_type.as_str() {
            "clip" => {
                let mut raw: serde_json::Value = serde_json::from_str(text).map_err(bad)?;
                let cnn = take_cnn(&mut raw, path)?;
                let mut c: ClipConfig = serde_json::from_value(raw).map_err(bad)?;
                c.image_cnn = cnn;
                Ok(ModelConfig::Clip(c))
            }
            "chinese_clip" => Ok(ModelConfig::ChineseClip(
                serde_json::from_str(text).map_err(bad)?,
            )),
            "vision-text-dual-encoder" => {
                let towers: DualHead = serde_json::from_str(text).map_err(bad)?;
                let v = towers.vision_config.model_type.unwrap_or_default();
                let t = towers.text_config.model_type.unwrap_or_default();
                let cnn = super::cnn_tower::MODEL_TYPES.contains(&v.as_str());
                if !(v == "clip_vision_model" || cnn) || t != "bert" {
                    return Err(Error::UnsupportedArchitecture {
                        path: path.to_path_buf(),
                        model_type: format!("vision-text-dual-encoder of {v} and {t}"),
                        supported: "vision-text-dual-encoder of clip_vision_model, \
                                    mobilenet_v2, resnet or efficientnet_lite, and bert"
                            .into(),
                    });
                }
                if !cnn {
                    return Ok(ModelConfig::DualEncoder(
                        serde_json::from_str(text).map_err(bad)?,
                    ));
                }
                let mut raw: serde_json::Value = serde_json::from_str(text).map_err(bad)?;
                let cnn = take_cnn(&mut raw, path)?;
                let mut c: DualEncoderConfig = serde_json::from_value(raw).map_err(bad)?;
                c.image_cnn = cnn;
                Ok(ModelConfig::DualEncoder(c))
            }
            "siglip" | "siglip2" => {
                let mut c: SiglipConfig = serde_json::from_str(text).map_err(bad)?;
                c.naflex = model_type == "siglip2";
                if c.naflex {
                    let n = c.vision_config.num_patches.unwrap_or(256);
                    let g = (n as f64).sqrt().round() as usize;
                    if g * g != n {
                        return Err(Error::Config {
                            path: path.to_path_buf(),
                            reason: format!("num_patches {n} is not a square grid"),
                        });
                    }
                    c.vision_config.num_patches = Some(n);
                }
                let (v, t) = (&c.vision_config, &c.text_config);
                if !v.vision_use_head {
                    return Err(Error::Config {
                        path: path.to_path_buf(),
                        reason:
                            "vision_use_head is false: this SigLIP vision tower has no pooling \
                                 head, so it gives no image embedding"
                                .into(),
                    });
                }
                if v.hidden_size != t.projection_size() {
                    return Err(Error::Config {
                        path: path.to_path_buf(),
                        reason: format!(
                            "the vision head gives {} values and the text head {}; SigLIP compares them directly",
                            v.hidden_size,
                            t.projection_size()
                        ),
                    });
                }
                c.vit = Some(c.vision_config.as_vit());
                Ok(ModelConfig::Siglip(c))
            }
            other => Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                model_type: if other.is_empty() {
                    "<missing model_type>".into()
                } else {
                    other.into()
                },
                supported: SUPPORTED_MODEL_TYPES.join(", "),
            }),
        }
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::Clip(_) => "clip",
            ModelConfig::ChineseClip(_) => "chinese_clip",
            ModelConfig::DualEncoder(_) => "vision-text-dual-encoder",
            ModelConfig::Siglip(c) if c.naflex => "siglip2",
            ModelConfig::Siglip(_) => "siglip",
        }
    }

    pub fn vision(&self) -> &VisionConfig {
        match self {
            ModelConfig::Clip(c) => &c.vision_config,
            ModelConfig::ChineseClip(c) => &c.vision_config,
            ModelConfig::DualEncoder(c) => &c.vision_config,
            ModelConfig::Siglip(c) => c.vit.as_ref().expect("set when parsed"),
        }
    }

    pub fn projection_dim(&self) -> usize {
        match self {
            ModelConfig::Clip(c) => c.projection_dim,
            ModelConfig::ChineseClip(c) => c.projection_dim,
            ModelConfig::DualEncoder(c) => c.projection_dim,
            ModelConfig::Siglip(c) => c.text_config.projection_size(),
        }
    }

    /// Whether the image tower takes NaFlex patches (SigLIP 2): the aspect
    /// kept under a patch budget, positions resized per image.
    pub fn is_naflex(&self) -> bool {
        matches!(self, ModelConfig::Siglip(c) if c.vision_config.num_patches.is_some())
    }

    /// Whether the text tower reads the whole padded context without a mask
    /// (SigLIP, SigLIP 2), so token batches must keep their full padding.
    pub fn reads_full_context(&self) -> bool {
        matches!(self, ModelConfig::Siglip(_))
    }

    /// The text context the model was trained with: CLIP's position table (77),
    /// and Chinese-CLIP's 52 (its BERT table has 512 rows, but the published
    /// models were trained and are used with 52 tokens). A BERT text tower of a
    /// dual encoder gets CLIP's 77 (captions are short; BERT allows 512).
    pub fn text_context_length(&self) -> usize {
        match self {
            ModelConfig::Clip(c) => c.text_config.max_position_embeddings,
            ModelConfig::ChineseClip(c) => c.text_config.max_position_embeddings.min(52),
            ModelConfig::DualEncoder(c) => c.text_config.max_position_embeddings.min(77),
            // SigLIP pads every text to its whole position table (64), as
            // it was trained, and reads the last position.
            ModelConfig::Siglip(c) => c.text_config.max_position_embeddings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chinese_clip_config_fills_transformers_defaults() {
        let json = r#"{"model_type":"chinese_clip","text_config":{"vocab_size":21128},
                       "vision_config":{"patch_size":16}}"#;
        let ModelConfig::ChineseClip(c) =
            ModelConfig::from_json(json, Path::new("c.json")).unwrap()
        else {
            panic!("wrong variant")
        };
        assert_eq!(c.text_config.hidden_size, 768);
        assert_eq!(c.text_config.layer_norm_eps, 1e-12);
        assert_eq!(c.text_config.hidden_act, Activation::Gelu);
        assert_eq!(c.vision_config.patch_size, 16);
        assert_eq!(c.vision_config.hidden_act, Activation::QuickGelu);
        assert_eq!(c.projection_dim, 512);
    }

    #[test]
    fn unsupported_model_type_lists_supported_ones() {
        let err = ModelConfig::from_json(r#"{"model_type":"blip"}"#, Path::new("x/config.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("blip"), "{err}");
        assert!(
            err.contains("clip, chinese_clip, vision-text-dual-encoder, siglip, siglip2"),
            "{err}"
        );
        assert!(err.contains("x/config.json"), "{err}");
    }
}
