//! `clasp train --task dpo|reward`: a LoRA adapter on a language model
//! trained on preference pairs, through the one training loop
//! ([`crate::run`]): with [`crate::dpo`]'s losses, or as a reward model
//! ([`crate::reward`]: a scalar head too, the Bradley–Terry loss). The model is a vision-language checkpoint
//! (`init`: each pair's image enters policy and reference alike) or a
//! language model alone (`llm`). The reference is the model as it started:
//! with its adapter disabled when the adapter is new, or with the adapter it
//! came with (a stage-2 checkpoint's), kept frozen, as TRL does with PEFT.
//!
//! Saves the vision-language model in the Llava layout with its adapter (a
//! reward model's head beside it, `score.safetensors`), or the language
//! model's adapter in PEFT's layout (`LlamaForCausalLM`, or a `SEQ_CLS`
//! adapter with the head for a reward model); the batch's statistics go to
//! metrics.jsonl under `losses`, named as TRL logs them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};

use super::config::{Task as RunTask, TrainConfig};
use super::dpo::{completion_logps, PairLogps};
use super::hooks::StepLog;
use super::optim::{self, GroupedAdamW};
use super::order::{self, Order};
use super::prefs::{load_prefs, tokenize_pair, PairIds, PrefPair};
use super::reward::{self, bradley_terry, sequence_rewards, SCORE_KEY};
use super::run::{Prepare, Task};
use super::state::{self, checkpoint_dir, State};
use crate::data::ImageSource;
use crate::llm::lora::{Lora, PeftBase};
use crate::llm::{LanguageModel, Llama, LlmTokenizer, Precision};
use crate::{Error, Result};
use clasp_vlm::reward::SCORE_FILE;
use clasp_vlm::Vlm;

/// The model whose language model is aligned.
enum Policy {
    Vlm(Box<Vlm>),
    Llm(Box<LanguageModel>),
}

impl Policy {
    fn llm(&self) -> &Llama {
        match self {
            Policy::Vlm(v) => &v.llm,
            Policy::Llm(l) => &l.model,
        }
    }
    fn llm_mut(&mut self) -> &mut Llama {
        match self {
            Policy::Vlm(v) => &mut v.llm,
            Policy::Llm(l) => &mut l.model,
        }
    }
    fn tokenizer(&self) -> &LlmTokenizer {
        match self {
            Policy::Vlm(v) => &v.tokenizer,
            Policy::Llm(l) => &l.tokenizer,
        }
    }
}

fn load_policy(cfg: &TrainConfig, dev: &Device) -> Result<Policy> {
    match (&cfg.init, &cfg.llm) {
        (Some(init), None) => Ok(Policy::Vlm(Box::new(Vlm::load(Path::new(init), dev)?))),
        (None, Some(llm)) => Ok(Policy::Llm(Box::new(LanguageModel::load(
            llm,
            Precision::F32,
            dev,
        )?))),
        _ => Err(Error::Report(
            "a preference run starts from --init VLM_CHECKPOINT or --llm MODEL".into(),
        )),
    }
}

/// A preference run in progress.
pub struct PreferenceTrainer {
    cfg: TrainConfig,
    out: PathBuf,
    policy: Policy,
    /// The adapter being trained (its tensors are `vars`').
    adapter: Lora,
    /// The reference's adapter: none when the adapter is new.
    reference: Option<Lora>,
    /// A reward model's score head `[1, hidden]` (also in `vars`).
    head: Option<Var>,
    opt: GroupedAdamW,
    vars: Vec<(String, Var)>,
    ids: Vec<PairIds>,
    images: Vec<ImageSource>,
    /// Each pair's line in the preference file, for errors.
    lines: Vec<String>,
    per_pair: Vec<Vec<usize>>,
    order: Order,
    step: usize,
}

/// The pairs the model can train on, tokenized (a vision-language prompt's
/// image expanded); the rest are reported by line and left out.
fn prepare_pairs(
    policy: &Policy,
    pairs: Vec<PrefPair>,
    file: &Path,
) -> (Vec<PairIds>, Vec<ImageSource>, Vec<String>) {
    let (mut ids, mut images, mut lines) = (Vec::new(), Vec::new(), Vec::new());
    for p in pairs {
        let want = usize::from(matches!(policy, Policy::Vlm(_)));
        let made = if p.images.len() != want {
            Err(Error::Report(format!(
                "{} image(s) for a {} model (one for a vision-language model, none for a language model)",
                p.images.len(),
                if want == 1 { "vision-language" } else { "language" }
            )))
        } else {
            tokenize_pair(policy.tokenizer(), &p).and_then(|mut t| {
                if let Policy::Vlm(v) = policy {
                    let marks = t
                        .prompt
                        .iter()
                        .filter(|&&i| i == v.cfg.image_token_index)
                        .count();
                    if marks != 1 {
                        return Err(Error::Report(format!(
                            "the prompt has {marks} <image> placeholders for 1 image"
                        )));
                    }
                    t.prompt = v.expand_images(&t.prompt);
                }
                Ok(t)
            })
        };
        match made {
            Ok(t) => {
                ids.push(t);
                lines.push(format!("{}:{}", file.display(), p.line));
                if let Some(img) = p.images.first() {
                    images.push(ImageSource::File(img.clone()));
                }
            }
            Err(e) => tracing::warn!("{}:{}: left out: {e}", file.display(), p.line),
        }
    }
    (ids, images, lines)
}

impl PreferenceTrainer {
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.check()?;
        let out = cfg.output_dir()?.to_path_buf();
        state::check_fresh_output(&out)?;
        let dev = cfg.device.open()?;
        let policy = load_policy(&cfg, &dev)?;
        let order = Order::new(cfg.seed);
        Self::build(cfg, policy, order, 0, None)
    }

    /// Continues the run in `out`: the model rebuilt from its sources, the
    /// adapter set from the saved checkpoint.
    pub fn resume(out: &Path) -> Result<Self> {
        let (st, dev, opt) = state::read_resume(out)?;
        let policy = load_policy(&st.config, &dev)?;
        let me = Self::build(st.config, policy, st.order, st.step, Some(opt))?;
        let ckpt = checkpoint_dir(out);
        let mut saved: HashMap<String, Tensor> =
            Lora::load_peft(&ckpt, me.policy.llm().config(), &dev)?
                .peft_tensors()
                .into_iter()
                .collect();
        if me.head.is_some() {
            let hidden = me.policy.llm().config().hidden_size;
            let h = reward::load_head_file(
                &head_file(&ckpt, matches!(me.policy, Policy::Vlm(_))),
                hidden,
                &dev,
            )?;
            saved.insert(SCORE_KEY.into(), h);
        }
        state::restore_vars(&me.vars, &saved, &ckpt, |n| n)?;
        Ok(me)
    }

    fn build(
        cfg: TrainConfig,
        mut policy: Policy,
        order: Order,
        step: usize,
        opt_state: Option<HashMap<String, Tensor>>,
    ) -> Result<Self> {
        let out = cfg.output_dir()?.to_path_buf();
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let file = cfg
            .preference
            .prefs
            .clone()
            .expect("checked: a preference run has prefs");
        let set = load_prefs(&file)?;
        for issue in &set.issues {
            tracing::warn!("{issue}: left out");
        }
        let (ids, images, lines) = prepare_pairs(&policy, set.pairs, &file);
        if ids.len() < cfg.batch_size {
            return Err(Error::Dataset(format!(
                "{}: {} usable preference pairs, fewer than one batch of {}",
                file.display(),
                ids.len(),
                cfg.batch_size
            )));
        }
        let llm = policy.llm_mut();
        // A model that came with an adapter goes on training it, against
        // itself as it came; else a fresh adapter against the bare model.
        let (start, reference) = match llm.lora() {
            Some(l) => (l.clone(), Some(l)),
            None => (
                Lora::init(&cfg.lora(), llm.config(), cfg.seed, llm.device())?,
                None,
            ),
        };
        let (adapter, mut vars) = start.into_vars()?;
        llm.set_lora(Some(&adapter))?;
        // transformers draws a new score head N(0, 0.02²); this one is
        // uniform with that spread, from the run's seed.
        let head = if cfg.task() == RunTask::Reward {
            let h = llm.config().hidden_size;
            let w = crate::rng::Rng(cfg.seed ^ 0x0005_C04E).symmetric(h, 0.02 * 3f64.sqrt());
            let v = Var::from_tensor(&Tensor::from_vec(w, (1, h), llm.device())?)?;
            vars.push((SCORE_KEY.to_string(), v.clone()));
            Some(v)
        } else {
            None
        };
        if cfg.packed_llm && llm.device().is_cpu() {
            llm.pack_frozen_for_training()?;
        }
        let opt = GroupedAdamW::for_run(&vars, &cfg, opt_state.as_ref(), step)?;
        let per_pair = (0..ids.len()).map(|i| vec![i]).collect();
        Ok(Self {
            cfg,
            out,
            policy,
            adapter,
            reference,
            head,
            opt,
            vars,
            ids,
            images,
            lines,
            per_pair,
            order,
            step,
        })
    }

    /// The summed log-probabilities of the batch's chosen and rejected
    /// completions under the adapter the model holds now.
    fn logps(&self, prefixes: &[Tensor], batch: &[usize]) -> Result<PairLogps> {
        let n = batch.len();
        let both: Vec<Tensor> = prefixes.iter().chain(prefixes).cloned().collect();
        let comps: Vec<&[u32]> = batch
            .iter()
            .map(|&i| self.ids[i].chosen.as_slice())
            .chain(batch.iter().map(|&i| self.ids[i].rejected.as_slice()))
            .collect();
        let lp = completion_logps(self.policy.llm(), &both, &comps)?;
        Ok(PairLogps {
            chosen: lp.narrow(0, 0, n)?,
            rejected: lp.narrow(0, n, n)?,
            chosen_len: batch.iter().map(|&i| self.ids[i].chosen.len()).collect(),
            rejected_len: batch.iter().map(|&i| self.ids[i].rejected.len()).collect(),
        })
    }

    /// One optimiser step on a batch of pairs (and their images' pixels).
    pub fn step(&mut self, batch: &[(usize, usize)], pixels: &[Vec<f32>]) -> Result<StepLog> {
        let t0 = Instant::now();
        let lr = optim::cosine_lr(
            self.step,
            self.cfg.lr,
            self.cfg.warmup_steps(),
            self.cfg.steps,
        );
        self.opt.set_lr(lr);
        let pairs: Vec<usize> = batch.iter().map(|&(i, _)| i).collect();
        // The prompts' input embeddings: frozen, images spliced in.
        let prefixes: Vec<Tensor> = match &self.policy {
            Policy::Vlm(v) => {
                let feats = v.image_features(&v.pixel_batch(pixels)?)?.detach();
                pairs
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| {
                        Ok(
                            v.input_embeds(&self.ids[i].prompt, &feats.narrow(0, k, 1)?)?
                                .detach(),
                        )
                    })
                    .collect::<Result<_>>()?
            }
            Policy::Llm(l) => pairs
                .iter()
                .map(|&i| {
                    let t = Tensor::new(self.ids[i].prompt.as_slice(), l.model.device())?
                        .unsqueeze(0)?;
                    Ok(l.model.embed(&t)?.squeeze(0)?)
                })
                .collect::<Result<_>>()?,
        };
        if let Some(head) = &self.head {
            return self.reward_step(&prefixes, &pairs, &head.as_tensor().clone(), lr, t0);
        }
        self.policy.llm_mut().set_lora(self.reference.as_ref())?;
        let reference = self.logps(&prefixes, &pairs);
        self.policy.llm_mut().set_lora(Some(&self.adapter))?;
        let reference = reference?;
        let reference = PairLogps {
            chosen: reference.chosen.detach(),
            rejected: reference.rejected.detach(),
            ..reference
        };
        let policy = self.logps(&prefixes, &pairs)?;
        let (loss, stats) = self.cfg.preference.loss().loss(&policy, &reference)?;
        self.apply(&loss)?;
        let stats = [
            ("rewards/chosen", stats.rewards_chosen),
            ("rewards/rejected", stats.rewards_rejected),
            ("rewards/accuracies", stats.rewards_accuracy),
            ("rewards/margins", stats.rewards_margin),
            ("logps/chosen", stats.logps_chosen),
            ("logps/rejected", stats.logps_rejected),
        ];
        Ok(self.log(loss.to_scalar::<f32>()? as f64, &stats, lr, batch.len(), t0))
    }

    /// One Bradley–Terry step of a reward model on whole conversations.
    fn reward_step(
        &mut self,
        prefixes: &[Tensor],
        pairs: &[usize],
        head: &Tensor,
        lr: f64,
        t0: Instant,
    ) -> Result<StepLog> {
        let llm = self.policy.llm();
        let whole = |k: usize, c: &[u32]| -> Result<Tensor> {
            let ids = Tensor::new(c, llm.device())?.unsqueeze(0)?;
            Ok(Tensor::cat(
                &[prefixes[k].clone(), llm.embed(&ids)?.squeeze(0)?],
                0,
            )?)
        };
        let mut seqs = Vec::with_capacity(2 * pairs.len());
        for (k, &i) in pairs.iter().enumerate() {
            seqs.push(whole(k, &self.ids[i].chosen)?);
        }
        for (k, &i) in pairs.iter().enumerate() {
            seqs.push(whole(k, &self.ids[i].rejected)?);
        }
        let r = sequence_rewards(llm, &seqs, head)?;
        let n = pairs.len();
        let (loss, s) = bradley_terry(&r.narrow(0, 0, n)?, &r.narrow(0, n, n)?)?;
        self.apply(&loss)?;
        let stats = [
            ("accuracy", s.accuracy),
            ("margin", s.margin),
            ("min_reward", s.min_reward),
            ("mean_reward", s.mean_reward),
            ("max_reward", s.max_reward),
        ];
        Ok(self.log(s.loss as f64, &stats, lr, n, t0))
    }

    /// Backpropagates `loss`, clips (the adapter's norm, then the global
    /// one) and steps the optimiser.
    fn apply(&mut self, loss: &Tensor) -> Result<()> {
        let mut grads = loss.backward()?;
        optim::clip_grad_norm(&self.vars, &mut grads, self.cfg.grad_clip_adapter)?;
        optim::clip_grad_norm(&self.vars, &mut grads, self.cfg.grad_clip)?;
        self.opt.step(&grads)?;
        self.step += 1;
        Ok(())
    }

    fn log(&self, loss: f64, stats: &[(&str, f32)], lr: f64, n: usize, t0: Instant) -> StepLog {
        StepLog {
            step: self.step,
            loss,
            lr,
            temperature: f64::NAN,
            images_per_s: n as f64 / t0.elapsed().as_secs_f64(),
            group_grad_norms: None,
            grad_conflict: None,
            losses: Some(
                stats
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v as f64))
                    .collect::<BTreeMap<_, _>>(),
            ),
            skipped: Vec::new(),
            dev: None,
            comm_s: None,
            data_wait_s: None,
        }
    }

    fn save_at(&self, order: &Order) -> Result<()> {
        let ckpt = checkpoint_dir(&self.out);
        let head = self.head.as_ref().map(|h| h.as_tensor().clone());
        match &self.policy {
            Policy::Vlm(v) => v.save_with(&ckpt, |dir| match &head {
                Some(h) => save_tensors(&dir.join(SCORE_FILE), &[(SCORE_KEY, h)]),
                None => Ok(()),
            })?,
            Policy::Llm(l) => crate::atomic::write_dir(&ckpt, |tmp| {
                self.adapter
                    .save_peft_for(tmp, l.model.config(), PeftBase::CausalLm)?;
                let Some(h) = &head else { return Ok(()) };
                // PEFT's SEQ_CLS adapter: the head beside the LoRA tensors.
                let w = tmp.join("adapter_model.safetensors");
                let mut t =
                    candle_core::safetensors::load(&w, h.device()).map_err(|e| Error::Weights {
                        path: w.clone(),
                        reason: e.to_string(),
                    })?;
                t.insert(SCORE_KEY.into(), h.clone());
                let all: Vec<(&str, &Tensor)> = t.iter().map(|(k, v)| (k.as_str(), v)).collect();
                save_tensors(&w, &all)?;
                let mut cfg = self.adapter.peft_config_for(PeftBase::CausalLm);
                cfg["task_type"] = "SEQ_CLS".into();
                cfg["modules_to_save"] = serde_json::json!(["score"]);
                crate::atomic::write_json(&tmp.join("adapter_config.json"), &cfg)
            })?,
        }
        let st = State {
            step: self.step,
            order: order.clone(),
            config: self.cfg.clone(),
        };
        state::write(&self.out, &self.opt.state().into_iter().collect(), &st)
    }
}

/// Where a saved reward model's head is: in a language model's adapter
/// file, or in `score.safetensors` (the same name) beside a VLM.
pub fn head_file(ckpt: &Path, vlm: bool) -> PathBuf {
    ckpt.join(if vlm {
        SCORE_FILE
    } else {
        "adapter_model.safetensors"
    })
}

fn save_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).clone()))
        .collect();
    candle_core::safetensors::save(&map, path).map_err(|e| Error::Weights {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl Task for PreferenceTrainer {
    crate::task_fields!();
    fn images(&self) -> &[ImageSource] {
        &self.images
    }
    fn draw(&self, order: &mut Order, n: usize) -> Vec<Vec<(usize, usize)>> {
        (0..n)
            .map(|_| order.next_batch(&self.per_pair, self.cfg.batch_size))
            .collect()
    }
    fn prepare(&self, start: usize) -> Prepare {
        let Policy::Vlm(v) = &self.policy else {
            return Box::new(|_, _, _| Ok(Vec::new()));
        };
        let (proc, images, lines) = (
            v.image_processor().clone(),
            self.images.clone(),
            self.lines.clone(),
        );
        Box::new(move |n, k, pair: &(usize, usize)| {
            let plain = order::Augment {
                crop_scale: 1.0,
                jitter: None,
                seed: 0,
            };
            // A pair whose image cannot be read is skipped, named by its line.
            order::prepare_image(&proc, &images[pair.0], plain, start + n, k)
                .map_err(|e| Error::Report(format!("{}: {e}", lines[pair.0])))
        })
    }
    fn min_batch(&self) -> usize {
        1
    }
    fn step(&mut self, batch: &[(usize, usize)], pixels: &[Vec<f32>]) -> Result<StepLog> {
        PreferenceTrainer::step(self, batch, pixels)
    }
    fn save_at(&self, order: &Order) -> Result<()> {
        PreferenceTrainer::save_at(self, order)
    }
}
