//! Image processors' configs as transformers writes them (preprocessor_config.json, every supported processor class), read and written back.

use super::*;

/// Image-processor class names clasp accepts, old `*FeatureExtractor` names included.
pub const SUPPORTED_PROCESSORS: &[&str] = &[
    "CLIPImageProcessor",
    "CLIPImageProcessorFast",
    "CLIPImageProcessorPil",
    "CLIPFeatureExtractor",
    "ChineseCLIPImageProcessor",
    "ChineseCLIPImageProcessorFast",
    "ChineseCLIPImageProcessorPil",
    "ChineseCLIPFeatureExtractor",
    "SiglipImageProcessor",
    "SiglipImageProcessorFast",
    "SiglipImageProcessorPil",
    "Siglip2ImageProcessor",
    "Siglip2ImageProcessorFast",
    "Siglip2ImageProcessorPil",
    "BlipImageProcessor",
    "BlipImageProcessorFast",
    "BlipImageProcessorPil",
    "Emu3ImageProcessor",
    // The base image and each tile as CLIP's; the grid is config.json's.
    "LlavaNextImageProcessor",
    "LlavaNextImageProcessorFast",
    "LlavaNextImageProcessorPil",
];

/// How to resize before any crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// Scale so the shorter edge has this length, keeping the aspect ratio
    /// (CLIPImageProcessor).
    ShortestEdge(u32),
    /// Resize straight to this size, ignoring the aspect ratio
    /// (ChineseCLIPImageProcessor).
    Exact { height: u32, width: u32 },
    /// Keep the aspect ratio with each side a multiple of `patch` and at
    /// most `max_patches` patches (SigLIP 2's NaFlex rule; clasp's
    /// `--keep-aspect`).
    PatchBudget { patch: u32, max_patches: u32 },
    /// Keep the aspect ratio with each side a multiple of `factor` and the
    /// area between `min_pixels` and `max_pixels` (Emu3ImageProcessor's
    /// `smart_resize`).
    PixelBudget {
        factor: u32,
        min_pixels: u32,
        max_pixels: u32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub resize: ResizeTo,
    pub do_center_crop: bool,
    pub crop: (u32, u32),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// Pillow's filter for the resize (and random crops in training).
    pub resample: crate::preprocess::resample::Filter,
    /// How the center crop's offsets round (transformers' floor, or
    /// torchvision's round-half-even that open_clip's transform uses).
    pub crop_rounding: CropRounding,
}

/// How a center crop places an odd margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropRounding {
    /// transformers: `(size - crop) // 2`.
    Floor,
    /// torchvision's `CenterCrop` (open_clip): `int(round((size - crop) / 2))`,
    /// Python's round, so a .5 goes to the even neighbour.
    Torchvision,
}

impl CropRounding {
    /// The offset of a crop of `crop` from `size` (negative: the crop is
    /// larger and the image sits inside it, centred as each library pads).
    pub fn offset(self, size: u32, crop: u32) -> i64 {
        let d = size as i64 - crop as i64;
        match self {
            Self::Floor => d.div_euclid(2),
            Self::Torchvision if d >= 0 => {
                let k = d / 2;
                if d % 2 == 1 && k % 2 == 1 {
                    k + 1
                } else {
                    k
                }
            }
            // torchvision pads (crop - size) // 2 before the image first.
            Self::Torchvision => -((-d) / 2),
        }
    }
}

impl ImageProcessorConfig {
    /// A stable byte encoding of every field, for cache keys: explicit,
    /// little-endian, with a version tag, so it never depends on `Debug`
    /// output. Bump the version when a field is added; old keys then miss.
    pub fn key_bytes(&self) -> Vec<u8> {
        let mut v = b"clasp-image-processor-v3\0".to_vec();
        // The JPEG decoder's pixels differ by a level here and there, so
        // vectors cached under one are not the other's.
        v.extend_from_slice(super::JPEG_DECODER.as_bytes());
        v.push(0);
        let flag = |v: &mut Vec<u8>, b: bool| v.push(b as u8);
        flag(&mut v, self.do_convert_rgb);
        flag(&mut v, self.do_resize);
        match self.resize {
            ResizeTo::ShortestEdge(e) => {
                v.push(0);
                v.extend_from_slice(&e.to_le_bytes());
            }
            ResizeTo::Exact { height, width } => {
                v.push(1);
                v.extend_from_slice(&height.to_le_bytes());
                v.extend_from_slice(&width.to_le_bytes());
            }
            ResizeTo::PatchBudget { patch, max_patches } => {
                v.push(2);
                v.extend_from_slice(&patch.to_le_bytes());
                v.extend_from_slice(&max_patches.to_le_bytes());
            }
            ResizeTo::PixelBudget {
                factor,
                min_pixels,
                max_pixels,
            } => {
                v.push(3);
                for x in [factor, min_pixels, max_pixels] {
                    v.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        flag(&mut v, self.do_center_crop);
        v.extend_from_slice(&self.crop.0.to_le_bytes());
        v.extend_from_slice(&self.crop.1.to_le_bytes());
        flag(&mut v, self.do_rescale);
        v.extend_from_slice(&self.rescale_factor.to_le_bytes());
        flag(&mut v, self.do_normalize);
        for x in self.mean.iter().chain(&self.std) {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.extend_from_slice(&self.resample.pil_number().to_le_bytes());
        // Appended only when not transformers' floor, so every key made
        // before this field existed stays as it was.
        if self.crop_rounding == CropRounding::Torchvision {
            v.extend_from_slice(b"crop:torchvision");
        }
        v
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum SizeJson {
    Int(u32),
    Dict {
        shortest_edge: Option<u32>,
        height: Option<u32>,
        width: Option<u32>,
    },
}

#[derive(Deserialize)]
pub(super) struct RawProcessor {
    image_processor_type: Option<String>,
    feature_extractor_type: Option<String>,
    do_convert_rgb: Option<bool>,
    do_resize: Option<bool>,
    size: Option<SizeJson>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<SizeJson>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<[f64; 3]>,
    image_std: Option<[f64; 3]>,
    /// Siglip2ImageProcessor's NaFlex budget.
    patch_size: Option<u32>,
    max_num_patches: Option<u32>,
    /// Emu3ImageProcessor's pixel budget.
    spatial_factor: Option<u32>,
    min_pixels: Option<u32>,
    max_pixels: Option<u32>,
    /// clasp's own key: "torchvision" for open_clip's center crop.
    clasp_crop_rounding: Option<String>,
}

pub(super) const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub(super) const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

impl ImageProcessorConfig {
    /// CLIPImageProcessor's defaults for an image size.
    pub fn clip_default(size: u32) -> Self {
        Self {
            do_convert_rgb: true,
            do_resize: true,
            resize: ResizeTo::ShortestEdge(size),
            do_center_crop: true,
            crop: (size, size),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            resample: crate::preprocess::resample::Filter::Bicubic,
            crop_rounding: CropRounding::Floor,
        }
    }

    /// torchvision's ImageNet eval transform (`Resize(256)`,
    /// `CenterCrop(224)`, ImageNet mean and deviation), which its pretrained
    /// classifiers (MobileNetV2, ResNet) were measured with: bilinear as
    /// torchvision's `Resize` on a PIL image, crop offsets rounded as
    /// torchvision's `CenterCrop`.
    pub fn imagenet_default() -> Self {
        Self {
            resize: ResizeTo::ShortestEdge(256),
            crop: (224, 224),
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            resample: crate::preprocess::resample::Filter::Bilinear,
            crop_rounding: CropRounding::Torchvision,
            ..Self::clip_default(224)
        }
    }

    /// The preprocessor_config.json that transformers reads back as this
    /// config (CLIPImageProcessor, or ChineseCLIPImageProcessor for an
    /// exact resize), bicubic as both use.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let crop = |kind: &str, size: serde_json::Value| {
            serde_json::json!({
                "image_processor_type": kind,
                "do_resize": self.do_resize, "size": size,
                "do_center_crop": self.do_center_crop,
                "crop_size": {"height": self.crop.0, "width": self.crop.1},
            })
        };
        let mut out = match self.resize {
            ResizeTo::ShortestEdge(e) => crop(
                "CLIPImageProcessor",
                serde_json::json!({"shortest_edge": e}),
            ),
            ResizeTo::Exact { height, width } => crop(
                "ChineseCLIPImageProcessor",
                serde_json::json!({"height": height, "width": width}),
            ),
            // The aspect kept under a patch budget: Siglip2ImageProcessor's
            // NaFlex keys (which `from_json` reads back).
            ResizeTo::PatchBudget { patch, max_patches } => serde_json::json!({
                "image_processor_type": "Siglip2ImageProcessor",
                "patch_size": patch, "max_num_patches": max_patches,
            }),
            ResizeTo::PixelBudget {
                factor,
                min_pixels,
                max_pixels,
            } => serde_json::json!({
                "image_processor_type": "Emu3ImageProcessor",
                "spatial_factor": factor, "min_pixels": min_pixels, "max_pixels": max_pixels,
            }),
        };
        let common = serde_json::json!({
            "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": self.mean, "image_std": self.std,
            "do_convert_rgb": self.do_convert_rgb, "resample": self.resample.pil_number()
        });
        for (k, v) in common.as_object().expect("an object") {
            out[k] = v.clone();
        }
        if self.crop_rounding == CropRounding::Torchvision {
            // transformers ignores it (and crops with floor offsets).
            out["clasp_crop_rounding"] = "torchvision".into();
        }
        out
    }

    /// SiglipImageProcessor's: straight resize, no crop, and 0.5 for every
    /// channel's mean and deviation (pixels to [-1, 1]).
    pub fn siglip_default(size: u32) -> Self {
        Self {
            mean: [0.5; 3],
            std: [0.5; 3],
            ..Self::chinese_clip_default(size)
        }
    }

    /// Siglip2ImageProcessor's NaFlex defaults: the aspect ratio kept with
    /// at most `max_patches` patches of `patch` pixels, bilinear, 0.5/0.5.
    pub fn siglip2_default(patch: u32, max_patches: u32) -> Self {
        Self {
            resize: ResizeTo::PatchBudget { patch, max_patches },
            resample: crate::preprocess::resample::Filter::Bilinear,
            ..Self::siglip_default(patch)
        }
    }

    /// ChineseCLIPImageProcessor's behaviour: straight resize, no crop.
    pub fn chinese_clip_default(size: u32) -> Self {
        Self {
            resize: ResizeTo::Exact {
                height: size,
                width: size,
            },
            do_center_crop: false,
            ..Self::clip_default(size)
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let raw: RawProcessor = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let kind = raw
            .image_processor_type
            .or(raw.feature_extractor_type)
            .unwrap_or_else(|| "CLIPImageProcessor".into());
        if !SUPPORTED_PROCESSORS.contains(&kind.as_str()) {
            return Err(bad(format!(
                "unsupported image processor `{kind}`; supported: {}",
                SUPPORTED_PROCESSORS.join(", ")
            )));
        }
        // BLIP's processor resizes as Chinese-CLIP's: straight to the size,
        // bicubic, no crop, CLIP's mean and deviation.
        let chinese = kind.starts_with("ChineseCLIP") || kind.starts_with("Blip");
        let siglip2 = kind.starts_with("Siglip2");
        let resample = match raw.resample {
            Some(r) => crate::preprocess::resample::Filter::from_pil(r).ok_or_else(|| {
                bad(format!(
                    "resample={r} is not supported; 3 (bicubic) and 2 (bilinear) are implemented"
                ))
            })?,
            None => crate::preprocess::resample::Filter::Bicubic,
        };
        if kind.starts_with("Emu3") {
            // Emu3's smart resize, no crop; its own defaults are CLIP's mean
            // and deviation and the 512² to 1024² budget.
            let base = Self::chinese_clip_default(224);
            return Ok(Self {
                resize: ResizeTo::PixelBudget {
                    factor: raw.spatial_factor.unwrap_or(8),
                    min_pixels: raw.min_pixels.unwrap_or(512 * 512),
                    max_pixels: raw.max_pixels.unwrap_or(1024 * 1024),
                },
                resample,
                do_resize: raw.do_resize.unwrap_or(true),
                do_rescale: raw.do_rescale.unwrap_or(true),
                rescale_factor: raw.rescale_factor.unwrap_or(base.rescale_factor),
                do_normalize: raw.do_normalize.unwrap_or(true),
                mean: raw.image_mean.unwrap_or(base.mean),
                std: raw.image_std.unwrap_or(base.std),
                do_convert_rgb: raw.do_convert_rgb.unwrap_or(true),
                ..base
            });
        }
        let siglip = kind.starts_with("Siglip") && !siglip2;
        let mut cfg = if siglip2 {
            let cfg = Self::siglip2_default(
                raw.patch_size.unwrap_or(16),
                raw.max_num_patches.unwrap_or(256),
            );
            // NaFlex's geometry is its budget; `size` and crops do not apply.
            return Ok(Self {
                // SigLIP 2's own default (bilinear) unless the file says.
                resample: if raw.resample.is_some() {
                    resample
                } else {
                    cfg.resample
                },
                do_rescale: raw.do_rescale.unwrap_or(true),
                rescale_factor: raw.rescale_factor.unwrap_or(cfg.rescale_factor),
                do_normalize: raw.do_normalize.unwrap_or(true),
                mean: raw.image_mean.unwrap_or(cfg.mean),
                std: raw.image_std.unwrap_or(cfg.std),
                do_convert_rgb: raw.do_convert_rgb.unwrap_or(true),
                ..cfg
            });
        } else if siglip {
            Self::siglip_default(224)
        } else if chinese {
            Self::chinese_clip_default(224)
        } else {
            Self::clip_default(224)
        };
        match raw.size {
            Some(SizeJson::Int(s)) if chinese || siglip => {
                cfg.resize = ResizeTo::Exact {
                    height: s,
                    width: s,
                }
            }
            Some(SizeJson::Int(s)) => cfg.resize = ResizeTo::ShortestEdge(s),
            Some(SizeJson::Dict {
                shortest_edge: Some(s),
                ..
            }) => cfg.resize = ResizeTo::ShortestEdge(s),
            Some(SizeJson::Dict {
                height: Some(height),
                width: Some(width),
                ..
            }) => cfg.resize = ResizeTo::Exact { height, width },
            Some(SizeJson::Dict { .. }) => {
                return Err(bad("`size` needs shortest_edge, or height and width".into()))
            }
            None => {}
        }
        match raw.crop_size {
            Some(SizeJson::Int(s)) => cfg.crop = (s, s),
            Some(SizeJson::Dict {
                height: Some(h),
                width: Some(w),
                ..
            }) => cfg.crop = (h, w),
            Some(_) => return Err(bad("`crop_size` needs height and width".into())),
            None => {}
        }
        macro_rules! set {
            ($($f:ident => $t:expr),*) => { $(if let Some(v) = raw.$f { $t = v; })* };
        }
        set!(do_convert_rgb => cfg.do_convert_rgb, do_resize => cfg.do_resize,
             do_center_crop => cfg.do_center_crop, do_rescale => cfg.do_rescale,
             rescale_factor => cfg.rescale_factor, do_normalize => cfg.do_normalize,
             image_mean => cfg.mean, image_std => cfg.std);
        cfg.resample = resample;
        cfg.crop_rounding = match raw.clasp_crop_rounding.as_deref() {
            None | Some("floor") => CropRounding::Floor,
            Some("torchvision") => CropRounding::Torchvision,
            Some(other) => {
                return Err(bad(format!(
                    "clasp_crop_rounding `{other}` is not one of floor, torchvision"
                )))
            }
        };
        Ok(cfg)
    }

    /// The (height, width) every processed image has, when it does not
    /// depend on the input (a crop or a straight resize).
    pub fn fixed_size(&self) -> Option<(u32, u32)> {
        if self.do_center_crop {
            return Some(self.crop);
        }
        match (self.do_resize, self.resize) {
            (true, ResizeTo::Exact { height, width }) => Some((height, width)),
            _ => None,
        }
    }

    /// The (height, width) of the processed tensor.
    pub fn output_size(&self, src: (u32, u32)) -> (u32, u32) {
        let resized = if self.do_resize {
            resize_target(src, self.resize)
        } else {
            src
        };
        if self.do_center_crop {
            self.crop
        } else {
            resized
        }
    }
}
