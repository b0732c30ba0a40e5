//! The training loop: seeded data order with decoding one batch ahead on a
//! worker thread, contrastive steps with clipping and a cosine schedule,
//! atomic checkpoints in the Hugging Face layout plus a resumable training
//! state, periodic dev evaluation, metrics.jsonl and a loss plot.
//!
//! Resuming from the state gives the same final weights as an uninterrupted
//! run on CPU: the data order comes from a saved RNG state, the optimiser
//! moments are saved exactly, and the weights are saved in f32.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::loss;
use super::model::Trainable;
use super::optim::{self, AdamWConfig, GroupedAdamW};
use crate::data::{self, DatasetSpec, ImageSource, Lang, PairSet, Split};
use crate::preprocess::augment::ColorJitter;
use crate::preprocess::image::decode_image;
use crate::progress::Progress;
pub use crate::rng::Rng;
use crate::{Error, Result};

/// Everything a run needs; saved with the state so a resume continues the
/// same run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    /// A checkpoint directory to start from.
    pub init: String,
    pub dataset: String,
    pub split: String,
    pub lang: String,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    /// Per-module max-norms (0: off), applied before the global clip.
    #[serde(default)]
    pub grad_clip_vision: f64,
    #[serde(default)]
    pub grad_clip_text: f64,
    #[serde(default)]
    pub grad_clip_proj: f64,
    /// Every this many steps, log the cosine between the first two
    /// objectives' gradients on `conflict_group` (0: never).
    #[serde(default)]
    pub conflict_every: usize,
    #[serde(default = "proj_group")]
    pub conflict_group: optim::ParamGroup,
    /// Micro-batches per step, with features cached across them (1: none).
    #[serde(default = "one")]
    pub accum_freq: usize,
    /// RandomResizedCrop's lower area bound (open_clip's 0.9); 1 turns
    /// augmentation off and uses the evaluation preprocessing.
    #[serde(default = "crop_scale")]
    pub crop_scale: f64,
    /// Colour jitter strengths [brightness, contrast, saturation, hue] as
    /// torchvision's ColorJitter takes them; empty: off.
    #[serde(default)]
    pub color_jitter: Vec<f32>,
    /// The probability that an image is jittered (open_clip's 0.8).
    #[serde(default = "color_jitter_prob")]
    pub color_jitter_prob: f64,
    /// `cpu` or `cuda`.
    #[serde(default = "cpu")]
    pub device: String,
    /// The towers' compute type: f32, or bf16 (mixed precision, f32 master
    /// weights and loss).
    #[serde(default)]
    pub precision: Precision,
    /// Freeze the image tower (only the projections above it learn).
    #[serde(default)]
    pub lock_image: bool,
    /// Freeze the text tower (LiT: a pretrained text encoder, kept as is).
    #[serde(default)]
    pub lock_text: bool,
    pub seed: u64,
    pub objective: String,
    /// Hard negatives from `clasp mine`, put into the batches of their anchors.
    #[serde(default)]
    pub negatives: Option<PathBuf>,
    /// At most this share of each batch is mined negatives.
    #[serde(default = "half")]
    pub negatives_share: f64,
    /// After the last step, estimate the diagonal Fisher over this many
    /// batches and save it with the checkpoint, for EWC later (0: no).
    #[serde(default)]
    pub fisher_batches: usize,
    /// The old task's Fisher for `ewc` (a fisher.safetensors or a checkpoint
    /// directory holding one); default: the --init checkpoint's.
    #[serde(default)]
    pub ewc_anchor: Option<String>,
    /// A frozen teacher checkpoint for `distill` (any model clasp loads).
    #[serde(default)]
    pub teacher: Option<String>,
    /// Tunables of the objectives (`daa_temp`, `triplet_margin`, ...).
    #[serde(default, flatten)]
    pub objective_params: super::align::ObjectiveParams,
    /// A weight schedule trading the first objective against the others
    /// (`bcif`, or e.g. `linear(1,0.2)`); none: constant weights.
    #[serde(default)]
    pub schedule: Option<String>,
    pub eval_dataset: Option<String>,
    pub eval_split: String,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Save the checkpoint and state every this many steps (0: only at the end).
    pub save_every: usize,
    pub output: PathBuf,
}

/// The compute type of the forward and backward passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bf16 towers (open_clip's `amp_bf16`): the variables, the optimiser,
    /// the logit scale and the loss stay f32. bf16 keeps f32's exponent
    /// range, so no loss scaling is needed. Made for CUDA; on the CPU it
    /// works but is slower than f32 (candle widens bf16 matmuls to f32).
    Bf16,
}

impl Precision {
    /// The dtype the towers compute in, when it is not f32.
    pub fn half(self) -> Option<candle_core::DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(candle_core::DType::BF16),
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "bf16" | "amp_bf16" => Ok(Self::Bf16),
            other => Err(format!("unknown precision `{other}` (f32 or bf16)")),
        }
    }
}

fn half() -> f64 {
    0.5
}
fn proj_group() -> optim::ParamGroup {
    optim::ParamGroup::Proj
}
fn one() -> usize {
    1
}
fn crop_scale() -> f64 {
    0.9
}
fn cpu() -> String {
    "cpu".into()
}
pub fn color_jitter_prob() -> f64 {
    0.8
}

/// The distillation teacher, when `distill` is among the objectives.
fn load_teacher(
    cfg: &TrainConfig,
    wanted: bool,
    dev: &candle_core::Device,
) -> Result<Option<crate::Encoder>> {
    let Some(spec) = cfg.teacher.as_deref() else {
        return if wanted {
            Err(Error::Report(
                "objective `distill` needs a teacher: --teacher CHECKPOINT".into(),
            ))
        } else {
            Ok(None)
        };
    };
    if !wanted {
        return Err(Error::Report(format!(
            "--teacher {spec} is given but no `distill` objective uses it (add e.g. --objective infonce,distill:1)"
        )));
    }
    Ok(Some(crate::Encoder::load(spec, dev)?))
}

/// The teacher sees the student's pixels, so the two must preprocess alike
/// (same crop size, mean and std); texts go through the teacher's own
/// tokenizer.
fn check_teacher_pixels(
    te: &crate::Encoder,
    spec: &str,
    student: &crate::preprocess::ImageProcessor,
) -> Result<()> {
    let (a, b) = (student.config(), te.image_processor().config());
    if (a.crop, a.mean, a.std) != (b.crop, b.mean, b.std) {
        return Err(Error::Report(format!(
            "teacher {spec} preprocesses images differently from the student (crop {:?} mean {:?} std {:?} vs the student's {:?} {:?} {:?}); distillation shares the student's pixels, so they must match",
            b.crop, b.mean, b.std, a.crop, a.mean, a.std
        )));
    }
    Ok(())
}

/// A new run must not write into another run's directory: its metrics would
/// be appended to the old ones and its state would replace the old state.
pub fn check_fresh_output(out: &Path) -> Result<()> {
    if state_dir(out).join("trainer.json").is_file() {
        return Err(Error::Report(format!(
            "{} already holds a training run; continue it with `clasp train --resume {}`, or give another --output",
            out.display(),
            out.display()
        )));
    }
    Ok(())
}

/// Where the data order stands: the epoch's image order with one caption
/// each, and the position in it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    rng: Rng,
    epoch: usize,
    /// (image, caption) pairs of the current epoch.
    pairs: Vec<(usize, usize)>,
    pos: usize,
}

impl Order {
    fn new(seed: u64) -> Self {
        Self {
            rng: Rng(seed),
            epoch: 0,
            pairs: Vec::new(),
            pos: 0,
        }
    }

    /// The next batch: `n` distinct images, each with one of its captions
    /// (an epoch shows every image once, with a caption drawn at random).
    fn next_batch(&mut self, per_image: &[Vec<usize>], n: usize) -> Vec<(usize, usize)> {
        if self.pos + n > self.pairs.len() {
            let mut imgs: Vec<usize> = (0..per_image.len()).collect();
            self.rng.shuffle(&mut imgs);
            self.pairs = imgs
                .into_iter()
                .map(|i| {
                    let caps = &per_image[i];
                    (i, caps[self.rng.below(caps.len())])
                })
                .collect();
            self.pos = 0;
            self.epoch += 1;
        }
        let b = self.pairs[self.pos..self.pos + n].to_vec();
        self.pos += n;
        b
    }
}

#[derive(Serialize, Deserialize)]
struct State {
    step: usize,
    order: Order,
    config: TrainConfig,
}

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub temperature: f64,
    pub images_per_s: f64,
    /// Per-module gradient norms before clipping, when per-module clipping is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_grad_norms: Option<std::collections::BTreeMap<String, f64>>,
    /// Cosine between the first two objectives' gradients on the probed group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_conflict: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<serde_json::Value>,
}

pub struct TrainOutcome {
    pub steps_done: usize,
    pub interrupted: bool,
    pub last_loss: f64,
    pub dev: Option<serde_json::Value>,
    pub checkpoint: PathBuf,
}

/// Progress during training, beyond the plain bar.
pub trait TrainProgress: Progress {
    fn step(&self, log: &StepLog);
}

fn state_dir(out: &Path) -> PathBuf {
    out.join("state")
}
fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// Decodes, augments and preprocesses a batch of images (on the worker
/// thread). Each image's crop comes from a generator seeded by (seed, step,
/// position), so a resumed run draws the same crops.
fn decode_batch(
    proc: &crate::preprocess::ImageProcessor,
    images: &[ImageSource],
    batch: &[(usize, usize)],
    crop_scale: f64,
    jitter: Option<&ColorJitter>,
    seed: u64,
    step: usize,
) -> Result<Vec<Vec<f32>>> {
    batch
        .par_iter()
        .enumerate()
        .map(|(k, (i, _))| {
            let src = &images[*i];
            let bytes = src.read()?;
            let img = decode_image(&bytes, &src.path())?;
            let mut rng = Rng(seed ^ 0xA5A5_5A5A ^ ((step as u64) << 20) ^ k as u64);
            rng.next_u64();
            let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            proc.process_train(&img, crop_scale, jitter, &mut uniform)
        })
        .collect()
}

/// `cpu`, or `cuda` (GPU 0; needs the `cuda` cargo feature).
fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" if !cfg!(feature = "cuda") => Err(Error::Report(
            "this clasp was built without CUDA; rebuild with `cargo build --release --features cuda`"
                .into(),
        )),
        "cuda" => Ok(Device::new_cuda(0)?),
        other => Err(Error::Report(format!(
            "unknown device `{other}` (cpu or cuda)"
        ))),
    }
}

/// How a run begins.
pub enum Start {
    /// A new run with this config.
    New(Box<TrainConfig>),
    /// Continue the run saved in this output directory, with its own config.
    Resume(PathBuf),
}

/// Trains a new run, or resumes a saved one. `stop` is polled between steps (Ctrl-C): the run then saves and returns.
/// `stop_after` ends this invocation after that many total steps without
/// finishing the schedule (time-boxing, and the resume test).
pub fn train(
    start: Start,
    stop: &AtomicBool,
    stop_after: Option<usize>,
    progress: &dyn TrainProgress,
) -> Result<TrainOutcome> {
    let (cfg, t, mut order, start_step, mut opt_state) = match start {
        Start::Resume(out) => {
            let sd = state_dir(&out);
            let text = std::fs::read_to_string(sd.join("trainer.json"))
                .map_err(|e| Error::io(sd.join("trainer.json"), e))?;
            let st: State = serde_json::from_str(&text)
                .map_err(|e| Error::Report(format!("{}: {e}", sd.display())))?;
            let cfg = TrainConfig {
                output: out.clone(),
                ..st.config
            };
            let dev = device(&cfg.device)?;
            let t = Trainable::from_checkpoint(&checkpoint_dir(&out).to_string_lossy(), &dev)?;
            let opt = candle_core::safetensors::load(sd.join("optimizer.safetensors"), &dev)?;
            (cfg, t, st.order, st.step, Some(opt))
        }
        Start::New(cfg) => {
            let cfg = *cfg;
            check_fresh_output(&cfg.output)?;
            let dev = device(&cfg.device)?;
            let t = Trainable::from_checkpoint(&cfg.init, &dev)?;
            let order = Order::new(cfg.seed);
            (cfg, t, order, 0, None)
        }
    };
    let dev = device(&cfg.device)?;
    let out = cfg.output.clone();
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    let lang = Lang::parse(&cfg.lang)?;
    let set: PairSet = data::load_pairs(
        &DatasetSpec::parse(&cfg.dataset)?,
        Split::parse(&cfg.split)?,
        lang,
        None,
    )?;
    if set.images.len() < cfg.batch_size {
        return Err(Error::Dataset(format!(
            "{}: {} images, fewer than one batch of {}",
            set.name,
            set.images.len(),
            cfg.batch_size
        )));
    }
    let mut per_image: Vec<Vec<usize>> = vec![Vec::new(); set.images.len()];
    for (c, &i) in set.caption_image.iter().enumerate() {
        per_image[i].push(c);
    }
    let teacher = load_teacher(
        &cfg,
        loss::names(&cfg.objective).iter().any(|n| n == "distill"),
        &dev,
    )?;
    let objective = loss::parse_objectives(
        &cfg.objective,
        &cfg.objective_params,
        cfg.schedule.as_deref(),
        &loss::ObjectiveEnv {
            dim: t.config.projection_dim(),
            seed: cfg.seed,
            device: &dev,
            teacher_dim: teacher.as_ref().map(|te| te.config().projection_dim()),
        },
    )?;
    let needs_bias = objective.uses("siglip");
    // SigLIP's bias lives in the training state, not in the checkpoint
    // (CLIPModel has no such parameter).
    let bias = Var::from_tensor(&Tensor::new(-10f32, &dev)?)?;
    let frozen = if cfg.lock_image || cfg.lock_text {
        Some(t.snapshot()?)
    } else {
        None
    };
    let locked = super::step::Locked {
        image: frozen.as_ref().filter(|_| cfg.lock_image),
        text: frozen.as_ref().filter(|_| cfg.lock_text),
    };
    // A locked tower's parameters are not optimised (nor decayed).
    let mut opt_vars: Vec<(String, Var)> = t
        .vars()
        .into_iter()
        .filter(|(n, _)| {
            !(cfg.lock_image && n.starts_with("vision_model.")
                || cfg.lock_text && n.starts_with("text_model."))
        })
        .collect();
    // Trainable tensors outside the checkpoint: SigLIP's bias and any
    // objective's own parameters (a discriminator). They live in the state.
    let mut extra = objective.vars();
    if needs_bias {
        extra.push(("logit_bias".into(), bias.clone()));
    }
    opt_vars.extend(extra.iter().cloned());
    let mut opt = GroupedAdamW::new(
        &opt_vars,
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    if let Some(s) = opt_state.take() {
        for (name, v) in &extra {
            if let Some(x) = s.get(name) {
                v.set(x)?;
            }
        }
        opt.load_state(&s, start_step)?;
    }
    let tokenizer =
        crate::preprocess::TextTokenizer::from_dir(&t.source_dir, t.config.text_context_length())?;
    let jitter = ColorJitter::new(&cfg.color_jitter, cfg.color_jitter_prob)?;
    let proc = crate::preprocess::ImageProcessor::new(
        match &t.source_dir.join("preprocessor_config.json") {
            p if p.is_file() => crate::preprocess::ImageProcessorConfig::from_file(p)?,
            _ => crate::preprocess::ImageProcessorConfig::clip_default(
                t.config.vision().image_size as u32,
            ),
        },
    );
    if let Some(te) = &teacher {
        check_teacher_pixels(te, cfg.teacher.as_deref().unwrap_or(""), &proc)?;
    }
    let ewc = match &objective.ewc {
        Some(_) => {
            let anchor = cfg.ewc_anchor.clone().unwrap_or_else(|| cfg.init.clone());
            Some(super::ewc::Ewc::load(Path::new(&anchor), &opt_vars)?)
        }
        None => None,
    };

    let end = stop_after.unwrap_or(cfg.steps).min(cfg.steps);
    // The batches this invocation will run, in order (cheap: indices only).
    // They are drawn up front for the decode worker, so the live order runs
    // ahead; states saved mid-run replay `base` to the step they record.
    let base = order.clone();
    let order_at = |step: usize| {
        let mut o = base.clone();
        for _ in start_step..step {
            o.next_batch(&per_image, cfg.batch_size);
        }
        o
    };
    let eval_set = match &cfg.eval_dataset {
        Some(spec) => Some(data::load_pairs(
            &DatasetSpec::parse(spec)?,
            Split::parse(&cfg.eval_split)?,
            lang,
            None,
        )?),
        None => None,
    };
    let negatives = match &cfg.negatives {
        Some(p) => Some(super::mine::MinedNegatives::load(p, &set)?),
        None => None,
    };
    let plan: Vec<Vec<(usize, usize)>> = (start_step..end)
        .map(|_| {
            let mut b = order.next_batch(&per_image, cfg.batch_size);
            if let Some(m) = &negatives {
                m.fill(&set, &mut b, cfg.negatives_share);
            }
            b
        })
        .collect();
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("metrics.jsonl"))
        .map_err(|e| Error::io(out.join("metrics.jsonl"), e))?;
    progress.start("training", (end - start_step) as u64);
    let (tx, rx) = mpsc::sync_channel::<(Vec<(usize, usize)>, Result<Vec<Vec<f32>>>)>(2);
    let mut step = start_step;
    let mut last_loss = f64::NAN;
    let mut interrupted = false;
    let mut last_dev = None;
    std::thread::scope(|s| -> Result<()> {
        let images = &set.images;
        let proc = &proc;
        let (crop, seed) = (cfg.crop_scale, cfg.seed);
        let jitter = jitter.as_ref();
        s.spawn(move || {
            for (n, b) in plan.into_iter().enumerate() {
                let px = decode_batch(proc, images, &b, crop, jitter, seed, start_step + n);
                if tx.send((b, px)).is_err() {
                    return;
                }
            }
        });
        for (batch, pixels) in rx {
            if stop.load(Ordering::Relaxed) {
                interrupted = true;
                break;
            }
            let t0 = Instant::now();
            let pixels = pixels?;
            let lr = optim::cosine_lr(step, cfg.lr, cfg.warmup, cfg.steps);
            opt.set_lr(lr);
            let texts = batch_texts(&set, &batch);
            let (ids, mask) = tokenizer.encode(&texts)?.to_tensors(true, &dev)?;
            let teacher_tokens = match &teacher {
                Some(te) => Some(te.tokenizer().encode(&texts)?.to_tensors(true, &dev)?),
                None => None,
            };
            let px = pixel_tensor(&pixels, &t, &dev)?;
            let inputs = super::step::Inputs {
                pixels: &px,
                ids: &ids,
                mask: &mask,
                locked,
                teacher: teacher
                    .as_ref()
                    .zip(teacher_tokens.as_ref())
                    .map(|(te, (ti, tm))| super::step::TeacherInputs {
                        model: te.model(),
                        ids: ti,
                        mask: tm,
                    }),
            };
            let progress_now = step as f64 / cfg.steps.max(1) as f64;
            // Mixed precision: this step's bf16 view of the variables.
            let half = cfg
                .precision
                .half()
                .map(|dt| t.compute_model(dt))
                .transpose()?;
            // This batch's loss and gradients under an objective.
            let grads_of = |obj: &dyn loss::Objective| {
                super::step::contrastive_grads(
                    half.as_ref().unwrap_or(&t.model),
                    obj,
                    &inputs,
                    needs_bias.then_some(&bias),
                    &opt_vars,
                    cfg.accum_freq,
                )
            };
            let (mut lv, mut grads) = grads_of(&objective.at(progress_now))?;
            if let (Some(e), Some(w)) = (&ewc, &objective.ewc) {
                lv += e.apply(w.at(progress_now), &mut grads)?;
            }
            let t_bwd = t0.elapsed();
            // The seed's measurement: do two objectives pull the chosen
            // group the same way? Two extra backward passes, every N steps.
            let grad_conflict = if cfg.conflict_every > 0
                && objective.parts.len() >= 2
                && step % cfg.conflict_every == 0
            {
                let (g0, g1) = (
                    grads_of(&objective.only(0))?.1,
                    grads_of(&objective.only(1))?.1,
                );
                Some(optim::grad_cosine(
                    &cfg.conflict_group.members(&opt_vars),
                    &g0,
                    &g1,
                )?)
            } else {
                None
            };
            let group_norms = optim::clip_group_norms(
                &opt_vars,
                &mut grads,
                &[
                    (optim::ParamGroup::Vision, cfg.grad_clip_vision),
                    (optim::ParamGroup::Text, cfg.grad_clip_text),
                    (optim::ParamGroup::Proj, cfg.grad_clip_proj),
                ],
            )?;
            optim::clip_grad_norm(&opt_vars, &mut grads, cfg.grad_clip)?;
            let t_clip = t0.elapsed();
            opt.step(&grads)?;
            tracing::debug!(
                forward_backward_s = t_bwd.as_secs_f64(),
                clip_s = (t_clip - t_bwd).as_secs_f64(),
                optimizer_s = (t0.elapsed() - t_clip).as_secs_f64(),
                "step timing"
            );
            step += 1;
            last_loss = lv;
            let temperature = t
                .model
                .logit_scale()
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                .exp();
            let mut log = StepLog {
                step,
                loss: lv,
                lr,
                temperature,
                images_per_s: batch.len() as f64 / t0.elapsed().as_secs_f64(),
                group_grad_norms: (!group_norms.is_empty()).then(|| {
                    group_norms
                        .iter()
                        .map(|(g, n)| (format!("{g:?}").to_lowercase(), *n))
                        .collect()
                }),
                grad_conflict,
                dev: None,
            };
            let save_now = (cfg.save_every > 0 && step % cfg.save_every == 0) || step == end;
            let eval_now = eval_set.is_some()
                && ((cfg.eval_every > 0 && step % cfg.eval_every == 0) || step == cfg.steps);
            if save_now || eval_now {
                save(&t, &opt, &extra, &order_at(step), step, &cfg)?;
            }
            if let (true, Some(set)) = (eval_now, &eval_set) {
                let m = evaluate(&cfg, set.clone())?;
                last_dev = Some(m.clone());
                log.dev = Some(m);
            }
            writeln!(
                metrics,
                "{}",
                serde_json::to_string(&log).expect("log serialises")
            )
            .map_err(|e| Error::io(out.join("metrics.jsonl"), e))?;
            progress.step(&log);
            progress.inc(1);
        }
        Ok(())
    })?;
    progress.finish();
    if interrupted {
        save(&t, &opt, &extra, &order_at(step), step, &cfg)?;
    }
    if cfg.fisher_batches > 0 && !interrupted && step == cfg.steps {
        // EWC's Fisher for this task, on unaugmented batches in a fresh
        // seeded order, with the final weights.
        let mut o = Order::new(cfg.seed.wrapping_add(0xF15E));
        let mut sum = super::ewc::FisherSum::default();
        progress.start("fisher", cfg.fisher_batches as u64);
        for k in 0..cfg.fisher_batches {
            let b = o.next_batch(&per_image, cfg.batch_size);
            let pixels = decode_batch(&proc, &set.images, &b, 1.0, None, cfg.seed, k)?;
            let (ids, mask) = tokenizer
                .encode(&batch_texts(&set, &b))?
                .to_tensors(true, &dev)?;
            let px = pixel_tensor(&pixels, &t, &dev)?;
            let inputs = super::step::Inputs {
                pixels: &px,
                ids: &ids,
                mask: &mask,
                locked,
                teacher: None,
            };
            let (_, g) = super::step::contrastive_grads(
                &t.model,
                &loss::InfoNce,
                &inputs,
                None,
                &opt_vars,
                cfg.accum_freq,
            )?;
            sum.add(&opt_vars, &g)?;
            progress.inc(1);
        }
        progress.finish();
        sum.save(
            &opt_vars,
            &checkpoint_dir(&out).join(super::ewc::FISHER_FILE),
        )?;
    }
    let _ = plot_losses(&out);
    Ok(TrainOutcome {
        steps_done: step,
        interrupted,
        last_loss,
        dev: last_dev,
        checkpoint: checkpoint_dir(&out),
    })
}

/// The captions of a batch's (image, caption) pairs.
fn batch_texts<'a>(set: &'a PairSet, batch: &[(usize, usize)]) -> Vec<&'a str> {
    batch
        .iter()
        .map(|(_, c)| set.captions[*c].as_str())
        .collect()
}

/// A batch of decoded images as one [B, C, S, S] tensor.
fn pixel_tensor(pixels: &[Vec<f32>], t: &Trainable, dev: &candle_core::Device) -> Result<Tensor> {
    let s = t.config.vision().image_size;
    Ok(Tensor::from_vec(
        pixels.concat(),
        (pixels.len(), t.config.vision().num_channels, s, s),
        dev,
    )?)
}

fn save(
    t: &Trainable,
    opt: &GroupedAdamW,
    extra: &[(String, Var)],
    order: &Order,
    step: usize,
    cfg: &TrainConfig,
) -> Result<()> {
    t.save(&checkpoint_dir(&cfg.output))?;
    let sd = state_dir(&cfg.output);
    std::fs::create_dir_all(&sd).map_err(|e| Error::io(&sd, e))?;
    let mut tensors: HashMap<String, Tensor> = opt.state().into_iter().collect();
    for (name, v) in extra {
        tensors.insert(name.clone(), v.as_tensor().clone());
    }
    let tmp = sd.join("optimizer.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, sd.join("optimizer.safetensors")).map_err(|e| Error::io(&sd, e))?;
    write_state(&cfg.output, order, step, cfg)
}

fn write_state(out: &Path, order: &Order, step: usize, cfg: &TrainConfig) -> Result<()> {
    let sd = state_dir(out);
    std::fs::create_dir_all(&sd).map_err(|e| Error::io(&sd, e))?;
    let st = State {
        step,
        order: order.clone(),
        config: cfg.clone(),
    };
    let tmp = sd.join("trainer.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(&st).expect("state serialises"),
    )
    .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, sd.join("trainer.json")).map_err(|e| Error::io(&sd, e))
}

/// Dev retrieval metrics of the saved checkpoint, as `clasp eval` computes them.
fn evaluate(cfg: &TrainConfig, set: PairSet) -> Result<serde_json::Value> {
    let enc = crate::Encoder::load(
        &checkpoint_dir(&cfg.output).to_string_lossy(),
        &device(&cfg.device)?,
    )?;
    let mut ctx = crate::eval::EmbedContext {
        encoder: &enc,
        cache: None,
        model_key: None,
        batch_size: 64,
        progress: &crate::progress::Silent,
    };
    let r = crate::eval::retrieval::evaluate_retrieval(&mut ctx, set, &crate::eval::RECALL_KS)?;
    let m: serde_json::Map<String, serde_json::Value> = r
        .metrics
        .to_pairs()
        .into_iter()
        .map(|(k, v)| (k, serde_json::json!(v)))
        .collect();
    Ok(serde_json::Value::Object(m))
}

/// loss.png (and dev_recall.png when evaluated) from metrics.jsonl.
fn plot_losses(out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).map_err(|e| Error::io(out, e))?;
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let loss: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r["step"].as_f64()?, r["loss"].as_f64()?)))
        .collect();
    crate::eval::plot::line_chart(
        &out.join("loss.png"),
        "Training loss",
        "step",
        "loss",
        None,
        &[("loss", loss)],
    )?;
    let dev: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r["step"].as_f64()?, r["dev"]["mean_recall"].as_f64()?)))
        .collect();
    if !dev.is_empty() {
        crate::eval::plot::line_chart(
            &out.join("dev_recall.png"),
            "Dev mean recall",
            "step",
            "mean recall",
            Some((0.0, 1.0)),
            &[("dev", dev)],
        )?;
    }
    Ok(())
}
