//! The assembled vision-language model.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::connector::{Connector, ConnectorKind};
use crate::llm::{self, GenerateOptions, Generation, LanguageModel, Llama, LlmTokenizer, Message};
use crate::preprocess::{ImageProcessor, ImageProcessorConfig};
use crate::{Error, Result};
use clasp_core::model::blip2::Blip2VisionConfig;
use clasp_core::model::cnn_tower::{CnnConfig, CnnTower};
use clasp_core::model::config::{ModelConfig, VisionConfig};
use clasp_core::model::vit::VisionTransformer;

/// The frozen image tower: a CLIP-family ViT, whose tokens are its patch
/// states at `vision_feature_layer`; a pretrained CNN, whose tokens are
/// the positions of its last feature map (MobileNetV2: 7×7 = 49 tokens of
/// 1280 at 224 pixels, ResNet-50 49 of 2048; `vision_feature_layer` does not
/// apply); or BLIP-2's ViT (`Blip2VisionModel`), whose tokens are every
/// position after its post-LayerNorm, as `Blip2ForConditionalGeneration`
/// gives its Q-Former.
#[derive(Debug, Clone)]
enum ImageTower {
    Vit(VisionTransformer),
    Cnn(Box<CnnTower>, CnnConfig),
    Blip2(Box<VisionTransformer>, Blip2VisionConfig),
}

/// Which kind of image tower a VLM is built with (its tensors in that
/// tower's own names).
#[derive(Debug, Clone)]
pub enum TowerSpec {
    /// CLIP's ViT (`CLIPVisionModel`), described by the `VisionConfig`.
    ClipVit,
    /// A pretrained CNN; the `VisionConfig` holds only its feature width,
    /// image size and stride.
    Cnn(CnnConfig),
    /// BLIP-2's ViT: the VLM is saved as `Blip2ForConditionalGeneration`.
    Blip2(Blip2VisionConfig),
}

impl TowerSpec {
    /// A CNN when one is given, else CLIP's ViT.
    pub fn cnn_or_clip(cnn: Option<CnnConfig>) -> Self {
        cnn.map_or(Self::ClipVit, Self::Cnn)
    }
}

/// Which of the vision tower's tokens go to the connector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureSelect {
    /// The patch tokens, without the class token (LLaVA's `default`).
    #[default]
    Default,
    /// Every token, the class token first.
    Full,
}

/// How the parts are joined.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VlmConfig {
    /// The vision hidden state the features come from, as transformers
    /// indexes `hidden_states` (negative from the end): LLaVA's −2 is the
    /// penultimate layer.
    pub vision_feature_layer: i64,
    pub select: FeatureSelect,
    pub connector: ConnectorKind,
    /// The placeholder text and its token id.
    pub image_token: String,
    pub image_token_index: u32,
    /// LLaVA-NeXT's `image_grid_pinpoints` (height, width), when images are
    /// tiled (see `anyres`).
    #[serde(default)]
    pub anyres: Option<Vec<(u32, u32)>>,
    /// LLaVA-NeXT-Video's `<video>` token, when the model reads videos
    /// (see `video`).
    #[serde(default)]
    pub video_token_index: Option<u32>,
}

/// An image tower's config (and CNN config), tensors and preprocessing.
type TowerParts = (
    VisionConfig,
    TowerSpec,
    HashMap<String, Tensor>,
    ImageProcessor,
);

/// A pretrained ImageNet CNN file (`.pth` or safetensors: torchvision's
/// MobileNetV2 or ResNet, or EfficientNet-Lite) as a VLM's image tower,
/// with the preprocessing its weights were trained with.
fn pretrained_cnn(path: &Path, device: &Device) -> Result<TowerParts> {
    let (cnn, tensors) = clasp_core::model::cnn_tower::read_pretrained(path)?;
    let vision_cfg = cnn.vision_config();
    let tensors = tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("classifier."))
        .map(|(k, v)| Ok((k, v.to_device(device)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let processor = ImageProcessor::new(cnn.processor());
    Ok((vision_cfg, TowerSpec::Cnn(cnn), tensors, processor))
}

/// The default instructions: English and Chinese.
pub const DESCRIBE_EN: &str = "Describe the image.";
pub const DESCRIBE_ZH: &str = "描述这张图片。";

/// A vision tower, a connector and a language model.
pub struct Vlm {
    pub cfg: VlmConfig,
    vision: ImageTower,
    pub(super) vision_cfg: VisionConfig,
    /// The tower's tensors in transformers' `CLIPVisionModel` names
    /// (`embeddings.*`, `encoder.*`, ...), for saving.
    pub(super) vision_tensors: HashMap<String, Tensor>,
    pub connector: Connector,
    pub llm: Llama,
    pub tokenizer: LlmTokenizer,
    pub(super) processor: ImageProcessor,
    /// LLaVA-NeXT's `image_newline` [hidden], when images are tiled.
    pub(super) image_newline: Option<Tensor>,
}

impl Vlm {
    /// Joins the vision tower of a clasp CLIP-family checkpoint (its
    /// `vision_model.*` tensors and preprocessing), or of a pretrained
    /// ImageNet CNN file (`.pth`/safetensors: its last feature map, with
    /// its ImageNet preprocessing), and a language model
    /// (GGUF, dequantised to f32 so gradients can pass through it) with a
    /// fresh connector seeded by `seed`. The tokenizer gains `<image>`.
    pub fn assemble(
        vision_checkpoint: &Path,
        llm_path: &Path,
        connector: ConnectorKind,
        vision_feature_layer: i64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if clasp_core::model::blip2::is_blip2_dir(vision_checkpoint) {
            return Self::from_stage1(
                vision_checkpoint,
                llm_path,
                connector,
                vision_feature_layer,
                seed,
                device,
            );
        }
        let (vision_cfg, cnn, vision_tensors, processor) = if vision_checkpoint.is_file() {
            pretrained_cnn(vision_checkpoint, device)?
        } else {
            let files = clasp_core::model::loader::resolve(&vision_checkpoint.to_string_lossy())?;
            let model_cfg = ModelConfig::from_file(&files.config)?;
            let vision_cfg = model_cfg.vision().clone();
            let cnn = TowerSpec::cnn_or_clip(match &model_cfg {
                ModelConfig::DualEncoder(c) => c.image_cnn.clone(),
                _ => None,
            });
            // The vision tower only: the text tower's tensors stay on disk.
            let vision_tensors =
                super::checkpoint::load_prefixed(&files.weights, &["vision_model."], device)?;
            if vision_tensors.is_empty() {
                return Err(Error::Report(format!(
                    "{}: no vision_model.* tensors; the vision tower must come from a CLIP-family checkpoint",
                    files.weights.display()
                )));
            }
            let processor = ImageProcessor::new(match &files.preprocessor_config {
                Some(p) => ImageProcessorConfig::from_file(p)?,
                None => ImageProcessorConfig::clip_default(vision_cfg.image_size as u32),
            });
            (vision_cfg, cnn, vision_tensors, processor)
        };
        let lm = LanguageModel::load(llm_path, llm::Precision::F32, device)?;
        let mut tokenizer = lm.tokenizer;
        let image_token = "<image>".to_string();
        let image_token_index = tokenizer.add_special_token(&image_token);
        let connector = Connector::new(
            connector,
            vision_cfg.hidden_size,
            lm.model.config().hidden_size,
            seed,
            device,
        )?;
        let cfg = VlmConfig {
            vision_feature_layer,
            select: FeatureSelect::Default,
            connector: connector.kind(),
            image_token,
            image_token_index,
            anyres: None,
            video_token_index: None,
        };
        Self::from_parts(
            cfg,
            vision_cfg,
            cnn,
            vision_tensors,
            connector,
            lm.model,
            tokenizer,
            processor,
        )
    }

    /// BLIP-2's stage 2 from a stage-1 folder (see [`super::stage1`]): its
    /// CNN or ViT as the tower, its Q-Former as the connector (`connector` must ask
    /// for one; the folder gives its sizes), a fresh projection.
    fn from_stage1(
        dir: &Path,
        llm_path: &Path,
        connector: ConnectorKind,
        vision_feature_layer: i64,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if !matches!(connector, ConnectorKind::QFormer { .. }) {
            return Err(Error::Report(format!(
                "{} is a Q-Former (BLIP-2 stage 1) folder: its Q-Former is the connector \
                 (--connector qformer)",
                dir.display()
            )));
        }
        let lm = LanguageModel::load(llm_path, llm::Precision::F32, device)?;
        let mut tokenizer = lm.tokenizer;
        let image_token = "<image>".to_string();
        let image_token_index = tokenizer.add_special_token(&image_token);
        let parts = super::stage1::read(dir, lm.model.config().hidden_size, seed, device)?;
        let blip2 = matches!(parts.tower_spec, TowerSpec::Blip2(_));
        let cfg = VlmConfig {
            // BLIP-2's Q-Former reads every token of the last layer.
            vision_feature_layer: if blip2 { -1 } else { vision_feature_layer },
            select: if blip2 {
                FeatureSelect::Full
            } else {
                FeatureSelect::Default
            },
            connector: parts.connector.kind(),
            image_token,
            image_token_index,
            anyres: None,
            video_token_index: None,
        };
        Self::from_parts(
            cfg,
            parts.vision_cfg,
            parts.tower_spec,
            parts.tower,
            parts.connector,
            lm.model,
            tokenizer,
            parts.processor,
        )
    }

    /// `tower`: which image tower `vision_tensors` are (a CNN's
    /// `vision_cfg` holds only its feature width, image size and stride).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn from_parts(
        cfg: VlmConfig,
        vision_cfg: VisionConfig,
        tower: TowerSpec,
        vision_tensors: HashMap<String, Tensor>,
        connector: Connector,
        llm: Llama,
        tokenizer: LlmTokenizer,
        processor: ImageProcessor,
    ) -> Result<Self> {
        let device = llm.device().clone();
        let vb = VarBuilder::from_tensors(vision_tensors.clone(), candle_core::DType::F32, &device);
        let vision = match tower {
            TowerSpec::Cnn(c) => ImageTower::Cnn(Box::new(CnnTower::load(vb, &c)?), c),
            TowerSpec::ClipVit => ImageTower::Vit(VisionTransformer::load(vb, &vision_cfg)?),
            TowerSpec::Blip2(b) => {
                ImageTower::Blip2(Box::new(clasp_core::model::blip2::load_vision(vb, &b)?), b)
            }
        };
        if connector.vision_dim() != vision_cfg.hidden_size
            || connector.text_dim() != llm.config().hidden_size
        {
            return Err(Error::Shape(format!(
                "the connector maps width {} to {}, but the vision tower is {} wide and the language model {}",
                connector.vision_dim(),
                connector.text_dim(),
                vision_cfg.hidden_size,
                llm.config().hidden_size
            )));
        }
        let me = Self {
            cfg,
            vision,
            vision_cfg,
            vision_tensors,
            connector,
            llm,
            tokenizer,
            processor,
            image_newline: None,
        };
        me.feature_layer()?;
        Ok(me)
    }

    pub fn device(&self) -> &Device {
        self.llm.device()
    }

    pub fn image_processor(&self) -> &ImageProcessor {
        &self.processor
    }

    pub fn vision_config(&self) -> &VisionConfig {
        &self.vision_cfg
    }

    /// The number of encoder layers the features come after.
    fn feature_layer(&self) -> Result<usize> {
        let n = self.vision_cfg.num_hidden_layers as i64;
        let l = self.cfg.vision_feature_layer;
        let k = if l < 0 { n + 1 + l } else { l };
        if !(0..=n).contains(&k) {
            return Err(Error::Report(format!(
                "vision_feature_layer {l} is outside a vision tower of {n} layers (−{} to {n})",
                n + 1
            )));
        }
        Ok(k as usize)
    }

    /// The CNN image tower's config, when the tower is one.
    pub fn vision_cnn(&self) -> Option<&CnnConfig> {
        match &self.vision {
            ImageTower::Cnn(_, c) => Some(c),
            _ => None,
        }
    }

    /// BLIP-2's vision config, when the tower is `Blip2VisionModel` (the
    /// model is then a `Blip2ForConditionalGeneration`, its prompts laid out
    /// as `Blip2Processor` lays them out).
    pub fn blip2_vision(&self) -> Option<&Blip2VisionConfig> {
        match &self.vision {
            ImageTower::Blip2(_, c) => Some(c),
            _ => None,
        }
    }

    /// The vision tower's tokens per image that reach the connector.
    pub fn patch_tokens(&self) -> usize {
        let g = self.vision_cfg.image_size / self.vision_cfg.patch_size;
        if self.vision_cnn().is_some() {
            // A feature map has no class token.
            return g * g;
        }
        if self.blip2_vision().is_some() {
            return g * g + 1;
        }
        match self.cfg.select {
            FeatureSelect::Default => g * g,
            FeatureSelect::Full => g * g + 1,
        }
    }

    /// Image tokens per image in the language model's input.
    pub fn image_tokens(&self) -> usize {
        self.cfg.connector.tokens(self.patch_tokens())
    }

    /// Prepared pixels of image files as `[B, C, S, S]`; each file's error
    /// names it.
    pub fn pixels(&self, paths: &[&Path]) -> Result<Tensor> {
        let images = paths
            .iter()
            .map(|p| self.processor.process_path(p))
            .collect::<Result<Vec<_>>>()?;
        self.pixel_batch(&images)
    }

    /// Images prepared by [`Self::image_processor`] as one `[B, C, S, S]`
    /// tensor, each checked for its size.
    pub fn pixel_batch(&self, images: &[Vec<f32>]) -> Result<Tensor> {
        let (c, s) = (self.vision_cfg.num_channels, self.vision_cfg.image_size);
        if let Some(i) = images.iter().position(|im| im.len() != c * s * s) {
            return Err(Error::Shape(format!(
                "image {i} has {} values, the vision tower takes {c}x{s}x{s}",
                images[i].len()
            )));
        }
        Ok(Tensor::from_vec(
            images.concat(),
            (images.len(), c, s, s),
            self.device(),
        )?)
    }

    /// The frozen tower's features `[B, P, vision]`, without a graph.
    pub fn patch_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let _no_grad = clasp_core::model::grad_mode_guard(false);
        let vit = match &self.vision {
            ImageTower::Vit(v) => v,
            ImageTower::Cnn(c, _) => return Ok(c.feature_tokens(pixels)?.detach()),
            ImageTower::Blip2(v, _) => return Ok(v.last_hidden_state(pixels)?.detach()),
        };
        let h = vit.hidden_state(pixels, self.feature_layer()?)?;
        let h = match self.cfg.select {
            FeatureSelect::Default => h.narrow(1, 1, h.dim(1)? - 1)?,
            FeatureSelect::Full => h,
        };
        Ok(h.contiguous()?.detach())
    }

    /// Image tokens `[B, N, hidden]` of prepared pixels.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        self.connector.forward(&self.patch_features(pixels)?)
    }

    /// `ids` with each image placeholder repeated once per image token (as
    /// transformers' Llava processor expands `<image>`). A BLIP-2 model's
    /// image tokens all go first, before the text (and its bos), as
    /// `Blip2Processor` puts them; each placeholder leaves the text with
    /// the newline after it.
    pub fn expand_images(&self, ids: &[u32]) -> Vec<u32> {
        if self.blip2_vision().is_some() {
            return self.prefix_images(ids);
        }
        let id = self.cfg.image_token_index;
        let slots = ids.iter().filter(|&&i| i == id).count();
        expand_slots(ids, id, "", &vec![self.image_tokens(); slots])
            .expect("one count per placeholder")
    }

    /// The token ids of one user turn (`<image>` written where the image
    /// goes) rendered with the language model's chat template, with the
    /// assistant's turn opened, images expanded. Checks that the prompt has
    /// exactly `images` placeholders.
    pub fn chat_prompt(&self, user: &str, images: usize) -> Result<Vec<u32>> {
        self.render_ids(&[Message::new("user", user)], images)
    }

    /// The default captioning turn: the placeholder, a newline, the
    /// instruction.
    pub fn caption_turn(instruction: &str) -> String {
        format!("<image>\n{instruction}")
    }

    /// Input embeddings `[t, hidden]` of one expanded prompt, its image
    /// positions filled, in order, from `images` (`[k, N, hidden]`).
    pub fn input_embeds(&self, ids: &[u32], images: &Tensor) -> Result<Tensor> {
        let n = self.image_tokens();
        let (k, nn, _) = images.dims3()?;
        if nn != n {
            return Err(Error::Shape(format!(
                "{k} image(s) of {nn} tokens were given; each image takes {n}"
            )));
        }
        self.input_embeds_flat(ids, &images.reshape((k * nn, images.dim(2)?))?)
    }

    /// Input embeddings `[t, hidden]` of one expanded prompt whose image
    /// positions take the rows of `flat` (`[positions, hidden]`) in order.
    pub fn input_embeds_flat(&self, ids: &[u32], flat: &Tensor) -> Result<Tensor> {
        self.input_embeds_filled(ids, self.cfg.image_token_index, flat)
    }

    /// Input embeddings `[t, hidden]` of one expanded prompt whose positions
    /// holding `img_id` take the rows of `flat` in order.
    pub fn input_embeds_filled(&self, ids: &[u32], img_id: u32, flat: &Tensor) -> Result<Tensor> {
        let slots = ids.iter().filter(|&&i| i == img_id).count();
        let rows = flat.dim(0)?;
        if slots != rows {
            return Err(Error::Shape(format!(
                "the prompt has {slots} image positions, and {rows} image tokens were given"
            )));
        }
        let mut parts = Vec::new();
        let (mut i, mut used) = (0, 0);
        while i < ids.len() {
            let is_img = ids[i] == img_id;
            let mut j = i;
            while j < ids.len() && (ids[j] == img_id) == is_img {
                j += 1;
            }
            if is_img {
                parts.push(flat.narrow(0, used, j - i)?);
                used += j - i;
            } else {
                let t = Tensor::new(&ids[i..j], self.device())?.unsqueeze(0)?;
                parts.push(self.llm.embed(&t)?.squeeze(0)?);
            }
            i = j;
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Logits `[t, vocab]` at every position of one expanded prompt with
    /// its images' prepared pixels `[k, C, S, S]`.
    pub fn logits(&self, ids: &[u32], pixels: &Tensor) -> Result<Tensor> {
        self.logits_of_features(ids, &self.image_features(pixels)?)
    }

    /// [`Self::logits`] on image features already computed (`[k, N, hidden]`),
    /// for several prompts about the same images.
    pub fn logits_of_features(&self, ids: &[u32], feats: &Tensor) -> Result<Tensor> {
        self.logits_of_embeds(&self.input_embeds(ids, feats)?)
    }

    /// Logits `[t, vocab]` at every position of one prompt's input
    /// embeddings `[t, hidden]`.
    pub fn logits_of_embeds(&self, embeds: &Tensor) -> Result<Tensor> {
        let mut cache = self.llm.new_cache(vec![0]);
        let h = self.llm.forward_embeds(&embeds.unsqueeze(0)?, &mut cache)?;
        Ok(self.llm.logits(&h)?.squeeze(0)?)
    }

    /// Generates one answer per image to the same user turn, the images run
    /// as one batch.
    pub fn generate(
        &self,
        pixels: &Tensor,
        user: &str,
        opts: &GenerateOptions,
    ) -> Result<Vec<Generation>> {
        let ids = self.chat_prompt(user, 1)?;
        let feats = self.image_features(pixels)?;
        let prompts = (0..feats.dim(0)?)
            .map(|i| {
                Ok(llm::Prompt {
                    ids: ids.clone(),
                    embeds: Some(self.input_embeds(&ids, &feats.narrow(0, i, 1)?)?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.generate_prompts(&prompts, opts)
    }

    /// Answers several user turns (one `<image>` each) about one image
    /// (`pixels` `[1, 3, H, W]`), its features computed once, the answers
    /// generated as one batch.
    pub fn answer_each(
        &self,
        pixels: &Tensor,
        users: &[String],
        opts: &GenerateOptions,
    ) -> Result<Vec<Generation>> {
        let feats = self.image_features(pixels)?;
        let prompts = users
            .iter()
            .map(|u| {
                let ids = self.chat_prompt(u, 1)?;
                Ok(llm::Prompt {
                    embeds: Some(self.input_embeds(&ids, &feats)?),
                    ids,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.generate_prompts(&prompts, opts)
    }

    pub(crate) fn generate_prompts(
        &self,
        prompts: &[llm::Prompt],
        opts: &GenerateOptions,
    ) -> Result<Vec<Generation>> {
        let mut opts = opts.clone();
        opts.suppress_tokens.push(self.cfg.image_token_index);
        opts.suppress_tokens.extend(self.cfg.video_token_index);
        llm::generate_batch_prompts(&self.llm, &self.tokenizer, prompts, &opts)
    }
}

/// `ids` with the k-th `id` placeholder (written `name`) repeated
/// `counts[k]` times; an error naming it unless they number `counts.len()`.
pub(crate) fn expand_slots(ids: &[u32], id: u32, name: &str, counts: &[usize]) -> Result<Vec<u32>> {
    let slots = ids.iter().filter(|&&i| i == id).count();
    if slots != counts.len() {
        return Err(Error::Report(format!(
            "the prompt has {slots} {name} placeholders for {} input{}",
            counts.len(),
            if counts.len() == 1 { "" } else { "s" }
        )));
    }
    let mut out = Vec::with_capacity(ids.len() + counts.iter().sum::<usize>());
    let mut k = counts.iter();
    for &i in ids {
        match i == id {
            true => out.extend(std::iter::repeat_n(id, *k.next().expect("counted"))),
            false => out.push(i),
        }
    }
    Ok(out)
}
