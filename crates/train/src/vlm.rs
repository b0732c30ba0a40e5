//! Training a vision-language model (LLaVA's recipe). Stage 1: only the
//! connector learns, on image–caption pairs turned into instructions (the
//! user turn `<image>` + "Describe the image.", the caption as the answer),
//! English or Chinese. The LM loss counts the answer tokens only (the
//! caption and its end-of-turn token), as LLaVA masks everything else with
//! −100. The vision tower runs without a graph; the language model's frozen
//! f32 weights pass the gradient from the loss back to the image tokens and
//! on into the connector.
//!
//! The habits of `clasp train` hold: config file and flags, seeded data order,
//! atomic checkpoints (the VLM in the Llava layout) and a resumable state,
//! metrics.jsonl with plots, progress, Ctrl-C saves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};

use super::bcif::{mix_grads, Branch};
use super::config::TrainConfig;
use super::dist::Collective;
use super::hooks::{Hooks, StepLog, TrainOutcome};
use super::optim::{self, GroupedAdamW};
use super::order::{self, Order};
use super::run::{Prepare, Task};
use super::state::{self, checkpoint_dir, State};
use crate::data::{Lang, PairSet};
use crate::llm::lora::Lora;
use crate::preprocess::image::decode_image;
use crate::{Error, Result};
use clasp_vlm::heads::HEADS;
use clasp_vlm::model::{DESCRIBE_EN, DESCRIBE_ZH};
use clasp_vlm::Vlm;

/// One training sequence: the prompt (images expanded) and the answer.
pub struct Example {
    pub prompt: Vec<u32>,
    pub answer: Vec<u32>,
}

impl Example {
    /// The user turn for a caption in `lang`, and the caption (cut to
    /// `max_answer` tokens) closed by the end-of-turn token as the answer.
    pub fn caption(vlm: &Vlm, lang: Lang, caption: &str, max_answer: usize) -> Result<Self> {
        Self::caption_sized(vlm, lang, caption, max_answer, None)
    }

    /// [`Self::caption`] for an image of `size` (height, width): a
    /// LLaVA-NeXT model's prompt takes the tokens that size asks for.
    pub fn caption_sized(
        vlm: &Vlm,
        lang: Lang,
        caption: &str,
        max_answer: usize,
        size: Option<(u32, u32)>,
    ) -> Result<Self> {
        let instruction = match lang {
            Lang::En => DESCRIBE_EN,
            Lang::Zh => DESCRIBE_ZH,
        };
        let turn = Vlm::caption_turn(instruction);
        let prompt = match size {
            Some(s) => vlm.chat_prompt_sized(&turn, &[s])?,
            None => vlm.chat_prompt(&turn, 1)?,
        };
        let mut answer = vlm.tokenizer.encode(caption.trim(), false)?;
        answer.truncate(max_answer);
        let eos = vlm.tokenizer.eos_id().ok_or_else(|| {
            Error::Report("the language model has no end-of-sequence token".into())
        })?;
        answer.push(eos);
        Ok(Self { prompt, answer })
    }
}

/// The mean cross-entropy of every answer token given what precedes it,
/// with the images' tokens `[B, N, hidden]` spliced into the prompts. The
/// graph reaches back into `images` (and whatever made them).
pub fn answer_loss(vlm: &Vlm, examples: &[Example], images: &Tensor) -> Result<Tensor> {
    let each = (0..examples.len())
        .map(|i| Ok(images.get(i)?))
        .collect::<Result<Vec<_>>>()?;
    answer_loss_each(vlm, examples, &each)
}

/// [`answer_loss`] with each example's image tokens `[n_i, hidden]` (a
/// LLaVA-NeXT model's differ in number by image).
pub fn answer_loss_each(vlm: &Vlm, examples: &[Example], images: &[Tensor]) -> Result<Tensor> {
    let b = examples.len();
    let seqs: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| [e.prompt.as_slice(), e.answer.as_slice()].concat())
        .collect();
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let hidden = vlm.llm.config().hidden_size;
    let mut rows = Vec::with_capacity(b);
    let (mut idx, mut targets) = (Vec::new(), Vec::new());
    for (i, (e, ids)) in examples.iter().zip(&seqs).enumerate() {
        let x = vlm.input_embeds_flat(&e.prompt, &images[i])?;
        let a = Tensor::new(e.answer.as_slice(), vlm.device())?.unsqueeze(0)?;
        let a = vlm.llm.embed(&a)?.squeeze(0)?;
        let mut parts = vec![x, a];
        // Right padding: causal attention keeps real positions blind to it.
        if ids.len() < t {
            parts.push(Tensor::zeros(
                (t - ids.len(), hidden),
                candle_core::DType::F32,
                vlm.device(),
            )?);
        }
        rows.push(Tensor::cat(&parts, 0)?);
        // Position p predicts token p + 1: the answer's tokens.
        for p in e.prompt.len() - 1..ids.len() - 1 {
            idx.push((i * t + p) as u32);
            targets.push(ids[p + 1]);
        }
    }
    let h = vlm.llm.forward_train(&Tensor::stack(&rows, 0)?)?;
    let picked = h
        .reshape((b * t, hidden))?
        .index_select(&Tensor::new(idx.as_slice(), vlm.device())?, 0)?;
    let logits = vlm.llm.logits_train(&picked)?;
    let targets = Tensor::new(targets.as_slice(), vlm.device())?;
    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
}

/// A vision-language run in progress.
pub struct VlmTrainer {
    cfg: TrainConfig,
    out: PathBuf,
    vlm: Vlm,
    opt: GroupedAdamW,
    vars: Vec<(String, Var)>,
    set: PairSet,
    per_image: Vec<Vec<usize>>,
    order: Order,
    step: usize,
    /// BCIF's contrastive branch, when the objective has one.
    branch: Option<Branch>,
    /// `vars` split for per-module clipping and the probe, once.
    groups: Groups,
    /// The ranks sharing each global batch (one process alone by default).
    dist: Arc<dyn Collective>,
}

/// The trained variables by module.
struct Groups {
    /// The projector side: the connector and the contrastive heads.
    proj: Vec<(String, Var)>,
    /// The language model's LoRA adapter (stage 2; else empty).
    llm: Vec<(String, Var)>,
    /// The connector alone: where the conflict probe reads the gradients.
    connector: Vec<(String, Var)>,
}

impl Groups {
    fn new(vars: &[(String, Var)]) -> Self {
        let (proj, llm): (Vec<_>, Vec<_>) = vars
            .iter()
            .cloned()
            .partition(|(n, _)| !n.starts_with("base_model."));
        let connector = proj
            .iter()
            .filter(|(n, _)| n.starts_with("multi_modal_projector."))
            .cloned()
            .collect();
        Self {
            proj,
            llm,
            connector,
        }
    }
}

/// The model a run starts from: its `init` checkpoint, or the vision tower
/// and language model joined by a fresh connector.
fn base_model(cfg: &TrainConfig, dev: &Device) -> Result<Vlm> {
    match (&cfg.init, &cfg.llm, &cfg.vision) {
        (Some(init), _, _) => Vlm::load(Path::new(init), dev),
        (None, Some(llm), Some(vision)) => {
            let mut vlm = Vlm::assemble(
                vision,
                llm,
                cfg.connector_kind()?,
                cfg.vision_feature_layer,
                cfg.seed,
                dev,
            )?;
            if let Some(p) = &cfg.anyres {
                let p = crate::preprocess::anyres::parse_pinpoints(p)
                    .map_err(|e| Error::Report(format!("--anyres: {e}")))?;
                vlm.set_anyres(p, None, cfg.seed)?;
            }
            Ok(vlm)
        }
        _ => Err(Error::Report(
            "a vision-language run needs --llm and --vision, or --init VLM_CHECKPOINT".into(),
        )),
    }
}

impl VlmTrainer {
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.check()?;
        let out = cfg.output_dir()?.to_path_buf();
        state::check_fresh_output(&out)?;
        let dev = cfg.device.open()?;
        let vlm = base_model(&cfg, &dev)?;
        let order = Order::new(cfg.seed);
        Self::build(cfg, vlm, order, 0, None)
    }

    /// Continues the run in `out`: the model is rebuilt from the run's own
    /// sources and the connector set from the saved checkpoint, so a resumed
    /// run computes exactly what an uninterrupted one would.
    pub fn resume(out: &Path) -> Result<Self> {
        let (st, dev, opt) = state::read_resume(out)?;
        let cfg = st.config;
        let vlm = base_model(&cfg, &dev)?;
        let me = Self::build(cfg, vlm, st.order, st.step, Some(opt))?;
        // The trained tensors only (the connector's, the adapter's), not
        // the whole saved model.
        let ckpt = checkpoint_dir(out);
        let w = ckpt.join("model.safetensors");
        let mut saved =
            clasp_vlm::checkpoint::load_prefixed(&w, &["multi_modal_projector."], &dev)?;
        let adapter = ckpt.join("adapter_model.safetensors");
        if me.cfg.stage == 2 {
            let a = candle_core::safetensors::load(&adapter, &dev).map_err(|e| Error::Weights {
                path: adapter.clone(),
                reason: e.to_string(),
            })?;
            saved.extend(a);
        }
        if me.branch.is_some() {
            let h = ckpt.join(HEADS);
            let a = candle_core::safetensors::load(&h, &dev).map_err(|e| Error::Weights {
                path: h.clone(),
                reason: e.to_string(),
            })?;
            saved.extend(a);
        }
        state::restore_vars(&me.vars, &saved, &ckpt, |n| {
            n.strip_prefix("multi_modal_projector.").unwrap_or(n)
        })?;
        Ok(me)
    }

    fn build(
        cfg: TrainConfig,
        mut vlm: Vlm,
        order: Order,
        step: usize,
        opt_state: Option<HashMap<String, Tensor>>,
    ) -> Result<Self> {
        let out = cfg.output_dir()?.to_path_buf();
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let (set, per_image) = order::training_pairs(&cfg)?;
        let mut vars: Vec<(String, Var)> = vlm
            .connector
            .vars()
            .iter()
            .map(|(n, v)| (format!("multi_modal_projector.{n}"), v.clone()))
            .collect();
        if cfg.stage == 2 {
            // The init model's adapter goes on training; else a fresh one.
            let lora = match vlm.llm.lora() {
                Some(l) => l,
                None => Lora::init(&cfg.lora(), vlm.llm.config(), cfg.seed, vlm.device())?,
            };
            let (lora, lora_vars) = lora.into_vars()?;
            vlm.llm.set_lora(Some(&lora))?;
            vars.extend(lora_vars);
        }
        // The language model stays frozen: with --packed-llm its projections
        // run on packed AVX-512 copies where the CPU has them (the step's
        // largest cost). Off by default: the default path's results are the
        // same on every CPU, which the fixtures made from them rely on.
        if cfg.packed_llm && vlm.device().is_cpu() {
            vlm.llm.pack_frozen_for_training()?;
        }
        let branch = Branch::from_config(&cfg, vlm.llm.config().hidden_size, vlm.device())?;
        if let Some(b) = &branch {
            // Heads trained by the init model's run go on from where they were
            // (e.g. a contrastively pre-aligned connector).
            if let Some(init) = &cfg.init {
                let h = Path::new(init).join(HEADS);
                if h.is_file() {
                    let saved = candle_core::safetensors::load(&h, vlm.device()).map_err(|e| {
                        Error::Weights {
                            path: h.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    b.load(&saved)?;
                }
            }
            vars.extend(b.vars());
        }
        let opt = GroupedAdamW::for_run(&vars, &cfg, opt_state.as_ref(), step)?;
        Ok(Self {
            cfg,
            out,
            vlm,
            opt,
            groups: Groups::new(&vars),
            vars,
            set,
            per_image,
            order,
            step,
            branch,
            dist: Arc::new(crate::dist::Single),
        })
    }

    /// Trains as one rank of `c` ([`crate::dist`]), on the language-model
    /// loss only: a contrastive branch would need its features gathered.
    pub fn with_collective(mut self, c: Arc<dyn Collective>) -> Result<Self> {
        if c.world() > 1 && self.branch.is_some() {
            return Err(Error::Report(
                "data-parallel vision-language training takes the language-model loss only; \
                 run a contrastive branch in one process"
                    .into(),
            ));
        }
        crate::dist::check_same_weights(c.as_ref(), &self.vars)?;
        self.dist = c;
        Ok(self)
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    pub fn model(&self) -> &Vlm {
        &self.vlm
    }

    /// One optimiser step on (image, caption) pairs and their prepared pixels.
    pub fn step(&mut self, batch: &[(usize, usize)], pixels: &[Vec<f32>]) -> Result<StepLog> {
        let t0 = Instant::now();
        let cfg = &self.cfg;
        let lr = optim::cosine_lr(self.step, cfg.lr, cfg.warmup_steps(), cfg.steps);
        self.opt.set_lr(lr);
        // A LLaVA-NeXT model's images come tiled (see `prepare`).
        let tiled = match self.vlm.anyres() {
            Some(_) => Some(
                pixels
                    .iter()
                    .map(|p| self.vlm.tiles_from_flat(p))
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => None,
        };
        let px = match &tiled {
            Some(_) => None,
            None => Some(self.vlm.pixel_batch(pixels)?),
        };
        let examples = batch
            .iter()
            .enumerate()
            .map(|(k, (_, c))| {
                Example::caption_sized(
                    &self.vlm,
                    cfg.lang,
                    &self.set.captions[*c],
                    cfg.max_answer_tokens,
                    tiled.as_ref().map(|t| t[k].image_size),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let p = self.step as f64 / cfg.steps.max(1) as f64;
        let (w_lm, w_c) = match &self.branch {
            Some(b) => b.weights(p),
            None => (1.0, 0.0),
        };
        let with_lm = self.branch.as_ref().is_none_or(|b| b.lm);
        let mut losses = std::collections::BTreeMap::new();
        let mut probe: Option<Tensor> = None;
        let (lm, contrastive) = {
            let _graph = clasp_core::model::grad_mode_guard(true);
            let (images, each) = match (&tiled, &px) {
                (Some(t), _) => {
                    let each = t
                        .iter()
                        .map(|p| self.vlm.anyres_features(p))
                        .collect::<Result<Vec<_>>>()?;
                    (None, each)
                }
                (None, Some(px)) => {
                    let images = self.vlm.image_features(px)?;
                    let each = (0..examples.len())
                        .map(|i| Ok(images.get(i)?))
                        .collect::<Result<Vec<_>>>()?;
                    (Some(images), each)
                }
                (None, None) => unreachable!("pixels are tiled or square"),
            };
            let lm = if with_lm {
                Some(answer_loss_each(&self.vlm, &examples, &each)?)
            } else {
                None
            };
            let contrastive = match &self.branch {
                Some(b) => {
                    // The caption without its end-of-turn token.
                    let captions: Vec<Vec<u32>> = examples
                        .iter()
                        .map(|e| e.answer[..e.answer.len() - 1].to_vec())
                        .collect();
                    let images = images.as_ref().ok_or_else(|| {
                        Error::Report(
                            "a contrastive objective needs fixed-size image tokens; an AnyRes \
                             model trains with the language-model loss"
                                .into(),
                        )
                    })?;
                    let fi = b.image_features(images)?;
                    let ft = b.text_features(&self.vlm, &captions, cfg.stage == 2)?;
                    let l = b.losses(&fi, &ft, p)?;
                    losses.extend(l.parts.iter().cloned());
                    if b.trades() {
                        losses.insert("lambda".into(), w_c);
                    }
                    probe = l.probe;
                    Some(l.contrastive)
                }
                None => None,
            };
            (lm, contrastive)
        };
        let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
        let lm_v = lm.as_ref().map(scalar).transpose()?;
        let c_v = contrastive.as_ref().map(scalar).transpose()?;
        if let Some(v) = lm_v {
            losses.insert("lm".into(), v);
        }
        let lv = w_lm * lm_v.unwrap_or(0.0) + w_c * c_v.unwrap_or(0.0);
        if !lv.is_finite() {
            return Err(Error::Report(format!(
                "step {}: the loss is {lv}",
                self.step + 1
            )));
        }
        let Groups {
            proj,
            llm,
            connector,
        } = &self.groups;
        // The two losses are differentiated apart and their gradients mixed
        // with the step's weights: the conflict probe reads both for free.
        let mut grad_conflict = None;
        let mut grads = match (&lm, &contrastive) {
            (Some(l), None) => l.backward()?,
            (None, Some(c)) => (c * w_c)?.backward()?,
            (Some(l), Some(c)) => {
                let mut g = l.backward()?;
                let gc = c.backward()?;
                if cfg.conflict_every > 0 && self.step.is_multiple_of(cfg.conflict_every) {
                    grad_conflict = Some(match &probe {
                        Some(u) => optim::grad_cosine(connector, &g, &u.backward()?)?,
                        None => optim::grad_cosine(connector, &g, &gc)?,
                    });
                }
                mix_grads(&self.vars, &mut g, w_lm, &gc, w_c)?;
                g
            }
            (None, None) => unreachable!("a run has the LM loss or a contrastive branch"),
        };
        // Data parallel: the mean over the global batch's answer tokens,
        // before any clipping, which sees the global gradient.
        let comm0 = self.dist.comm_seconds();
        let tokens = examples.iter().map(|e| e.answer.len()).sum();
        let lv = crate::dist::token_mean(self.dist.as_ref(), &self.vars, &mut grads, tokens, lv)?;
        let comm_s = (self.dist.world() > 1).then(|| self.dist.comm_seconds() - comm0);
        // Per-module clipping (BCIF's: the projector side, the language
        // model's adapter; the vision tower is frozen), then the global clip.
        let mut norms = vec![(
            "projector".to_string(),
            optim::clip_grad_norm(proj, &mut grads, cfg.grad_clip_proj)?,
        )];
        if !llm.is_empty() {
            norms.push((
                "llm".to_string(),
                optim::clip_grad_norm(llm, &mut grads, cfg.grad_clip_adapter)?,
            ));
        }
        optim::clip_grad_norm(&self.vars, &mut grads, cfg.grad_clip)?;
        self.opt.step(&grads)?;
        self.step += 1;
        Ok(StepLog {
            step: self.step,
            loss: lv,
            lr,
            temperature: f64::NAN,
            images_per_s: batch.len() as f64 / t0.elapsed().as_secs_f64(),
            group_grad_norms: Some(norms.into_iter().collect()),
            grad_conflict,
            losses: (!losses.is_empty() && self.branch.is_some()).then_some(losses),
            skipped: Vec::new(),
            dev: None,
            comm_s,
            data_wait_s: None,
        })
    }

    fn save_at(&self, order: &Order) -> Result<()> {
        self.vlm.save_with(&checkpoint_dir(&self.out), |dir| {
            let Some(b) = &self.branch else {
                return Ok(());
            };
            // Training-only tensors, beside the model (transformers ignores
            // the file).
            let t: HashMap<String, Tensor> = b
                .vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect();
            let p = dir.join(HEADS);
            candle_core::safetensors::save(&t, &p).map_err(|e| Error::Weights {
                path: p.clone(),
                reason: e.to_string(),
            })
        })?;
        let st = State {
            step: self.step,
            order: order.clone(),
            config: self.cfg.clone(),
        };
        state::write(&self.out, &self.opt.state().into_iter().collect(), &st)
    }

    /// Runs to the end of the schedule (or `stop_after` steps, or Ctrl-C),
    /// through the loop every task shares ([`super::run::run`]).
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        stop_after: Option<usize>,
        hooks: &Hooks,
    ) -> Result<TrainOutcome> {
        super::run::run(self, stop, stop_after, hooks)
    }
}

impl Task for VlmTrainer {
    crate::task_fields!();
    fn images(&self) -> &[crate::data::ImageSource] {
        &self.set.images
    }
    /// Each rank's share of global batches of world × batch size.
    fn draw(&self, order: &mut Order, n: usize) -> Vec<Vec<(usize, usize)>> {
        let global = self.cfg.batch_size * self.dist.world();
        (0..n)
            .map(|_| {
                crate::dist::share(
                    self.dist.as_ref(),
                    &order.next_batch(&self.per_image, global),
                )
            })
            .collect()
    }
    fn group(&self) -> &dyn crate::dist::Collective {
        self.dist.as_ref()
    }
    fn prepare(&self, _start: usize) -> Prepare {
        let (proc, images) = (self.vlm.image_processor().clone(), self.set.images.clone());
        // A LLaVA-NeXT model's images are tiled on the loader's thread and
        // handed over flat (`Vlm::tiles_to_flat`).
        let tiler = self.vlm.tiler().ok();
        Box::new(move |_, _, pair: &(usize, usize)| {
            let src = &images[pair.0];
            let img = decode_image(&src.read()?, &src.path())?;
            match &tiler {
                Some(t) => Ok(Vlm::tiles_to_flat(&t.tile(&img)?)),
                None => proc.process(&img),
            }
        })
    }
    /// The language-model loss learns from a single image.
    fn min_batch(&self) -> usize {
        1
    }
    fn step(&mut self, batch: &[(usize, usize)], pixels: &[Vec<f32>]) -> Result<StepLog> {
        VlmTrainer::step(self, batch, pixels)
    }
    fn save_at(&self, order: &Order) -> Result<()> {
        VlmTrainer::save_at(self, order)
    }
}
