//! The training loop as an object: [`Trainer::new`] or [`Trainer::resume`],
//! then [`Trainer::run`] (or [`Trainer::step`] batch by batch), with
//! checkpoints and state saved atomically and a Fisher pass at the end.
//! Dev evaluation is a hook the caller passes in ([`Hooks`]), so training
//! knows nothing of `eval`.
//!
//! Resuming from the state gives the same final weights as an uninterrupted
//! run on CPU: the data order comes from a saved RNG state, the optimiser
//! moments are saved exactly, and the weights are saved in f32.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};

use super::config::TrainConfig;
use super::ewc::Ewc;
use super::feature_cache::FeatureCache;
use super::mine::MinedNegatives;
use super::model::Trainable;
use super::objectives::{self, Objective};
use super::optim::{self, AdamWConfig, GroupedAdamW};
use super::order::{self, Augment, Order};
use super::run::{Prepare, Task};
use super::schedule::{self, Combined};
use super::state::{self, checkpoint_dir, State};
use super::step::Images;
use crate::data::{ImageSource, PairSet};
use crate::preprocess::augment::ColorJitter;
use crate::preprocess::{ImageProcessor, ImageProcessorConfig, TextTokenizer};
use crate::progress::Progress;
use crate::{Encoder, Error, Result};
use clasp_core::model::Model;

pub use super::config::Precision;
pub use super::hooks::{EvalHook, Hooks, StepLog, TrainOutcome, TrainProgress};
use super::momentum::Momentum;
pub use super::state::check_fresh_output;
use super::teacher::{check_teacher_pixels, load_teacher};

/// A run in progress.
pub struct Trainer {
    cfg: TrainConfig,
    out: PathBuf,
    dev: Device,
    t: Trainable,
    opt: GroupedAdamW,
    /// Everything the optimiser updates.
    opt_vars: Vec<(String, Var)>,
    /// Trainable tensors outside the checkpoint (SigLIP's bias, an
    /// objective's own parameters); they live in the state.
    extra: Vec<(String, Var)>,
    objective: Combined,
    bias: Option<Var>,
    /// Inference snapshot of the locked towers.
    frozen: Option<Model>,
    /// The locked image tower's features, computed once (no augmentation).
    cache: Option<std::sync::Arc<FeatureCache>>,
    teacher: Option<Encoder>,
    momentum: Option<Momentum>,
    ewc: Option<Ewc>,
    tokenizer: TextTokenizer,
    proc: ImageProcessor,
    jitter: Option<ColorJitter>,
    set: PairSet,
    per_image: Vec<Vec<usize>>,
    negatives: Option<MinedNegatives>,
    /// The data order at `step`.
    order: Order,
    step: usize,
    /// The ranks sharing each global batch (one process alone by default).
    dist: std::sync::Arc<dyn crate::dist::Collective>,
}

impl Trainer {
    /// A new run. A preset's initial checkpoint is written to OUTPUT/init
    /// first (see [`TrainConfig::materialize_init`]).
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        Self::new_in(cfg, std::sync::Arc::new(crate::dist::Single))
    }

    /// [`Self::new`] as one rank of `dist`: --batch-size per rank, each
    /// global batch of world × batch-size drawn as one process would draw it
    /// and split in rank order, gradients averaged, rank 0 writing, a locked
    /// tower's feature cache filled by the ranks together. Fails, naming the
    /// rank, unless every rank starts from the same weights.
    pub fn new_in(
        mut cfg: TrainConfig,
        dist: std::sync::Arc<dyn crate::dist::Collective>,
    ) -> Result<Self> {
        cfg.check()?;
        let out = cfg.output_dir()?.to_path_buf();
        check_fresh_output(&out)?;
        cfg.materialize_init()?;
        let dev = cfg.device.open()?;
        let init = cfg.init.clone().expect("materialize_init sets init");
        let t = Trainable::from_checkpoint(&init, &dev)?;
        let order = Order::new(cfg.seed);
        Self::build(cfg, dev, t, order, 0, None, dist)
    }

    /// Continues the run saved in `out`, with its own config.
    pub fn resume(out: &Path) -> Result<Self> {
        Self::resume_in(out, std::sync::Arc::new(crate::dist::Single))
    }

    /// [`Self::resume`] as one rank of `dist` (see [`Self::new_in`]).
    pub fn resume_in(
        out: &Path,
        dist: std::sync::Arc<dyn crate::dist::Collective>,
    ) -> Result<Self> {
        let st = state::read_state(out)?;
        let dev = st.config.device.open()?;
        let opt = state::read_optimizer(out, &dev)?;
        let t = Trainable::from_checkpoint(&checkpoint_dir(out).to_string_lossy(), &dev)?;
        Self::build(st.config, dev, t, st.order, st.step, Some(opt), dist)
    }

    fn build(
        cfg: TrainConfig,
        dev: Device,
        t: Trainable,
        order: Order,
        step: usize,
        opt_state: Option<std::collections::HashMap<String, Tensor>>,
        dist: std::sync::Arc<dyn crate::dist::Collective>,
    ) -> Result<Self> {
        crate::dist::check_same_weights(dist.as_ref(), &t.vars())?;
        let out = cfg.output_dir()?.to_path_buf();
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let (set, per_image) = order::training_pairs(&cfg)?;
        let wants_teacher = schedule::names(&cfg.objective)
            .iter()
            .any(|n| n == "distill");
        let teacher = load_teacher(&cfg, wants_teacher, &dev)?;
        let objective = schedule::parse_objectives(
            &cfg.objective,
            &cfg.objective_params,
            cfg.schedule.as_deref(),
            &objectives::ObjectiveEnv {
                dim: t.config.projection_dim(),
                seed: cfg.seed,
                device: &dev,
                teacher_dim: teacher.as_ref().map(|te| te.config().projection_dim()),
            },
        )?;
        // The sigmoid loss's bias: a SigLIP checkpoint's own `logit_bias`
        // (trained and saved with the model), else one that lives in the
        // training state (CLIPModel has no such parameter).
        let own_bias = t.vars().into_iter().find(|(n, _)| n == "logit_bias");
        let bias = if objective.uses("siglip") {
            match &own_bias {
                Some((_, v)) => Some(v.clone()),
                None => Some(Var::from_tensor(&Tensor::new(-10f32, &dev)?)?),
            }
        } else {
            None
        };
        let frozen = if cfg.lock_image || cfg.lock_text {
            Some(t.snapshot()?)
        } else {
            None
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
        let mut extra = objective.vars();
        if let (Some(b), None) = (&bias, &own_bias) {
            extra.push(("logit_bias".into(), b.clone()));
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
        if let Some(text_lr) = cfg.text_lr {
            opt.scale_lr(|n| n.starts_with("text_model."), text_lr / cfg.lr);
        }
        let momentum = Momentum::start(&cfg, &t, opt_state.as_ref(), teacher.is_some())?;
        if let Some(s) = opt_state {
            for (name, v) in &extra {
                if let Some(x) = s.get(name) {
                    v.set(x)?;
                }
            }
            opt.load_state(&s, step)?;
        }
        let tokenizer = TextTokenizer::from_dir(&t.source_dir, t.config.text_context_length())?;
        let tokenizer = if t.config.reads_full_context() {
            tokenizer.full_context()
        } else {
            tokenizer
        };
        let jitter = ColorJitter::new(&cfg.color_jitter, cfg.color_jitter_prob)?;
        let pp_file = t.source_dir.join("preprocessor_config.json");
        let proc = ImageProcessor::new(match &t.preprocessor_json {
            Some(j) => ImageProcessorConfig::from_json(&j.to_string(), &pp_file)?,
            None if pp_file.is_file() => ImageProcessorConfig::from_file(&pp_file)?,
            None => crate::encoder::default_image_processor(&t.config),
        });
        // Batches stack square images of the model's size. An aspect-keeping
        // processor (SigLIP 2's NaFlex) trains on squares of its trained
        // grid, where its positions are the table itself.
        let proc = if proc.config().fixed_size().is_none() {
            let s = t.config.vision().image_size as u32;
            let mut c = proc.config().clone();
            c.resize = crate::preprocess::ResizeTo::Exact {
                height: s,
                width: s,
            };
            c.do_center_crop = false;
            c.crop = (s, s);
            tracing::info!("training on {s}x{s} squares (the trained position grid)");
            ImageProcessor::new(c)
        } else {
            proc
        };
        if let Some(te) = &teacher {
            check_teacher_pixels(te, cfg.teacher.as_deref().unwrap_or(""), &proc)?;
        }
        let ewc = match &objective.ewc {
            Some(_) => {
                let anchor = cfg
                    .ewc_anchor
                    .clone()
                    .or_else(|| cfg.init.clone())
                    .unwrap_or_default();
                Some(Ewc::load(Path::new(&anchor), &opt_vars)?)
            }
            None => None,
        };
        let cnn = match &t.config {
            clasp_core::model::ModelConfig::DualEncoder(c) => c.image_cnn.is_some(),
            clasp_core::model::ModelConfig::Clip(c) => c.image_cnn.is_some(),
            _ => false,
        };
        if cnn && !cfg.lock_image {
            return Err(Error::Report(
                "this checkpoint's image tower is a CNN, which trains locked in clasp: \
                 add --lock-image"
                    .into(),
            ));
        }
        let cache = match &frozen {
            Some(m) if cfg.lock_image => super::feature_cache::for_run(
                &cfg,
                &t,
                m,
                &proc,
                &set.images,
                jitter.is_some() || teacher.is_some(),
                &dev,
                dist.as_ref(),
            )?,
            _ => None,
        };
        let negatives = match &cfg.negatives {
            Some(p) => Some(MinedNegatives::load(p, &set)?),
            None => None,
        };
        Ok(Self {
            cfg,
            out,
            dev,
            t,
            opt,
            opt_vars,
            extra,
            objective,
            bias,
            frozen,
            teacher,
            momentum,
            cache,
            ewc,
            tokenizer,
            proc,
            jitter,
            set,
            per_image,
            negatives,
            order,
            step,
            dist,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Optimiser steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The next `n` batches of the data order (mined negatives filled in),
    /// advancing it.
    fn draw(&self, order: &mut Order, n: usize) -> Vec<Vec<(usize, usize)>> {
        (0..n)
            .map(|_| {
                let global = self.cfg.batch_size * self.dist.world();
                let mut b = order.next_batch(&self.per_image, global);
                if let Some(m) = &self.negatives {
                    m.fill(&self.set, &mut b, self.cfg.negatives_share);
                }
                crate::dist::share(self.dist.as_ref(), &b)
            })
            .collect()
    }

    fn augment(&self) -> Augment {
        Augment {
            crop_scale: self.cfg.crop_scale,
            jitter: self.jitter,
            seed: self.cfg.seed,
        }
    }

    /// A batch of prepared images as one [B, C, S, S] tensor.
    fn pixel_tensor(&self, pixels: &[Vec<f32>]) -> Result<Tensor> {
        let v = self.t.config.vision();
        Ok(Tensor::from_vec(
            pixels.concat(),
            (pixels.len(), v.num_channels, v.image_size, v.image_size),
            &self.dev,
        )?)
    }

    /// One optimiser step on a batch of (image, caption) pairs and their
    /// prepared pixels.
    pub fn step(&mut self, batch: &[(usize, usize)], pixels: &[Vec<f32>]) -> Result<StepLog> {
        let cfg = &self.cfg;
        let t0 = Instant::now();
        let comm0 = self.dist.comm_seconds();
        let lr = optim::cosine_lr(self.step, cfg.lr, cfg.warmup_steps(), cfg.steps);
        self.opt.set_lr(lr);
        let texts = order::batch_texts(&self.set, batch);
        let (ids, mask) = self.tokenizer.encode(&texts)?.to_tensors(true, &self.dev)?;
        let teacher_tokens = match &self.teacher {
            Some(te) => Some(te.tokenizer().encode(&texts)?.to_tensors(true, &self.dev)?),
            None => None,
        };
        let images = match &self.cache {
            Some(c) => Images::Pooled(c.batch(
                &batch.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
                &self.dev,
            )?),
            None => Images::Pixels(self.pixel_tensor(pixels)?),
        };
        // ALBEF: the momentum towers move first, then see the batch.
        let ema = self
            .momentum
            .as_mut()
            .map(|m| m.advance(&self.t))
            .transpose()?;
        let locked = super::step::Locked {
            image: self.frozen.as_ref().filter(|_| cfg.lock_image),
            text: self.frozen.as_ref().filter(|_| cfg.lock_text),
        };
        let inputs = super::step::Inputs {
            images: &images,
            ids: &ids,
            mask: &mask,
            locked,
            teacher: self
                .teacher
                .as_ref()
                .zip(teacher_tokens.as_ref())
                .map(|(te, (ti, tm))| super::step::TeacherInputs {
                    model: te.model(),
                    ids: ti,
                    mask: tm,
                })
                .or(ema.as_ref().map(|model| super::step::TeacherInputs {
                    model,
                    ids: &ids,
                    mask: &mask,
                })),
        };
        let progress_now = self.step as f64 / cfg.steps.max(1) as f64;
        // Mixed precision: this step's bf16 view of the variables.
        let half = cfg
            .precision
            .half()
            .map(|dt| self.t.compute_model(dt))
            .transpose()?;
        let model = half.as_ref().unwrap_or(&self.t.model);
        let gather = crate::dist::step::Gather {
            group: self.dist.as_ref(),
            with_grad: cfg.gather_with_grad,
            local_loss: cfg.local_loss,
        };
        let grads_of = |obj: &dyn Objective| {
            crate::dist::step::contrastive_grads(
                model,
                obj,
                &inputs,
                self.bias.as_ref(),
                &self.opt_vars,
                cfg.accum_freq,
                gather,
            )
        };
        let (mut lv, mut grads) = grads_of(&self.objective.at(progress_now))?;
        if let (Some(e), Some(w)) = (&self.ewc, &self.objective.ewc) {
            lv += e.apply(w.at(progress_now), &mut grads)?;
        }
        let t_bwd = t0.elapsed();
        // The seed's measurement: do two objectives pull the chosen group
        // the same way? Two extra backward passes, every N steps.
        let grad_conflict = if cfg.conflict_every > 0
            && self.objective.parts.len() >= 2
            && self.step.is_multiple_of(cfg.conflict_every)
        {
            let (g0, g1) = (
                grads_of(&self.objective.only(0))?.1,
                grads_of(&self.objective.only(1))?.1,
            );
            Some(optim::grad_cosine(
                &cfg.conflict_group.members(&self.opt_vars),
                &g0,
                &g1,
            )?)
        } else {
            None
        };
        let group_norms = optim::clip_group_norms(
            &self.opt_vars,
            &mut grads,
            &[
                (optim::ParamGroup::Vision, cfg.grad_clip_vision),
                (optim::ParamGroup::Text, cfg.grad_clip_text),
                (optim::ParamGroup::Proj, cfg.grad_clip_proj),
            ],
        )?;
        optim::clip_grad_norm(&self.opt_vars, &mut grads, cfg.grad_clip)?;
        let t_clip = t0.elapsed();
        self.opt.step(&grads)?;
        tracing::debug!(
            forward_backward_s = t_bwd.as_secs_f64(),
            clip_s = (t_clip - t_bwd).as_secs_f64(),
            optimizer_s = (t0.elapsed() - t_clip).as_secs_f64(),
            "step timing"
        );
        self.step += 1;
        let temperature = self
            .t
            .model
            .logit_scale()
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
            .exp();
        Ok(StepLog {
            step: self.step,
            loss: lv,
            lr,
            temperature,
            // The whole global batch's rate.
            images_per_s: (batch.len() * self.dist.world()) as f64 / t0.elapsed().as_secs_f64(),
            group_grad_norms: (!group_norms.is_empty()).then(|| {
                group_norms
                    .iter()
                    .map(|(g, n)| (format!("{g:?}").to_lowercase(), *n))
                    .collect()
            }),
            grad_conflict,
            losses: None,
            skipped: Vec::new(),
            dev: None,
            comm_s: (self.dist.world() > 1).then(|| self.dist.comm_seconds() - comm0),
            data_wait_s: None,
        })
    }

    /// Saves the checkpoint and the state at `order` (the data order at the
    /// current step).
    fn save_at(&self, order: &Order) -> Result<()> {
        self.t.save(&checkpoint_dir(&self.out))?;
        let mut tensors: std::collections::HashMap<String, Tensor> =
            self.opt.state().into_iter().collect();
        for (name, v) in &self.extra {
            tensors.insert(name.clone(), v.as_tensor().clone());
        }
        if let Some(m) = &self.momentum {
            m.save_into(&mut tensors);
        }
        let st = State {
            step: self.step,
            order: order.clone(),
            config: self.cfg.clone(),
        };
        state::write(&self.out, &tensors, &st)
    }

    /// Saves the checkpoint and the state now.
    pub fn save(&self) -> Result<()> {
        self.save_at(&self.order)
    }

    /// Runs to the end of the schedule, or to `stop_after` total steps, or
    /// until `stop` is set (Ctrl-C): the run then saves and returns. The
    /// loop is the one every task shares ([`super::run::run`]).
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        stop_after: Option<usize>,
        hooks: &Hooks,
    ) -> Result<TrainOutcome> {
        super::run::run(self, stop, stop_after, hooks)
    }
}

/// How a run begins.
pub enum Start {
    /// A new run with this config.
    New(Box<TrainConfig>),
    /// Continue the run saved in this output directory, with its own config.
    Resume(PathBuf),
}

/// Trains a new run or resumes a saved one (see [`Trainer::run`]).
pub fn train(
    start: Start,
    stop: &AtomicBool,
    stop_after: Option<usize>,
    hooks: &Hooks,
) -> Result<TrainOutcome> {
    let mut t = match start {
        Start::New(cfg) => Trainer::new(*cfg)?,
        Start::Resume(out) => Trainer::resume(&out)?,
    };
    t.run(stop, stop_after, hooks)
}

// The shared training loop's view of a contrastive run.
#[path = "trainer_task.rs"]
mod task;
