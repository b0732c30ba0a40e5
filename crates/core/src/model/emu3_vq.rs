//! Emu3's VQ image tokenizer (`Emu3VQVAE` in transformers; Wang et al.
//! 2024, after MoVQ): an encoder that turns an image or a video into a grid
//! of codes from a learned codebook, and a decoder that draws the pixels
//! back, conditioning every norm on the codes' embeddings (MoVQ's spatial
//! norm).
//!
//! Geometry: the spatial factor is `2^(levels - 1)` (8 for Emu3), the
//! temporal factor `temporal_downsample_factor` (4). An image is tokenized as
//! a video of that many copies of itself, so it gives one frame of codes,
//! `[h/8, w/8]`; decoding one frame of codes gives 4 frames, of which an
//! image is the first (transformers' rule).
//!
//! Pixels are [-1, 1] (Emu3's processor normalises with mean and std 0.5).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, GroupNorm, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::preprocess::image::ImageProcessorConfig;
use crate::{Error, Result};

mod blocks;
use blocks::{conv3x3, Conv3d, Level, Middle, Norm, TemporalResnetBlock};

/// transformers' `Emu3VQVAEConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Emu3VqConfig {
    pub codebook_size: usize,
    pub embed_dim: usize,
    pub latent_channels: usize,
    #[serde(default)]
    pub double_latent: bool,
    pub in_channels: usize,
    pub out_channels: usize,
    pub temporal_downsample_factor: usize,
    pub base_channels: usize,
    pub channel_multiplier: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_resolutions: Vec<usize>,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
}

impl Default for Emu3VqConfig {
    /// Emu3's own tokenizer (BAAI/Emu3-VisionTokenizer).
    fn default() -> Self {
        Self {
            codebook_size: 32768,
            embed_dim: 4,
            latent_channels: 4,
            double_latent: false,
            in_channels: 3,
            out_channels: 3,
            temporal_downsample_factor: 4,
            base_channels: 256,
            channel_multiplier: vec![1, 2, 2, 4],
            num_res_blocks: 2,
            attn_resolutions: vec![3],
            hidden_size: 1024,
            num_attention_heads: 1,
        }
    }
}

impl Emu3VqConfig {
    /// Reads a config.json: an `Emu3VQVAEConfig` (model_type `emu3_vqgan`)
    /// or an `Emu3Config`, whose `vq_config` it takes.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let vq = match v["model_type"].as_str() {
            Some("emu3_vqgan") => v,
            Some("emu3") => v["vq_config"].clone(),
            other => {
                return Err(bad(format!(
                    "model_type {other:?} is not an Emu3 VQ tokenizer (emu3_vqgan) or an Emu3 model (emu3)"
                )))
            }
        };
        let cfg: Self = serde_json::from_value(vq).map_err(|e| bad(e.to_string()))?;
        cfg.check().map_err(bad)?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.double_latent {
            return Err("double_latent is not supported (Emu3 does not use it)".into());
        }
        if self.latent_channels != self.embed_dim {
            return Err(format!(
                "latent_channels {} differs from embed_dim {}: Emu3's decoder runs the two through one temporal stack",
                self.latent_channels, self.embed_dim
            ));
        }
        if !self.temporal_downsample_factor.is_power_of_two() || self.channel_multiplier.is_empty()
        {
            return Err("temporal_downsample_factor must be a power of two and channel_multiplier not empty".into());
        }
        if !self.base_channels.is_multiple_of(32) {
            return Err(format!(
                "base_channels {} is not a multiple of GroupNorm's 32 groups",
                self.base_channels
            ));
        }
        Ok(())
    }

    /// Pixels per code along each side.
    pub fn spatial_factor(&self) -> usize {
        1 << (self.channel_multiplier.len() - 1)
    }

    fn temporal_layers(&self) -> usize {
        self.temporal_downsample_factor.trailing_zeros() as usize
    }
}

struct Encoder {
    conv_in: Conv2d,
    levels: Vec<Level>,
    middle: Middle,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    time_conv: Vec<Conv3d>,
    time_res: Vec<TemporalResnetBlock>,
}

impl Encoder {
    fn load(vb: VarBuilder, cfg: &Emu3VqConfig) -> Result<Self> {
        let top = cfg.base_channels * cfg.channel_multiplier[cfg.channel_multiplier.len() - 1];
        let z = cfg.latent_channels;
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), cfg.in_channels, cfg.base_channels)?,
            levels: Level::down(vb.pp("down_block.down"), cfg)?,
            middle: Middle::load(vb.pp("middle_block"), cfg, top, None)?,
            norm_out: candle_nn::group_norm(32, top, 1e-6, vb.pp("norm_out"))?,
            conv_out: conv3x3(vb.pp("conv_out"), top, z)?,
            time_conv: (0..cfg.temporal_layers())
                .map(|i| Conv3d::load(vb.pp("time_conv").pp(i).pp("conv"), z, z, [4, 3, 3], 2))
                .collect::<Result<_>>()?,
            time_res: (0..cfg.num_res_blocks)
                .map(|i| TemporalResnetBlock::load(vb.pp("time_res_stack").pp(i), z, z))
                .collect::<Result<_>>()?,
        })
    }

    /// [B, T, C, H, W] pixels to [B, C, T', h, w] latents.
    fn forward(&self, video: &Tensor) -> Result<Tensor> {
        let (b, t, c, h, w) = video.dims5()?;
        let mut x = self.conv_in.forward(&video.reshape((b * t, c, h, w))?)?;
        for level in &self.levels {
            x = level.forward_down(&x)?;
        }
        let x = self.middle.forward(&x, None)?;
        let x = self.conv_out.forward(&self.norm_out.forward(&x)?.silu()?)?;
        let (_, z, hh, ww) = x.dims4()?;
        let mut x = x.reshape((b, t, z, hh, ww))?.permute((0, 2, 1, 3, 4))?;
        for conv in &self.time_conv {
            x = conv.forward(&x)?.silu()?;
        }
        for block in &self.time_res {
            x = block.forward(&x)?;
        }
        Ok(x)
    }
}

struct Decoder {
    time_res: Vec<TemporalResnetBlock>,
    time_conv: Vec<Conv3d>,
    conv_in: Conv2d,
    middle: Middle,
    levels: Vec<Level>,
    norm_out: Norm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: VarBuilder, cfg: &Emu3VqConfig) -> Result<Self> {
        let top = cfg.base_channels * cfg.channel_multiplier[cfg.channel_multiplier.len() - 1];
        let z = cfg.latent_channels;
        let q = Some(cfg.embed_dim);
        let bottom = cfg.base_channels * cfg.channel_multiplier[0];
        Ok(Self {
            time_res: (0..cfg.num_res_blocks)
                .map(|i| TemporalResnetBlock::load(vb.pp("time_res_stack").pp(i), z, z))
                .collect::<Result<_>>()?,
            time_conv: (0..cfg.temporal_layers())
                .map(|i| Conv3d::load(vb.pp("time_conv").pp(i).pp("conv"), z, z, [3, 3, 3], 1))
                .collect::<Result<_>>()?,
            conv_in: conv3x3(vb.pp("conv_in"), z, top)?,
            middle: Middle::load(vb.pp("middle_block"), cfg, top, q)?,
            levels: Level::up(vb.pp("up_block.up"), cfg)?,
            norm_out: Norm::load(vb.pp("norm_out"), q, bottom)?,
            conv_out: conv3x3(vb.pp("conv_out"), bottom, cfg.out_channels)?,
        })
    }

    /// `post_quant` and `quant`: [B, C, T', h, w]; returns [B, T, C, H, W].
    fn forward(&self, post_quant: &Tensor, quant: &Tensor) -> Result<Tensor> {
        let b = post_quant.dims()[0];
        // The latents and the codes' embeddings go through the temporal
        // stack together, as one batch.
        let mut x = Tensor::cat(&[post_quant, quant], 0)?;
        for block in &self.time_res {
            x = block.forward(&x)?;
        }
        for conv in &self.time_conv {
            x = conv.forward(&blocks::repeat_frames(&x)?)?.silu()?;
        }
        let (_, c, t, h, w) = x.dims5()?;
        let frames = x.permute((0, 2, 1, 3, 4))?.reshape((2 * b * t, c, h, w))?;
        let hidden = frames.narrow(0, 0, b * t)?;
        let quant = frames.narrow(0, b * t, b * t)?;
        let mut x = self.conv_in.forward(&hidden)?;
        x = self.middle.forward(&x, Some(&quant))?;
        for level in &self.levels {
            x = level.forward_up(&x, &quant)?;
        }
        let x = self.norm_out.forward(&x, Some(&quant))?.silu()?;
        let x = self.conv_out.forward(&x)?;
        let (_, co, hh, ww) = x.dims4()?;
        Ok(x.reshape((b, t, co, hh, ww))?)
    }
}

/// Emu3's VQ image tokenizer.
pub struct Emu3Vq {
    cfg: Emu3VqConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv3d,
    post_quant_conv: Conv3d,
    /// [codebook_size, embed_dim].
    codebook: Tensor,
}

/// The weight-name prefixes an `Emu3VQVAE` is found under: its own folder,
/// or inside an `Emu3ForConditionalGeneration` checkpoint.
const PREFIXES: &[&str] = &["", "model.vqmodel.", "vqmodel."];

impl Emu3Vq {
    pub fn load(vb: VarBuilder, cfg: &Emu3VqConfig) -> Result<Self> {
        let (z, e) = (cfg.latent_channels, cfg.embed_dim);
        Ok(Self {
            encoder: Encoder::load(vb.pp("encoder"), cfg)?,
            decoder: Decoder::load(vb.pp("decoder"), cfg)?,
            quant_conv: Conv3d::load(vb.pp("quant_conv"), z, e, [3, 1, 1], 1)?,
            post_quant_conv: Conv3d::load(vb.pp("post_quant_conv"), e, z, [3, 1, 1], 1)?,
            codebook: vb.get((cfg.codebook_size, e), "quantize.embedding.weight")?,
            cfg: cfg.clone(),
        })
    }

    /// Loads a folder: config.json (an Emu3 VQ or a whole Emu3 model) and
    /// the tokenizer's tensors ([`read_tensors`]).
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = Emu3VqConfig::from_file(&dir.join("config.json"))?;
        let vb = VarBuilder::from_tensors(read_tensors(dir, device)?, DType::F32, device);
        Self::load(vb, &cfg).map_err(|e| Error::Weights {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })
    }

    pub fn config(&self) -> &Emu3VqConfig {
        &self.cfg
    }

    /// The encoder's latents after `quant_conv`: [B, T', E, h, w], for
    /// pixels [B, C, H, W] (images) or [B, T, C, H, W] (videos, T a
    /// multiple of the temporal factor).
    pub fn latents(&self, pixels: &Tensor) -> Result<Tensor> {
        let video = self.as_video(pixels)?;
        let z = self.encoder.forward(&video)?;
        Ok(self.quant_conv.forward(&z)?.permute((0, 2, 1, 3, 4))?)
    }

    fn as_video(&self, pixels: &Tensor) -> Result<Tensor> {
        let f = self.cfg.spatial_factor();
        let tf = self.cfg.temporal_downsample_factor;
        let dims = pixels.dims();
        let video = match dims.len() {
            4 => {
                let (b, c, h, w) = pixels.dims4()?;
                pixels
                    .unsqueeze(1)?
                    .broadcast_as((b, tf, c, h, w))?
                    .contiguous()?
            }
            5 if dims[1].is_multiple_of(tf) => pixels.clone(),
            5 => {
                return Err(Error::Shape(format!(
                    "a video of {} frames: Emu3's tokenizer takes a multiple of {tf}",
                    dims[1]
                )))
            }
            _ => {
                return Err(Error::Shape(format!(
                    "pixels of shape {dims:?}: [B, C, H, W] or [B, T, C, H, W]"
                )))
            }
        };
        let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if !h.is_multiple_of(f) || !w.is_multiple_of(f) || h == 0 || w == 0 {
            return Err(Error::Shape(format!(
                "{h}x{w} pixels: each side must be a positive multiple of {f}"
            )));
        }
        Ok(video)
    }

    /// The codes: [B, h, w] for images, [B, T', h, w] for videos.
    pub fn encode(&self, pixels: &Tensor) -> Result<Tensor> {
        let image = pixels.rank() == 4;
        let codes = self.quantize(&self.latents(pixels)?)?;
        Ok(if image { codes.squeeze(1)? } else { codes })
    }

    /// The nearest code of each latent [B, T', E, h, w], by the expanded
    /// squared distance `|z|² + |e|² − 2 z·e` transformers computes.
    pub fn quantize(&self, latents: &Tensor) -> Result<Tensor> {
        let (b, t, e, h, w) = latents.dims5()?;
        let flat = latents
            .permute((0, 1, 3, 4, 2))?
            .reshape((b * t * h * w, e))?;
        let z2 = flat.sqr()?.sum_keepdim(1)?;
        let e2 = self.codebook.sqr()?.sum(1)?.unsqueeze(0)?;
        let dot = (flat.matmul(&self.codebook.t()?)? * 2.0)?;
        let d = z2.broadcast_add(&e2)?.sub(&dot)?;
        Ok(d.argmin(D::Minus1)?.reshape((b, t, h, w))?)
    }

    /// The codes' embeddings: [B, T', h, w] codes to [B, E, T', h, w].
    pub fn embed_codes(&self, codes: &Tensor) -> Result<Tensor> {
        let (b, t, h, w) = codes.dims4()?;
        let n = self.cfg.codebook_size as u32;
        let flat = codes.flatten_all()?.to_dtype(candle_core::DType::U32)?;
        if let Some(bad) = flat.to_vec1::<u32>()?.into_iter().find(|&c| c >= n) {
            return Err(Error::Shape(format!(
                "code {bad} is outside the {n}-code codebook"
            )));
        }
        let e = self.codebook.index_select(&flat, 0)?;
        Ok(e.reshape((b, t, h, w, self.cfg.embed_dim))?
            .permute((0, 4, 1, 2, 3))?)
    }

    /// Pixels from codes: [B, h, w] codes give [B, C, H, W] images (the
    /// first of the decoded frames), [B, T', h, w] give [B, T, C, H, W].
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        let image = codes.rank() == 3;
        let codes = if image {
            codes.unsqueeze(1)?
        } else {
            codes.clone()
        };
        let quant = self.embed_codes(&codes)?;
        self.decode_embedded(&quant, image)
    }

    /// [`Self::decode`] from the codes' embeddings [B, E, T', h, w] (a
    /// straight-through estimate in training).
    pub fn decode_embedded(&self, quant: &Tensor, image: bool) -> Result<Tensor> {
        let post = self.post_quant_conv.forward(quant)?;
        let video = self.decoder.forward(&post, quant)?;
        Ok(if image {
            video.narrow(1, 0, 1)?.squeeze(1)?
        } else {
            video
        })
    }
}

/// A folder's VQ tokenizer tensors by `Emu3VQVAE`'s own names, from
/// model.safetensors or its shards: the whole file of a tokenizer folder, or
/// the `model.vqmodel.*` (or `vqmodel.*`) tensors of an Emu3 model, found by
/// where the codebook is.
pub fn read_tensors(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let files = weight_files(dir)?;
    let bad = |e: candle_core::Error| Error::Weights {
        path: files[0].clone(),
        reason: e.to_string(),
    };
    // SAFETY: the files are mapped read-only and dropped before this returns
    // (the tensors are copied out); clasp never writes a checkpoint in place.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(bad)?;
    let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
    let key = "quantize.embedding.weight";
    let prefix = PREFIXES
        .iter()
        .find(|p| names.iter().any(|n| *n == format!("{p}{key}")))
        .ok_or_else(|| Error::Weights {
            path: files[0].clone(),
            reason: format!("no Emu3 VQ codebook ({key}, alone or under model.vqmodel.)"),
        })?;
    let mut out = HashMap::new();
    for name in &names {
        if let Some(short) = name.strip_prefix(prefix) {
            // An Emu3 model's text tensors share the empty prefix.
            if prefix.is_empty() && !is_vq_tensor(short) {
                continue;
            }
            out.insert(short.to_string(), st.load(name, device).map_err(bad)?);
        }
    }
    Ok(out)
}

fn is_vq_tensor(name: &str) -> bool {
    [
        "encoder.",
        "decoder.",
        "quantize.",
        "quant_conv.",
        "post_quant_conv.",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// A tokenizer folder's processor: its preprocessor_config.json, or
/// Emu3ImageProcessor's defaults when it has none.
pub fn processor_config(dir: &Path) -> Result<ImageProcessorConfig> {
    let pp = dir.join("preprocessor_config.json");
    if pp.is_file() {
        ImageProcessorConfig::from_file(&pp)
    } else {
        ImageProcessorConfig::from_json(r#"{"image_processor_type": "Emu3ImageProcessor"}"#, &pp)
    }
}

/// A code histogram's perplexity (the exponential of its entropy) and the
/// number of codes it uses.
pub fn codebook_usage(counts: &[f64]) -> (f64, usize) {
    let n: f64 = counts.iter().sum();
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0.0)
        .map(|&c| {
            let p = c / n;
            -p * p.ln()
        })
        .sum();
    (entropy.exp(), counts.iter().filter(|&&c| c > 0.0).count())
}

/// model.safetensors, or every shard of model.safetensors.index.json.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(Error::MissingWeights {
            dir: dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: index.clone(),
        reason: e.to_string(),
    })?;
    let mut files: Vec<PathBuf> = v["weight_map"]
        .as_object()
        .ok_or_else(|| Error::Config {
            path: index.clone(),
            reason: "no weight_map".into(),
        })?
        .values()
        .filter_map(|f| f.as_str().map(|f| dir.join(f)))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Decoded pixels [3, H, W] back to an image, as Emu3ImageProcessor's
/// `postprocess` does: unnormalise with the processor's mean and deviation,
/// scale by 255, clip to [0, 255] and truncate to bytes.
pub fn pixels_to_image(pixels: &Tensor, cfg: &ImageProcessorConfig) -> Result<image::RgbImage> {
    let (c, h, w) = pixels.dims3()?;
    if c != 3 {
        return Err(Error::Shape(format!("{c} channels: an RGB image has 3")));
    }
    let v: Vec<f32> = pixels.flatten_all()?.to_vec1()?;
    let scale = if cfg.do_rescale {
        1.0 / cfg.rescale_factor
    } else {
        1.0
    };
    let mut img = image::RgbImage::new(w as u32, h as u32);
    for (x, y, px) in img.enumerate_pixels_mut() {
        for (ch, out) in px.0.iter_mut().enumerate() {
            let mut p = v[ch * h * w + y as usize * w + x as usize] as f64;
            if cfg.do_normalize {
                p = p * cfg.std[ch] + cfg.mean[ch];
            }
            *out = (p * scale).clamp(0.0, 255.0) as u8;
        }
    }
    Ok(img)
}
