//! The `Encoder`: a dual encoder loaded once with its tokenizer and image
//! processor, embedding images and texts into the shared space. It is the
//! surface that index, eval, train and serve build on.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::model::{self, int8_checkpoint, loader, Model, ModelConfig, ModelFiles};
use crate::preprocess::{ImageProcessor, ImageProcessorConfig, Pixels, ResizeTo, TextTokenizer};
use crate::{Error, Result};

#[path = "encoder/files.rs"]
mod files;
#[path = "encoder/video.rs"]
mod video_embed;
pub use files::*;
pub use video_embed::VideoEmbedding;

pub struct Encoder {
    model: Model,
    config: ModelConfig,
    files: ModelFiles,
    tokenizer: TextTokenizer,
    image_processor: ImageProcessor,
    /// The checkpoint's own processor (before `set_resolution`).
    default_processor: ImageProcessorConfig,
    device: Device,
    precision: Precision,
}

/// The arithmetic the towers run in at inference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// The checkpoint's f32 weights (the reference).
    #[default]
    F32,
    /// Dynamic int8 on the CPU (see `model::int8`): per-channel int8 weights,
    /// per-token int8 activations.
    Int8,
    /// bf16 weights and activations with f32 sums, on CPUs with avx512_bf16
    /// (see `model::packed`).
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "int8" => Ok(Precision::Int8),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("unknown precision `{other}` (f32, int8 or bf16)")),
        }
    }
}

/// One input that could not be embedded, with its position in the input.
#[derive(Debug)]
pub struct Failure {
    pub index: usize,
    pub error: Error,
}

/// Embeddings of the inputs that succeeded, in input order, and the failures.
#[derive(Debug)]
pub struct BatchEmbeddings {
    /// Row `i` belongs to input `indices[i]`.
    pub embeddings: Vec<Vec<f32>>,
    pub indices: Vec<usize>,
    pub failures: Vec<Failure>,
}

impl Encoder {
    /// Loads a model from a directory or a Hub id.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        Self::load_towers(spec, device, model::Towers::Both)
    }

    /// Loads a model with only `towers`: [`model::Towers::Text`] for a
    /// process that embeds texts alone (a text search, zero-shot labels),
    /// which then never reads the image tower's weights. Embedding an image
    /// with it is an error.
    pub fn load_towers(spec: &str, device: &Device, towers: model::Towers) -> Result<Self> {
        Self::load_with(spec, device, towers, None)
    }

    /// Loads `towers` to run in `precision` (`None`: f32, or int8 for a
    /// `clasp quantize` checkpoint), preparing the weights once for it.
    pub fn load_with(
        spec: &str,
        device: &Device,
        towers: model::Towers,
        precision: Option<Precision>,
    ) -> Result<Self> {
        let files = model::resolve(spec)?;
        Self::from_files_towers(files, device, towers, precision)
    }

    pub fn from_files(files: ModelFiles, device: &Device) -> Result<Self> {
        Self::from_files_towers(files, device, model::Towers::Both, None)
    }

    fn from_files_towers(
        files: ModelFiles,
        device: &Device,
        towers: model::Towers,
        precision: Option<Precision>,
    ) -> Result<Self> {
        // open_clip's layout: translated to transformers' CLIPModel once.
        let (open_clip, config) = match files.layout {
            loader::Layout::OpenClip => {
                let t = model::open_clip::translate(&files.config, &files.weights)?;
                let c = ModelConfig::from_json(&t.config_json.to_string(), &files.config)?;
                (Some(t), c)
            }
            loader::Layout::Hf => (None, ModelConfig::from_file(&files.config)?),
        };
        // A `clasp quantize` checkpoint: f32 tensors for the model to build
        // from, and the int8 weights, used as they are.
        let quantized = if open_clip.is_none() && int8_checkpoint::is_quantized(&files.weights)? {
            if !device.is_cpu() {
                return Err(Error::Report(format!(
                    "{} is an int8 checkpoint (clasp quantize), which runs on the CPU only",
                    files.dir.display()
                )));
            }
            Some(int8_checkpoint::read(&files.weights)?)
        } else {
            None
        };
        let mut open_clip_pp = None;
        let (vb, int8) = match (quantized, open_clip) {
            (_, Some(t)) => {
                open_clip_pp = Some(t.preprocessor_json);
                (
                    candle_nn::VarBuilder::from_tensors(t.tensors, candle_core::DType::F32, device),
                    None,
                )
            }
            (Some((tensors, int8)), None) => (
                candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, device),
                Some(int8),
            ),
            (None, None) => (loader::var_builder(&files, device)?, None),
        };
        let mut model = Model::load_towers(vb, &config, towers).map_err(|e| match e {
            Error::Candle(c) => Error::Weights {
                path: files.weights.clone(),
                reason: c.to_string(),
            },
            other => other,
        })?;
        let loaded = match int8 {
            Some(int8) => {
                model.quantize_int8(&|name| Ok(int8.get(name).cloned()))?;
                Precision::Int8
            }
            None => Precision::F32,
        };
        let pp = match (&files.preprocessor_config, &open_clip_pp) {
            (_, Some(j)) => ImageProcessorConfig::from_json(&j.to_string(), &files.config)?,
            (Some(p), None) => ImageProcessorConfig::from_file(p)?,
            (None, None) => default_image_processor(&config),
        };
        let tokenizer = TextTokenizer::from_dir(&files.dir, config.text_context_length())?;
        // open_clip cleans texts its way and pads with id 0 (the causal mask
        // makes the padding irrelevant).
        let tokenizer = if open_clip_pp.is_some() {
            tokenizer.open_clip()?
        } else {
            tokenizer
        };
        let tokenizer = if config.reads_full_context() {
            tokenizer.full_context()
        } else {
            tokenizer
        };
        let mut encoder = Self {
            model,
            config,
            files,
            tokenizer,
            image_processor: ImageProcessor::new(pp.clone()),
            default_processor: pp,
            device: device.clone(),
            precision: loaded,
        };
        encoder.prepare(precision.unwrap_or(loaded))?;
        if device.is_cpu() {
            // f32 at every precision, so packed once here for all of them.
            encoder.model.pack_patch_f32()?;
        }
        Ok(encoder)
    }

    /// Runs the towers in `precision` from now on. int8 and bf16 run on the
    /// CPU only; going back to f32 from them is not supported (reload).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if self.precision == precision {
            return Ok(());
        }
        self.prepare(precision)
    }

    /// Prepares the weights for `precision`: packs f32 ones for the CPU
    /// kernels, quantizes to int8, or packs bf16; once, as an encoder's
    /// weights never change.
    fn prepare(&mut self, precision: Precision) -> Result<()> {
        if self.precision != Precision::F32 {
            if self.precision == precision {
                return Ok(());
            }
            return Err(Error::Report(format!(
                "{} runs in {} (an int8 checkpoint, or switched already); {} needs the original f32 checkpoint",
                self.files.dir.display(),
                self.precision.name(),
                precision.name()
            )));
        }
        if precision != Precision::F32 && !self.device.is_cpu() {
            return Err(Error::Report(format!(
                "--precision {} runs on the CPU only (use --device cpu)",
                precision.name()
            )));
        }
        let t = std::time::Instant::now();
        match precision {
            Precision::F32 if self.device.is_cpu() => self.model.pack_f32()?,
            Precision::F32 => {}
            Precision::Int8 => self.model.quantize_int8(&|_| Ok(None))?,
            Precision::Bf16 => self.model.pack_bf16()?,
        }
        tracing::debug!(
            precision = precision.name(),
            seconds = t.elapsed().as_secs_f64(),
            "prepared the weights"
        );
        self.precision = precision;
        Ok(())
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn files(&self) -> &ModelFiles {
        &self.files
    }
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }
    pub fn image_processor(&self) -> &ImageProcessor {
        &self.image_processor
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn embedding_dim(&self) -> usize {
        self.config.projection_dim()
    }

    /// A BLAKE3 hash of the model's content: config, weights and tokenizer
    /// files. Two directories with the same files hash the same.
    pub fn content_hash(&self) -> Result<[u8; 32]> {
        let files = &self.files;
        let mut h = blake3::Hasher::new();
        // Another precision gives other vectors: its own key, so a store or
        // cache never mixes them with f32 ones.
        if self.precision != Precision::F32 {
            h.update(b"precision:");
            h.update(self.precision.name().as_bytes());
        }
        // So do other input sizes (--image-size, --keep-aspect).
        if self.image_processor.config() != &self.default_processor {
            h.update(b"image-processor:");
            h.update(&self.image_processor.config().key_bytes());
        }
        hash_model_files(&mut h, &[&files.config, &files.weights], &files.dir)?;
        Ok(*h.finalize().as_bytes())
    }

    /// Class vectors by CLIP's prompt ensemble (see `preprocess::prompts`).
    pub fn prompt_ensemble(
        &self,
        classes: &[String],
        templates: &[String],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let prompts = crate::preprocess::prompts::class_prompts(classes, templates);
        let emb = self.embed_text_batches(&prompts, batch_size, |_| {})?;
        Ok(crate::zeroshot::ensemble(&emb, templates.len()))
    }

    /// Stacks processed CHW images into a [B, C, H, W] tensor; they must
    /// have the processor's fixed size (or the model's, square).
    pub fn pixel_batch(&self, images: &[Vec<f32>]) -> Result<Tensor> {
        let s = self.config.vision().image_size as u32;
        let (h, w) = self.image_processor.config().fixed_size().unwrap_or((s, s));
        let (h, w) = (h as usize, w as usize);
        let c = self.config.vision().num_channels;
        let mut flat = Vec::with_capacity(images.len() * c * h * w);
        for (i, im) in images.iter().enumerate() {
            if im.len() != c * h * w {
                return Err(Error::Shape(format!(
                    "image {i} has {} values, the model needs {c}x{h}x{w}",
                    im.len()
                )));
            }
            flat.extend_from_slice(im);
        }
        Ok(Tensor::from_vec(
            flat,
            (images.len(), c, h, w),
            &self.device,
        )?)
    }

    /// L2-normalised embeddings [B, P] of processed images of any sizes
    /// (`--keep-aspect` gives each its own): images of one size run as one
    /// batch, and the rows come back in input order.
    pub fn embed_pixel_items(&self, items: &[Pixels]) -> Result<Tensor> {
        let c = self.config.vision().num_channels;
        let mut groups: Vec<((usize, usize), Vec<usize>)> = Vec::new();
        for (i, p) in items.iter().enumerate() {
            if p.data.len() != c * p.height * p.width {
                return Err(Error::Shape(format!(
                    "image {i} has {} values, not {c}x{}x{}",
                    p.data.len(),
                    p.height,
                    p.width
                )));
            }
            match groups.iter_mut().find(|(k, _)| *k == (p.height, p.width)) {
                Some((_, v)) => v.push(i),
                None => groups.push(((p.height, p.width), vec![i])),
            }
        }
        let mut rows: Vec<Option<Tensor>> = vec![None; items.len()];
        for ((h, w), idx) in groups {
            let flat: Vec<f32> = idx
                .iter()
                .flat_map(|&i| items[i].data.iter().copied())
                .collect();
            let px = Tensor::from_vec(flat, (idx.len(), c, h, w), &self.device)?;
            let emb = self.embed_pixels(&px)?;
            for (j, &i) in idx.iter().enumerate() {
                rows[i] = Some(emb.get(j)?);
            }
        }
        let rows: Vec<Tensor> = rows
            .into_iter()
            .map(|r| r.expect("every item is in a group"))
            .collect();
        if rows.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.embedding_dim()),
                candle_core::DType::F32,
                &self.device,
            )?);
        }
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// Runs images at `image_size` (a multiple of the patch size; default the
    /// model's own) instead of the trained size, with the positions
    /// interpolated, and with `keep_aspect` keeps each image's aspect ratio
    /// under the same patch budget, (image_size / patch)^2, instead of
    /// cropping or squashing it.
    pub fn set_resolution(&mut self, image_size: Option<u32>, keep_aspect: bool) -> Result<()> {
        let v = self.config.vision();
        let p = v.patch_size as u32;
        let n = image_size.unwrap_or(v.image_size as u32);
        if n == 0 || !n.is_multiple_of(p) {
            return Err(Error::Report(format!(
                "--image-size {n} is not a positive multiple of the model's patch size {p}"
            )));
        }
        let mut cfg = self.image_processor.config().clone();
        if keep_aspect {
            cfg.do_resize = true;
            cfg.do_center_crop = false;
            cfg.resize = ResizeTo::PatchBudget {
                patch: p,
                max_patches: (n / p) * (n / p),
            };
        } else if image_size.is_some() {
            cfg.resize = match cfg.resize {
                ResizeTo::ShortestEdge(_) => ResizeTo::ShortestEdge(n),
                ResizeTo::PatchBudget { patch, .. } => ResizeTo::PatchBudget {
                    patch,
                    max_patches: (n / p) * (n / p),
                },
                _ => ResizeTo::Exact {
                    height: n,
                    width: n,
                },
            };
            if cfg.do_center_crop {
                cfg.crop = (n, n);
            }
        }
        self.image_processor = ImageProcessor::new(cfg);
        Ok(())
    }

    /// Unnormalised projected features of pixel values [B, C, S, S].
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        on_pool(|| self.model.image_features(pixel_values))
    }

    /// L2-normalised image embeddings [B, P] of pixel values.
    pub fn embed_pixels(&self, pixel_values: &Tensor) -> Result<Tensor> {
        model::l2_normalize(&self.image_features(pixel_values)?)
    }

    /// L2-normalised embeddings of decoded RGB images.
    pub fn embed_images(&self, images: &[image::RgbImage]) -> Result<Tensor> {
        let pixels = images
            .par_iter()
            .map(|im| self.image_processor.process_pixels(im))
            .collect::<Result<Vec<_>>>()?;
        self.embed_pixel_items(&pixels)
    }

    /// Unnormalised projected text features [B, P].
    pub fn text_features<S: AsRef<str>>(&self, texts: &[S]) -> Result<Tensor> {
        let batch = self.tokenizer.encode(texts)?;
        let (ids, mask) = batch.to_tensors(true, &self.device)?;
        on_pool(|| self.model.text_features(&ids, &mask))
    }

    /// L2-normalised text embeddings [B, P].
    pub fn embed_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<Tensor> {
        model::l2_normalize(&self.text_features(texts)?)
    }

    /// `logits_per_image` [I, T] as the model computes it: exp(logit_scale)
    /// * normalised images x normalised texts^T, plus SigLIP's logit bias.
    pub fn similarity(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        let scale = self.model.logit_scale().exp()?;
        let logits = image_embeds
            .matmul(&text_embeds.t()?)?
            .broadcast_mul(&scale)?;
        Ok(match self.model.logit_bias() {
            Some(b) => logits.broadcast_add(b)?,
            None => logits,
        })
    }

    /// Whether the model scores pairs with a sigmoid (SigLIP: each pair's
    /// own probability) rather than a softmax over the candidates (CLIP).
    pub fn sigmoid_scores(&self) -> bool {
        self.model.logit_bias().is_some()
    }

    /// How `classify` turns cosines into label probabilities: SigLIP's
    /// sigmoid with the model's scale and bias, else CLIP's softmax.
    pub fn zero_shot_scoring(&self) -> Result<crate::zeroshot::ZeroShotScoring> {
        use crate::zeroshot::ZeroShotScoring;
        let scalar = |t: &Tensor| -> Result<f64> {
            Ok(t.to_dtype(candle_core::DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?[0])
        };
        Ok(match self.model.logit_bias() {
            Some(b) => ZeroShotScoring::Sigmoid {
                scale: scalar(self.model.logit_scale())?.exp(),
                bias: scalar(b)?,
            },
            None => ZeroShotScoring::Softmax,
        })
    }

    /// Probabilities from one image's logits over texts: the sigmoid of each
    /// for SigLIP, the softmax over them for CLIP.
    pub fn probabilities(&self, logits: &[f64]) -> Vec<f64> {
        if self.sigmoid_scores() {
            return logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect();
        }
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.into_iter().map(|v| v / sum).collect()
    }
}

/// The image processor of a checkpoint without preprocessor_config.json:
/// its architecture's transformers default at the model's image size.
pub fn default_image_processor(config: &ModelConfig) -> ImageProcessorConfig {
    let size = config.vision().image_size as u32;
    match config {
        ModelConfig::Clip(_) | ModelConfig::DualEncoder(_) => {
            ImageProcessorConfig::clip_default(size)
        }
        ModelConfig::ChineseClip(_) => ImageProcessorConfig::chinese_clip_default(size),
        ModelConfig::Siglip(c) if c.naflex => ImageProcessorConfig::siglip2_default(
            c.vision_config.patch_size as u32,
            c.vision_config.num_patches.unwrap_or(256) as u32,
        ),
        ModelConfig::Siglip(_) => ImageProcessorConfig::siglip_default(size),
    }
}

#[cfg(test)]
#[path = "encoder_tests.rs"]
mod tests;
