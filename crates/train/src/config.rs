//! A training run's configuration: one typed struct whose `Default` is the
//! only place the defaults are written. The CLI lays its flags over a TOML
//! table and deserialises once ([`TrainConfig::from_table`]); the same
//! struct is saved with the run's state, so a resume continues the same run.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::objectives::ObjectiveParams;
use super::optim::ParamGroup;
use crate::data::{DatasetSpec, Lang, Split};
use crate::device::DeviceKind;
use crate::{Error, Result};
use clasp_core::model::config::TextPooling;

/// A vision-language run's connector, by the names LLaVA's and clasp's
/// configs use (`queries`, `resampler_layers` and `resampler_heads` size the
/// resampler).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Connector {
    /// LLaVA-1.5's two-layer MLP with GELU.
    #[serde(rename = "mlp2x_gelu", alias = "mlp2x-gelu", alias = "mlp")]
    Mlp2xGelu,
    /// A Perceiver resampler: learnable queries cross-attending to the patches.
    #[serde(rename = "resampler", alias = "perceiver")]
    Resampler,
    /// BLIP-2's Q-Former: learned queries through BERT layers with
    /// cross-attention to the patches (64 channels per head).
    #[serde(rename = "qformer", alias = "q-former")]
    QFormer,
}

#[path = "config/task.rs"]
mod task;
pub use task::*;
#[path = "config/init.rs"]
mod init;
#[path = "config/precision.rs"]
mod precision;
pub use precision::Precision;

/// Everything a run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// What the run trains; none: as the other keys say ([`Task`]).
    pub task: Option<Task>,
    /// A checkpoint directory to start from.
    pub init: Option<String>,
    /// Or train from scratch: a CLIP preset (tiny, small, base) or the path of
    /// a CLIP config.json, written to OUTPUT/init.
    pub preset: Option<String>,
    /// Tokenizer files for a preset (CLIP's vocab.json and merges.txt, or
    /// tokenizer.json).
    pub tokenizer: Option<PathBuf>,
    /// LiT: a pretrained BERT checkpoint for the text tower of a preset.
    pub text_init: Option<PathBuf>,
    /// LiT on a pretrained CNN: an ImageNet MobileNetV2 or ResNet
    /// (torchvision's) or EfficientNet-Lite (`.pth` in either torch.save
    /// format, or safetensors) as the image tower, locked, in place of a
    /// preset's.
    pub image_init: Option<PathBuf>,
    /// With `text_init`: BERT's pooler or the mean of the token states.
    pub text_pooling: TextPooling,
    /// A vision-language run: the language model (GGUF or LlamaForCausalLM
    /// folder) the connector feeds.
    pub llm: Option<PathBuf>,
    /// A vision-language run: the CLIP-family checkpoint whose vision tower
    /// (frozen) gives the patch features.
    pub vision: Option<PathBuf>,
    /// The connector: mlp2x_gelu or resampler.
    pub connector: Connector,
    /// Resampler: learnable queries (image tokens per image), blocks, heads.
    pub queries: usize,
    pub resampler_layers: usize,
    pub resampler_heads: usize,
    /// The vision hidden state the features come from (−2: penultimate).
    pub vision_feature_layer: i64,
    /// LLaVA-NeXT's AnyRes for a model assembled here: grid pinpoints
    /// `HxW,...` (see `clasp assemble --anyres`). A `--init` model keeps
    /// its own.
    pub anyres: Option<String>,
    /// 1: only the connector learns; 2: the connector and LoRA on the LLM.
    pub stage: u8,
    /// Stage 2: LoRA's rank, alpha and target projections (of q_proj,
    /// k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_targets: Vec<String>,
    /// Vision-language runs with a contrastive objective: the width of the
    /// contrastive heads' features.
    pub contrastive_dim: usize,
    /// Captions longer than this many tokens are cut (vision-language runs).
    pub max_answer_tokens: usize,
    /// Training data, `FORMAT:PATH` or `PATH`.
    pub dataset: Option<DatasetSpec>,
    pub split: Split,
    /// Caption language.
    pub lang: Lang,
    /// Optimiser steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// The text tower's learning rate, when not `lr` (LiT: a pretrained
    /// text tower fine-tuned more gently than the new heads). It follows
    /// the same schedule.
    pub text_lr: Option<f64>,
    /// Linear warm-up steps; none: 10% of the steps.
    pub warmup: Option<usize>,
    /// AdamW weight decay on weight matrices.
    pub weight_decay: f64,
    /// Global grad-norm clip (0: none).
    pub grad_clip: f64,
    /// Per-module max-norms (0: off), applied before the global clip.
    pub grad_clip_vision: f64,
    pub grad_clip_text: f64,
    pub grad_clip_proj: f64,
    /// Vision-language stage 2: the max-norm of the LoRA adapter's
    /// gradient (0: off).
    pub grad_clip_adapter: f64,
    /// Every this many steps, log the cosine between the first two
    /// objectives' gradients on `conflict_group` (0: never).
    pub conflict_every: usize,
    pub conflict_group: ParamGroup,
    /// Micro-batches per step, with features cached across them (1: none).
    pub accum_freq: usize,
    /// Under `mpirun`: gathered features carry their gradient back to their
    /// rank (open_clip's `--gather-with-grad`; off, the gradient is not the
    /// global batch's); `local_loss`: each rank's rows against the global batch.
    pub gather_with_grad: bool,
    pub local_loss: bool,
    /// RandomResizedCrop's lower area bound (open_clip's 0.9); 1 turns
    /// augmentation off and uses the evaluation preprocessing.
    pub crop_scale: f64,
    /// Colour jitter strengths [brightness, contrast, saturation, hue] as
    /// torchvision's ColorJitter takes them; empty: off.
    pub color_jitter: Vec<f32>,
    /// The probability that an image is jittered (open_clip's 0.8).
    pub color_jitter_prob: f64,
    /// This fraction of the training captions, drawn by the seed, is rotated
    /// among their images (label noise, for measuring robustness to it).
    pub caption_noise: f64,
    pub device: DeviceKind,
    /// The towers' compute type: f32, or bf16 (mixed precision, f32 master
    /// weights and loss).
    pub precision: Precision,
    /// Freeze the image tower (only the projections above it learn).
    pub lock_image: bool,
    /// Freeze the text tower (LiT: a pretrained text encoder, kept as is).
    pub lock_text: bool,
    /// VLM training: the frozen LLM's projections on packed AVX-512 copies
    /// (faster, more memory, not bit-identical to the default path).
    pub packed_llm: bool,
    /// Seed of the data order, the crops and any objective's parameters.
    pub seed: u64,
    /// `name[:weight],...`, names from `train::objectives::REGISTRY`.
    pub objective: String,
    /// Each objective's tunables (`daa_temp`, `triplet_margin`, ...).
    #[serde(flatten)]
    pub objective_params: ObjectiveParams,
    /// A preference run's pairs, β and loss (`prefs`, `beta`, `pref_loss`, `label_smoothing`).
    #[serde(flatten)]
    pub preference: super::dpo::PreferenceParams,
    /// A VQ tokenizer run's size and losses (`vq_*`).
    #[serde(flatten)]
    pub vq: super::vq::VqParams,
    /// A native run's mix of directions (`draw_ratio`).
    #[serde(flatten)]
    pub native: super::native_task::NativeParams,
    /// A weight schedule trading the first objective against the others
    /// (`bcif`, or e.g. `linear(1,0.2)`); none: constant weights.
    pub schedule: Option<String>,
    /// Hard negatives from `clasp mine`, put into the batches of their anchors.
    pub negatives: Option<PathBuf>,
    /// At most this share of each batch is mined negatives.
    pub negatives_share: f64,
    /// After the last step, estimate the diagonal Fisher over this many
    /// batches and save it with the checkpoint, for EWC later (0: no).
    pub fisher_batches: usize,
    /// The old task's Fisher for `ewc` (a fisher.safetensors or a checkpoint
    /// directory holding one); none: the init checkpoint's.
    pub ewc_anchor: Option<String>,
    /// A frozen teacher checkpoint for `distill` (any model clasp loads).
    pub teacher: Option<String>,
    /// A dev set evaluated during training.
    pub eval_dataset: Option<DatasetSpec>,
    pub eval_split: Split,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Vision-language runs: caption this many images of the eval split
    /// (0: all of them).
    pub eval_limit: usize,
    /// Save the checkpoint and state every this many steps (0: only at the end).
    pub save_every: usize,
    /// The run's directory: checkpoint/, state/, metrics.jsonl, plots.
    pub output: Option<PathBuf>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            task: None,
            init: None,
            preset: None,
            tokenizer: None,
            text_init: None,
            image_init: None,
            text_lr: None,
            text_pooling: TextPooling::default(),
            llm: None,
            vision: None,
            connector: Connector::Mlp2xGelu,
            queries: 16,
            resampler_layers: 2,
            resampler_heads: 4,
            vision_feature_layer: -2,
            anyres: None,
            stage: 1,
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_targets: crate::llm::lora::TARGETS
                .iter()
                .map(|t| t.to_string())
                .collect(),
            contrastive_dim: 256,
            max_answer_tokens: 48,
            dataset: None,
            split: Split::Train,
            lang: Lang::En,
            steps: 1000,
            batch_size: 32,
            lr: 5e-4,
            warmup: None,
            weight_decay: 0.2,
            grad_clip: 1.0,
            grad_clip_vision: 0.0,
            grad_clip_text: 0.0,
            grad_clip_proj: 0.0,
            grad_clip_adapter: 0.0,
            conflict_every: 0,
            conflict_group: ParamGroup::Proj,
            accum_freq: 1,
            gather_with_grad: true,
            local_loss: false,
            crop_scale: 0.9,
            color_jitter: Vec::new(),
            color_jitter_prob: 0.8,
            caption_noise: 0.0,
            device: DeviceKind::Cpu,
            precision: Precision::F32,
            lock_image: false,
            lock_text: false,
            packed_llm: false,
            seed: 0,
            objective: "infonce".into(),
            objective_params: ObjectiveParams::default(),
            preference: Default::default(),
            vq: Default::default(),
            native: Default::default(),
            schedule: None,
            negatives: None,
            negatives_share: 0.5,
            fisher_batches: 0,
            ewc_anchor: None,
            teacher: None,
            eval_dataset: None,
            eval_split: Split::Dev,
            eval_every: 0,
            eval_limit: 100,
            save_every: 100,
            output: None,
        }
    }
}

impl TrainConfig {
    /// Every config key with its default value, as the TOML file and the
    /// flag help show them (keys whose default is "none" are left out).
    pub fn default_values() -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(Self::default()) {
            Ok(serde_json::Value::Object(m)) => {
                m.into_iter().filter(|(_, v)| !v.is_null()).collect()
            }
            _ => unreachable!("TrainConfig serialises to an object"),
        }
    }

    /// Every key the config accepts.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(Self::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => unreachable!("TrainConfig serialises to an object"),
        }
    }

    /// The config from a table of keys (a TOML file's, with flags laid over
    /// it): unknown keys are refused by name, missing ones take their
    /// defaults, and the result is checked.
    pub fn from_table(table: serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        let known = Self::keys();
        let mut unknown: Vec<&str> = table
            .keys()
            .filter(|k| !known.contains(k))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(Error::Report(format!(
                "unknown training config key{} {}",
                if unknown.len() > 1 { "s" } else { "" },
                unknown
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let given: Vec<String> = table.keys().cloned().collect();
        let value = serde_json::Value::Object(table);
        // serde_path_to_error names the key whose value has the wrong type
        // (serde_json alone says only "invalid type: string, expected f64").
        let cfg: Self = match serde_path_to_error::deserialize(value.clone()) {
            Ok(c) => c,
            Err(e) => {
                // Inside the flattened objective parameters the path is
                // lost ("."): the key is then the one that fails alone.
                let mut key = e.path().to_string();
                if key == "." {
                    if let Some(k) = given.iter().find(|k| {
                        let one = serde_json::json!({ k.as_str(): value[k.as_str()].clone() });
                        serde_json::from_value::<Self>(one).is_err()
                    }) {
                        key = k.clone();
                    }
                }
                return Err(Error::Report(format!(
                    "training config key `{key}`: {}",
                    e.inner()
                )));
            }
        };
        let task = cfg.task();
        let mut unused: Vec<&str> = given
            .iter()
            .map(String::as_str)
            .filter(|k| task.refuses(k))
            .collect();
        if !unused.is_empty() {
            unused.sort_unstable();
            return Err(Error::Report(format!(
                "{} run does not use the key{} {}: {}",
                task.name(),
                if unused.len() > 1 { "s" } else { "" },
                unused
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                task.hint()
            )));
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// The task this config trains.
    pub fn task(&self) -> Task {
        let native = |i: &str| clasp_vlm::native::is_native(std::path::Path::new(i));
        if let Some(t) = self.task {
            t
        } else if self.init.as_deref().is_some_and(native) {
            Task::Native
        } else if self.is_vlm() {
            Task::VisionLanguage
        } else {
            Task::DualEncoder
        }
    }

    /// Whether this run trains a vision-language model (`llm` or `vision`
    /// given, or `init` is a VLM checkpoint).
    pub fn is_vlm(&self) -> bool {
        match self.task {
            Some(t) => t == Task::VisionLanguage,
            None => {
                self.llm.is_some()
                    || self.vision.is_some()
                    || self
                        .init
                        .as_deref()
                        .is_some_and(|i| clasp_vlm::checkpoint::is_vlm(std::path::Path::new(i)))
            }
        }
    }

    /// The warm-up in steps.
    pub fn warmup_steps(&self) -> usize {
        self.warmup.unwrap_or(self.steps / 10)
    }

    /// The run's directory (checked to be set by [`Self::check`]).
    pub fn output_dir(&self) -> Result<&std::path::Path> {
        self.output
            .as_deref()
            .ok_or_else(|| Error::Report("give an output directory (`output`, --output DIR) for the checkpoint, state and metrics".into()))
    }

    /// Refuses values no run can use, naming the key.
    pub fn check(&self) -> Result<()> {
        let bad = |key: &str, why: String| Err(Error::Report(format!("{key}: {why}")));
        if !(0.0..=1.0).contains(&self.caption_noise) {
            return bad("caption_noise", "a fraction in [0, 1]".into());
        }
        if self.task().is_preference() {
            self.output_dir()?;
            return self.check_dpo();
        }
        if self.dataset.is_none() {
            return bad(
                "dataset",
                "give the training data, e.g. --dataset flickr8k:data/flickr8k".into(),
            );
        }
        self.output_dir()?;
        if self.steps == 0 || self.batch_size == 0 || self.accum_freq == 0 {
            return bad("steps, batch_size, accum_freq", "must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} is not a positive number", self.lr));
        }
        if let Some(checked) = self.check_own_task() {
            return checked;
        }
        if self.is_vlm() {
            if self.init.is_none() && (self.llm.is_none() || self.vision.is_none()) {
                return bad(
                    "llm, vision",
                    "a vision-language run needs both --llm and --vision (or --init VLM_CHECKPOINT)".into(),
                );
            }
            if self.preset.is_some() {
                return bad(
                    "preset",
                    "a vision-language run starts from --llm and --vision".into(),
                );
            }
            match self.stage {
                1 => {}
                2 => {
                    if self.init.is_none() {
                        return bad(
                            "init",
                            "stage 2 continues a stage-1 model: pass --init VLM_CHECKPOINT (LLaVA's recipe)".into(),
                        );
                    }
                    self.lora().check().map_err(|e| Error::Report(format!("lora: {e}")))?;
                }
                s => return bad("stage", format!("{s}: the stages are 1 (the connector) and 2 (the connector and LoRA on the language model)")),
            }
            self.connector_kind()?;
            return Ok(());
        }
        let starts = [
            self.init.is_some(),
            self.preset.is_some(),
            self.image_init.is_some(),
        ];
        match starts.iter().filter(|s| **s).count() {
            0 => {
                return bad(
                    "init",
                    "give init (a checkpoint directory), preset (tiny, small, base) or \
                     image_init (a pretrained CNN) with text_init"
                        .into(),
                )
            }
            1 => {}
            _ => return bad("init", "give one of init, preset and image_init".into()),
        }
        if self.text_init.is_some() && self.preset.is_none() && self.image_init.is_none() {
            return bad(
                "text_init",
                "needs an image tower: a preset, or image_init (a pretrained CNN)".into(),
            );
        }
        if self.image_init.is_some() && self.text_init.is_none() {
            return bad(
                "image_init",
                "needs text_init: a pretrained image tower is trained with a text tower that \
                 meets it (--text-init BERT_DIR, e.g. MiniLM)"
                    .into(),
            );
        }
        if self.image_init.is_some() && !self.lock_image {
            return bad(
                "image_init",
                "a pretrained CNN image tower trains locked in clasp (its layers run without \
                 gradients): add lock_image (--lock-image)"
                    .into(),
            );
        }
        if let Some(l) = self.text_lr {
            if !(l.is_finite() && l >= 0.0) {
                return bad("text_lr", format!("{l} is not a learning rate"));
            }
            if self.lock_text {
                return bad("text_lr", "the text tower is locked (lock_text)".into());
            }
        }
        if !(self.crop_scale > 0.0 && self.crop_scale <= 1.0) {
            return bad(
                "crop_scale",
                format!("{} is not in (0, 1]", self.crop_scale),
            );
        }
        if !(0.0..=0.5).contains(&self.negatives_share) {
            return bad(
                "negatives_share",
                format!("{} is not in [0, 0.5]", self.negatives_share),
            );
        }
        crate::preprocess::augment::ColorJitter::new(&self.color_jitter, self.color_jitter_prob)?;
        for name in super::schedule::names(&self.objective) {
            if name != "ewc" && super::objectives::lookup(&name).is_none() {
                return bad(
                    "objective",
                    format!(
                        "unknown objective `{name}` (available: {})",
                        super::objectives::available()
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
