//! The pretrained CNN image towers as one kind of tower: torchvision's
//! MobileNetV2 and ResNets and EfficientNet-Lite, with the config a
//! checkpoint's `vision_config` holds, the ImageNet preprocessing each was
//! trained with, and a reader that tells them apart by their weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::VisionConfig;
use super::convnext::{ConvNext, ConvNextConfig};
use super::efficientnet_lite::{EfficientNetLite, EfficientNetLiteConfig};
use super::mobilenet_v2::{MobileNetV2, MobileNetV2Config};
use super::modified_resnet::{ModifiedResNet, ModifiedResNetConfig};
use super::resnet::{ResNet, ResNetConfig};
use crate::preprocess::ImageProcessorConfig;
use crate::{Error, Result};

/// A CNN tower's config, by family.
#[derive(Debug, Clone, PartialEq)]
pub enum CnnConfig {
    MobileNetV2(MobileNetV2Config),
    ResNet(ResNetConfig),
    EfficientNetLite(EfficientNetLiteConfig),
    /// OpenAI CLIP's ResNets in open_clip's names (a clasp model_type,
    /// `open_clip_modified_resnet`): pooled by attention to the embedding.
    ModifiedResNet(ModifiedResNetConfig),
    /// timm's ConvNeXt under open_clip's projection (a clasp model_type,
    /// `open_clip_timm_convnext`): its output is the embedding.
    ConvNext(ConvNextConfig),
}

/// The `vision_config` model types that name a CNN tower.
pub const MODEL_TYPES: [&str; 5] = [
    "mobilenet_v2",
    "resnet",
    "efficientnet_lite",
    "open_clip_modified_resnet",
    "open_clip_timm_convnext",
];

impl CnnConfig {
    /// The pooled feature's width.
    pub fn features(&self) -> usize {
        match self {
            CnnConfig::MobileNetV2(_) => super::mobilenet_v2::FEATURES,
            CnnConfig::ResNet(c) => c.features(),
            CnnConfig::EfficientNetLite(_) => super::efficientnet_lite::FEATURES,
            CnnConfig::ModifiedResNet(c) => c.output_dim,
            CnnConfig::ConvNext(c) => c.output_dim,
        }
    }

    /// "MobileNetV2", "ResNet-50", "EfficientNet-Lite0".
    pub fn name(&self) -> String {
        match self {
            CnnConfig::MobileNetV2(_) => "MobileNetV2".into(),
            CnnConfig::ResNet(c) => c.name(),
            CnnConfig::EfficientNetLite(c) => c.name(),
            CnnConfig::ModifiedResNet(c) => c.name(),
            CnnConfig::ConvNext(c) => format!("timm {}", c.timm_model_name),
        }
    }

    fn image_size(&self) -> usize {
        match self {
            CnnConfig::MobileNetV2(c) => c.image_size,
            CnnConfig::ResNet(_) => 224,
            CnnConfig::EfficientNetLite(c) => c.image_size,
            CnnConfig::ModifiedResNet(c) => c.image_size,
            CnnConfig::ConvNext(c) => c.image_size,
        }
    }

    fn num_channels(&self) -> usize {
        match self {
            CnnConfig::MobileNetV2(c) => c.num_channels,
            CnnConfig::ResNet(c) => c.num_channels,
            CnnConfig::EfficientNetLite(c) => c.num_channels,
            CnnConfig::ModifiedResNet(_) | CnnConfig::ConvNext(_) => 3,
        }
    }

    /// The preprocessing the pretrained weights were trained with:
    /// torchvision's ImageNet transform, or for EfficientNet-Lite (from
    /// TensorFlow) the same crop with `(x - 127) / 128`.
    pub fn processor(&self) -> ImageProcessorConfig {
        let base = ImageProcessorConfig::imagenet_default();
        match self {
            CnnConfig::EfficientNetLite(c) => {
                let crop = c.image_size as u32;
                ImageProcessorConfig {
                    mean: [127.0 / 255.0; 3],
                    std: [128.0 / 255.0; 3],
                    crop: (crop, crop),
                    // torchvision's 256/224 ratio at the model's own size.
                    resize: crate::preprocess::image::ResizeTo::ShortestEdge(crop * 256 / 224),
                    ..base
                }
            }
            // OpenAI CLIP's: bicubic to the model's size, CLIP's mean/std.
            CnnConfig::ModifiedResNet(ModifiedResNetConfig { image_size, .. })
            | CnnConfig::ConvNext(ConvNextConfig { image_size, .. }) => ImageProcessorConfig {
                crop_rounding: base.crop_rounding,
                ..ImageProcessorConfig::clip_default(*image_size as u32)
            },
            _ => base,
        }
    }

    /// The ViT-shaped [`VisionConfig`] the rest of clasp reads of an image
    /// tower: its feature width as `hidden_size`, its image size and
    /// channels, and `patch_size` 32 (the last map's stride).
    pub fn vision_config(&self) -> VisionConfig {
        let stub = serde_json::json!({
            "hidden_size": self.features(),
            "image_size": self.image_size(),
            "num_channels": self.num_channels(),
            "patch_size": 32,
        });
        serde_json::from_value(stub).expect("a VisionConfig has defaults for the rest")
    }

    /// This config as a `vision_config` (its family's keys, `model_type`,
    /// and `hidden_size`, the feature width `VisionTextDualEncoderModel`
    /// reads), which [`parse_vision_config`] reads back.
    pub fn to_vision_json(&self) -> serde_json::Value {
        let (mut v, ty) = match self {
            CnnConfig::MobileNetV2(c) => (serde_json::to_value(c), "mobilenet_v2"),
            CnnConfig::ResNet(c) => (serde_json::to_value(c), "resnet"),
            CnnConfig::EfficientNetLite(c) => (serde_json::to_value(c), "efficientnet_lite"),
            CnnConfig::ModifiedResNet(c) => (serde_json::to_value(c), "open_clip_modified_resnet"),
            CnnConfig::ConvNext(c) => (serde_json::to_value(c), "open_clip_timm_convnext"),
        };
        let v = v.as_mut().expect("a config serialises");
        v["model_type"] = serde_json::json!(ty);
        v["hidden_size"] = serde_json::json!(self.features());
        v.clone()
    }
}

/// A `vision_config` naming a CNN tower read: the tower's config, checked,
/// and the ViT-shaped [`VisionConfig`] the rest of clasp reads of an image
/// tower (its feature width as `hidden_size`, its image size and channels;
/// `patch_size` 32, the last map's stride). `None` when the model type is
/// not a CNN's.
pub fn parse_vision_config(
    v: &serde_json::Value,
) -> Option<std::result::Result<(CnnConfig, VisionConfig), String>> {
    let ty = v.get("model_type").and_then(|t| t.as_str())?;
    fn de<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> std::result::Result<T, String> {
        serde_json::from_value(v.clone()).map_err(|e| e.to_string())
    }
    let cnn = match ty {
        "mobilenet_v2" => {
            de(v).and_then(|c: MobileNetV2Config| c.check().map(|_| CnnConfig::MobileNetV2(c)))
        }
        "resnet" => de(v).and_then(|c: ResNetConfig| c.check().map(|_| CnnConfig::ResNet(c))),
        "efficientnet_lite" => de(v).and_then(|c: EfficientNetLiteConfig| {
            c.check().map(|_| CnnConfig::EfficientNetLite(c))
        }),
        "open_clip_modified_resnet" => de(v)
            .and_then(|c: ModifiedResNetConfig| c.check().map(|_| CnnConfig::ModifiedResNet(c))),
        "open_clip_timm_convnext" => {
            de(v).and_then(|c: ConvNextConfig| c.check().map(|_| CnnConfig::ConvNext(c)))
        }
        _ => return None,
    };
    Some(cnn.map(|cnn| {
        let vit = cnn.vision_config();
        (cnn, vit)
    }))
}

/// A CNN tower, by family.
#[derive(Debug, Clone)]
pub enum CnnTower {
    MobileNetV2(MobileNetV2),
    ResNet(ResNet),
    EfficientNetLite(EfficientNetLite),
    /// Boxed: its attention pool makes it the largest.
    ModifiedResNet(Box<ModifiedResNet>),
    ConvNext(Box<ConvNext>),
}

impl CnnTower {
    /// `vb` points at the tower's root (`vision_model` in a dual encoder).
    pub fn load(vb: VarBuilder, cfg: &CnnConfig) -> Result<Self> {
        Ok(match cfg {
            CnnConfig::MobileNetV2(c) => CnnTower::MobileNetV2(MobileNetV2::load(vb, c)?),
            CnnConfig::ResNet(c) => CnnTower::ResNet(ResNet::load(vb, c)?),
            CnnConfig::EfficientNetLite(c) => {
                CnnTower::EfficientNetLite(EfficientNetLite::load(vb, c)?)
            }
            CnnConfig::ModifiedResNet(c) => {
                CnnTower::ModifiedResNet(Box::new(ModifiedResNet::load(vb, c)?))
            }
            CnnConfig::ConvNext(c) => CnnTower::ConvNext(Box::new(ConvNext::load(vb, c)?)),
        })
    }

    /// The last feature map [B, C, H/32, W/32] from normalised pixels.
    pub fn feature_map(&self, pixel_values: &Tensor) -> Result<Tensor> {
        match self {
            CnnTower::MobileNetV2(m) => m.feature_map(pixel_values),
            CnnTower::ResNet(m) => m.feature_map(pixel_values),
            CnnTower::EfficientNetLite(m) => m.feature_map(pixel_values),
            CnnTower::ModifiedResNet(m) => m.feature_map(pixel_values),
            CnnTower::ConvNext(m) => m.feature_map(pixel_values),
        }
    }

    /// The feature map's positions as tokens [B, H·W, C], in row-major
    /// order (what a connector or a Q-Former reads of a CNN).
    pub fn feature_tokens(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let m = self.feature_map(pixel_values)?;
        Ok(m.flatten_from(2)?.transpose(1, 2)?.contiguous()?)
    }

    /// The pooled feature [B, C]: the feature map's average, or for CLIP's
    /// ResNets their attention pooling (the embedding itself).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        match self {
            CnnTower::ModifiedResNet(m) => m.forward(pixel_values),
            CnnTower::ConvNext(m) => m.forward(pixel_values),
            _ => super::cnn::global_avg_pool(&self.feature_map(pixel_values)?),
        }
    }
}

/// A pretrained ImageNet checkpoint of any of the towers (`.pth` in either
/// `torch.save` format, or safetensors), told apart by its keys: its config
/// and its tensors in the tower's names (`classifier.*` for the ImageNet
/// head, when it has one). A state dict already in the tower's names
/// (transformers' for MobileNetV2) is taken as it is.
pub fn read_pretrained(path: &Path) -> Result<(CnnConfig, HashMap<String, Tensor>)> {
    let raw = super::torch_file::read_state_dict(path)?;
    let bad = |reason: String| Error::Weights {
        path: path.to_path_buf(),
        reason,
    };
    if raw.contains_key("features.0.0.weight")
        || raw.contains_key("conv_stem.first_conv.convolution.weight")
    {
        let t = super::mobilenet_v2::from_torchvision_dict(raw).map_err(bad)?;
        return Ok((CnnConfig::MobileNetV2(MobileNetV2Config::torchvision()), t));
    }
    if raw.contains_key("conv1.weight") && raw.contains_key("layer1.0.conv1.weight") {
        let (c, t) = super::resnet::from_torchvision_dict(raw).map_err(bad)?;
        return Ok((CnnConfig::ResNet(c), t));
    }
    if raw.contains_key("_conv_stem.weight") {
        if raw.keys().any(|k| k.contains("_se_reduce")) {
            return Err(bad(
                "an EfficientNet with squeeze-excitation (B0-B7): only the Lite models are \
                 supported"
                    .into(),
            ));
        }
        let blocks = (0..)
            .take_while(|i| raw.contains_key(&format!("_blocks.{i}._project_conv.weight")))
            .count();
        let cfg = (0..5)
            .filter_map(EfficientNetLiteConfig::lite)
            .find(|c| c.block_count() == blocks)
            .ok_or_else(|| {
                bad(format!(
                    "an EfficientNet-Lite of {blocks} blocks (Lite0-4 have 16-30)"
                ))
            })?;
        let mut t = HashMap::with_capacity(raw.len());
        for (k, v) in raw {
            let k = match k.strip_prefix("_fc.") {
                Some(p) => format!("classifier.{p}"),
                None => k,
            };
            t.insert(k, v);
        }
        return Ok((CnnConfig::EfficientNetLite(cfg), t));
    }
    let mut keys: Vec<&String> = raw.keys().collect();
    keys.sort();
    keys.truncate(5);
    Err(bad(format!(
        "not a torchvision MobileNetV2 or ResNet, nor an EfficientNet-Lite state dict \
         (keys such as {})",
        keys.iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// A pretrained CNN file's tower (its head left out) and config.
pub fn load_pretrained(path: &Path, device: &candle_core::Device) -> Result<(CnnTower, CnnConfig)> {
    let (cfg, t) = read_pretrained(path)?;
    let vb = VarBuilder::from_tensors(t, candle_core::DType::F32, device);
    Ok((CnnTower::load(vb, &cfg)?, cfg))
}

/// torchvision's ImageNet-1k class names, in the classifiers' order (the
/// order of every ImageNet-1k model here, TensorFlow's included).
pub const IMAGENET_CLASSES: &str = include_str!("imagenet_classes.txt");

/// A pretrained CNN with its own ImageNet head: the model's own 1000
/// labels, no prompts (`clasp classify --imagenet`).
#[derive(Debug, Clone)]
pub struct ImageNetClassifier {
    tower: CnnTower,
    head: super::layers::Linear,
    labels: Vec<&'static str>,
    config: CnnConfig,
}

impl ImageNetClassifier {
    /// A checkpoint [`read_pretrained`] reads, its ImageNet head included.
    pub fn load(path: &Path, device: &candle_core::Device) -> Result<Self> {
        let (config, t) = read_pretrained(path)?;
        if !t.contains_key("classifier.weight") {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                reason: "no ImageNet classifier (fc, classifier.1 or _fc) in this checkpoint"
                    .into(),
            });
        }
        let vb = VarBuilder::from_tensors(t, candle_core::DType::F32, device);
        let labels: Vec<&'static str> = IMAGENET_CLASSES.lines().collect();
        Ok(Self {
            tower: CnnTower::load(vb.clone(), &config)?,
            head: super::layers::Linear::load(
                vb.pp("classifier"),
                config.features(),
                labels.len(),
                true,
            )?,
            labels,
            config,
        })
    }

    /// The class probabilities [B, 1000] of pixels normalised by
    /// [`Self::processor`].
    pub fn probabilities(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let logits = self.head.forward(&self.tower.forward(pixel_values)?)?;
        Ok(candle_nn::ops::softmax_last_dim(&logits)?)
    }

    pub fn labels(&self) -> &[&'static str] {
        &self.labels
    }

    pub fn config(&self) -> &CnnConfig {
        &self.config
    }

    /// The preprocessing the weights expect.
    pub fn processor(&self) -> ImageProcessorConfig {
        self.config.processor()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family's config goes to a `vision_config` and back.
    #[test]
    fn vision_configs_round_trip() {
        for c in [
            CnnConfig::MobileNetV2(MobileNetV2Config::torchvision()),
            CnnConfig::ResNet(ResNetConfig::torchvision(50).unwrap()),
            CnnConfig::EfficientNetLite(EfficientNetLiteConfig::lite(0).unwrap()),
            CnnConfig::ModifiedResNet(ModifiedResNetConfig {
                layers: vec![3, 4, 6, 3],
                width: 64,
                head_width: 64,
                image_size: 224,
                output_dim: 1024,
            }),
        ] {
            let j = c.to_vision_json();
            let (back, vit) = parse_vision_config(&j).unwrap().unwrap();
            assert_eq!(back, c);
            assert_eq!(vit.hidden_size, c.features());
            assert_eq!(j["hidden_size"], c.features());
        }
        assert!(
            parse_vision_config(&serde_json::json!({"model_type": "clip_vision_model"})).is_none()
        );
        let bad = serde_json::json!({"model_type": "resnet", "hidden_sizes": [64], "depths": [1], "hidden_act": "gelu"});
        assert!(parse_vision_config(&bad)
            .unwrap()
            .unwrap_err()
            .contains("gelu"));
    }
}
