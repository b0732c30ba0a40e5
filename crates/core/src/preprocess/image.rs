//! Image decoding and the CLIP / Chinese-CLIP image processors, driven by
//! preprocessor_config.json and matching transformers' PIL backend step by
//! step: EXIF transpose, RGB (alpha composited onto white), bicubic resize,
//! center crop, rescale, normalize.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde::Deserialize;

use crate::{Error, Result};

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
    pub resample: super::resample::Filter,
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
        let mut v = b"clasp-image-processor-v2\0".to_vec();
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
enum SizeJson {
    Int(u32),
    Dict {
        shortest_edge: Option<u32>,
        height: Option<u32>,
        width: Option<u32>,
    },
}

#[derive(Deserialize)]
struct RawProcessor {
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
    /// clasp's own key: "torchvision" for open_clip's center crop.
    clasp_crop_rounding: Option<String>,
}

const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

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
            resample: super::resample::Filter::Bicubic,
            crop_rounding: CropRounding::Floor,
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
            resample: super::resample::Filter::Bilinear,
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
        let chinese = kind.starts_with("ChineseCLIP");
        let siglip2 = kind.starts_with("Siglip2");
        let siglip = kind.starts_with("Siglip") && !siglip2;
        let resample = match raw.resample {
            Some(r) => super::resample::Filter::from_pil(r).ok_or_else(|| {
                bad(format!(
                    "resample={r} is not supported; 3 (bicubic) and 2 (bilinear) are implemented"
                ))
            })?,
            None => super::resample::Filter::Bicubic,
        };
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

/// transformers' `get_resize_output_image_size`: the short side becomes `size`
/// and the long side `int(size * long / short)` (truncated, not rounded).
fn resize_target((h, w): (u32, u32), to: ResizeTo) -> (u32, u32) {
    match to {
        ResizeTo::Exact { height, width } => (height, width),
        ResizeTo::PatchBudget { patch, max_patches } => patch_budget_size(h, w, patch, max_patches),
        ResizeTo::ShortestEdge(s) => {
            let (short, long) = if w <= h { (w, h) } else { (h, w) };
            let new_long = (s as f64 * long as f64 / short as f64) as u32;
            if w <= h {
                (new_long, s)
            } else {
                (s, new_long)
            }
        }
    }
}

/// The size that keeps an image's aspect ratio with each side a multiple of
/// `patch` and at most `max_patches` patches: transformers'
/// `get_image_size_for_max_num_patches` (Siglip2ImageProcessor), the same
/// bisection over the scale in f64, so the same grid comes out.
pub fn patch_budget_size(h: u32, w: u32, patch: u32, max_patches: u32) -> (u32, u32) {
    let p = patch as f64;
    let scaled = |scale: f64, size: u32| -> u32 {
        let s = ((size as f64 * scale) / p).ceil() * p;
        s.max(p) as u32
    };
    let eps = 1e-5;
    let (mut lo, mut hi) = (eps / 10.0, 100.0f64);
    while hi - lo >= eps {
        let scale = (lo + hi) / 2.0;
        let (th, tw) = (scaled(scale, h), scaled(scale, w));
        let n = (th as f64 / p) * (tw as f64 / p);
        if n <= max_patches as f64 {
            lo = scale;
        } else {
            hi = scale;
        }
    }
    (scaled(lo, h), scaled(lo, w))
}

/// SigLIP 2's model inputs for one image, as Siglip2ImageProcessor returns
/// them.
#[derive(Debug, Clone, PartialEq)]
pub struct NaflexInputs {
    /// [max_patches, p*p*C]: each patch row-major, channels last; zero
    /// after the image's own patches.
    pub patches: Vec<f32>,
    /// 1 for the image's patches, 0 for padding.
    pub mask: Vec<u8>,
    /// The patch grid (rows, columns).
    pub grid: (usize, usize),
}

/// Patchifies processed pixels as Siglip2ImageProcessor does.
pub fn naflex_patches(px: &Pixels, patch: usize, max_patches: usize) -> Result<NaflexInputs> {
    let (gh, gw) = (px.height / patch, px.width / patch);
    if !px.height.is_multiple_of(patch) || !px.width.is_multiple_of(patch) || gh * gw > max_patches
    {
        return Err(Error::Shape(format!(
            "a {}x{} image is not a grid of at most {max_patches} patches of {patch} px",
            px.height, px.width
        )));
    }
    let c = px.data.len() / (px.height * px.width);
    let dim = patch * patch * c;
    let mut out = vec![0f32; max_patches * dim];
    for (i, dst) in out.chunks_mut(dim).take(gh * gw).enumerate() {
        let (r, q) = (i / gw, i % gw);
        for y in 0..patch {
            for x in 0..patch {
                for ch in 0..c {
                    let src =
                        ch * px.height * px.width + (r * patch + y) * px.width + q * patch + x;
                    dst[(y * patch + x) * c + ch] = px.data[src];
                }
            }
        }
    }
    Ok(NaflexInputs {
        patches: out,
        mask: (0..max_patches).map(|i| (i < gh * gw) as u8).collect(),
        grid: (gh, gw),
    })
}

/// Processed pixels, CHW, with their height and width.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

/// Reads and decodes an image file, applies its EXIF orientation and converts
/// it to 8-bit RGB. Errors name the file.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image(&bytes, path)
}

/// Decodes image bytes; `path` only names the input in errors.
/// The most pixels an image may have: Pillow's `DecompressionBombError`
/// threshold (2 × `Image.MAX_IMAGE_PIXELS`).
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

pub fn decode_image(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let fail = |reason: String| Error::ImageDecode {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.is_empty() {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?;
    if reader.format().is_none() {
        return Err(fail("unrecognised image format".into()));
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) && jpeg_is_truncated(bytes) {
        return Err(fail(
            "truncated JPEG (no end-of-image marker after the last scan)".into(),
        ));
    }
    let mut decoder = reader.into_decoder().map_err(|e| fail(e.to_string()))?;
    // A few KB can claim billions of pixels (found by fuzzing: a 2.4 KB JPEG
    // whose header says 65490x65475 held `clasp embed` for minutes): refuse
    // before decoding, at Pillow's DecompressionBombError threshold.
    let (w, h) = decoder.dimensions();
    if w as u64 * h as u64 > MAX_IMAGE_PIXELS {
        return Err(fail(format!(
            "{w}x{h} is over {MAX_IMAGE_PIXELS} pixels (a decompression bomb?)"
        )));
    }
    let orientation = decoder.orientation().map_err(|e| fail(e.to_string()))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))?;
    img.apply_orientation(orientation);
    Ok(to_rgb(img))
}

/// The JPEG decoder fills missing scan data with grey instead of failing (Pillow
/// raises), so truncation is checked structurally: a complete file has an EOI
/// marker (FF D9) after its last start-of-scan (FF DA). Entropy-coded data
/// stuffs every FF byte with 00, so neither marker can occur inside a scan, and
/// an EXIF thumbnail's EOI lies before the main image's scans.
fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    let last = |m: u8| bytes.windows(2).rposition(|w| w[0] == 0xFF && w[1] == m);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi < sos,
        (Some(_), None) => true,
        (None, _) => false, // no scan at all: the decoder reports that itself
    }
}

/// Converts to RGB8. Images with an alpha channel are composited onto white,
/// as transformers' `convert_to_rgb` does; the rest are converted directly.
pub fn to_rgb(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as u32;
        for c in 0..3 {
            // round((src * a + 255 * (255 - a)) / 255), PIL's alpha_composite on
            // an opaque white background.
            let v = p[c] as u32 * a + 255 * (255 - a);
            o[c] = ((v + 127) / 255) as u8;
        }
    }
    out
}

/// Turns decoded images into normalised CHW float pixels.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    cfg: ImageProcessorConfig,
}

impl ImageProcessor {
    pub fn new(cfg: ImageProcessorConfig) -> Self {
        Self { cfg }
    }

    pub fn config(&self) -> &ImageProcessorConfig {
        &self.cfg
    }

    /// Processes one RGB image into CHW f32 values, `output_size` in shape.
    pub fn process(&self, img: &RgbImage) -> Result<Vec<f32>> {
        Ok(self.normalize(&self.resize_and_crop(img)))
    }

    /// [`Self::process`] with the output's height and width.
    pub fn process_pixels(&self, img: &RgbImage) -> Result<Pixels> {
        let out = self.resize_and_crop(img);
        Ok(Pixels {
            height: out.height() as usize,
            width: out.width() as usize,
            data: self.normalize(&out),
        })
    }

    /// [`Self::process_path`] with the output's height and width.
    pub fn process_path_pixels(&self, path: &Path) -> Result<Pixels> {
        self.process_pixels(&load_image(path)?)
    }

    /// The evaluation geometry: resize, then centre crop, as configured.
    fn resize_and_crop(&self, img: &RgbImage) -> RgbImage {
        let resized = if self.cfg.do_resize {
            let (h, w) = resize_target((img.height(), img.width()), self.cfg.resize);
            if (w, h) == img.dimensions() {
                img.clone()
            } else {
                super::resample::resize_pil(img, w, h, self.cfg.resample)
            }
        } else {
            img.clone()
        };
        if self.cfg.do_center_crop {
            center_crop(&resized, self.cfg.crop, self.cfg.crop_rounding)
        } else {
            resized
        }
    }

    /// Training preprocessing, in open_clip's order: RandomResizedCrop with
    /// area in [`crop_scale`, 1] (the evaluation resize and crop when
    /// `crop_scale` >= 1), colour jitter when given, then normalisation. All
    /// randomness comes from `uniform`, so the same draws give the same pixels.
    pub fn process_train(
        &self,
        img: &RgbImage,
        crop_scale: f64,
        jitter: Option<&super::augment::ColorJitter>,
        uniform: &mut dyn FnMut() -> f64,
    ) -> Result<Vec<f32>> {
        let mut out = if crop_scale < 1.0 {
            self.random_resized_crop(img, (crop_scale, 1.0), uniform)
        } else {
            self.resize_and_crop(img)
        };
        if let Some(j) = jitter {
            j.apply(&mut out, uniform);
        }
        Ok(self.normalize(&out))
    }

    /// Training augmentation: torchvision's `RandomResizedCrop` (area in
    /// `scale`, aspect ratio in [3/4, 4/3], ten tries, then a centre crop of
    /// clamped ratio), resized bicubically to the model's input size.
    /// `uniform` draws from [0, 1); the same draws give the same crop, so
    /// seeded training is reproducible.
    fn random_resized_crop(
        &self,
        img: &RgbImage,
        scale: (f64, f64),
        uniform: &mut dyn FnMut() -> f64,
    ) -> RgbImage {
        let (w0, h0) = (img.width() as f64, img.height() as f64);
        let area = w0 * h0;
        let (lr0, lr1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
        let mut crop = None;
        for _ in 0..10 {
            let target = area * (scale.0 + (scale.1 - scale.0) * uniform());
            let aspect = (lr0 + (lr1 - lr0) * uniform()).exp();
            let w = (target * aspect).sqrt().round();
            let h = (target / aspect).sqrt().round();
            if w > 0.0 && h > 0.0 && w <= w0 && h <= h0 {
                let top = ((h0 - h + 1.0) * uniform()).floor().min(h0 - h);
                let left = ((w0 - w + 1.0) * uniform()).floor().min(w0 - w);
                crop = Some((left as u32, top as u32, w as u32, h as u32));
                break;
            }
        }
        let (x, y, w, h) = crop.unwrap_or_else(|| {
            let ratio = w0 / h0;
            let (w, h) = if ratio < 3.0 / 4.0 {
                (w0, (w0 / (3.0 / 4.0)).round())
            } else if ratio > 4.0 / 3.0 {
                ((h0 * 4.0 / 3.0).round(), h0)
            } else {
                (w0, h0)
            };
            (
                ((w0 - w) / 2.0) as u32,
                ((h0 - h) / 2.0) as u32,
                w as u32,
                h as u32,
            )
        });
        let region = image::imageops::crop_imm(img, x, y, w.max(1), h.max(1)).to_image();
        let (oh, ow) = if self.cfg.do_center_crop {
            self.cfg.crop
        } else {
            resize_target((img.height(), img.width()), self.cfg.resize)
        };
        super::resample::resize_bicubic_pil(&region, ow, oh)
    }

    /// Loads and processes a file.
    pub fn process_path(&self, path: &Path) -> Result<Vec<f32>> {
        self.process(&load_image(path)?)
    }

    fn normalize(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = img.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        let c = &self.cfg;
        let scale = if c.do_rescale { c.rescale_factor } else { 1.0 };
        // Per channel, value = (px * scale - mean) / std; a 256-entry table
        // holds every possible result so the loop is a lookup.
        let mut lut = [[0f32; 256]; 3];
        for (ch, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                let x = (v as f64 * scale) as f32;
                *slot = if c.do_normalize {
                    (x - c.mean[ch] as f32) / c.std[ch] as f32
                } else {
                    x
                };
            }
        }
        for (i, p) in img.pixels().enumerate() {
            for ch in 0..3 {
                out[ch * plane + i] = lut[ch][p[ch] as usize];
            }
        }
        out
    }
}

/// A center crop: transformers' offsets `(orig - crop) // 2`, or
/// torchvision's (see [`CropRounding`]); a crop larger than the image pads
/// with zeros around it.
fn center_crop(img: &RgbImage, (ch, cw): (u32, u32), rounding: CropRounding) -> RgbImage {
    let (w, h) = img.dimensions();
    if (h, w) == (ch, cw) {
        return img.clone();
    }
    let top = rounding.offset(h, ch);
    let left = rounding.offset(w, cw);
    let mut out = RgbImage::new(cw, ch);
    for y in 0..ch as i64 {
        let sy = y + top;
        if sy < 0 || sy >= h as i64 {
            continue;
        }
        for x in 0..cw as i64 {
            let sx = x + left;
            if sx >= 0 && sx < w as i64 {
                out.put_pixel(x as u32, y as u32, *img.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    out
}

/// Files in a directory that look like images, sorted by path; the others are
/// counted so an empty result can say what was there.
pub fn list_image_files(dir: &Path) -> Result<(Vec<PathBuf>, usize)> {
    let mut images = Vec::new();
    let mut skipped = 0;
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let p = entry.path();
        if p.is_file() && has_image_extension(&p) {
            images.push(p);
        } else {
            skipped += 1;
        }
    }
    images.sort();
    Ok((images, skipped))
}

pub fn has_image_extension(p: &Path) -> bool {
    const EXTS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

#[cfg(test)]
#[path = "image_tests.rs"]
mod tests;
