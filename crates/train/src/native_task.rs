//! `clasp train --task native`: a native model (one decoder over text and
//! image tokens, `clasp assemble --native`) trained in both directions
//! through the one training loop ([`crate::run`]).
//!
//! - **Examples.** Each (photo, caption) pair of a batch becomes a
//!   *caption* example (the chat template's user turn `<image>` +
//!   "Describe the image." with the photo's codes, the caption and the
//!   end-of-turn token as the answer, as `clasp caption` asks) or, with
//!   probability `draw_ratio` (drawn per step and position from the seed), a
//!   *drawing* example (bos, the caption, the image's start and size prefix,
//!   as `clasp draw` asks; its rows of codes with their end-of-row tokens,
//!   the end of the image and the end of the sequence as the answer). The
//!   loss is the mean cross-entropy over the answers' tokens only.
//! - **The photos' codes** come from the model's own VQ tokenizer (frozen),
//!   after its processor's resize: each photo is tokenized once and kept.
//! - **What learns**: a LoRA adapter on the decoder (`lora_*` keys), and the
//!   rows of the embedding and of the output head that the image tokens
//!   added (`NativeModel::image_rows_from` on): those start near the
//!   average token (`clasp assemble --native`) and must become the codes'
//!   own. The original rows stay frozen.
//! - **Saving.** The checkpoint is the whole model as an
//!   `Emu3ForConditionalGeneration` folder with the adapter merged and the
//!   trained rows in place, which `clasp caption/chat/draw` and transformers
//!   load; the state keeps the adapter and the rows themselves, so a resumed
//!   run continues bit-identically from the model it started from.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::hooks::StepLog;
use super::optim::{self, GroupedAdamW};
use super::order::{self, Order};
use super::run::{Prepare, Task};
use super::state::{self, checkpoint_dir, State};
use crate::data::{ImageSource, Lang, PairSet};
use crate::llm::lora::Lora;
use crate::preprocess::image::{decode_image, ImageProcessor};
use crate::{Error, Result};
use clasp_common::rng::Rng;
use clasp_vlm::model::{DESCRIBE_EN, DESCRIBE_ZH};
use clasp_vlm::native::NativeModel;

/// A native run's keys (flat in the config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NativeParams {
    /// The share of examples that draw (caption → image tokens); the rest
    /// caption (image tokens → caption).
    pub draw_ratio: f64,
}

impl Default for NativeParams {
    fn default() -> Self {
        Self { draw_ratio: 0.5 }
    }
}

/// The keys a native run alone reads.
pub const NATIVE_KEYS: &[&str] = &["draw_ratio"];

/// The state's names of the trained embedding and head rows.
const EMBED_ROWS: &str = "clasp.native.embed_rows";
const HEAD_ROWS: &str = "clasp.native.head_rows";
/// The state's prefix for the trained variables.
const PARAM: &str = "clasp.param.";

impl NativeParams {
    pub fn check(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.draw_ratio) {
            return Err(Error::Report(format!(
                "draw_ratio: {} is not a share in [0, 1]",
                self.draw_ratio
            )));
        }
        Ok(())
    }
}

/// One training sequence: the prompt and the answer the loss counts.
struct Example {
    prompt: Vec<u32>,
    answer: Vec<u32>,
    draws: bool,
}

/// A native run in progress.
pub struct NativeTrainer {
    cfg: TrainConfig,
    out: PathBuf,
    model: NativeModel,
    /// The first row the image tokens added (the rows trained).
    rows_from: usize,
    /// The trained rows of the embedding and of the head (also in `vars`).
    embed_rows: Var,
    head_rows: Var,
    opt: GroupedAdamW,
    vars: Vec<(String, Var)>,
    set: PairSet,
    per_image: Vec<Vec<usize>>,
    /// Each photo's codes, once tokenized; shared with the image worker,
    /// which skips photos already tokenized.
    codes: Arc<Mutex<HashMap<usize, Vec<Vec<u32>>>>>,
    user: String,
    order: Order,
    step: usize,
}

impl NativeTrainer {
    /// A new run from `init`, a native model folder.
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.check()?;
        let out = cfg.output_dir()?.to_path_buf();
        state::check_fresh_output(&out)?;
        let order = Order::new(cfg.seed);
        Self::build(cfg, order, 0, None)
    }

    /// Continues the run saved in `out`: the model it started from, with
    /// the adapter and rows of its state.
    pub fn resume(out: &Path) -> Result<Self> {
        let (st, _, mut saved) = state::read_resume(out)?;
        let params: HashMap<String, Tensor> = saved
            .keys()
            .filter_map(|k| k.strip_prefix(PARAM).map(|n| (k.clone(), n.to_string())))
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|(k, n)| saved.remove(&k).map(|t| (n, t)))
            .collect();
        let me = Self::build(st.config, st.order, st.step, Some(saved))?;
        state::restore_vars(&me.vars, &params, &state::state_dir(out), |n| n)?;
        Ok(me)
    }

    fn build(
        cfg: TrainConfig,
        order: Order,
        step: usize,
        opt_state: Option<HashMap<String, Tensor>>,
    ) -> Result<Self> {
        let dev = cfg.device.open()?;
        let out = cfg.output_dir()?.to_path_buf();
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let init = cfg.init.as_deref().ok_or_else(|| {
            Error::Report(
                "init: a native run starts from a native model folder (`clasp assemble --native`)"
                    .into(),
            )
        })?;
        let mut model = NativeModel::load(Path::new(init), &dev)?;
        let rows_from = model.image_rows_from();
        let lora = Lora::init(&cfg.lora(), model.llm.config(), cfg.seed, &dev)?;
        let (lora, mut vars) = lora.into_vars()?;
        model.llm.set_lora(Some(&lora))?;
        let tail = |name: &str| -> Result<Var> {
            let t = model
                .checkpoint_tensors()?
                .remove(name)
                .ok_or_else(|| Error::Report(format!("{init}: the model has no {name}")))?;
            let n = t.dim(0)?;
            Ok(Var::from_tensor(&t.narrow(0, rows_from, n - rows_from)?)?)
        };
        let embed_rows = tail("model.text_model.embed_tokens.weight")?;
        let head_rows = tail("lm_head.weight")?;
        vars.push((EMBED_ROWS.into(), embed_rows.clone()));
        vars.push((HEAD_ROWS.into(), head_rows.clone()));
        if cfg.packed_llm && dev.is_cpu() {
            model.llm.pack_frozen_for_training()?;
        }
        let opt = GroupedAdamW::for_run(&vars, &cfg, opt_state.as_ref(), step)?;
        let (set, per_image) = order::training_pairs(&cfg)?;
        let user = clasp_vlm::Vlm::caption_turn(match cfg.lang {
            Lang::En => DESCRIBE_EN,
            Lang::Zh => DESCRIBE_ZH,
        });
        Ok(Self {
            cfg,
            out,
            model,
            rows_from,
            embed_rows,
            head_rows,
            opt,
            vars,
            set,
            per_image,
            codes: Arc::default(),
            user,
            order,
            step,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// Whether the example at `position` of the batch after `step` draws.
    fn draws(&self, position: usize) -> bool {
        let mut rng =
            Rng(self.cfg.seed ^ 0xD2A3_0000 ^ ((self.step as u64) << 20) ^ position as u64);
        rng.next_u64();
        (rng.uniform() as f64) < self.cfg.native.draw_ratio
    }

    fn example(&self, caption: &str, codes: &[Vec<u32>], draws: bool) -> Result<Example> {
        let m = &self.model;
        if draws {
            let (h, w) = (codes.len(), codes.first().map_or(0, Vec::len));
            return Ok(Example {
                prompt: m.draw_prompt_ids(caption.trim(), h, w)?,
                answer: m.draw_answer_ids(codes),
                draws,
            });
        }
        let mut answer = m.tokenizer.encode(caption.trim(), false)?;
        answer.truncate(self.cfg.max_answer_tokens);
        answer.extend(m.tokenizer.eos_id());
        Ok(Example {
            prompt: m.caption_prompt_ids(&self.user, codes)?,
            answer,
            draws,
        })
    }

    /// Input embeddings of `ids`: the frozen rows, with the trained rows
    /// in place for the image tokens.
    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let dev = self.model.llm.device();
        let from = self.rows_from as u32;
        let x = Tensor::new(ids, dev)?.unsqueeze(0)?;
        let base = self.model.llm.embed(&x)?.squeeze(0)?.detach();
        if ids.iter().all(|&i| i < from) {
            return Ok(base);
        }
        let keep: Vec<f32> = ids.iter().map(|&i| f32::from(u8::from(i < from))).collect();
        let rows: Vec<u32> = ids.iter().map(|&i| i.saturating_sub(from)).collect();
        let keep = Tensor::from_vec(keep, (ids.len(), 1), dev)?;
        let new = self
            .embed_rows
            .as_tensor()
            .index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
        Ok((base.broadcast_mul(&keep)? + new.broadcast_mul(&(1.0 - &keep)?)?)?)
    }

    /// Per-token negative log-likelihood `[n]` of every answer token.
    fn answer_nll(&self, examples: &[Example]) -> Result<Tensor> {
        let llm = &self.model.llm;
        let dev = llm.device();
        let hidden = llm.config().hidden_size;
        let seqs: Vec<Vec<u32>> = examples
            .iter()
            .map(|e| [e.prompt.as_slice(), e.answer.as_slice()].concat())
            .collect();
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let (mut rows, mut idx, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (e, ids)) in examples.iter().zip(&seqs).enumerate() {
            let mut x = self.embed(ids)?;
            // Right padding: causal attention keeps real positions blind to it.
            if ids.len() < t {
                let pad = Tensor::zeros((t - ids.len(), hidden), DType::F32, dev)?;
                x = Tensor::cat(&[x, pad], 0)?;
            }
            rows.push(x);
            for p in e.prompt.len() - 1..ids.len() - 1 {
                idx.push((i * t + p) as u32);
                targets.push(ids[p + 1]);
            }
        }
        let h = llm.forward_train(&Tensor::stack(&rows, 0)?)?;
        let picked = h
            .reshape((examples.len() * t, hidden))?
            .index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?;
        let old = llm.logits_train(&picked)?.narrow(1, 0, self.rows_from)?;
        let new = picked.matmul(&self.head_rows.as_tensor().t()?)?;
        let logits = Tensor::cat(&[old, new], 1)?;
        let lsm = candle_nn::ops::log_softmax(&logits, 1)?;
        let targets = Tensor::new(targets.as_slice(), dev)?.unsqueeze(1)?;
        Ok(lsm.gather(&targets, 1)?.squeeze(1)?.neg()?)
    }

    /// One optimiser step on a batch of (photo, caption) pairs; `prepared`
    /// holds each photo's processed pixels as `[height, width, pixels...]`
    /// (empty for a photo already tokenized).
    pub fn step(&mut self, batch: &[(usize, usize)], prepared: &[Vec<f32>]) -> Result<StepLog> {
        let t0 = Instant::now();
        let cfg = &self.cfg;
        let lr = optim::cosine_lr(self.step, cfg.lr, cfg.warmup_steps(), cfg.steps);
        self.opt.set_lr(lr);
        let mut examples = Vec::with_capacity(batch.len());
        for (k, (&(img, cap), px)) in batch.iter().zip(prepared).enumerate() {
            let known = self.lock_codes()?.get(&img).cloned();
            let codes = match known {
                Some(c) => c,
                None => {
                    let (Some(&h), Some(&w)) = (px.first(), px.get(1)) else {
                        return Err(Error::Report(format!(
                            "step {}: image {img} was neither tokenized nor prepared",
                            self.step + 1
                        )));
                    };
                    let c = self.model.pixel_codes(&px[2..], h as usize, w as usize)?;
                    self.lock_codes()?.insert(img, c.clone());
                    c
                }
            };
            examples.push(self.example(&self.set.captions[cap], &codes, self.draws(k))?);
        }
        let nll = {
            let _graph = clasp_core::model::grad_mode_guard(true);
            self.answer_nll(&examples)?
        };
        let total = nll.mean_all()?;
        let lv = optim::backward_step(
            &total,
            self.step + 1,
            &self.vars,
            &mut self.opt,
            self.cfg.grad_clip,
        )?;
        self.step += 1;
        // Each direction's mean over its own answer tokens.
        let per: Vec<f32> = nll.detach().to_vec1()?;
        let mut sums = BTreeMap::new();
        let mut at = 0;
        for e in &examples {
            let n = e.answer.len();
            let key = if e.draws { "draw" } else { "caption" };
            let s = sums.entry(key).or_insert((0f64, 0usize));
            s.0 += per[at..at + n].iter().map(|&v| v as f64).sum::<f64>();
            s.1 += n;
            at += n;
        }
        let losses = sums
            .into_iter()
            .map(|(k, (s, n))| (k.to_string(), s / n as f64))
            .collect();
        Ok(StepLog {
            step: self.step,
            loss: lv,
            lr,
            temperature: f64::NAN,
            images_per_s: batch.len() as f64 / t0.elapsed().as_secs_f64(),
            group_grad_norms: None,
            grad_conflict: None,
            losses: Some(losses),
            skipped: Vec::new(),
            dev: None,
            comm_s: None,
            data_wait_s: None,
        })
    }

    fn lock_codes(&self) -> Result<std::sync::MutexGuard<'_, HashMap<usize, Vec<Vec<u32>>>>> {
        self.codes
            .lock()
            .map_err(|_| Error::Report("the codes' lock is poisoned".into()))
    }

    /// The decoder as the checkpoint holds it: the adapter merged, the
    /// trained rows in place.
    pub fn trained_llm(&self) -> Result<crate::llm::Llama> {
        let mut lm = self.model.llm.clone();
        lm.merge_lora()?;
        let mut t: HashMap<String, Tensor> = lm.hf_tensors()?.into_iter().collect();
        for (name, rows) in [
            ("model.embed_tokens.weight", &self.embed_rows),
            ("lm_head.weight", &self.head_rows),
        ] {
            let old = t
                .remove(name)
                .ok_or_else(|| Error::Report(format!("the decoder has no {name}")))?;
            let kept = old.narrow(0, 0, self.rows_from)?;
            t.insert(name.into(), Tensor::cat(&[&kept, rows.as_tensor()], 0)?);
        }
        let vb = candle_nn::VarBuilder::from_tensors(t, DType::F32, lm.device());
        crate::llm::Llama::from_hf(vb, lm.config().clone())
    }

    fn save_at(&self, order: &Order) -> Result<()> {
        self.model
            .save_with(&self.trained_llm()?, &checkpoint_dir(&self.out))?;
        let st = State {
            step: self.step,
            order: order.clone(),
            config: self.cfg.clone(),
        };
        let mut tensors: HashMap<String, Tensor> = self.opt.state().into_iter().collect();
        for (name, v) in &self.vars {
            tensors.insert(format!("{PARAM}{name}"), v.as_tensor().clone());
        }
        state::write(&self.out, &tensors, &st)
    }
}

impl Task for NativeTrainer {
    crate::task_fields!(pairs);
    fn prepare(&self, _start: usize) -> Prepare {
        let (proc, images) = (self.model.processor.clone(), self.set.images.clone());
        let codes = self.codes.clone();
        Box::new(move |_, _, pair: &(usize, usize)| {
            if codes.lock().is_ok_and(|c| c.contains_key(&pair.0)) {
                return Ok(Vec::new());
            }
            prepare_pixels(&proc, &images[pair.0])
        })
    }
    fn min_batch(&self) -> usize {
        1
    }
    fn step(&mut self, batch: &[(usize, usize)], pixels: &[Vec<f32>]) -> Result<StepLog> {
        NativeTrainer::step(self, batch, pixels)
    }
    fn save_at(&self, order: &Order) -> Result<()> {
        NativeTrainer::save_at(self, order)
    }
}

/// A photo processed for the tokenizer as `[height, width, pixels...]`
/// (the processor's resize keeps the aspect, so the size travels along).
fn prepare_pixels(proc: &ImageProcessor, src: &ImageSource) -> Result<Vec<f32>> {
    let img = decode_image(&src.read()?, &src.path())?;
    let px = proc.process_pixels(&img)?;
    let mut out = Vec::with_capacity(px.data.len() + 2);
    out.extend([px.height as f32, px.width as f32]);
    out.extend(px.data);
    Ok(out)
}
